"""``cityops pipeline``: gateway + ingest in one process, at least once from MQTT to the database.

intake (event loop)           writer (event loop)                paho thread
  drain the session's inbox     commit a batch (retrying)          receive, timestamp, append
  decode, validate, batch  ──►  evaluate the rows it inserted,     (bounded by receive_maximum)
  flush on size or interval     write their alerts (retrying)
                                PUBACK its messages          ◄──
                                note rollups

Rules see only the rows a commit inserted, so a redelivered batch changes no alert; a batch is
acknowledged after its alerts are written too. At most one built batch waits for the writer: when
the database is slow the intake stops draining, the inbox fills to the in-flight bound, and the
broker holds everything else.

Shutdown (SIGTERM/SIGINT or ``stop``): the intake stops taking messages and hands over its last
batch; the writer commits and acknowledges what it holds, within ``shutdown_timeout``; then the
session disconnects (the broker keeps it, with anything unacknowledged) and the helpers finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from cityops.catalogue import Catalogue
from cityops.codec import Decoder
from cityops.components import Services
from cityops.db.connection import connection
from cityops.db.migrate import recorded_mode
from cityops.errors import MigrationError
from cityops.model import Row
from cityops.settings import Settings, StorageMode
from cityops.topics import Topics
from gateway.batcher import Batcher, PendingBatch
from gateway.metrics import GatewayMetrics
from gateway.presence import run_presence_writer
from gateway.registry import DeviceRegistry
from gateway.session import MqttSession
from ingest.batch import Segment
from ingest.metrics import IngestMetrics
from ingest.rollups import RollupTracker, run_rollup_refresher
from ingest.writer import BatchWriter, WriteResult
from rules import evaluator
from rules.engine import RuleEngine
from rules.metrics import RuleMetrics

log = logging.getLogger(__name__)
_T = TypeVar("_T")


def wall_clock_us() -> int:
    return time.time_ns() // 1000


@dataclass
class Pipeline:
    """One pipeline; :meth:`run` owns every resource it opens."""

    settings: Settings
    catalogue: Catalogue
    services: Services
    now_us: Callable[[], int] = wall_clock_us
    metrics_registry: CollectorRegistry | None = None

    def __post_init__(self) -> None:
        self.registry = self.metrics_registry or CollectorRegistry()
        self.gateway_metrics = GatewayMetrics(self.registry)
        self.ingest_metrics = IngestMetrics(self.registry)
        self.rule_metrics = RuleMetrics(self.registry)
        self.last_seen: dict[int, int] = {}
        self.tracker = RollupTracker()

    async def run(self, stop: asyncio.Event, ready: Callable[[], Awaitable[None]] | None = None) -> None:
        async with contextlib.AsyncExitStack() as resources:
            mode = await self._storage_mode()
            devices = DeviceRegistry(self.services.database_url, self.gateway_metrics)
            await devices.load()
            self.rule_devices = RuleDevices(devices, self.catalogue)
            self.engine: RuleEngine | None = None
            if self.settings.rules_enabled:
                self.engine = await resources.enter_async_context(
                    RuleEngine(
                        self.services.database_url,
                        self.catalogue,
                        self.settings,
                        self.rule_metrics,
                        self.now_us,
                    )
                )
                await self.engine.start(self.rule_devices.all())
            await self._run(mode, devices, stop, ready)

    async def _run(
        self,
        mode: StorageMode,
        devices: DeviceRegistry,
        stop: asyncio.Event,
        ready: Callable[[], Awaitable[None]] | None,
    ) -> None:
        s = self.settings
        session = MqttSession(
            s,
            self.services.mqtt_url,
            self.gateway_metrics,
            self.now_us,
            shared=self.services.shared_subscriptions,
        )
        self.session = session
        self.gateway_metrics.inflight.set_function(lambda: session.inflight)
        # First, so that a broker that cannot be reached leaves nothing running behind it; messages
        # that arrive before the intake starts wait in the session's inbox.
        await session.start()
        writer = BatchWriter(self.services.database_url, mode, self.ingest_metrics)
        batcher = Batcher(
            Decoder(self.catalogue, s.max_clock_skew),
            devices,
            Topics(s.topic_root),
            self.gateway_metrics,
            self.last_seen,
        )
        queue: asyncio.Queue[PendingBatch | None] = asyncio.Queue(maxsize=1)
        helpers_stop = asyncio.Event()
        helpers = [
            asyncio.create_task(devices.follow_changes(helpers_stop), name="registry-listener"),
            asyncio.create_task(
                run_presence_writer(
                    self.services.database_url, self.last_seen, helpers_stop, interval_s=s.presence_interval
                ),
                name="presence-writer",
            ),
            asyncio.create_task(
                run_rollup_refresher(
                    self.services.database_url,
                    mode,
                    self.tracker,
                    self.ingest_metrics,
                    helpers_stop,
                    interval_s=s.rollup_interval,
                    clock=_utc_now,
                ),
                name="rollup-refresher",
            ),
        ]
        if self.engine is not None:
            helpers += [
                asyncio.create_task(self.engine.follow_changes(helpers_stop), name="rules-listener"),
                asyncio.create_task(
                    self.engine.run_ticker(helpers_stop, before_tick=self._sync_rule_devices),
                    name="rules-ticker",
                ),
            ]
        metrics_server = self._serve_metrics()
        intake = asyncio.create_task(self._intake(session, batcher, devices, queue, stop), name="intake")
        committer = asyncio.create_task(self._commit_loop(session, writer, queue), name="writer")
        log.info(
            "pipeline running",
            extra={"storage": mode.value, "devices": len(devices), "receive_maximum": s.receive_maximum},
        )
        try:
            if ready is not None:
                await ready()
            stop_wait = asyncio.create_task(stop.wait(), name="pipeline-stop-wait")
            await asyncio.wait([stop_wait, intake, committer], return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
        finally:
            await self._shutdown(session, writer, intake, committer, helpers, helpers_stop, stop)
            if metrics_server is not None:
                metrics_server.shutdown()
        for task in (intake, committer):
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _storage_mode(self) -> StorageMode:
        async with connection(self.services.database_url) as conn:
            mode = await recorded_mode(conn)
        if mode is None:
            raise MigrationError("the database is not migrated: run `cityops db migrate` first")
        return mode

    def _serve_metrics(self) -> WSGIServer | None:
        port = self.settings.pipeline_metrics_port
        if not port:
            return None
        server, _thread = start_http_server(port, addr=self.settings.api_host, registry=self.registry)
        log.info("pipeline metrics", extra={"url": f"http://{self.settings.api_host}:{port}/metrics"})
        return server

    # --- intake ----------------------------------------------------------------------------------
    async def _intake(
        self,
        session: MqttSession,
        batcher: Batcher,
        devices: DeviceRegistry,
        queue: asyncio.Queue[PendingBatch | None],
        stop: asyncio.Event,
    ) -> None:
        s = self.settings
        inbox, has_mail = session.inbox, session.has_mail
        # Flush at half the in-flight bound, so the broker keeps sending while a batch commits.
        max_messages = max(1, s.receive_maximum // 2)
        max_rows, interval = s.batch_max_rows, s.batch_interval
        first_at = 0.0
        wake_on_stop = asyncio.create_task(_set_on(stop, has_mail), name="intake-wake-on-stop")
        try:
            while not stop.is_set():
                pending = batcher.pending
                if not inbox:
                    has_mail.clear()
                    if not inbox:
                        timeout = max(0.0, first_at + interval - time.monotonic()) if len(pending) else None
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(has_mail.wait(), timeout)
                if stop.is_set():
                    break
                while inbox and len(pending) < max_messages and pending.batch.rows < max_rows:
                    if not len(pending):
                        first_at = time.monotonic()
                    batcher.accept(inbox.popleft())
                batcher.count()
                full = len(pending) >= max_messages or pending.batch.rows >= max_rows
                if len(pending) and (full or time.monotonic() - first_at >= interval):
                    await self._hand_over(batcher, devices, queue)
            # Stopping: what was received before the stop is committed and acknowledged (a bounded
            # amount: the in-flight limit); whatever arrives later stays unacknowledged for redelivery.
            for _ in range(len(inbox)):
                batcher.accept(inbox.popleft())
                if len(batcher.pending) >= max_messages or batcher.pending.batch.rows >= max_rows:
                    await self._hand_over(batcher, devices, queue)
            batcher.count()
            if len(batcher.pending):
                await self._hand_over(batcher, devices, queue)
        finally:
            wake_on_stop.cancel()
            await queue.put(None)

    async def _hand_over(
        self, batcher: Batcher, devices: DeviceRegistry, queue: asyncio.Queue[PendingBatch | None]
    ) -> None:
        if batcher.pending.unknown:
            await devices.reload_for_miss()
            batcher.settle_unknown()
        pending = batcher.take()
        self.gateway_metrics.batches_waiting.set(queue.qsize() + 1)
        await queue.put(pending)

    # --- writer ----------------------------------------------------------------------------------
    async def _commit_loop(
        self, session: MqttSession, writer: BatchWriter, queue: asyncio.Queue[PendingBatch | None]
    ) -> None:
        """Commit batches in order; hand each to the alert stage (or acknowledge it, without rules)."""
        alerts: asyncio.Queue[tuple[PendingBatch, WriteResult] | None] = asyncio.Queue(maxsize=1)
        alert_stage = None
        if self.engine is not None:
            # Rules are CPU in this process, COPY is CPU in the database's: evaluating batch N while
            # batch N+1 commits keeps both busy. Batches still reach the rules in commit order, and a
            # message is acknowledged only after its alerts are written.
            alert_stage = asyncio.create_task(self._alert_loop(self.engine, session, alerts), name="alerts")
        try:
            while True:
                pending = await queue.get()
                self.gateway_metrics.batches_waiting.set(queue.qsize())
                if pending is None:
                    break
                result = await writer.write(pending.batch)
                self.ingest_metrics.batch_rows.observe(result.rows_offered)
                self.tracker.note(result)
                if alert_stage is None:
                    self._acknowledge(session, pending)
                else:
                    await _put_unless_done(alerts, (pending, result), alert_stage)
            if alert_stage is not None:
                await _put_unless_done(alerts, None, alert_stage)
                await alert_stage
        finally:
            if alert_stage is not None and not alert_stage.done():
                alert_stage.cancel()

    async def _alert_loop(
        self,
        engine: RuleEngine,
        session: MqttSession,
        alerts: asyncio.Queue[tuple[PendingBatch, WriteResult] | None],
    ) -> None:
        while (item := await alerts.get()) is not None:
            pending, result = item
            if result.inserted:
                await engine.evaluate(self.rule_devices.segments(result.inserted))
            self._acknowledge(session, pending)

    def _acknowledge(self, session: MqttSession, pending: PendingBatch) -> None:
        session.ack(pending.messages)
        if pending.messages:
            oldest = pending.messages[0].received_us  # messages are in arrival order
            self.gateway_metrics.ack_lag.observe(max(0.0, (self.now_us() - oldest) / 1_000_000))

    def _sync_rule_devices(self) -> None:
        assert self.engine is not None
        if self.rule_devices.refresh():
            self.engine.set_devices(self.rule_devices.all())

    # --- shutdown --------------------------------------------------------------------------------
    async def _shutdown(
        self,
        session: MqttSession,
        writer: BatchWriter,
        intake: asyncio.Task[None],
        committer: asyncio.Task[None],
        helpers: list[asyncio.Task[None]],
        helpers_stop: asyncio.Event,
        stop: asyncio.Event,
    ) -> None:
        stop.set()
        deadline = self.settings.shutdown_timeout
        started = time.monotonic()
        log.info("pipeline stopping: no new messages; committing what is held")
        try:
            await asyncio.wait_for(asyncio.gather(intake, committer), deadline)
        except TimeoutError:
            log.warning(
                "shutdown deadline passed with batches uncommitted; the broker redelivers them",
                extra={"deadline_s": deadline},
            )
        except Exception:
            log.exception("pipeline task failed")
        for task in (intake, committer):
            task.cancel()
        await asyncio.gather(intake, committer, return_exceptions=True)
        await session.stop()
        helpers_stop.set()
        remaining = max(1.0, deadline - (time.monotonic() - started))
        _done, pending = await asyncio.wait(helpers, timeout=remaining)
        for task in pending:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        await writer.close()
        log.info("pipeline stopped", extra={"seconds": round(time.monotonic() - started, 2)})


class RuleDevices:
    """The gateway's registry as the rule engine sees it: the domain from the kind, the tags.

    Rebuilt lazily when the registry reloads (its ``version`` moves).
    """

    def __init__(self, registry: DeviceRegistry, catalogue: Catalogue) -> None:
        self._registry = registry
        self._catalogue = catalogue
        self._version = -1
        self._devices: dict[str, evaluator.DeviceInfo] = {}
        self.refresh()

    def refresh(self) -> bool:
        """Catch up with the registry; True when it had changed."""
        if self._version == self._registry.version:
            return False
        kinds = self._catalogue.kinds
        self._devices = {
            d.external_id: evaluator.DeviceInfo(
                d.id,
                d.external_id,
                d.tenant,
                d.kind,
                kinds[d.kind].domain if d.kind in kinds else None,
                d.district,
                d.tags,
            )
            for d in self._registry.all()
            if d.enabled
        }
        self._version = self._registry.version
        return True

    def all(self) -> list[evaluator.DeviceInfo]:
        return list(self._devices.values())

    def segments(self, inserted: list[Segment]) -> Iterator[tuple[evaluator.DeviceInfo, list[Row]]]:
        self.refresh()
        for segment in inserted:
            device = self._devices.get(segment.device or "")
            if device is not None:
                yield device, segment.rows


async def _put_unless_done(queue: asyncio.Queue[_T], item: _T, consumer: asyncio.Task[None]) -> None:
    """Put ``item``, unless the consumer ends first (then its exception, if any, is raised)."""
    put = asyncio.ensure_future(queue.put(item))
    await asyncio.wait([put, consumer], return_when=asyncio.FIRST_COMPLETED)
    if not put.done():
        put.cancel()
        consumer.result()
        raise RuntimeError("the alert stage ended before the writer")


async def _set_on(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


def _utc_now() -> datetime:
    return datetime.now(UTC)


class PipelineComponent:
    """The pipeline as a ``cityops`` component: ``cityops pipeline``, and part of ``cityops up``."""

    name = "pipeline"
    help = "MQTT gateway + ingest: store every reading, acknowledge after commit"
    order = 10

    def describe(self, settings: Settings, services: Services) -> str:
        metrics = (
            f", metrics http://{settings.api_host}:{settings.pipeline_metrics_port}/metrics"
            if settings.pipeline_metrics_port
            else ""
        )
        topics = f"{settings.topic_root}/v1/+/telemetry"
        group = settings.subscription_group if services.shared_subscriptions else ""
        return f"pipeline: {f'$share/{group}/' if group else ''}{topics}{metrics}"

    async def run(
        self, settings: Settings, catalogue: Catalogue, services: Services, stop: asyncio.Event
    ) -> None:
        await Pipeline(settings, catalogue, services).run(stop)


component = PipelineComponent()
