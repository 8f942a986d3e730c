"""Connections and the pool; psycopg's errors become :class:`DatabaseError` here."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import psycopg
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from cityops.errors import DatabaseError

# Seconds to wait for a connection before reporting the database unreachable; long enough for a
# server under load, short enough that a CLI user hears about a wrong URL promptly.
CONNECT_TIMEOUT_S = 10

AsyncConn = psycopg.AsyncConnection[TupleRow]


def redact(url: str) -> str:
    """The URL without its password, for logs and messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparsable database URL>"
    host = info.get("host", "localhost")
    port = info.get("port", "5432")
    return f"postgresql://{info.get('user', '')}@{host}:{port}/{info.get('dbname', '')}"


async def connect(url: str, **kwargs: Any) -> AsyncConn:
    try:
        return await psycopg.AsyncConnection.connect(url, connect_timeout=CONNECT_TIMEOUT_S, **kwargs)
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot connect to {redact(url)}: {exc}") from exc


@asynccontextmanager
async def connection(url: str, **kwargs: Any) -> AsyncIterator[AsyncConn]:
    conn = await connect(url, **kwargs)
    try:
        yield conn
    finally:
        await conn.close()


@asynccontextmanager
async def open_pool(
    url: str, *, min_size: int = 1, max_size: int = 8, name: str = "cityops"
) -> AsyncIterator[AsyncConnectionPool[AsyncConn]]:
    """A pool that is open inside the block and closed (connections returned) after it."""
    pool: AsyncConnectionPool[AsyncConn] = AsyncConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        name=name,
        open=False,
        kwargs={"connect_timeout": CONNECT_TIMEOUT_S},
    )
    try:
        await pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot open a pool on {redact(url)}: {exc}") from exc
    except Exception as exc:
        raise DatabaseError(f"cannot open a pool on {redact(url)}: {exc}") from exc
    try:
        yield pool
    finally:
        await pool.close()


async def reachable(url: str, timeout_s: float = 3.0) -> bool:
    """True when a connection can be made within ``timeout_s``."""
    try:
        conn = await psycopg.AsyncConnection.connect(url, connect_timeout=max(1, int(timeout_s)))
    except psycopg.Error:
        return False
    await conn.close()
    return True


class OwnConnection:
    """One long-lived autocommit connection, made on first use and re-made after it is dropped.

    For the components that keep a connection of their own and retry through outages (the batch
    writer, the rule engine): :meth:`get` connects when needed, :meth:`drop` forgets a connection
    that failed (closing it quietly), so the next :meth:`get` starts afresh.
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: AsyncConn | None = None

    async def get(self) -> AsyncConn:
        if self._conn is None or self._conn.closed:
            self._conn = await connect(self._url, autocommit=True)
        return self._conn

    async def drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(psycopg.Error):
                await conn.close()
