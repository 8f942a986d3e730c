"""Decoder cost per reading, for each payload shape, beside the bare parser it cannot beat.

The ceiling is the foreign parser alone (orjson.loads / msgpack.unpackb) on the same bytes, measured
in the same run; the decoder's figure includes it. Run: python bench/codec.py [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

import msgpack
import orjson

from cityops.catalogue import load_default_catalogue
from cityops.codec import Decoder, Encoding, encode_batch, encode_compact, encode_values

NOW_MS = int(time.time() * 1000)


def per_call_seconds(fn: Callable[[], object], seconds: float) -> float:
    calls, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(200):
            fn()
        calls += 200
        now = time.perf_counter()
        if now >= deadline:
            return (now - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    args = parser.parse_args()
    catalogue = load_default_catalogue()
    decoder = Decoder(catalogue, 300)
    rng = random.Random(1)
    air = ["pm25", "pm10", "o3", "no2", "so2", "co"]
    cases = {
        "single JSON reading": (encode_values({"pm25": 35.2}, NOW_MS), Encoding.JSON, 1),
        "JSON ts+values, 6 metrics": (
            encode_values({m: rng.uniform(0, 100) for m in air}, NOW_MS),
            Encoding.JSON,
            6,
        ),
        "JSON batch of 50": (
            encode_batch([(NOW_MS - i * 1000, {"pm25": rng.uniform(0, 100)}) for i in range(50)]),
            Encoding.JSON,
            50,
        ),
        "compact msgpack of 100": (
            encode_compact([(NOW_MS - i, air[i % 6], rng.uniform(0, 100)) for i in range(100)]),
            Encoding.MSGPACK,
            100,
        ),
        "compact JSON of 100": (
            encode_compact(
                [(NOW_MS - i, air[i % 6], rng.uniform(0, 100)) for i in range(100)], encoding=Encoding.JSON
            ),
            Encoding.JSON,
            100,
        ),
    }
    received_us = NOW_MS * 1000
    print(f"{'shape':<28} {'readings':>8} {'decode µs/reading':>18} {'parser alone':>13} {'ratio':>6}")
    for name, (payload, encoding, readings) in cases.items():
        out = decoder.decode(payload, None, received_us)
        assert len(out.rows) == readings and not out.rejects, name
        if encoding is Encoding.JSON:

            def parse(p: bytes = payload) -> object:
                return orjson.loads(p)
        else:

            def parse(p: bytes = payload) -> object:
                return msgpack.unpackb(p, raw=False, strict_map_key=False, timestamp=0)

        ceiling = per_call_seconds(parse, args.seconds) / readings * 1e6
        cost = (
            per_call_seconds(lambda p=payload: decoder.decode(p, None, received_us), args.seconds)
            / readings
            * 1e6
        )
        print(f"{name:<28} {readings:>8} {cost:>18.3f} {ceiling:>13.3f} {cost / ceiling:>5.1f}x")


if __name__ == "__main__":
    main()
