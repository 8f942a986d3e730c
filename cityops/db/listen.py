"""Following a table through ``LISTEN``: reload once at start and after every burst of changes.

Used by a pipeline for its in-memory device registry and rule set: the reload runs on the listening
connection right after ``LISTEN`` (changes made before it took effect are not missed), and a burst of
notifications (a fleet import, a pack install) becomes one reload after a quiet period. The
connection is re-made when it drops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import psycopg

from cityops.db.connection import AsyncConn, connect

log = logging.getLogger(__name__)

# A burst of edits becomes one reload after this quiet period.
DEBOUNCE_S = 0.2
RETRY_S = 2.0


async def follow(
    url: str,
    channel: str,
    reload: Callable[[AsyncConn], Awaitable[None]],
    stop: asyncio.Event,
    *,
    what: str,
) -> None:
    """LISTEN on ``channel`` until ``stop``; ``reload(conn)`` at start and after each burst."""
    while not stop.is_set():
        try:
            conn = await connect(url, autocommit=True)
        except Exception as exc:
            log.warning(f"{what} listener cannot connect", extra={"error": str(exc)[:200]})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RETRY_S)
            continue
        try:
            await conn.execute(f"LISTEN {channel}")
            await reload(conn)
            await _listen(conn, reload, stop)
        except psycopg.Error as exc:
            log.warning(f"{what} listener lost its connection", extra={"error": str(exc)[:200]})
        finally:
            await conn.close()


async def _listen(
    conn: AsyncConn, reload: Callable[[AsyncConn], Awaitable[None]], stop: asyncio.Event
) -> None:
    while not stop.is_set():
        changed = False
        async for _ in conn.notifies(timeout=1.0, stop_after=1):
            changed = True
        if changed:
            async for _ in conn.notifies(timeout=DEBOUNCE_S):
                pass  # the rest of a burst: one reload covers it
            await reload(conn)
