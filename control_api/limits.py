"""Per-key request rate limits: a token bucket per API key, answered with 429 and ``Retry-After``.

One integrator's runaway script must not starve the operations desk. The bucket is keyed by the
key's public prefix (the part before the secret), checked before any database work, and kept in
memory per API process; buckets idle for a while are forgotten so the table stays small.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response

from control_api.problems import problem_response

# Buckets not touched for this long are dropped (a full bucket is the same as none).
IDLE_FORGET_S = 300.0
SWEEP_EVERY = 1000  # requests between sweeps of idle buckets


class RateLimiter:
    def __init__(self, rate_per_s: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate_per_s, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key prefix -> (tokens, at)
        self._seen = 0

    def take(self, key: str) -> float:
        """0 when the request may go; otherwise the seconds until it could."""
        now = self.clock()
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        self._seen += 1
        if self._seen % SWEEP_EVERY == 0:
            self._sweep(now)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1 - tokens) / self.rate

    def _sweep(self, now: float) -> None:
        for key in [k for k, (_, at) in self._buckets.items() if now - at > IDLE_FORGET_S]:
            del self._buckets[key]


def key_of(request: Request) -> str | None:
    """The key's public prefix from ``Authorization: Bearer cok_<prefix>_<secret>``, if any."""
    header = request.headers.get("authorization", "")
    parts = header.removeprefix("Bearer ").split("_", 2)
    return parts[1] if header.startswith("Bearer ") and len(parts) == 3 else None


def install(app: FastAPI, limiter: RateLimiter) -> None:
    @app.middleware("http")
    async def limit(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        key = key_of(request)
        if key is not None:
            wait = limiter.take(key)
            if wait > 0:
                return problem_response(
                    429, "rate-limited", "Too many requests",
                    f"this key may make {limiter.rate:g} requests a second (bursts of {limiter.burst:g})",
                    request.url.path, headers={"Retry-After": str(max(1, math.ceil(wait)))},
                )  # fmt: skip
        return await call_next(request)
