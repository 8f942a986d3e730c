"""The agent's spool and sources, without services."""

from __future__ import annotations

from pathlib import Path

import pytest

from cityops.catalogue import load_default_catalogue
from cityops.codec import Decoder
from device_sim.fleet import build_fleet
from device_sim.payloads import MALFORMED, Shape, messages
from device_sim.simulation import Simulation
from device_sim.sources import ParseError, parse_reading
from device_sim.spool import Spool

NOW = 1_782_835_200_000


def test_the_spool_drops_its_oldest_at_the_bound_and_remembers_how_many(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite", max_rows=3)
    ids = [spool.put(NOW + i, b"%d" % i) for i in range(5)]
    assert len(spool) == 3 and spool.dropped == 2
    assert [r.payload for r in spool.oldest(10)] == [b"2", b"3", b"4"]
    spool.remove([ids[2]])
    assert [r.payload for r in spool.oldest(10, after_id=ids[2])] == [b"3", b"4"]
    assert [r.payload for r in spool.oldest(10, up_to_id=ids[3])] == [b"3"]
    spool.close()
    reopened = Spool(tmp_path / "s.sqlite", max_rows=3)  # a restart: the backlog and the count survive
    assert len(reopened) == 2 and reopened.dropped == 2 and reopened.last_id() == ids[4]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"ts": 1782835200123, "values": {"pm25": 35.2}}', (1782835200123, {"pm25": 35.2})),
        (
            '{"ts": "2026-07-01T00:00:00+08:00", "values": {"ph": 7}}',
            (NOW, {"ph": 7.0}),
        ),
        ('{"pm25": 12, "pm10": "30.5"}', (NOW, {"pm25": 12.0, "pm10": 30.5})),
        ("pm25=12\npm10 30.5\n", (NOW, {"pm25": 12.0, "pm10": 30.5})),
    ],
)
def test_readings_parse_from_every_input_shape(text: str, expected: tuple[int, dict[str, float]]) -> None:
    assert parse_reading(text, NOW) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("{bad", "not JSON"),
        ('{"values": {"pm25": "high"}}', "pm25: not a number"),
        ('{"values": {"pm25": NaN}}', "not JSON"),
        ('{"ts": "yesterday", "values": {"pm25": 1}}', "ts: not epoch"),
        ('{"ts": "2026-07-01T00:00:00", "values": {"pm25": 1}}', "needs an offset"),
        ("[1, 2]", "not a list"),
        ("pm25", "expected `metric=value`"),
        ('{"values": {}}', "non-empty"),
    ],
)
def test_bad_input_says_why(text: str, reason: str) -> None:
    with pytest.raises(ParseError, match=reason):
        parse_reading(text, NOW)


@pytest.mark.parametrize("shape", list(Shape))
def test_simulated_payloads_decode_with_the_codec(shape: Shape) -> None:
    catalogue = load_default_catalogue()
    fleet = build_fleet(40, catalogue, seed=5)
    sim = Simulation(fleet, catalogue, start_ms=NOW, seed=5)
    emissions = list(sim.run_until(NOW + 600_000))
    decoder = Decoder(catalogue, 300)
    sent = sum(len(e.values) for e in emissions)
    decoded = 0
    for message in messages(emissions, shape):
        result = decoder.decode(message.payload, None, (NOW + 600_000) * 1000)  # encoding by first byte
        assert not result.rejects, result.rejects
        assert len(result.rows) == message.readings
        decoded += len(result.rows)
    assert decoded == sent
    assert decoder.decode(MALFORMED, None, NOW * 1000).rejects


def test_the_rate_limiter_refills_by_the_clock() -> None:
    from control_api.limits import RateLimiter

    now = [0.0]
    limiter = RateLimiter(rate_per_s=2.0, burst=2.0, clock=lambda: now[0])
    assert [limiter.take("k") for _ in range(2)] == [0.0, 0.0]
    assert limiter.take("k") == 0.5  # half a second until the next token
    assert limiter.take("other") == 0.0  # buckets are per key
    now[0] = 0.5
    assert limiter.take("k") == 0.0
