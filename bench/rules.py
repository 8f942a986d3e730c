"""Rule evaluation throughput and the latency it adds per batch, through the default packs.

A fleet of every device kind, enough devices for --series series (10,000 by default), reports one
reading per series per simulated minute; --breach of the series sit past a threshold so alerts fire
and repeat. Readings go to the evaluator in pipeline-sized batches (segments per device), as the
pipeline hands it the rows a commit inserted.

The ceiling, measured in the same run, is the least any evaluator must do per reading: one loop over
the same segments with a dict lookup for the metric's rules and a watermark update. The ratio says
how much of the evaluator's time is rule work rather than bookkeeping.

Run: python bench/rules.py [--series 10000] [--batch 20000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would hide the `rules`
# package it measures.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from cityops.catalogue import load_default_catalogue
from cityops.model import Row
from rules.evaluator import DeviceInfo, Evaluator
from rules.spec import default_packs

# Ordinary values (a quiet city) for the metrics the default packs watch; others sit low in range.
TYPICAL = {
    "pm25": 30.0, "pm10": 60.0, "o3": 80.0, "no2": 30.0, "so2": 10.0, "co": 0.8,
    "turbidity": 0.3, "ph": 7.4, "free_chlorine": 0.5, "combustible_gas_lel": 0.0, "co_ppm": 2.0,
    "h2s_ppm": 0.0, "o2_pct": 20.9, "manhole_ch4": 0.0, "ponding_depth": 0.0, "rainfall": 0.0,
    "network_pressure": 0.35, "flow_rate": 120.0, "dissolved_oxygen": 7.0, "codmn": 3.0, "nh3_n": 0.4,
    "tp": 0.1, "surface_ph": 7.5, "average_speed": 40.0, "congestion_index": 2.0, "occupancy": 0.2,
    "laeq": 50.0, "vehicle_count": 20.0, "gas_pipe_pressure": 0.3,
}  # fmt: skip
MINUTE_US = 60_000_000


def build_fleet(series: int, rng: random.Random) -> list[tuple[DeviceInfo, list[tuple[int, float]]]]:
    catalogue = load_default_catalogue()
    kinds = [k for k in catalogue.kinds.values() if k.metrics]
    fleet: list[tuple[DeviceInfo, list[tuple[int, float]]]] = []
    count = 0
    while count < series:
        kind = kinds[len(fleet) % len(kinds)]
        n = len(fleet) + 1
        device = DeviceInfo(
            n, f"{kind.name}-{n}", kind.domain.value, kind.name, kind.domain, f"district-{n % 11}",
            {"zone_class": "2"},
        )  # fmt: skip
        metrics = []
        for name in kind.metrics:
            m = catalogue.metrics[name]
            metrics.append((m.id, TYPICAL.get(name, m.min + (m.max - m.min) * 0.05)))
        fleet.append((device, metrics))
        count += len(metrics)
    return fleet


def batches(
    fleet: list[tuple[DeviceInfo, list[tuple[int, float]]]],
    batch_rows: int,
    breach: float,
    rng: random.Random,
    start_us: int,
) -> list[list[tuple[DeviceInfo, list[Row]]]]:
    """One simulated minute of readings for every series, cut into batches of about ``batch_rows``."""
    breaching = {d.id for d, _ in fleet if rng.random() < breach}
    out: list[list[tuple[DeviceInfo, list[Row]]]] = [[]]
    rows_in_batch = 0
    for device, metrics in fleet:
        factor = 4.0 if device.id in breaching else 1.0
        rows: list[Row] = [
            (start_us, mid, base * factor * rng.uniform(0.98, 1.02) + rng.uniform(0, 0.01), 0)
            for mid, base in metrics
        ]
        out[-1].append((device, rows))
        rows_in_batch += len(rows)
        if rows_in_batch >= batch_rows:
            out.append([])
            rows_in_batch = 0
    return [b for b in out if b]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--series", type=int, default=10_000)
    parser.add_argument(
        "--batch", type=int, default=20_000, help="rows per batch (the pipeline's batch_max_rows)"
    )
    parser.add_argument("--breach", type=float, default=0.01, help="fraction of devices past a threshold")
    parser.add_argument("--seconds", type=float, default=10.0, help="wall time per measurement")
    args = parser.parse_args()
    rng = random.Random(7)
    catalogue = load_default_catalogue()
    rules = [r for pack in default_packs(catalogue).values() for r in pack]
    fleet = build_fleet(args.series, rng)
    series = sum(len(m) for _, m in fleet)
    start_us = 1_782_835_200_000_000
    minutes = [batches(fleet, args.batch, args.breach, rng, start_us + i * MINUTE_US) for i in range(30)]
    clock_now = [start_us]
    evaluator = Evaluator(rules, catalogue, lambda: clock_now[0])
    for device, _ in fleet:
        evaluator.watch_for_silence(device)
    print(f"{len(rules)} rules, {len(fleet)} devices, {series} series, batches of ~{args.batch} rows")

    latencies: list[float] = []
    readings = signals = 0
    minute = 0
    began = time.perf_counter()
    while time.perf_counter() - began < args.seconds:
        for batch in minutes[minute % len(minutes)]:
            shift = (minute // len(minutes)) * len(minutes) * MINUTE_US
            shifted = (
                [(d, [(t + shift, m, v, q) for t, m, v, q in rows]) for d, rows in batch] if shift else batch
            )
            t0 = time.perf_counter()
            for device, rows in shifted:
                signals += len(evaluator.observe(device, rows))
            latencies.append(time.perf_counter() - t0)
            readings += sum(len(r) for _, r in shifted)
        minute += 1
        clock_now[0] = start_us + minute * MINUTE_US
    evaluating = sum(latencies)
    tick_started = time.perf_counter()
    ticked = len(evaluator.tick())
    tick_seconds = time.perf_counter() - tick_started

    # The ceiling: per reading, one dict lookup for its rules and a watermark update, nothing else.
    index: dict[int, list[object]] = {m.id: [] for m in catalogue.metrics.values()}
    watermarks: dict[tuple[int, int], int] = {}
    floor_rows = 0
    floor_began = time.perf_counter()
    for minute_batches in minutes:
        for batch in minute_batches:
            for device, rows in batch:
                for t, mid, _v, _q in rows:
                    index.get(mid)
                    watermarks[(device.id, mid)] = t
                floor_rows += len(rows)
    floor_seconds = time.perf_counter() - floor_began

    rate = readings / evaluating
    ceiling = floor_rows / floor_seconds
    per_batch = sorted(latencies)
    print(f"evaluator:  {rate:,.0f} readings/s over {readings:,} readings ({signals:,} signals)")
    print(f"ceiling:    {ceiling:,.0f} readings/s (lookup + watermark only, same run)")
    print(f"ratio:      {rate / ceiling:.0%} of the ceiling; {1e6 / rate:.2f} µs per reading")
    print(
        f"per batch of ~{args.batch} rows: p50 {statistics.median(per_batch) * 1000:.1f} ms, "
        f"p95 {per_batch[int(len(per_batch) * 0.95)] * 1000:.1f} ms, max {per_batch[-1] * 1000:.1f} ms"
    )
    print(f"tick over {series} series: {tick_seconds * 1000:.1f} ms ({ticked} signals)")


if __name__ == "__main__":
    main()
