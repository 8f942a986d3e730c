"""The live alert feed: Server-Sent Events driven by ``LISTEN cityops_alerts``, resumable.

One LISTEN connection per API process (the :class:`FeedHub`) wakes every client; each client then
reads the events it has not sent yet from ``alert_events``, filtered like the alert list and scoped
to its key. So a client that reconnects with ``Last-Event-ID`` first receives every event it missed,
in order, then live ones: the database, not the notification, is the source, and nothing is sent
twice. A client too slow to keep up is cut off (it reconnects and catches up from its last id);
idle connections get a heartbeat comment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any

import orjson
import psycopg
from fastapi import APIRouter, Header, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from prometheus_client import Gauge
from psycopg_pool import AsyncConnectionPool

from cityops.apikeys import authenticate
from cityops.db.connection import AsyncConn, connect
from control_api.alerts import Filters
from control_api.deps import Viewer, pool
from control_api.problems import invalid

log = logging.getLogger(__name__)

CHANNEL = "cityops_alerts"
HEARTBEAT_S = 15.0
# Wake-ups a client may have pending; beyond that it is cut off and resumes by itself.
CLIENT_QUEUE = 1000
# Events read from the database per round.
PAGE = 500
LISTEN_RETRY_S = 2.0
WS_UNAUTHORIZED = 4401  # a WebSocket close code in the private range: "401"

router = APIRouter(prefix="/api/v1/alerts", tags=["alerts"])


class FeedHub:
    """Wakes every feed client when an alert event commits."""

    def __init__(self, database_url: str, clients_gauge: Gauge) -> None:
        self._url = database_url
        self._clients: set[asyncio.Queue[None]] = set()
        self._gauge = clients_gauge

    def subscribe(self) -> asyncio.Queue[None]:
        queue: asyncio.Queue[None] = asyncio.Queue(CLIENT_QUEUE)
        self._clients.add(queue)
        self._gauge.set(len(self._clients))
        return queue

    def unsubscribe(self, queue: asyncio.Queue[None]) -> None:
        self._clients.discard(queue)
        self._gauge.set(len(self._clients))

    def _wake(self) -> None:
        for queue in list(self._clients):
            with contextlib.suppress(asyncio.QueueFull):  # a full queue already means "read again"
                queue.put_nowait(None)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                conn = await connect(self._url, autocommit=True)
            except Exception as exc:
                log.warning("feed cannot LISTEN", extra={"error": str(exc)[:200]})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), LISTEN_RETRY_S)
                continue
            try:
                await conn.execute(f"LISTEN {CHANNEL}")
                self._wake()  # events may have committed while we were not listening
                while not stop.is_set():
                    async for _ in conn.notifies(timeout=1.0):
                        self._wake()
            except psycopg.Error as exc:
                log.warning("feed lost its LISTEN connection", extra={"error": str(exc)[:200]})
            finally:
                await conn.close()


def _event_sql(where: list[str]) -> str:
    return (
        "SELECT e.id, e.alert_id, e.at, e.kind, e.from_state, e.to_state, e.actor, e.detail, "
        "a.state, a.severity, a.tenant, a.labels, a.summary, a.last_value "
        f"FROM alert_events e JOIN alerts a ON a.id = e.alert_id WHERE e.id > %s AND {' AND '.join(where)} "
        f"ORDER BY e.id LIMIT {PAGE}"
    )


def _event(row: tuple[Any, ...]) -> dict[str, Any]:
    (event_id, alert_id, at, kind, from_state, to_state, actor, detail,
     state, severity, tenant, labels, summary, last_value) = row  # fmt: skip
    return {
        "event_id": event_id, "alert_id": alert_id, "at": at.isoformat(), "kind": kind,
        "from_state": from_state, "to_state": to_state, "actor": actor, "detail": detail,
        "alert": {"state": state, "severity": severity, "tenant": tenant, "labels": labels,
                  "summary": summary, "last_value": last_value},
    }  # fmt: skip


async def feed_events(
    db: AsyncConnectionPool[AsyncConn],
    hub: FeedHub,
    where: list[str],
    params: list[Any],
    after: int,
    gone: Callable[[], Awaitable[bool]],
    left: asyncio.Event | None = None,
) -> AsyncIterator[dict[str, Any] | None]:
    """Events after ``after`` (every one committed so far, then live ones), in id order; ``None``
    when idle for a heartbeat interval. The first item is ``{"resumed_after": id}``."""
    wake = hub.subscribe()  # before the first read: nothing committed after it is missed
    try:
        if after < 0:
            async with db.connection() as conn:
                cur = await conn.execute("SELECT coalesce(max(id), 0) FROM alert_events")
                row = await cur.fetchone()
                after = int(row[0]) if row else 0
        yield {"resumed_after": after}
        sql = _event_sql(where)
        while not await gone():
            async with db.connection() as conn:
                while True:
                    cur = await conn.execute(sql, [after, *params])
                    rows = await cur.fetchall()
                    for row in rows:
                        after = row[0]
                        yield _event(row)
                    if len(rows) < PAGE:
                        break
            if not await _woken(wake, left):
                yield None
    finally:
        hub.unsubscribe(wake)


@router.get(
    "/stream",
    summary="Live alert events (Server-Sent Events), resumable with Last-Event-ID",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "`id:` is the alert event id"}},
)
async def stream(
    request: Request,
    caller: Viewer,
    filters: Filters,
    since: Annotated[int | None, Query(ge=0, description="resume after this event id")] = None,
    last_event_id: Annotated[str | None, Header(description="SSE resume: the last id received")] = None,
) -> StreamingResponse:
    after = _resume_point(last_event_id, since)
    where, params = filters.where(caller)
    hub: FeedHub = request.app.state.feed
    return StreamingResponse(
        _sse(request, hub, where, params, after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


def _resume_point(last_event_id: str | None, since: int | None) -> int:
    if last_event_id is not None:
        if not last_event_id.isdigit():
            raise invalid("Last-Event-ID", "header", "an event id (a non-negative integer)")
        return int(last_event_id)
    if since is not None:
        return since
    return -1  # from now: set when the stream starts


async def _woken(wake: asyncio.Queue[None], left: asyncio.Event | None) -> bool:
    """Until an event commits (True), the heartbeat interval passes (False) or the client leaves."""
    waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(wake.get())]
    if left is not None:
        waits.append(asyncio.ensure_future(left.wait()))
    done, pending = await asyncio.wait(waits, timeout=HEARTBEAT_S, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return bool(done)


async def _sse(
    request: Request, hub: FeedHub, where: list[str], params: list[Any], after: int
) -> AsyncIterator[bytes]:
    async for item in feed_events(pool(request), hub, where, params, after, request.is_disconnected):
        if item is None:
            yield b": heartbeat %s\n\n" % datetime.now().isoformat(timespec="seconds").encode()
        elif "resumed_after" in item:
            yield b": connected; resuming after event %d\n\n" % item["resumed_after"]
        else:
            yield b"id: %d\nevent: alert\ndata: %s\n\n" % (item["event_id"], orjson.dumps(item))


@router.websocket("/ws")
async def websocket_feed(
    websocket: WebSocket,
    filters: Filters,
    since: Annotated[int | None, Query(ge=0, description="resume after this event id")] = None,
    token: Annotated[str | None, Query(description="the API key, where a header cannot be set")] = None,
) -> None:
    """The same events as the SSE stream, as JSON text messages; resume with ``since``."""
    header = websocket.headers.get("authorization", "")
    key = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else token
    async with pool(websocket).connection() as conn:  # type: ignore[arg-type]
        caller = await authenticate(conn, key) if key else None
    await websocket.accept()  # accepted first, so that a refusal reaches the client as a close code
    if caller is None:
        await websocket.close(code=WS_UNAUTHORIZED, reason="unknown or missing API key")
        return
    where, params = filters.where(caller)
    closed = asyncio.Event()

    async def gone() -> bool:
        return closed.is_set()

    async def watch() -> None:
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                await websocket.receive_text()  # clients say nothing; this notices them leave
        closed.set()

    watcher = asyncio.create_task(watch(), name="ws-feed-watch")
    try:
        async for item in feed_events(pool(websocket), websocket.app.state.feed, where, params,  # type: ignore[arg-type]
                                      -1 if since is None else since, gone, closed):  # fmt: skip
            await websocket.send_text(
                orjson.dumps(item if item is not None else {"heartbeat": True}).decode()
            )
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client left
    finally:
        watcher.cancel()
