"""The agent's store-and-forward spool: readings on disk until the broker has acknowledged them.

SQLite in WAL mode, one row per message. Bounded: at ``max_rows`` the oldest rows are dropped to
make room, and counted (the count survives restarts: a device that lost data says so). Rows are
taken oldest first; a row is deleted only once its PUBACK came back.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from cityops.errors import CityopsError


class SpoolError(CityopsError):
    """The spool file cannot be opened or written."""


@dataclass(frozen=True, slots=True)
class Spooled:
    id: int
    ts_ms: int
    payload: bytes


class Spool:
    def __init__(self, path: Path, max_rows: int) -> None:
        if max_rows < 1:
            raise SpoolError("the spool must hold at least one reading")
        self.max_rows = max_rows
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS spool "
                "(id INTEGER PRIMARY KEY AUTOINCREMENT, ts_ms INTEGER NOT NULL, payload BLOB NOT NULL)"
            )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)"
            )
        except sqlite3.Error as exc:
            raise SpoolError(f"spool {path}: {exc}") from None
        self._rows = self._count()

    def _count(self) -> int:
        row = self._db.execute("SELECT count(*) FROM spool").fetchone()
        return int(row[0])

    def __len__(self) -> int:
        return self._rows

    @property
    def dropped(self) -> int:
        row = self._db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
        return int(row[0]) if row else 0

    def put(self, ts_ms: int, payload: bytes) -> int:
        """Keep a message; drops the oldest when full. Its row id (ids grow with arrival)."""
        with self._db:
            self._db.execute("BEGIN")
            overflow = self._rows + 1 - self.max_rows
            if overflow > 0:
                self._db.execute(
                    "DELETE FROM spool WHERE id IN (SELECT id FROM spool ORDER BY id LIMIT ?)", (overflow,)
                )
                self._db.execute(
                    "INSERT INTO counters (name, value) VALUES ('dropped', ?) "
                    "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                    (overflow,),
                )
                self._rows -= overflow
            cur = self._db.execute("INSERT INTO spool (ts_ms, payload) VALUES (?, ?)", (ts_ms, payload))
            self._rows += 1
        assert cur.lastrowid is not None
        return cur.lastrowid

    def oldest(self, limit: int, *, after_id: int = 0, up_to_id: int | None = None) -> list[Spooled]:
        """Up to ``limit`` messages with ``after_id < id <= up_to_id``, oldest first."""
        cur = self._db.execute(
            "SELECT id, ts_ms, payload FROM spool WHERE id > ? AND id <= ? ORDER BY id LIMIT ?",
            (after_id, up_to_id if up_to_id is not None else 2**62, limit),
        )
        return [Spooled(*row) for row in cur.fetchall()]

    def last_id(self) -> int:
        row = self._db.execute("SELECT coalesce(max(id), 0) FROM spool").fetchone()
        return int(row[0])

    def remove(self, ids: list[int]) -> None:
        """Acknowledged: gone for good."""
        if not ids:
            return
        with self._db:
            self._db.execute("BEGIN")
            cur = self._db.executemany("DELETE FROM spool WHERE id = ?", [(i,) for i in ids])
            self._rows -= max(0, cur.rowcount)

    def close(self) -> None:
        self._db.close()
