"""Emissions as MQTT messages, in the wire contract's shapes (DESIGN §3).

A message groups one device's emissions: ``single`` sends each emission on its own
(``{"ts", "seq", "values"}``), ``batch`` a JSON list of them, ``compact`` MessagePack
``[[ts, metric, value], …]``. A malformed emission becomes a message of its own that no decoder
accepts; a duplicated one is sent twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum

from cityops.codec import encode_batch, encode_compact, encode_values
from device_sim.simulation import Emission

# What a garbled frame looks like on the wire: JSON cut off mid-object.
MALFORMED = b'{"ts": 17321700, "values": {"pm25": 3'
BATCH_MAX_EMISSIONS = 50
COMPACT_MAX_READINGS = 100


class Shape(StrEnum):
    SINGLE = "single"
    BATCH = "batch"
    COMPACT = "compact"


@dataclass(frozen=True, slots=True)
class Message:
    device: str
    payload: bytes
    readings: int  # readings it carries that the pipeline should store (0 for garbage)


def messages(emissions: Iterable[Emission], shape: Shape) -> Iterator[Message]:
    """The messages of some emissions; a device's emissions are grouped up to the shape's limit."""
    if shape is Shape.SINGLE:
        for e in emissions:
            yield from _single(e)
        return
    pending: dict[str, list[Emission]] = {}
    for e in emissions:
        if e.malformed:
            yield Message(e.device, MALFORMED, 0)
            continue
        group = pending.setdefault(e.device, [])
        group.append(e)
        if _full(group, shape):
            yield from _grouped(e.device, pending.pop(e.device), shape)
    for device, group in pending.items():
        yield from _grouped(device, group, shape)


def _single(e: Emission) -> Iterator[Message]:
    if e.malformed:
        yield Message(e.device, MALFORMED, 0)
        return
    payload = encode_values(e.values, e.ts_ms, seq=e.seq)
    yield Message(e.device, payload, len(e.values))
    for _ in range(e.copies - 1):
        yield Message(e.device, payload, 0)  # the same readings again: stored once


def _full(group: list[Emission], shape: Shape) -> bool:
    if shape is Shape.BATCH:
        return len(group) >= BATCH_MAX_EMISSIONS
    return sum(len(e.values) for e in group) >= COMPACT_MAX_READINGS


def _grouped(device: str, group: list[Emission], shape: Shape) -> Iterator[Message]:
    if shape is Shape.BATCH:
        payload = encode_batch([(e.ts_ms, e.values) for e in group], seq=group[-1].seq)
    else:
        payload = encode_compact(
            (e.ts_ms, metric, value) for e in group for metric, value in e.values.items()
        )
    yield Message(device, payload, sum(len(e.values) for e in group))
    if any(e.copies > 1 for e in group):
        yield Message(device, payload, 0)
