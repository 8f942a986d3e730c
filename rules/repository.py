"""The ``rules`` table: the rule set a running pipeline evaluates, and installing rule packs into it.

A row's ``name``, ``tenant`` and ``enabled`` columns are authoritative over the same fields in its
``spec``: an API can rename or disable a rule without rewriting the spec. A tenant's rule is keyed
``tenant/name`` in memory (two tenants may each have a rule called ``pressure-low``), and selects
only that tenant's devices.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import orjson

from cityops.catalogue import Catalogue
from cityops.db.connection import AsyncConn
from rules.spec import RuleSpec, RuleSpecError, default_packs, parse_rules


def rule_key(name: str, tenant: str | None) -> str:
    return name if tenant is None else f"{tenant}/{name}"


@dataclass
class RuleTable:
    specs: dict[str, RuleSpec] = field(default_factory=dict)  # by rule key; enabled or not
    ids: dict[str, int] = field(default_factory=dict)
    invalid: list[str] = field(default_factory=list)  # rows that no longer validate, with why


@dataclass(frozen=True, slots=True)
class InstallReport:
    created: int
    updated: int
    unchanged: int


async def load_rule_table(conn: AsyncConn, catalogue: Catalogue) -> RuleTable:
    """Every row as a checked spec; a row that fails validation is reported, not fatal."""
    cur = await conn.execute("SELECT id, name, tenant, enabled, spec FROM rules ORDER BY id")
    table = RuleTable()
    for rule_id, name, tenant, enabled, doc in await cur.fetchall():
        key = rule_key(name, tenant)
        try:
            (spec,) = parse_rules(
                [{**doc, "name": name, "enabled": enabled}], catalogue, origin=f"rule {key}"
            )
        except RuleSpecError as exc:
            table.invalid.append(str(exc))
            continue
        if tenant is not None:
            # model_copy: the key is not a valid bare name, but it is what the engine and alerts use.
            selector = spec.selector.model_copy(update={"tenant": tenant})
            spec = spec.model_copy(update={"name": key, "selector": selector})
        table.specs[key] = spec
        table.ids[key] = rule_id
    return table


async def install_rules(
    conn: AsyncConn, specs: Iterable[RuleSpec], *, tenant: str | None = None, replace: bool = False
) -> InstallReport:
    """Insert rules that are missing; with ``replace``, overwrite the spec of those that differ."""
    created = updated = unchanged = 0
    async with conn.transaction():
        for spec in specs:
            doc = spec.model_dump(mode="json", exclude={"name", "enabled"})
            spec_json = orjson.dumps(doc).decode()
            # ON CONFLICT: two pipelines installing the defaults at once do not fail each other.
            cur = await conn.execute(
                "INSERT INTO rules (name, tenant, enabled, spec, source) VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT ON CONSTRAINT rules_tenant_name_key DO NOTHING RETURNING id",
                (spec.name, tenant, spec.enabled, spec_json, spec.source),
            )
            if await cur.fetchone() is not None:
                created += 1
                continue
            if replace:
                cur = await conn.execute(
                    "UPDATE rules SET spec = %s, source = %s, version = version + 1, updated_at = now() "
                    "WHERE name = %s AND tenant IS NOT DISTINCT FROM %s AND spec <> %s::jsonb",
                    (spec_json, spec.source, spec.name, tenant, spec_json),
                )
                if cur.rowcount:
                    updated += 1
                    continue
            unchanged += 1
    return InstallReport(created, updated, unchanged)


async def install_default_packs(
    conn: AsyncConn, catalogue: Catalogue, *, replace: bool = False, packs: Iterable[str] | None = None
) -> dict[str, InstallReport]:
    """The shipped packs (all, or the named ones), installed as rules for every tenant."""
    available = default_packs(catalogue)
    chosen = list(available) if packs is None else list(packs)
    unknown = [p for p in chosen if p not in available]
    if unknown:
        raise RuleSpecError(f"unknown rule pack(s): {', '.join(unknown)}; available: {', '.join(available)}")
    return {name: await install_rules(conn, available[name], replace=replace) for name in chosen}


async def rules_table_is_empty(conn: AsyncConn) -> bool:
    cur = await conn.execute("SELECT NOT EXISTS (SELECT 1 FROM rules)")
    row = await cur.fetchone()
    return bool(row and row[0])
