"""The ``cityops`` command."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import orjson

from cityops import __version__
from cityops.apikeys import Role, create_key
from cityops.catalogue import Catalogue, load_default_catalogue
from cityops.components import Component, discover, discover_commands
from cityops.db.connection import connection, redact
from cityops.db.maintenance import maintain
from cityops.db.migrate import migrate, status
from cityops.errors import CityopsError, ConfigError
from cityops.logs import configure_logging
from cityops.registry import FileFormat, import_fleet, list_devices, parse_fleet
from cityops.services import configured_services, database_url
from cityops.settings import Settings, load_settings
from cityops.up import run_up, stop_on_signals, utc_now


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cityops", description="City operations centre backend.")
    parser.add_argument("--version", action="version", version=f"cityops {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start everything (embedded services when none are configured)")
    up.add_argument("--demo", action="store_true", help="also play a simulated city with incidents, live")

    db = commands.add_parser("db", help="database schema and housekeeping").add_subparsers(
        dest="db_command", required=True
    )
    db.add_parser("migrate", help="apply pending migrations (idempotent)")
    db.add_parser("status", help="storage mode, applied and pending migrations")
    db.add_parser("maintain", help="create partitions ahead, apply retention (native mode)")

    devices = commands.add_parser("devices", help="the device registry").add_subparsers(
        dest="devices_command", required=True
    )
    imp = devices.add_parser("import", help="register or update devices from CSV or JSON lines")
    imp.add_argument("file", help="path, or - for standard input")
    imp.add_argument("--format", choices=[f.value for f in FileFormat], help="default: from the file name")
    lst = devices.add_parser("list", help="list registered devices")
    lst.add_argument("--tenant")
    lst.add_argument("--kind")
    lst.add_argument("--district")
    lst.add_argument("--json", action="store_true", help="JSON lines instead of a table")

    keys = commands.add_parser("apikey", help="API keys").add_subparsers(dest="apikey_command", required=True)
    create = keys.add_parser("create", help="make a key (printed once)")
    create.add_argument("--name", required=True, help="who or what uses it")
    create.add_argument("--role", choices=[r.value for r in Role], required=True)
    create.add_argument("--tenant", action="append", help="a tenant it may see (repeatable); default: all")

    cat = commands.add_parser("catalogue", help="the metric catalogue and device kinds")
    cat.add_argument("--json", action="store_true")

    for component in discover():
        commands.add_parser(component.name, help=component.help)
    for plugin in discover_commands():
        plugin.configure(commands.add_parser(plugin.name, help=plugin.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        configure_logging(settings.log_level, settings.log_format)
        return _dispatch(args, settings, load_default_catalogue())
    except ConfigError as exc:
        print(f"cityops: {exc}", file=sys.stderr)
        return 2
    except CityopsError as exc:
        print(f"cityops: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace, settings: Settings, catalogue: Catalogue) -> int:
    if args.command == "up":
        _run(run_up(settings.model_copy(update={"demo": True}) if args.demo else settings, catalogue))
        return 0
    if args.command == "catalogue":
        _print_catalogue(catalogue, as_json=args.json)
        return 0
    if args.command == "apikey":
        return _run(_apikey_create(settings, args))
    if args.command == "db":
        handlers = {"migrate": _db_migrate, "status": _db_status, "maintain": _db_maintain}
        return _run(handlers[args.db_command](settings, catalogue))
    plugins = {p.name: p for p in discover_commands()}
    if args.command in plugins:
        return _run(plugins[args.command].run(args, settings, catalogue))
    components = {c.name: c for c in discover()}
    if args.command in components:
        return _run(_run_component(components[args.command], settings, catalogue))
    if args.command == "devices":
        if args.devices_command == "import":
            text, name = _read_fleet_file(args.file)
            return _run(_devices_import(settings, catalogue, text, name, args.format))
        return _run(_devices_list(settings, args))
    raise AssertionError(args.command)


def _run(coro: Coroutine[Any, Any, int | None]) -> int:
    try:
        import uvloop

        result = uvloop.run(coro)
    except ImportError:
        result = asyncio.run(coro)
    return result or 0


async def _apikey_create(settings: Settings, args: argparse.Namespace) -> int:
    async with connection(database_url(settings)) as conn:
        key_id, key = await create_key(conn, args.name, Role(args.role), args.tenant)
    scope = ", ".join(args.tenant) if args.tenant else "every tenant"
    print(f"key {key_id} ({args.role}, {scope}): {key}")
    print("It is shown once; keep it somewhere safe.", file=sys.stderr)
    return 0


async def _db_migrate(settings: Settings, catalogue: Catalogue) -> int:
    url = database_url(settings)
    async with connection(url) as conn:
        report = await migrate(conn, settings, catalogue)
    print(f"database {redact(url)}: {report.mode.value} storage")
    for label in report.applied:
        print(f"  applied {label}")
    for change in report.policies_changed:
        print(f"  policy {change}")
    if not report.applied and not report.policies_changed:
        print("  up to date: nothing to apply")
    return 0


async def _db_status(settings: Settings, catalogue: Catalogue) -> int:
    url = database_url(settings)
    async with connection(url) as conn:
        st = await status(conn, settings)
    print(f"database:     {redact(url)} (PostgreSQL {st.server_version})")
    print(
        f"storage mode: {st.mode.value if st.mode else 'not migrated yet'}"
        + (f" (TimescaleDB {st.timescaledb_version})" if st.timescaledb_version else " (no TimescaleDB)")
    )
    for version, name, mode in st.applied:
        print(f"  applied  {version:04d}_{name} ({mode})")
    for label in st.pending:
        print(f"  pending  {label}")
    return 0 if not st.pending else 3


async def _db_maintain(settings: Settings, catalogue: Catalogue) -> int:
    async with connection(database_url(settings), autocommit=True) as conn:
        report = await maintain(conn, settings, utc_now())
    print(
        f"{report.mode.value} storage: {report.partitions_created} partition(s) created, "
        f"{len(report.partitions_dropped)} dropped, {report.rollup_rows_deleted} rollup row(s) and "
        f"{report.dead_letters_deleted} dead letter(s) expired"
    )
    return 0


async def _run_component(component: Component, settings: Settings, catalogue: Catalogue) -> int:
    """One component on its own, against configured services (or those of a running `cityops up`)."""
    services = configured_services(settings)
    stop = asyncio.Event()
    with stop_on_signals(stop):
        print(component.describe(settings, services), file=sys.stderr, flush=True)
        await component.run(settings, catalogue, services, stop)
    return 0


def _read_fleet_file(file: str) -> tuple[str, str]:
    if file == "-":
        return sys.stdin.read(), "<stdin>"
    path = Path(file)
    try:
        return path.read_text(encoding="utf-8-sig"), path.name
    except OSError as exc:
        raise ConfigError(f"cannot read {file}: {exc.strerror}") from None


async def _devices_import(
    settings: Settings, catalogue: Catalogue, text: str, name: str, fmt: str | None
) -> int:
    specs = parse_fleet(text, FileFormat(fmt) if fmt else FileFormat.guess(name), catalogue)
    async with connection(database_url(settings)) as conn:
        result = await import_fleet(conn, specs)
    print(f"{name}: {result.created} created, {result.updated} updated, {result.unchanged} unchanged")
    return 0


async def _devices_list(settings: Settings, args: argparse.Namespace) -> int:
    async with connection(database_url(settings)) as conn:
        devices = await list_devices(conn, tenant=args.tenant, kind=args.kind, district=args.district)
    if args.json:
        for device in devices:
            sys.stdout.write(device.model_dump_json() + "\n")
        return 0
    print(f"{'external_id':<24} {'tenant':<12} {'kind':<22} {'district':<10} {'enabled':<7} last_seen")
    for d in devices:
        seen = d.last_seen.isoformat(timespec="seconds") if d.last_seen else "-"
        print(
            f"{d.external_id:<24} {d.tenant:<12} {d.kind:<22} {d.district or '-':<10} "
            f"{'yes' if d.enabled else 'no':<7} {seen}"
        )
    print(f"{len(devices)} device(s)")
    return 0


def _print_catalogue(catalogue: Catalogue, *, as_json: bool) -> None:
    if as_json:
        doc = {
            "metrics": [
                {
                    "id": m.id,
                    "name": m.name,
                    "domain": m.domain.value,
                    "unit": m.unit,
                    "unit_code": m.unit_code,
                    "min": m.min,
                    "max": m.max,
                }
                for m in catalogue.metrics.values()
            ],
            "device_kinds": {
                k.name: list(catalogue.metrics_of_kind(k.name)) for k in catalogue.kinds.values()
            },
        }
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    for m in catalogue.metrics.values():
        bounds = f"[{m.min:g}, {m.max:g}]"
        print(f"{m.id:>4} {m.name:<26} {m.domain.value:<14} {m.unit:<10} {m.unit_code:<5} {bounds}")
    for k in catalogue.kinds.values():
        print(f"kind {k.name:<24} {k.domain.value:<14} {', '.join(k.metrics) or '-'}")


if __name__ == "__main__":
    sys.exit(main())
