"""Waiting on conditions with a deadline: never a fixed sleep standing in for a condition."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

# How often a condition is re-checked; small against every deadline used with it.
POLL_INTERVAL_S = 0.05


async def eventually(
    attempt: Callable[[], Awaitable[T]],
    *,
    deadline_s: float = 10.0,
    retry_on: tuple[type[BaseException], ...] = (AssertionError,),
) -> T:
    """Call ``attempt`` until it returns without one of ``retry_on``; re-raise the last after the deadline."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + deadline_s
    while True:
        try:
            return await attempt()
        except retry_on:
            if loop.time() >= give_up:
                raise
        await asyncio.sleep(POLL_INTERVAL_S)
