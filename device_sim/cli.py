"""``cityops sim`` (simulator and load generator) and ``cityops agent`` (the device agent)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import datetime
from pathlib import Path

import orjson

from cityops.catalogue import Catalogue
from cityops.db.connection import connection
from cityops.errors import ConfigError
from cityops.registry import import_fleet
from cityops.services import database_url, mqtt_v311_url
from cityops.settings import Settings
from cityops.up import stop_on_signals
from device_sim.agent import Agent, AgentOptions
from device_sim.fleet import build_fleet
from device_sim.load import DEFAULT_MAX_RATE, SimPlan, publish, scenario_truth
from device_sim.payloads import Shape
from device_sim.scenario import default_start_ms, find_scenario, shipped_scenarios
from device_sim.sources import CommandSource, Source, StdinSource, plugin_source
from device_sim.verify import wait_and_reconcile

DEFAULT_DEVICES = 300


class SimCommand:
    name = "sim"
    help = "simulate a city fleet: scenarios with ground truth, or load at a target rate"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--scenario", help="a shipped scenario's name or a YAML file")
        parser.add_argument("--list-scenarios", action="store_true", help="the shipped scenarios, and exit")
        parser.add_argument(
            "--devices", type=int, help=f"fleet size (default: the scenario's, or {DEFAULT_DEVICES})"
        )
        parser.add_argument("--rate", type=float, help="load mode: readings per second across the fleet")
        parser.add_argument("--duration", type=float, default=60.0, help="load mode: seconds (default 60)")
        parser.add_argument("--start", type=_timestamp, help="scenario start (ISO 8601); default: ends now")
        parser.add_argument("--shape", choices=[s.value for s in Shape], default=Shape.SINGLE.value)
        parser.add_argument("--qos", type=int, choices=(0, 1), default=1)
        parser.add_argument("--processes", type=int, default=1, help="publisher processes")
        parser.add_argument(
            "--max-rate",
            type=float,
            default=DEFAULT_MAX_RATE,
            help="readings/s cap when sending the past (default 5,000; brokers drop what they cannot queue)",
        )
        parser.add_argument("--seed", type=int, default=1)
        parser.add_argument("--prefix", default="gz", help="device id prefix (one fleet per prefix)")
        parser.add_argument("--no-register", action="store_true", help="do not register the fleet first")
        parser.add_argument("--truth", type=Path, help="write the scenario's ground truth here (JSON)")
        parser.add_argument("--verify", action="store_true", help="reconcile sent and stored readings")
        parser.add_argument(
            "--verify-timeout", type=float, default=120.0, help="seconds to wait for the pipeline"
        )

    async def run(self, args: argparse.Namespace, settings: Settings, catalogue: Catalogue) -> int:
        if args.list_scenarios:
            for scenario in shipped_scenarios().values():
                print(
                    f"{scenario.name:<24} {scenario.duration_s / 3600:5.1f} h  {scenario.description.strip()}"
                )
            return 0
        plan, scenario_name = self._plan(args, settings, catalogue)
        if not args.no_register:
            await _register(settings, plan, catalogue)
        mode = f"scenario {scenario_name}" if scenario_name else f"load {args.rate:,.0f} readings/s"
        shape = f"{plan.shape.value}, QoS {plan.qos}, {plan.processes} process(es)"
        print(f"{mode}: {plan.fleet_size} devices, {shape}")
        report = await asyncio.to_thread(publish, plan)
        rate = report.readings / report.seconds if report.seconds else 0.0
        print(
            f"sent {report.messages:,} messages, {report.readings:,} readings in {report.seconds:.1f} s: "
            f"{rate:,.0f} readings/s"
            + (
                f" (fell behind the clock by up to {report.max_lag_ms / 1000:.1f} s)"
                if report.max_lag_ms > 1000
                else ""
            )
        )
        if scenario_name and args.truth:
            truth = scenario_truth(plan, find_scenario(scenario_name), report)
            args.truth.write_bytes(orjson.dumps(truth, option=orjson.OPT_INDENT_2))
            print(f"ground truth: {args.truth}")
        if not args.verify:
            return 0
        result = await wait_and_reconcile(
            database_url(settings),
            report.expected,
            plan.start_ms,
            plan.end_ms + plan.max_clock_skew_ms,
            deadline_s=args.verify_timeout,
        )
        print(
            f"verify: {result.expected:,} expected, {result.stored:,} stored, "
            f"{result.missing:,} missing, {result.duplicated:,} duplicated"
            + (f" (short: {', '.join(result.devices_short)})" if result.devices_short else "")
        )
        return 0 if result.ok else 1

    def _plan(
        self, args: argparse.Namespace, settings: Settings, catalogue: Catalogue
    ) -> tuple[SimPlan, str | None]:
        if args.scenario and args.rate:
            raise ConfigError(
                "--scenario runs at the catalogue's sampling intervals; --rate is for load runs"
            )
        if not args.scenario and not args.rate:
            raise ConfigError("give --scenario NAME or --rate READINGS_PER_SECOND (see --list-scenarios)")
        if args.processes < 1 or (args.devices is not None and args.devices < 1):
            raise ConfigError("--processes and --devices must be at least 1")
        now_ms = time.time_ns() // 1_000_000
        common = {
            "seed": args.seed,
            "prefix": args.prefix,
            "shape": Shape(args.shape),
            "qos": args.qos,
            "mqtt_url": mqtt_v311_url(settings),
            "topic_root": settings.topic_root,
            "processes": args.processes,
            "max_clock_skew_ms": int(settings.max_clock_skew * 1000),
            "max_rate": args.max_rate if args.max_rate > 0 else float("inf"),
        }
        if args.scenario:
            scenario = find_scenario(args.scenario)
            start = int(args.start.timestamp() * 1000) if args.start else default_start_ms(scenario, now_ms)
            plan = SimPlan(
                fleet_size=args.devices or scenario.fleet_size,
                start_ms=start,
                end_ms=start + int(scenario.duration_s * 1000),
                interval_ms=None,
                scenario=args.scenario,
                **common,
            )
            return plan, scenario.name
        if args.rate <= 0 or args.duration <= 0:
            raise ConfigError("--rate and --duration must be positive")
        fleet_size = args.devices or DEFAULT_DEVICES
        series = sum(
            len(d.metrics) for d in build_fleet(fleet_size, catalogue, seed=args.seed, prefix=args.prefix)
        )
        common["max_rate"] = float("inf")  # live load is paced by the clock, at --rate
        plan = SimPlan(
            fleet_size=fleet_size,
            start_ms=now_ms,
            end_ms=now_ms + int(args.duration * 1000),
            interval_ms=max(1, round(series * 1000 / args.rate)),
            scenario=None,
            **common,
        )
        return plan, None


async def _register(settings: Settings, plan: SimPlan, catalogue: Catalogue) -> None:
    fleet = build_fleet(plan.fleet_size, catalogue, seed=plan.seed, prefix=plan.prefix)
    async with connection(database_url(settings)) as conn:
        result = await import_fleet(conn, [d.spec for d in fleet])
    print(
        f"fleet: {result.created} registered, {result.updated + result.unchanged} already there",
        file=sys.stderr,
    )


def _timestamp(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} needs a UTC offset (e.g. +08:00 or Z)")
    return value


class AgentCommand:
    name = "agent"
    help = "the device agent: read a source, publish at QoS 1, spool on disk while offline"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--device", required=True, help="this device's id (as registered)")
        source = parser.add_mutually_exclusive_group()
        source.add_argument("--stdin", action="store_true", help="readings as JSON lines on stdin (default)")
        source.add_argument("--command", help="a shell command whose output is one reading")
        source.add_argument("--plugin", help="a source from the cityops.agent_sources entry points")
        parser.add_argument("--interval", type=float, default=60.0, help="seconds between --command runs")
        parser.add_argument(
            "--option", action="append", default=[], metavar="KEY=VALUE", help="plugin option"
        )
        parser.add_argument(
            "--spool", type=Path, help="spool file (default: <data dir>/agent-<device>.sqlite)"
        )
        parser.add_argument("--spool-max", type=int, default=100_000, help="messages kept while offline")
        parser.add_argument(
            "--replay-rate", type=float, default=50.0, help="backlog messages/s after reconnect"
        )

    async def run(self, args: argparse.Namespace, settings: Settings, catalogue: Catalogue) -> int:
        if args.interval <= 0 or args.spool_max < 1 or args.replay_rate <= 0:
            raise ConfigError("--interval, --spool-max and --replay-rate must be positive")
        source: Source
        if args.command:
            source = CommandSource(args.command, args.interval)
        elif args.plugin:
            plugin_options = dict(item.partition("=")[::2] for item in args.option)
            source = plugin_source(args.plugin, plugin_options)
        else:
            source = StdinSource()
        options = AgentOptions(
            device_id=args.device,
            mqtt_url=settings.mqtt_url or mqtt_v311_url(settings),
            topic_root=settings.topic_root,
            spool_path=args.spool or settings.data_dir / f"agent-{args.device}.sqlite",
            spool_max=args.spool_max,
            replay_rate=args.replay_rate,
        )
        agent = Agent(options, source)
        stop = asyncio.Event()
        with stop_on_signals(stop):
            await agent.run(stop)
        return 0


sim_command = SimCommand()
agent_command = AgentCommand()
