"""``cityops rules``: install the default packs, load rule files, list, validate, backtest."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

import orjson

from cityops.catalogue import Catalogue
from cityops.db.connection import connection
from cityops.errors import ConfigError
from cityops.services import database_url
from cityops.settings import Settings
from rules.backtest import DEFAULT_MAX_ROWS, DEFAULT_RESOLUTION_S, backtest
from rules.repository import install_default_packs, install_rules, load_rule_table
from rules.spec import RuleSpec, default_packs, load_rules


class RulesCommand:
    name = "rules"
    help = "alert rules: default packs, rule files, backtest"

    def configure(self, parser: argparse.ArgumentParser) -> None:
        sub = parser.add_subparsers(dest="rules_command", required=True)
        defaults = sub.add_parser("load-defaults", help="install the default rule packs (national standards)")
        defaults.add_argument("--pack", action="append", help="only this pack (repeatable); default: all")
        defaults.add_argument("--replace", action="store_true", help="overwrite installed rules that differ")
        load = sub.add_parser("load", help="install rules from YAML or JSON files")
        load.add_argument("files", nargs="+", type=Path)
        load.add_argument("--tenant", help="the rules apply to this tenant only")
        load.add_argument("--replace", action="store_true", help="overwrite installed rules that differ")
        validate = sub.add_parser("validate", help="check rule files without installing them")
        validate.add_argument("files", nargs="+", type=Path)
        lst = sub.add_parser("list", help="the installed rules")
        lst.add_argument("--json", action="store_true", help="JSON lines of the full specs")
        sub.add_parser("packs", help="the default packs shipped with cityops")
        bt = sub.add_parser("backtest", help="the alerts rules would have raised over stored readings")
        bt.add_argument("--rule", action="append", default=[], help="an installed rule (repeatable)")
        bt.add_argument("--file", type=Path, action="append", default=[], help="rules from a file")
        bt.add_argument("--from", dest="start", required=True, type=_timestamp, help="ISO 8601 with offset")
        bt.add_argument("--to", dest="end", required=True, type=_timestamp, help="ISO 8601 with offset")
        bt.add_argument("--device", action="append", help="only this device (repeatable)")
        bt.add_argument("--resolution", type=float, default=DEFAULT_RESOLUTION_S, help="timer step, seconds")
        bt.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS)

    async def run(self, args: argparse.Namespace, settings: Settings, catalogue: Catalogue) -> int:
        command = args.rules_command
        if command == "validate":
            return _validate(args.files, catalogue)
        if command == "packs":
            for name, rules in default_packs(catalogue).items():
                print(f"{name:<24} {len(rules):>3} rules")
            return 0
        async with connection(database_url(settings)) as conn:
            if command == "load-defaults":
                reports = await install_default_packs(conn, catalogue, replace=args.replace, packs=args.pack)
                for name, r in reports.items():
                    print(f"{name:<24} {r.created} created, {r.updated} updated, {r.unchanged} unchanged")
                return 0
            if command == "load":
                specs = [spec for path in args.files for spec in load_rules(path, catalogue)]
                r = await install_rules(conn, specs, tenant=args.tenant, replace=args.replace)
                print(
                    f"{len(specs)} rules: {r.created} created, {r.updated} updated, {r.unchanged} unchanged"
                )
                return 0
            table = await load_rule_table(conn, catalogue)
            if command == "list":
                _print_rules(table.specs, as_json=args.json)
                for problem in table.invalid:
                    print(f"invalid: {problem}", file=sys.stderr)
                return 0 if not table.invalid else 1
            specs = _chosen(args, table.specs, catalogue)
            result = await backtest(
                conn,
                specs,
                catalogue,
                args.start,
                args.end,
                devices=args.device,
                resolution_s=args.resolution,
                max_rows=args.max_rows,
            )
        print(f"{result.readings} readings, {len(result.alerts)} alerts")
        for a in result.alerts:
            until = a.resolved_at.isoformat() if a.resolved_at else "open"
            print(
                f"{a.started_at.isoformat()} → {until}  {a.severity:<13} {a.rule} on {a.subject}"
                f"  (count {a.count}, flaps {a.flap_count}, last {a.last_value})"
            )
        return 0


def _validate(files: list[Path], catalogue: Catalogue) -> int:
    for path in files:
        rules = load_rules(path, catalogue)  # raises RuleSpecError naming the file, rule and field
        print(f"{path}: {len(rules)} rules, valid")
    return 0


def _chosen(args: argparse.Namespace, installed: dict[str, RuleSpec], catalogue: Catalogue) -> list[RuleSpec]:
    unknown = [name for name in args.rule if name not in installed]
    if unknown:
        raise ConfigError(f"no installed rule named {', '.join(unknown)}")
    specs = [installed[name] for name in args.rule]
    specs += [spec for path in args.file for spec in load_rules(path, catalogue)]
    if not specs:
        raise ConfigError("backtest needs --rule NAME or --file FILE")
    return specs


def _print_rules(specs: dict[str, RuleSpec], *, as_json: bool) -> None:
    for key, spec in specs.items():
        if as_json:
            sys.stdout.write(orjson.dumps({"key": key, **spec.model_dump(mode="json")}).decode() + "\n")
            continue
        state = "on " if spec.enabled else "off"
        print(f"{state} {spec.severity.value:<13} {key:<40} {spec.condition.type:<15} {spec.source}")
    if not as_json:
        print(f"{len(specs)} rule(s)")


def _timestamp(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} needs a UTC offset (e.g. +08:00 or Z)")
    return value


command = RulesCommand()
