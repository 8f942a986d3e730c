"""Where a device agent's readings come from: stdin JSON lines, a command, a plugin, or a queue.

A source yields ``(ts_ms, {metric: value})``. A line or an output it cannot read is logged with the
reason and skipped (counted in ``rejected``): one bad line never stops a device.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from importlib.metadata import entry_points
from typing import Any, Protocol

import orjson

from cityops.errors import ConfigError

log = logging.getLogger(__name__)

Reading = tuple[int, dict[str, float]]
PLUGIN_GROUP = "cityops.agent_sources"
# A command that hangs is killed after this long (it would otherwise stop all sampling).
COMMAND_TIMEOUT_S = 30.0


class ParseError(ValueError):
    """A line or command output that is not a reading; the message says why."""


class Source(Protocol):
    rejected: int

    def readings(self, stop: asyncio.Event) -> AsyncIterator[Reading]: ...

    def set_interval(self, interval_s: float) -> bool:
        """Change the sampling interval; False when the source has none."""
        ...


def parse_reading(text: str | bytes, now_ms: int) -> Reading:
    """``{"ts": …, "values": {…}}``, a flat ``{"pm25": 3.2}``, or ``metric=value`` lines."""
    stripped = text.strip()
    if not stripped:
        raise ParseError("empty")
    if stripped[:1] in ("[", b"["):
        raise ParseError("a reading is a JSON object, not a list")
    if stripped[:1] in ("{", b"{"):
        try:
            doc = orjson.loads(stripped)
        except orjson.JSONDecodeError as exc:
            raise ParseError(f"not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ParseError("a reading is a JSON object")
        if "values" in doc:
            return _timestamp(doc.get("ts"), now_ms), _values(doc["values"])
        return now_ms, _values(doc)
    text_str = stripped.decode() if isinstance(stripped, bytes) else stripped
    pairs: dict[str, Any] = {}
    for line in text_str.splitlines():
        name, sep, value = line.replace("=", " ", 1).partition(" ")
        if not sep:
            raise ParseError(f"expected `metric=value`, got {line.strip()!r}")
        pairs[name.strip()] = value.strip()
    return now_ms, _values(pairs)


def _values(doc: Any) -> dict[str, float]:
    if not isinstance(doc, dict) or not doc:
        raise ParseError("values must be a non-empty object of metric: number")
    out = {}
    for name, raw in doc.items():
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ParseError(f"{name}: not a number: {raw!r}") from None
        if not math.isfinite(value):
            raise ParseError(f"{name}: not finite")
        out[str(name)] = value
    return out


def _timestamp(raw: Any, now_ms: int) -> int:
    if raw is None:
        return now_ms
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return int(raw)
    if isinstance(raw, str):
        try:
            parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            raise ParseError(f"ts: not epoch milliseconds or RFC 3339: {raw!r}") from None
        if parsed.tzinfo is None:
            raise ParseError("ts: RFC 3339 needs an offset")
        return int(parsed.timestamp() * 1000)
    raise ParseError(f"ts: not epoch milliseconds or RFC 3339: {raw!r}")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class StdinSource:
    """One reading per line of standard input (a sensor script piping into the agent)."""

    def __init__(self, stream: Any = None, clock_ms: Callable[[], int] = _now_ms) -> None:
        self.stream = stream
        self.clock_ms = clock_ms
        self.rejected = 0

    async def readings(self, stop: asyncio.Event) -> AsyncIterator[Reading]:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), self.stream or sys.stdin)
        while not stop.is_set():
            line = await reader.readline()
            if not line:
                return  # end of input
            try:
                yield parse_reading(line, self.clock_ms())
            except ParseError as exc:
                self.rejected += 1
                log.warning(
                    "input line skipped",
                    extra={"reason": str(exc), "line": line[:200].decode(errors="replace")},
                )

    def set_interval(self, interval_s: float) -> bool:
        return False


class CommandSource:
    """Runs a shell command every ``interval_s`` and reads its output as one reading."""

    def __init__(self, command: str, interval_s: float, clock_ms: Callable[[], int] = _now_ms) -> None:
        self.command = command
        self.interval_s = interval_s
        self.clock_ms = clock_ms
        self.rejected = 0

    def set_interval(self, interval_s: float) -> bool:
        self.interval_s = interval_s
        return True

    async def readings(self, stop: asyncio.Event) -> AsyncIterator[Reading]:
        while not stop.is_set():
            started = time.monotonic()
            reading = await self._sample()
            if reading is not None:
                yield reading
            wait = max(0.0, self.interval_s - (time.monotonic() - started))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)

    async def _sample(self) -> Reading | None:
        proc = await asyncio.create_subprocess_shell(
            self.command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            self.rejected += 1
            log.warning("command timed out", extra={"command": self.command, "timeout_s": COMMAND_TIMEOUT_S})
            return None
        if proc.returncode != 0:
            self.rejected += 1
            log.warning(
                "command failed",
                extra={"status": proc.returncode, "stderr": err[:200].decode(errors="replace")},
            )
            return None
        try:
            return parse_reading(out, self.clock_ms())
        except ParseError as exc:
            self.rejected += 1
            log.warning("command output skipped", extra={"reason": str(exc)})
            return None


class QueueSource:
    """Readings put on a queue by the program that embeds the agent (and by tests)."""

    def __init__(self, maxsize: int = 10_000) -> None:
        self.queue: asyncio.Queue[Reading] = asyncio.Queue(maxsize)
        self.rejected = 0

    async def readings(self, stop: asyncio.Event) -> AsyncIterator[Reading]:
        while not stop.is_set():
            yield await self.queue.get()

    def set_interval(self, interval_s: float) -> bool:
        return False


def plugin_source(name: str, options: dict[str, str]) -> Source:
    """A source from the ``cityops.agent_sources`` entry point ``name``, called with ``options``."""
    found = {entry.name: entry for entry in entry_points(group=PLUGIN_GROUP)}
    if name not in found:
        raise ConfigError(
            f"no agent source plugin {name!r} (installed: {', '.join(sorted(found)) or 'none'})"
        )
    factory = found[name].load()
    source: Source = factory(options)
    return source
