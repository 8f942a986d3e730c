"""The alert store: evaluator signals become alert rows, events and notifications, exactly once.

One open alert per fingerprint (rule + subject), enforced by the partial unique index
``alerts_one_open_per_fingerprint``: two writers racing on the same fingerprint end with one open
alert, the loser's trigger counted on it. A repeat trigger updates the open alert (count, last value,
last seen); a trigger within the rule's flap window after a resolve reopens the same alert and
counts a flap. Every transition appends to ``alert_events`` and sends ``NOTIFY cityops_alerts`` in
the same transaction, so a listener never hears of an event that did not commit.

An alert that opens while a silence matches its labels is recorded with that silence's id: nothing
is hidden from the record, and the feed and notifications can leave it out. Operators move alerts
through :mod:`rules.actions`; the rules never undo an acknowledgement or a shelving, they only
update the alert and, when the condition clears, resolve it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import orjson

from cityops.db.connection import AsyncConn
from cityops.model import AlertState
from rules.conditions import Status
from rules.evaluator import DeviceInfo, Signal
from rules.spec import RuleSpec

CHANNEL = "cityops_alerts"


@dataclass(frozen=True, slots=True)
class Transition:
    event_id: int
    alert_id: int
    kind: str  # opened | reopened | firing | resolved, and the operators' (see rules.actions)
    from_state: str | None
    to_state: str
    silenced: bool = False


async def notify(conn: AsyncConn, transitions: list[Transition]) -> None:
    """One NOTIFY per transition, inside the caller's transaction (delivered only on commit)."""
    for t in transitions:
        payload = {
            "event_id": t.event_id,
            "alert_id": t.alert_id,
            "kind": t.kind,
            "state": t.to_state,
        }
        if t.silenced:
            payload["silenced"] = True
        await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, orjson.dumps(payload).decode()))


def fingerprint(rule: str, subject: str) -> str:
    return hashlib.sha256(f"{rule}\x00{subject}".encode()).hexdigest()[:32]


class AlertStore:
    async def apply(
        self,
        conn: AsyncConn,
        signals: list[Signal],
        rules: Mapping[str, RuleSpec],
        devices: Mapping[str, DeviceInfo],
        rule_ids: Mapping[str, int] | None = None,
    ) -> list[Transition]:
        """Write ``signals`` in one transaction; the transitions they caused, in order.

        ``rule_ids`` links new alerts to their row in ``rules`` (rules from files have none).
        """
        transitions: list[Transition] = []
        # A fixed lock order across writers: no deadlocks between pipelines.
        # Sorted by fingerprint (stable: a fingerprint's signals keep their order).
        keyed = sorted(
            ((fingerprint(s.rule, s.subject), s) for s in signals if s.rule in rules), key=lambda p: p[0]
        )
        async with conn.transaction():
            open_states = await self._lock_open(conn, sorted({fp for fp, _ in keyed}))
            # A fingerprint all of whose signals repeat its open alert goes into one bulk update;
            # any other goes signal by signal, in order (a resolve then a re-trigger, say).
            moving = {fp for fp, s in keyed if not _is_repeat(s, open_states.get(fp))}
            await self._count_repeats(conn, [(fp, s) for fp, s in keyed if fp not in moving])
            for fp, signal in keyed:
                if fp not in moving:
                    continue
                spec = rules[signal.rule]
                if signal.status is Status.INACTIVE:
                    transitions += await self._resolve(conn, signal)
                else:
                    device = devices.get(signal.device or "")
                    rule_id = (rule_ids or {}).get(signal.rule)
                    transitions += await self._trigger(conn, signal, spec, device, rule_id)
            await notify(conn, transitions)
        return transitions

    async def _lock_open(self, conn: AsyncConn, fingerprints: list[str]) -> dict[str, str]:
        """Lock the open alerts of these fingerprints (in fingerprint order); their states."""
        if not fingerprints:
            return {}
        cur = await conn.execute(
            "SELECT fingerprint, state FROM alerts WHERE fingerprint = ANY(%s) AND state <> 'resolved' "
            "ORDER BY fingerprint FOR UPDATE",
            (fingerprints,),
        )
        return dict(await cur.fetchall())

    async def _count_repeats(self, conn: AsyncConn, repeats: list[tuple[str, Signal]]) -> None:
        """Repeat triggers of open alerts that change no state: one statement for all of them.

        A busy city repeats far more often than it changes: a statement per signal would make the
        alert store, not the rules, the limit of a pipeline.
        """
        if not repeats:
            return
        merged: dict[str, tuple[int, float | None, int]] = {}  # fingerprint: (count, value, at)
        for fp, signal in repeats:
            n, value, at = merged.get(fp, (0, None, -(1 << 62)))
            if signal.at_us >= at and signal.value is not None:
                value, at = signal.value, signal.at_us
            merged[fp] = (n + signal.observations, value, max(at, signal.at_us))
        fps = sorted(merged)
        await conn.execute(
            """
            UPDATE alerts a SET count = a.count + u.n, last_value = coalesce(u.value, a.last_value),
                last_seen_at = greatest(a.last_seen_at, u.at), updated_at = now()
            FROM unnest(%s::text[], %s::int[], %s::float8[], %s::timestamptz[]) AS u(fp, n, value, at)
            WHERE a.fingerprint = u.fp AND a.state <> 'resolved'
            """,
            (
                fps,
                [merged[fp][0] for fp in fps],
                [merged[fp][1] for fp in fps],
                [_dt(merged[fp][2]) for fp in fps],
            ),
        )

    async def _trigger(
        self, conn: AsyncConn, signal: Signal, spec: RuleSpec, device: DeviceInfo | None, rule_id: int | None
    ) -> list[Transition]:
        fp = fingerprint(signal.rule, signal.subject)
        at = _dt(signal.at_us)
        wanted = AlertState.FIRING if signal.status is Status.FIRING else AlertState.PENDING
        cur = await conn.execute(
            """
            WITH open AS (
                SELECT id, state FROM alerts WHERE fingerprint = %(fp)s AND state <> 'resolved' FOR UPDATE
            )
            UPDATE alerts a SET
                count = a.count + %(n)s, last_value = coalesce(%(value)s, a.last_value),
                last_seen_at = greatest(a.last_seen_at, %(at)s),
                state = CASE WHEN a.state = 'pending' THEN %(wanted)s ELSE a.state END,
                updated_at = now()
            FROM open WHERE a.id = open.id
            RETURNING a.id, open.state, a.state
            """,
            {"fp": fp, "n": signal.observations, "value": signal.value, "at": at, "wanted": wanted.value},
        )
        row = await cur.fetchone()
        if row is not None:
            alert_id, before, after = row
            if before == after:
                return []
            return [await _event(conn, alert_id, "firing", before, after, signal)]
        reopened = await self._reopen(conn, fp, signal, spec, wanted)
        if reopened is not None:
            return [reopened]
        return await self._open(conn, fp, signal, spec, device, wanted, rule_id)

    async def _reopen(
        self, conn: AsyncConn, fp: str, signal: Signal, spec: RuleSpec, wanted: AlertState
    ) -> Transition | None:
        at = _dt(signal.at_us)
        cur = await conn.execute(
            """
            UPDATE alerts SET state = %(wanted)s, resolved_at = NULL, flap_count = flap_count + 1,
                count = count + %(n)s, last_value = %(value)s, last_seen_at = %(at)s, updated_at = now()
            WHERE id = (SELECT id FROM alerts WHERE fingerprint = %(fp)s AND state = 'resolved'
                        AND resolved_at >= %(since)s ORDER BY resolved_at DESC LIMIT 1 FOR UPDATE)
              AND NOT EXISTS (SELECT 1 FROM alerts WHERE fingerprint = %(fp)s AND state <> 'resolved')
            RETURNING id
            """,
            {
                "fp": fp,
                "wanted": wanted.value,
                "n": signal.observations,
                "value": signal.value,
                "at": at,
                "since": at - timedelta(seconds=spec.flap_window_s),
            },
        )
        row = await cur.fetchone()
        if row is None:
            return None
        return await _event(conn, row[0], "reopened", "resolved", wanted.value, signal)

    async def _open(
        self,
        conn: AsyncConn,
        fp: str,
        signal: Signal,
        spec: RuleSpec,
        device: DeviceInfo | None,
        wanted: AlertState,
        rule_id: int | None,
    ) -> list[Transition]:
        at = _dt(signal.at_us)
        labels = {**spec.labels, "rule": spec.name, "subject": signal.subject}
        if device is not None:
            labels |= {"tenant": device.tenant, "device": device.external_id, "kind": device.kind}
            if device.district:
                labels["district"] = device.district
            if device.domain:
                labels["domain"] = device.domain.value
        if signal.metric:
            labels["metric"] = signal.metric
        summary = _summary(spec, signal)
        cur = await conn.execute(
            """
            INSERT INTO alerts (fingerprint, rule_id, state, severity, tenant, labels, summary, evidence,
                                count, last_value, started_at, last_seen_at, silence_id)
            VALUES (%(fp)s, %(rule_id)s, %(state)s, %(severity)s, %(tenant)s, %(labels)s, %(summary)s,
                    %(evidence)s, %(n)s, %(value)s, %(at)s, %(at)s,
                    (SELECT id FROM silences
                     WHERE starts_at <= %(at)s AND ends_at > %(at)s
                       AND (tenant IS NULL OR tenant = %(tenant)s) AND %(labels)s::jsonb @> matchers
                     ORDER BY id LIMIT 1))
            ON CONFLICT (fingerprint) WHERE state <> 'resolved' DO UPDATE SET
                count = alerts.count + excluded.count, last_value = excluded.last_value,
                last_seen_at = greatest(alerts.last_seen_at, excluded.last_seen_at), updated_at = now()
            RETURNING id, (xmax = 0) AS inserted, silence_id
            """,
            {
                "fp": fp,
                "rule_id": rule_id,
                "state": wanted.value,
                "severity": spec.severity.value,
                "tenant": labels.get("tenant", spec.selector.tenant or "all"),
                "labels": orjson.dumps(labels).decode(),
                "summary": summary,
                "evidence": orjson.dumps(
                    {"value": signal.value, "metric": signal.metric, "at": at.isoformat()}
                ).decode(),
                "n": signal.observations,
                "value": signal.value,
                "at": at,
            },
        )
        row = await cur.fetchone()
        assert row is not None
        alert_id, inserted, silence_id = row
        if not inserted:
            return []  # a concurrent writer opened it first; this trigger was counted on it
        opened = await _event(conn, alert_id, "opened", None, wanted.value, signal, silence_id=silence_id)
        return [opened]

    async def _resolve(self, conn: AsyncConn, signal: Signal) -> list[Transition]:
        cur = await conn.execute(
            """
            WITH open AS (
                SELECT id, state FROM alerts WHERE fingerprint = %(fp)s AND state <> 'resolved' FOR UPDATE
            )
            UPDATE alerts a
            SET state = 'resolved', resolved_at = %(at)s, last_value = coalesce(%(value)s, a.last_value),
                updated_at = now()
            FROM open WHERE a.id = open.id
            RETURNING a.id, open.state
            """,
            {"fp": fingerprint(signal.rule, signal.subject), "at": _dt(signal.at_us), "value": signal.value},
        )
        row = await cur.fetchone()
        if row is None:
            return []
        return [await _event(conn, row[0], "resolved", row[1], "resolved", signal)]


async def _event(
    conn: AsyncConn,
    alert_id: int,
    kind: str,
    before: str | None,
    after: str,
    signal: Signal,
    *,
    silence_id: int | None = None,
) -> Transition:
    detail: dict[str, object] = {"value": signal.value, "metric": signal.metric}
    if silence_id is not None:
        detail["silence_id"] = silence_id
    event_id = await record_event(conn, alert_id, kind, before, after, "rules", detail, _dt(signal.at_us))
    return Transition(event_id, alert_id, kind, before, after, silenced=silence_id is not None)


async def record_event(
    conn: AsyncConn,
    alert_id: int,
    kind: str,
    before: str | None,
    after: str | None,
    actor: str,
    detail: Mapping[str, object],
    at: datetime | None = None,
) -> int:
    """Append to ``alert_events``; its id is the feed's event id. ``at`` defaults to the database's now."""
    cur = await conn.execute(
        "INSERT INTO alert_events (alert_id, at, kind, from_state, to_state, actor, detail) "
        "VALUES (%s, coalesce(%s, now()), %s, %s, %s, %s, %s) RETURNING id",
        (alert_id, at, kind, before, after, actor, orjson.dumps(detail).decode()),
    )
    row = await cur.fetchone()
    assert row is not None
    event_id: int = row[0]
    return event_id


def _is_repeat(signal: Signal, open_state: str | None) -> bool:
    """A trigger of an alert that is open and stays in its state (only pending -> firing moves)."""
    if signal.status is Status.INACTIVE or open_state is None:
        return False
    return not (open_state == AlertState.PENDING.value and signal.status is Status.FIRING)


def _summary(spec: RuleSpec, signal: Signal) -> str:
    try:
        return spec.message.format(
            rule=spec.name,
            device=signal.device or signal.subject,
            subject=signal.subject,
            metric=signal.metric or "",
            value=signal.value,
        )
    except (KeyError, IndexError, ValueError):
        return f"{spec.name} on {signal.subject}"


def _dt(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1_000_000, tz=UTC)
