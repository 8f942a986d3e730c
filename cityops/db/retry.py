"""Which database errors are worth retrying, and how long to wait between tries."""

from __future__ import annotations

import random
from dataclasses import dataclass

import psycopg

from cityops.errors import DatabaseError

# SQLSTATE classes and codes that say "try again later", not "this data is wrong".
TRANSIENT_CLASSES = ("08", "53", "57P")  # connection exception, insufficient resources, operator intervention
TRANSIENT_CODES = frozenset(
    {"40001", "40P01", "55P03"}
)  # serialization failure, deadlock, lock not available


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, DatabaseError) and exc.__cause__ is not None:
        return is_transient(exc.__cause__)  # our translation of a driver error: judge the original
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return False  # statement_timeout: the same batch would time out again
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return True  # connection lost, server gone: no SQLSTATE to go by
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate or ""
        return state in TRANSIENT_CODES or state.startswith(TRANSIENT_CLASSES)
    return isinstance(exc, OSError | TimeoutError)


@dataclass(slots=True)
class Backoff:
    """Capped exponential backoff with full jitter, so pipelines that failed together retry apart."""

    base_s: float = 0.1
    cap_s: float = 5.0
    attempt: int = 0
    rng: random.Random | None = None

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.base_s * (2**self.attempt))
        self.attempt += 1
        return (self.rng or random).uniform(0, ceiling)

    def reset(self) -> None:
        self.attempt = 0
