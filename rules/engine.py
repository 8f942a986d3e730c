"""The rule engine of a running pipeline: the evaluator, the alert store, and their database.

- Rules come from the ``rules`` table and are reloaded when it changes (``NOTIFY cityops_rules``);
  rules whose spec did not change keep their state.
- :meth:`RuleEngine.evaluate` takes the rows a batch actually inserted (a redelivered reading is not
  among them), so the same readings twice produce the same alerts once.
- :meth:`RuleEngine.tick` lets time decide: ``no_data``, ``for`` between sparse readings, schedules
  ending, shelves expiring. Time comes from the injected clock.
- :meth:`RuleEngine.start` rebuilds state after a restart: open alerts seed hysteresis, each
  device's ``last_seen`` seeds its silence, recent readings are replayed (as far back as the rules
  watching each metric need), and the open alerts are then reconciled with what the replay decided.

Alert writes are retried on transient database errors with backoff while the caller waits (the
pipeline acknowledges a batch only after its alerts are written); evaluation and writing hold one
lock, so batches and ticks reach the store in the order they were evaluated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from types import TracebackType

from cityops.catalogue import Catalogue
from cityops.db.connection import AsyncConn, OwnConnection
from cityops.db.listen import follow
from cityops.db.retry import Backoff, is_transient
from cityops.model import Row
from cityops.settings import Settings
from rules.actions import expire_shelves
from rules.conditions import US, Status
from rules.evaluator import Clock, DeviceInfo, Evaluator, Signal
from rules.metrics import RuleMetrics
from rules.repository import install_default_packs, load_rule_table, rules_table_is_empty
from rules.store import AlertStore, Transition

log = logging.getLogger(__name__)

CHANNEL = "cityops_rules"
# Replayed rows are fetched from a server-side cursor this many at a time.
REPLAY_FETCH_ROWS = 10_000

Sleep = Callable[[float], Awaitable[None]]


class RuleEngine:
    def __init__(
        self,
        database_url: str,
        catalogue: Catalogue,
        settings: Settings,
        metrics: RuleMetrics,
        clock: Clock,
        *,
        backoff: Backoff | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._url = database_url
        self._catalogue = catalogue
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._backoff = backoff or Backoff()
        self._sleep = sleep
        self._conn = OwnConnection(database_url)
        self._lock = asyncio.Lock()
        self._store = AlertStore()
        self._rule_ids: dict[str, int] = {}
        self.evaluator = Evaluator([], catalogue, clock)

    async def __aenter__(self) -> RuleEngine:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._conn.drop()

    # --- start ---------------------------------------------------------------------------------
    async def start(self, devices: Iterable[DeviceInfo]) -> None:
        """Load the rules (installing the default packs into an empty table) and rebuild state."""
        started = time.perf_counter()
        conn = await self._conn.get()
        if self._settings.rules_install_defaults and await rules_table_is_empty(conn):
            reports = await install_default_packs(conn, self._catalogue)
            log.info(
                "installed the default rule packs", extra={"rules": sum(r.created for r in reports.values())}
            )
        await self._load(conn)
        devices = list(devices)
        open_alerts = await self._open_alerts(conn)
        for rule, subject in open_alerts:
            self.evaluator.assume_firing(rule, subject)
        replayed = await self._replay(conn, {d.external_id: d for d in devices})
        # After the replay, which made every replayed device look just heard from: the registry
        # knows when each was really last heard from.
        await self._seed_silences(conn, devices)
        transitions = await self._reconcile(open_alerts)
        log.info(
            "rule state rebuilt",
            extra={
                "rules": len(self.evaluator.rules),
                "open_alerts": len(open_alerts),
                "replayed_readings": replayed,
                "reconciled": len(transitions),
                "seconds": round(time.perf_counter() - started, 2),
            },
        )

    async def _seed_silences(self, conn: AsyncConn, devices: list[DeviceInfo]) -> None:
        cur = await conn.execute(
            "SELECT external_id, (extract(epoch FROM last_seen) * 1000000)::bigint FROM devices "
            "WHERE last_seen IS NOT NULL"
        )
        last_seen: dict[str, int] = dict(await cur.fetchall())
        for device in devices:
            self.evaluator.watch_for_silence(device, last_seen.get(device.external_id))

    async def _open_alerts(self, conn: AsyncConn) -> set[tuple[str, str]]:
        cur = await conn.execute(
            "SELECT labels->>'rule', labels->>'subject' FROM alerts "
            "WHERE state <> 'resolved' AND labels ? 'rule' AND labels ? 'subject'"
        )
        rules = self.evaluator.rules
        return {(rule, subject) for rule, subject in await cur.fetchall() if rule in rules}

    async def _replay(self, conn: AsyncConn, devices: dict[str, DeviceInfo]) -> int:
        """Feed recent readings, oldest first per metric, to the evaluator; its signals are dropped."""
        cap_us = int(self._settings.rules_replay_max_hours * 3600 * US)
        now_us = self._clock()
        horizons: dict[int, list[int]] = {}
        for metric in self._catalogue.metrics.values():
            horizon = min(self.evaluator.horizon_us(metric.id), cap_us)
            if horizon:
                horizons.setdefault(horizon, []).append(metric.id)
        replayed = 0
        for horizon, metric_ids in sorted(horizons.items()):
            since = datetime.fromtimestamp((now_us - horizon) / US, tz=UTC)
            async with conn.transaction():
                cur = conn.cursor("rules_replay")
                await cur.execute(
                    "SELECT d.external_id, r.metric_id, (extract(epoch FROM r.time) * 1000000)::bigint, "
                    "r.value, r.quality FROM readings r JOIN devices d ON d.id = r.device_id "
                    "WHERE r.time >= %s AND r.metric_id = ANY(%s) ORDER BY r.time",
                    (since, metric_ids),
                )
                while rows := await cur.fetchmany(REPLAY_FETCH_ROWS):
                    replayed += len(rows)
                    for external_id, metric_id, time_us, value, quality in rows:
                        device = devices.get(external_id)
                        if device is not None:
                            self.evaluator.observe(device, [(time_us, metric_id, value, quality)])
                await cur.close()
        self._metrics.replayed.inc(replayed)
        return replayed

    async def _reconcile(self, open_alerts: set[tuple[str, str]]) -> list[Transition]:
        """Make the open alerts agree with the rebuilt state (counting nothing twice)."""
        now = self._clock()
        statuses = self.evaluator.statuses()
        signals = [
            Signal(rule, subject, _device_of(subject), status, None, None, now, observations=0)
            for (rule, subject), status in statuses.items()
            if status is not Status.INACTIVE
        ]
        signals += [
            Signal(rule, subject, _device_of(subject), Status.INACTIVE, None, None, now, observations=0)
            for rule, subject in open_alerts
            if statuses.get((rule, subject), Status.INACTIVE) is Status.INACTIVE
        ]
        async with self._lock:
            return await self._write(signals)

    # --- rules ---------------------------------------------------------------------------------
    async def _load(self, conn: AsyncConn) -> None:
        table = await load_rule_table(conn, self._catalogue)
        for problem in table.invalid:
            log.warning("rule skipped: it does not validate", extra={"problem": problem[:500]})
        async with self._lock:
            self.evaluator.set_rules(table.specs.values())
            self._rule_ids = table.ids
        self._metrics.rules_loaded.set(len(self.evaluator.rules))
        self._metrics.rules_invalid.set(len(table.invalid))

    async def follow_changes(self, stop: asyncio.Event) -> None:
        """LISTEN for rule changes and reload; reconnects when the connection drops."""
        await follow(self._url, CHANNEL, self._reload_on, stop, what="rules")

    async def _reload_on(self, conn: AsyncConn) -> None:
        """Read the rules table again (rules whose spec is unchanged keep their state)."""
        await self._load(conn)
        self._metrics.reloads.inc()
        log.info("rules reloaded", extra={"rules": len(self.evaluator.rules)})

    def set_devices(self, devices: Iterable[DeviceInfo]) -> None:
        """The registry changed: selectors are matched again, new devices' silences are watched."""
        self.evaluator.forget_devices()
        for device in devices:
            self.evaluator.watch_for_silence(device)

    # --- evaluation ----------------------------------------------------------------------------
    async def evaluate(self, segments: Iterable[tuple[DeviceInfo, list[Row]]]) -> list[Transition]:
        """Evaluate inserted rows and write the alerts they change; returns once they are committed."""
        async with self._lock:
            started = time.perf_counter()
            signals: list[Signal] = []
            readings = 0
            for device, rows in segments:
                readings += len(rows)
                signals += self.evaluator.observe(device, rows)
            self._metrics.readings.inc(readings)
            self._metrics.evaluate_seconds.observe(time.perf_counter() - started)
            return await self._write(signals)

    async def tick(self) -> list[Transition]:
        """What time alone decides, then shelves whose time is up."""
        async with self._lock:
            transitions = await self._write(self.evaluator.tick())
            now = datetime.fromtimestamp(self._clock() / US, tz=UTC)
            transitions += await self._retrying(lambda conn: expire_shelves(conn, now))
        return transitions

    async def run_ticker(self, stop: asyncio.Event, before_tick: Callable[[], None] | None = None) -> None:
        interval = self._settings.rules_tick_interval
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if stop.is_set():
                return
            if before_tick is not None:
                before_tick()
            try:
                await self.tick()
            except Exception:
                log.exception("rule tick failed; trying again next tick")

    # --- store ---------------------------------------------------------------------------------
    async def _write(self, signals: list[Signal]) -> list[Transition]:
        if not signals:
            return []
        self._metrics.signals.inc(len(signals))
        rules, devices = self.evaluator.rules, self.evaluator.devices
        try:
            transitions = await self._retrying(
                lambda conn: self._store.apply(conn, signals, rules, devices, self._rule_ids)
            )
        except Exception:
            # Not a database outage (those are retried): a bug or bad data. Counted and logged; the
            # next change of the same rule and subject carries the state again.
            self._metrics.store_errors.inc()
            log.exception("alert write failed; signals dropped", extra={"signals": len(signals)})
            return []
        for t in transitions:
            self._metrics.transitions.labels(t.kind).inc()
        return transitions

    async def _retrying(self, write: Callable[[AsyncConn], Awaitable[list[Transition]]]) -> list[Transition]:
        while True:
            try:
                result = await write(await self._conn.get())
                self._backoff.reset()
                return result
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self._metrics.retries.inc()
                delay = self._backoff.next_delay()
                log.warning(
                    "database unavailable; alerts kept, retrying",
                    extra={"error": str(exc).strip()[:200], "retry_in_s": round(delay, 2)},
                )
                await self._conn.drop()
                await self._sleep(delay)


def _device_of(subject: str) -> str | None:
    return None if subject.startswith("district:") else subject
