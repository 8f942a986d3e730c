"""The control API on a real database: auth and roles, the tenancy matrix, alerts and their actions,
problem details for bad input, and the live feed resuming without gap or duplicate."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
import uvicorn

from cityops.apikeys import Role, create_key
from cityops.catalogue import Catalogue
from cityops.db.connection import AsyncConn
from cityops.embedded import free_port
from cityops.model import DeviceSpec, Domain
from cityops.settings import Settings
from control_api.app import create_app
from control_api.component import _Server
from rules.conditions import Status
from rules.evaluator import DeviceInfo, Signal
from rules.spec import RuleSpec, parse_rules
from rules.store import AlertStore
from tests.pipeline_helpers import register_fleet
from tests.waiting import eventually

NOW = datetime(2026, 7, 1, 12, tzinfo=UTC)
FLEET = [
    DeviceSpec(external_id="pd-1", tenant="water", kind="ponding_gauge", name="Ponding 1", district="tianhe",
               lat=23.12, lon=113.36),
    DeviceSpec(external_id="pd-2", tenant="water", kind="ponding_gauge", name="Ponding 2", district="haizhu",
               lat=23.08, lon=113.31),
    DeviceSpec(external_id="gd-1", tenant="gas", kind="gas_detector", name="Gas 1", district="tianhe",
               lat=23.13, lon=113.37),
]  # fmt: skip


@dataclass
class Api:
    client: httpx.AsyncClient
    conn: AsyncConn
    keys: dict[str, str]
    rules: dict[str, RuleSpec]
    devices: dict[str, DeviceInfo]

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}

    async def raise_alert(self, rule: str, device: str, at: datetime, status: Status = Status.FIRING) -> int:
        signal = Signal(rule, device, device, status, 30.0, None, int(at.timestamp() * 1_000_000))
        (t,) = await AlertStore().apply(self.conn, [signal], self.rules, self.devices)
        return t.alert_id


def _rules(catalogue: Catalogue) -> dict[str, RuleSpec]:
    specs = parse_rules(
        [
            {"name": "ponding", "severity": "high", "source": "t",
             "condition": {"type": "threshold", "metric": "ponding_depth", "op": ">=", "value": 15}},
            {"name": "leak", "severity": "critical", "source": "t",
             "condition": {"type": "threshold", "metric": "combustible_gas_lel", "op": ">=", "value": 20}},
        ],
        catalogue,
    )  # fmt: skip
    return {s.name: s for s in specs}


async def _keys(conn: AsyncConn) -> dict[str, str]:
    made = {
        "admin": ("admin", Role.ADMIN, None),
        "water_viewer": ("water viewer", Role.VIEWER, ["water"]),
        "water_operator": ("water operator", Role.OPERATOR, ["water"]),
        "gas_operator": ("gas operator", Role.OPERATOR, ["gas"]),
    }
    return {
        who: (await create_key(conn, name, role, tenants))[1] for who, (name, role, tenants) in made.items()
    }


@pytest.fixture
async def api(migrated_conn: AsyncConn, settings: Settings, catalogue: Catalogue) -> AsyncIterator[Api]:
    ids = await register_fleet(migrated_conn, FLEET)
    devices = {
        "pd-1": DeviceInfo(ids["pd-1"], "pd-1", "water", "ponding_gauge", Domain.DRAINAGE, "tianhe"),
        "pd-2": DeviceInfo(ids["pd-2"], "pd-2", "water", "ponding_gauge", Domain.DRAINAGE, "haizhu"),
        "gd-1": DeviceInfo(ids["gd-1"], "gd-1", "gas", "gas_detector", Domain.GAS, "tianhe"),
    }
    assert settings.database_url is not None
    app = create_app(settings, catalogue, settings.database_url, clock=lambda: NOW)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield Api(client, migrated_conn, await _keys(migrated_conn), _rules(catalogue), devices)


def problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"].endswith("/" + slug) and body["status"] == status
    return body


async def test_no_key_or_a_bad_key_is_401(api: Api) -> None:
    problem(await api.client.get("/api/v1/alerts"), 401, "unauthorized")
    bad = await api.client.get("/api/v1/alerts", headers={"Authorization": "Bearer cok_nope_nope"})
    assert problem(bad, 401, "unauthorized")["detail"] == "unknown or revoked API key"


async def test_tenancy_matrix_a_water_key_cannot_see_or_act_on_gas(api: Api) -> None:
    water = await api.raise_alert("ponding", "pd-1", NOW)
    gas = await api.raise_alert("leak", "gd-1", NOW + timedelta(seconds=1))
    listed = (await api.client.get("/api/v1/alerts", headers=api.auth("water_viewer"))).json()
    assert [a["id"] for a in listed["items"]] == [water]
    admin = (await api.client.get("/api/v1/alerts", headers=api.auth("admin"))).json()
    assert [a["id"] for a in admin["items"]] == [gas, water]
    for who in ("water_viewer", "water_operator"):
        problem(await api.client.get(f"/api/v1/alerts/{gas}", headers=api.auth(who)), 404, "not-found")
    problem(
        await api.client.post(f"/api/v1/alerts/{gas}/ack", headers=api.auth("water_operator")),
        404,
        "not-found",
    )
    problem(
        await api.client.post(f"/api/v1/alerts/{water}/ack", headers=api.auth("gas_operator")),
        404,
        "not-found",
    )
    devices = (await api.client.get("/api/v1/devices", headers=api.auth("water_viewer"))).json()
    assert [d["id"] for d in devices["items"]] == ["pd-1", "pd-2"]
    problem(await api.client.get("/api/v1/devices/gd-1", headers=api.auth("water_viewer")), 404, "not-found")
    gas_devices = (await api.client.get("/api/v1/devices", headers=api.auth("gas_operator"))).json()
    assert [d["id"] for d in gas_devices["items"]] == ["gd-1"]


async def test_roles_viewers_read_operators_act_and_every_action_is_audited(api: Api) -> None:
    alert = await api.raise_alert("ponding", "pd-1", NOW)
    denied = await api.client.post(f"/api/v1/alerts/{alert}/ack", headers=api.auth("water_viewer"))
    assert "needs the operator role" in problem(denied, 403, "forbidden")["detail"]
    acked = await api.client.post(
        f"/api/v1/alerts/{alert}/ack", headers=api.auth("water_operator"), json={"comment": "crew on the way"}
    )
    assert acked.status_code == 200 and acked.json()["state"] == "acknowledged"
    assert [e["kind"] for e in acked.json()["events"]] == ["opened", "acknowledged"]
    again = await api.client.post(f"/api/v1/alerts/{alert}/ack", headers=api.auth("water_operator"))
    assert (
        problem(again, 409, "invalid-transition")["detail"]
        == "cannot acknowledge an alert that is acknowledged"
    )
    until = (NOW + timedelta(hours=2)).isoformat()
    shelved = await api.client.post(
        f"/api/v1/alerts/{alert}/shelve", headers=api.auth("water_operator"), json={"until": until}
    )
    assert shelved.json()["state"] == "shelved"
    assign = await api.client.post(
        f"/api/v1/alerts/{alert}/assign", headers=api.auth("water_operator"), json={"assignee": "crew-3"}
    )
    assert assign.json()["assignee"] == "crew-3"
    resolved = await api.client.post(f"/api/v1/alerts/{alert}/resolve", headers=api.auth("water_operator"))
    assert resolved.json()["state"] == "resolved"
    cur = await api.conn.execute(
        "SELECT actor, action, object_id, before->>'state', after->>'state' FROM audit_log ORDER BY id"
    )
    rows = await cur.fetchall()
    assert [r[1] for r in rows] == ["alert.acknowledge", "alert.shelve", "alert.assign", "alert.resolve"]
    assert all(r[0].endswith(":water operator") and r[2] == str(alert) for r in rows)
    assert (rows[0][3], rows[0][4]) == ("firing", "acknowledged")


async def test_filters_and_keyset_pages(api: Api) -> None:
    ids = [
        await api.raise_alert("ponding", device, NOW + timedelta(minutes=i))
        for i, device in enumerate(["pd-1", "pd-2"])
    ]
    ids.append(await api.raise_alert("leak", "gd-1", NOW + timedelta(minutes=5)))
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await api.client.get("/api/v1/alerts", headers=api.auth("admin"), params=params)).json()
        seen += [a["id"] for a in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids, reverse=True)
    tianhe = (
        await api.client.get("/api/v1/alerts", headers=api.auth("admin"), params={"district": "tianhe"})
    ).json()
    assert {a["id"] for a in tianhe["items"]} == {ids[0], ids[2]}
    gas = (
        await api.client.get(
            "/api/v1/alerts", headers=api.auth("admin"), params={"domain": "gas", "severity": "critical"}
        )
    ).json()
    assert [a["id"] for a in gas["items"]] == [ids[2]]


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("/api/v1/alerts", {"limit": 0}, "limit"),
        ("/api/v1/alerts", {"limit": 100000}, "limit"),
        ("/api/v1/alerts", {"state": "exploded"}, "state.0"),
        ("/api/v1/alerts", {"since": "yesterday"}, "since"),
        ("/api/v1/alerts", {"cursor": "!!"}, "cursor"),
        ("/api/v1/alerts/abc", {}, "alert_id"),
        ("/api/v1/devices", {"bbox": "1,2,3"}, "bbox"),
        ("/api/v1/devices", {"domain": "weather"}, "domain"),
        ("/api/v1/dead-letters", {"reason": "because"}, "reason.0"),
    ],
)
async def test_bad_parameters_are_422_naming_the_field(
    api: Api, path: str, params: dict[str, Any], field: str
) -> None:
    body = problem(
        await api.client.get(path, params=params, headers=api.auth("admin")), 422, "invalid-parameters"
    )
    assert field in [e["field"] for e in body["errors"]], body


async def test_shelve_needs_a_future_time_and_bodies_are_validated(api: Api) -> None:
    alert = await api.raise_alert("ponding", "pd-1", NOW)
    past = await api.client.post(
        f"/api/v1/alerts/{alert}/shelve",
        headers=api.auth("admin"),
        json={"until": (NOW - timedelta(hours=1)).isoformat()},
    )
    problem(past, 409, "invalid-transition")
    missing = await api.client.post(f"/api/v1/alerts/{alert}/shelve", headers=api.auth("admin"), json={})
    assert [e["field"] for e in problem(missing, 422, "invalid-parameters")["errors"]] == ["until"]
    empty = await api.client.post(
        f"/api/v1/alerts/{alert}/comment", headers=api.auth("admin"), json={"comment": ""}
    )
    problem(empty, 422, "invalid-parameters")


async def test_devices_presence_latest_and_dead_letters(api: Api, catalogue: Catalogue) -> None:
    await api.conn.execute(
        "UPDATE devices SET last_seen = %s WHERE external_id = 'pd-1'", (NOW - timedelta(minutes=1),)
    )
    await api.conn.execute(
        "UPDATE devices SET last_seen = %s WHERE external_id = 'pd-2'", (NOW - timedelta(minutes=20),)
    )
    online = (
        await api.client.get("/api/v1/devices", headers=api.auth("admin"), params={"presence": "online"})
    ).json()
    assert [d["id"] for d in online["items"]] == ["pd-1"]
    stale = (
        await api.client.get("/api/v1/devices", headers=api.auth("admin"), params={"presence": "stale"})
    ).json()
    assert [d["id"] for d in stale["items"]] == ["pd-2"]
    boxed = (
        await api.client.get(
            "/api/v1/devices", headers=api.auth("admin"), params={"bbox": "113.35,23.10,113.40,23.20"}
        )
    ).json()
    assert [d["id"] for d in boxed["items"]] == ["gd-1", "pd-1"]
    await api.conn.execute("SELECT cityops_ensure_partitions(%s::date, %s::date)", (NOW.date(), NOW.date()))
    await api.conn.execute(
        "INSERT INTO readings (time, device_id, metric_id, value, quality) "
        "SELECT t, d.id, %s, v, 0 FROM devices d, (VALUES (%s::timestamptz, 3.0), (%s::timestamptz, 7.5)) AS x(t, v) "
        "WHERE d.external_id = 'pd-1'",
        (catalogue.metrics["ponding_depth"].id, NOW - timedelta(minutes=2), NOW - timedelta(minutes=1)),
    )
    latest = (await api.client.get("/api/v1/devices/pd-1/latest", headers=api.auth("water_viewer"))).json()
    assert [(v["metric"], v["value"], v["unit"]) for v in latest] == [("ponding_depth", 7.5, "cm")]
    await api.conn.execute(
        "INSERT INTO dead_letters (received_at, topic, device, reason, detail, payload) VALUES "
        "(%s, 't', 'gd-1', 'malformed_payload', 'x', 'garbage'), (%s, 't', 'ghost', 'unknown_device', 'y', '{}')",
        (NOW, NOW),
    )
    mine = (await api.client.get("/api/v1/dead-letters", headers=api.auth("gas_operator"))).json()
    assert [(d["device"], d["reason"], d["payload_preview"]) for d in mine["items"]] == [
        ("gd-1", "malformed_payload", "garbage")
    ]
    everything = (
        await api.client.get(
            "/api/v1/dead-letters", headers=api.auth("admin"), params={"reason": "unknown_device"}
        )
    ).json()
    assert [d["device"] for d in everything["items"]] == ["ghost"]


async def test_ops_endpoints_and_openapi(api: Api) -> None:
    assert (await api.client.get("/healthz")).json() == {"status": "ok"}
    ready = await api.client.get("/readyz")
    assert ready.json()["database"] == "ok"
    await api.client.get("/api/v1/alerts", headers=api.auth("admin"))
    metrics = (await api.client.get("/metrics")).text
    assert 'cityops_api_requests_total{route="/api/v1/alerts",status="200"}' in metrics
    schema = (await api.client.get("/openapi.json")).json()
    assert {
        "/api/v1/alerts",
        "/api/v1/alerts/stream",
        "/api/v1/alerts/{alert_id}/ack",
        "/api/v1/devices",
    } <= set(schema["paths"])


# --- the live feed, over a real HTTP server ----------------------------------------------------------
@pytest.fixture
async def served(api: Api, settings: Settings, catalogue: Catalogue) -> AsyncIterator[str]:
    assert settings.database_url is not None
    app = create_app(settings, catalogue, settings.database_url, clock=lambda: NOW)
    port = free_port()
    server = _Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    task = asyncio.create_task(server.serve(), name="test-api-server")
    await eventually(_started(server))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


def _started(server: uvicorn.Server):  # type: ignore[no-untyped-def]
    async def check() -> None:
        assert server.started

    return check


async def read_events(lines: AsyncIterator[str], count: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    event_id, data = None, None
    async for line in lines:
        if line.startswith("id: "):
            event_id = int(line[4:])
        elif line.startswith("data: "):
            data = orjson.loads(line[6:])
        elif line == "" and data is not None:
            assert data["event_id"] == event_id
            events.append(data)
            data = None
            if len(events) == count:
                return events
    raise AssertionError("the stream ended early")


async def test_feed_resumes_with_last_event_id_exactly_then_goes_live(api: Api, served: str) -> None:
    headers = api.auth("water_viewer")
    async with httpx.AsyncClient(base_url=served, timeout=20) as client:
        async with client.stream("GET", "/api/v1/alerts/stream", headers=headers) as first:
            assert first.headers["content-type"].startswith("text/event-stream")
            lines = first.aiter_lines()
            assert (await anext(lines)).startswith(": connected")  # subscribed: nothing from here is missed
            await api.raise_alert("ponding", "pd-1", NOW)
            (opened,) = await asyncio.wait_for(read_events(lines, 1), 15)
        assert (opened["kind"], opened["alert"]["labels"]["device"]) == ("opened", "pd-1")
        # Disconnected: more happens, for water and for gas (which this key must never see).
        missed = [await api.raise_alert("ponding", "pd-2", NOW + timedelta(minutes=1))]
        await api.raise_alert("leak", "gd-1", NOW + timedelta(minutes=1))
        await api.raise_alert("ponding", "pd-1", NOW + timedelta(minutes=2), Status.INACTIVE)  # resolves pd-1
        resume = {**headers, "Last-Event-ID": str(opened["event_id"])}
        async with client.stream("GET", "/api/v1/alerts/stream", headers=resume) as second:
            lines = second.aiter_lines()
            caught_up = await asyncio.wait_for(read_events(lines, 2), 15)
            assert [(e["kind"], e["alert"]["labels"]["device"]) for e in caught_up] == [
                ("opened", "pd-2"),
                ("resolved", "pd-1"),
            ]
            assert caught_up[0]["alert_id"] == missed[0]
            assert [e["event_id"] for e in caught_up] == sorted(e["event_id"] for e in caught_up)
            assert caught_up[0]["event_id"] > opened["event_id"]
            await api.raise_alert(
                "leak", "gd-1", NOW + timedelta(minutes=3), Status.INACTIVE
            )  # gas: not for us
            await api.raise_alert("ponding", "pd-2", NOW + timedelta(minutes=3), Status.INACTIVE)
            (live,) = await asyncio.wait_for(read_events(lines, 1), 15)
            assert (live["kind"], live["alert"]["labels"]["device"]) == ("resolved", "pd-2")
    bad = await api.client.get("/api/v1/alerts/stream", headers={**headers, "Last-Event-ID": "abc"})
    problem(bad, 422, "invalid-parameters")


# --- readings -----------------------------------------------------------------------------------------
DAY = datetime(2026, 6, 30, tzinfo=UTC)


async def _three_hours_of_ponding(api: Api, catalogue: Catalogue) -> list[tuple[datetime, float]]:
    points = [(DAY + timedelta(minutes=i, seconds=7), float((i * 7) % 23)) for i in range(180)]
    await api.conn.execute("SELECT cityops_ensure_partitions(%s::date, %s::date)", (DAY.date(), DAY.date()))
    metric = catalogue.metrics["ponding_depth"].id
    async with api.conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO readings (time, device_id, metric_id, value, quality) "
            "SELECT %s, id, %s, %s, 0 FROM devices WHERE external_id = 'pd-1'",
            [(t, metric, v) for t, v in points],
        )
    await api.conn.execute("SELECT cityops_refresh_rollups(%s, %s)", (DAY, DAY + timedelta(hours=4)))
    return points


def _expected(
    points: list[tuple[datetime, float]], start: datetime, end: datetime, agg: str
) -> list[tuple[str, float]]:
    buckets: dict[datetime, list[float]] = {}
    for t, v in points:
        if start <= t < end:
            buckets.setdefault(t.replace(minute=0, second=0), []).append(v)
    fn = {
        "avg": lambda v: sum(v) / len(v),
        "min": min,
        "max": max,
        "sum": sum,
        "count": len,
        "last": lambda v: v[-1],
    }[agg]
    return [(b.isoformat().replace("+00:00", "Z"), float(fn(v))) for b, v in sorted(buckets.items())]


@pytest.mark.parametrize("agg", ["avg", "min", "max", "sum", "count", "last"])
async def test_hourly_buckets_are_the_same_from_rollups_and_from_raw_rows(
    api: Api, catalogue: Catalogue, settings: Settings, agg: str
) -> None:
    points = await _three_hours_of_ponding(api, catalogue)
    start, end = DAY + timedelta(minutes=30), DAY + timedelta(hours=3)  # a partial first hour
    params = {"device": "pd-1", "metric": "ponding_depth", "from": start.isoformat(), "to": end.isoformat(),
              "bucket": "1h", "agg": agg}  # fmt: skip
    from_rollups = (
        await api.client.get("/api/v1/readings", params=params, headers=api.auth("water_viewer"))
    ).json()
    assert from_rollups["source"] == "readings_1h"
    # The same question asked "just after" the readings arrived: the rollups may lag, all raw.
    assert settings.database_url is not None
    fresh = create_app(settings, catalogue, settings.database_url, clock=lambda: DAY + timedelta(minutes=90))
    async with (
        fresh.router.lifespan_context(fresh),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=fresh), base_url="http://api") as client,
    ):
        from_raw = (
            await client.get("/api/v1/readings", params=params, headers=api.auth("water_viewer"))
        ).json()
    assert from_raw["source"] == "raw"
    expected = _expected(points, start, end, agg)
    for answer in (from_rollups, from_raw):
        ((series),) = answer["series"]
        assert (series["device"], series["metric"], series["unit"]) == ("pd-1", "ponding_depth", "cm")
        got = [(t, v) for t, v in series["points"]]
        assert [t for t, _ in got] == [t for t, _ in expected]
        assert [v for _, v in got] == pytest.approx([v for _, v in expected])


async def test_readings_raw_limits_scope_and_errors(api: Api, catalogue: Catalogue) -> None:
    await _three_hours_of_ponding(api, catalogue)
    base = {
        "device": "pd-1",
        "metric": "ponding_depth",
        "from": DAY.isoformat(),
        "to": (DAY + timedelta(minutes=3)).isoformat(),
    }
    raw = (await api.client.get("/api/v1/readings", params=base, headers=api.auth("water_viewer"))).json()
    assert raw["source"] == "raw" and len(raw["series"][0]["points"]) == 3
    wide = {**base, "to": (DAY + timedelta(days=300)).isoformat(), "bucket": "1m"}
    problem(
        await api.client.get("/api/v1/readings", params=wide, headers=api.auth("water_viewer")),
        422,
        "too-many-points",
    )
    problem(
        await api.client.get(
            "/api/v1/readings", params={**base, "device": "gd-1"}, headers=api.auth("water_viewer")
        ),
        404,
        "not-found",
    )
    bad_metric = await api.client.get(
        "/api/v1/readings", params={**base, "metric": "rainbow"}, headers=api.auth("admin")
    )
    assert problem(bad_metric, 422, "invalid-parameters")["errors"][0]["field"] == "metric"
    backwards = await api.client.get(
        "/api/v1/readings", params={**base, "to": DAY.isoformat()}, headers=api.auth("admin")
    )
    assert problem(backwards, 422, "invalid-parameters")["errors"][0]["field"] == "to"
    missing = await api.client.get("/api/v1/readings", params={"device": "pd-1"}, headers=api.auth("admin"))
    assert {"metric", "from", "to"} <= {
        e["field"] for e in problem(missing, 422, "invalid-parameters")["errors"]
    }


# --- rules, backtest, silences -------------------------------------------------------------------------
PUDDLE = {
    "name": "puddle",
    "severity": "low",
    "source": "test",
    "selector": {"kinds": ["ponding_gauge"]},
    "condition": {"type": "threshold", "metric": "ponding_depth", "op": ">=", "value": 15, "clear": 12},
}


async def test_rules_crud_is_scoped_validated_and_audited(api: Api) -> None:
    water_admin = (await create_key(api.conn, "water admin", Role.ADMIN, ["water"]))[1]
    wa = {"Authorization": f"Bearer {water_admin}"}
    created = await api.client.post("/api/v1/rules", headers=wa, json={"tenant": "water", "spec": PUDDLE})
    assert created.status_code == 201, created.text
    rule = created.json()
    assert (rule["name"], rule["tenant"], rule["version"]) == ("puddle", "water", 1)
    problem(
        await api.client.post("/api/v1/rules", headers=wa, json={"tenant": "water", "spec": PUDDLE}),
        409,
        "conflict",
    )
    problem(
        await api.client.post("/api/v1/rules", headers=wa, json={"tenant": None, "spec": PUDDLE}),
        403,
        "forbidden",
    )
    problem(
        await api.client.post("/api/v1/rules", headers=api.auth("water_operator"), json={"spec": PUDDLE}),
        403,
        "forbidden",
    )
    broken = {
        **PUDDLE,
        "condition": {"type": "threshold", "metric": "ponding_depth", "op": ">=", "value": 15, "clear": 20},
    }
    bad = await api.client.post("/api/v1/rules", headers=wa, json={"tenant": "water", "spec": broken})
    assert "clear (20.0) must be at or below value (15.0)" in problem(bad, 422, "invalid-rule")["detail"]
    unknown = await api.client.post(
        "/api/v1/rules/validate",
        headers=api.auth("water_viewer"),
        json={**PUDDLE, "condition": {**PUDDLE["condition"], "metric": "rainbow"}},
    )  # type: ignore[dict-item]
    assert "unknown metric 'rainbow'" in problem(unknown, 422, "invalid-rule")["detail"]
    assert (
        await api.client.post("/api/v1/rules/validate", headers=api.auth("water_viewer"), json=PUDDLE)
    ).json() == {"valid": True, "name": "puddle"}
    changed = await api.client.put(
        f"/api/v1/rules/{rule['id']}",
        headers=wa,
        json={"tenant": "water", "spec": {**PUDDLE, "severity": "high"}},
    )
    assert (changed.json()["version"], changed.json()["spec"]["severity"]) == (2, "high")
    assert (await api.client.post(f"/api/v1/rules/{rule['id']}/disable", headers=wa)).json()[
        "enabled"
    ] is False
    assert [
        r["name"] for r in (await api.client.get("/api/v1/rules", headers=api.auth("gas_operator"))).json()
    ] == []
    problem(
        await api.client.get(f"/api/v1/rules/{rule['id']}", headers=api.auth("gas_operator")),
        404,
        "not-found",
    )
    assert (await api.client.delete(f"/api/v1/rules/{rule['id']}", headers=wa)).status_code == 204
    cur = await api.conn.execute("SELECT action FROM audit_log WHERE object_type = 'rule' ORDER BY id")
    assert [r[0] for r in await cur.fetchall()] == [
        "rule.create",
        "rule.update",
        "rule.disable",
        "rule.delete",
    ]


async def test_backtest_through_the_api(api: Api, catalogue: Catalogue) -> None:
    await _three_hours_of_ponding(
        api, catalogue
    )  # values cycle through 0..22: the puddle rule fires and clears
    body = {"specs": [PUDDLE], "from": DAY.isoformat(), "to": (DAY + timedelta(hours=3)).isoformat()}
    result = (
        await api.client.post("/api/v1/rules/backtest", headers=api.auth("water_viewer"), json=body)
    ).json()
    assert result["readings"] == 180 and result["alerts"]
    assert {a["subject"] for a in result["alerts"]} == {"pd-1"} and all(a["fired"] for a in result["alerts"])
    hidden = (
        await api.client.post("/api/v1/rules/backtest", headers=api.auth("gas_operator"), json=body)
    ).json()
    assert hidden == {"readings": 0, "alerts": []}  # a gas key backtests over gas devices only
    too_long = {**body, "to": (DAY + timedelta(days=40)).isoformat()}
    problem(
        await api.client.post("/api/v1/rules/backtest", headers=api.auth("water_viewer"), json=too_long),
        422,
        "invalid-parameters",
    )


async def test_silences_are_scoped_and_end_on_request(api: Api) -> None:
    body = {"tenant": "water", "matchers": {"district": "tianhe"}, "starts_at": NOW.isoformat(),
            "ends_at": (NOW + timedelta(hours=2)).isoformat(), "comment": "drain works"}  # fmt: skip
    made = await api.client.post("/api/v1/silences", headers=api.auth("water_operator"), json=body)
    assert made.status_code == 201, made.text
    problem(
        await api.client.post("/api/v1/silences", headers=api.auth("gas_operator"), json=body),
        403,
        "forbidden",
    )
    problem(
        await api.client.post("/api/v1/silences", headers=api.auth("water_viewer"), json=body),
        403,
        "forbidden",
    )
    assert [
        s["id"] for s in (await api.client.get("/api/v1/silences", headers=api.auth("water_viewer"))).json()
    ] == [made.json()["id"]]
    assert (await api.client.get("/api/v1/silences", headers=api.auth("gas_operator"))).json() == []
    alert = await api.raise_alert("ponding", "pd-1", NOW + timedelta(minutes=1))
    assert (await api.client.get(f"/api/v1/alerts/{alert}", headers=api.auth("admin"))).json()[
        "silenced"
    ] is True
    assert (
        await api.client.delete(f"/api/v1/silences/{made.json()['id']}", headers=api.auth("water_operator"))
    ).status_code == 204
    assert (await api.client.get("/api/v1/silences", headers=api.auth("water_viewer"))).json() == []


async def test_overview_and_map(api: Api) -> None:
    await api.conn.execute(
        "UPDATE devices SET last_seen = %s WHERE external_id = 'pd-1'", (NOW - timedelta(minutes=1),)
    )
    await api.raise_alert("ponding", "pd-1", NOW)
    cells = (await api.client.get("/api/v1/overview", headers=api.auth("water_viewer"))).json()
    assert [
        (c["domain"], c["district"], c["devices"], c["online"], c["offline"], c["open_alerts"]) for c in cells
    ] == [
        ("drainage", "haizhu", 1, 0, 1, {}),
        ("drainage", "tianhe", 1, 1, 0, {"high": 1}),
    ]
    layer = (await api.client.get("/api/v1/map/devices.geojson", headers=api.auth("admin"))).json()
    assert layer["type"] == "FeatureCollection"
    by_id = {f["id"]: f for f in layer["features"]}
    assert set(by_id) == {"pd-1", "pd-2", "gd-1"}
    assert by_id["pd-1"]["geometry"] == {"type": "Point", "coordinates": [113.36, 23.12]}
    assert (by_id["pd-1"]["properties"]["worst_open_alert"], by_id["pd-1"]["properties"]["presence"]) == (
        "high",
        "online",
    )
    assert by_id["gd-1"]["properties"]["worst_open_alert"] is None
    gas_layer = (await api.client.get("/api/v1/map/devices.geojson", headers=api.auth("gas_operator"))).json()
    assert [f["id"] for f in gas_layer["features"]] == ["gd-1"]


async def test_websocket_feed_resumes_with_since(api: Api, served: str) -> None:
    import websockets

    first = await api.raise_alert("ponding", "pd-1", NOW)
    cur = await api.conn.execute("SELECT min(id) FROM alert_events WHERE alert_id = %s", (first,))
    (opened_event,) = await cur.fetchone()  # type: ignore[misc]
    await api.raise_alert("leak", "gd-1", NOW)  # another tenant's
    url = served.replace("http", "ws") + "/api/v1/alerts/ws"
    async with websockets.connect(
        f"{url}?since={opened_event - 1}", additional_headers=api.auth("water_viewer")
    ) as ws:
        assert orjson.loads(await asyncio.wait_for(ws.recv(), 10)) == {"resumed_after": opened_event - 1}
        caught_up = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
        assert (caught_up["event_id"], caught_up["kind"]) == (opened_event, "opened")
        await api.raise_alert("ponding", "pd-1", NOW + timedelta(minutes=1), Status.INACTIVE)
        live = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
        assert (live["kind"], live["alert"]["labels"]["device"]) == ("resolved", "pd-1")
    with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
        async with websockets.connect(url) as ws:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401


async def test_a_key_over_its_rate_gets_429_with_retry_after(
    migrated_conn: AsyncConn, settings: Settings, catalogue: Catalogue
) -> None:
    assert settings.database_url is not None
    limited = settings.model_copy(update={"api_rate_limit": 1.0, "api_rate_burst": 3.0})
    app = create_app(limited, catalogue, settings.database_url, clock=lambda: NOW)
    _, key = await create_key(migrated_conn, "busy script", Role.VIEWER, None)
    _, other = await create_key(migrated_conn, "ops desk", Role.VIEWER, None)
    transport = httpx.ASGITransport(app=app)
    busy = {"Authorization": f"Bearer {key}"}
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://api") as client,
    ):
        codes = [(await client.get("/api/v1/alerts", headers=busy)).status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
        refused = await client.get("/api/v1/alerts", headers=busy)
        assert problem(refused, 429, "rate-limited") and int(refused.headers["Retry-After"]) >= 1
        desk = await client.get("/api/v1/alerts", headers={"Authorization": f"Bearer {other}"})
        assert desk.status_code == 200  # buckets are per key


async def test_values_the_database_cannot_store_are_422_not_500(api: Api) -> None:
    # Found by schemathesis: a NUL character in a JSON object (jsonb refuses it) or in text.
    body = {"tenant": "water", "matchers": {"district": "tian\u0000he"}, "starts_at": NOW.isoformat(),
            "ends_at": (NOW + timedelta(hours=1)).isoformat()}  # fmt: skip
    problem(
        await api.client.post("/api/v1/silences", headers=api.auth("admin"), json=body), 422, "invalid-data"
    )
    device = {"id": "pd-99", "tenant": "water", "kind": "ponding_gauge", "name": "nul\u0000name"}
    problem(
        await api.client.post("/api/v1/devices", headers=api.auth("admin"), json=device), 422, "invalid-data"
    )


async def test_devices_create_update_disable_enable_without_a_broker_account_api(api: Api) -> None:
    water_admin = (await create_key(api.conn, "water admin", Role.ADMIN, ["water"]))[1]
    wa = {"Authorization": f"Bearer {water_admin}"}
    body = {
        "id": "pd-9",
        "tenant": "water",
        "kind": "ponding_gauge",
        "name": "Gauge 9",
        "lat": 23.1,
        "lon": 113.3,
    }
    made = await api.client.post("/api/v1/devices", headers=wa, json=body)
    assert made.status_code == 201 and made.json()["credentials"] is None  # broker_admin=none
    assert made.json()["presence"] == "offline" and made.json()["domain"] == "drainage"
    problem(
        await api.client.post("/api/v1/devices", headers=wa, json={**body, "id": "gd-9", "tenant": "gas"}),
        403,
        "forbidden",
    )
    unknown = await api.client.post(
        "/api/v1/devices", headers=wa, json={**body, "id": "pd-10", "kind": "toaster"}
    )
    assert problem(unknown, 422, "invalid-parameters")["errors"][0]["field"] == "kind"
    problem(
        await api.client.post("/api/v1/devices", headers=api.auth("water_operator"), json=body),
        403,
        "forbidden",
    )
    patched = await api.client.patch(
        "/api/v1/devices/pd-9", headers=wa, json={"name": "Gauge nine", "tags": {"zone": "low"}}
    )
    assert (patched.json()["name"], patched.json()["tags"]) == ("Gauge nine", {"zone": "low"})
    problem(await api.client.patch("/api/v1/devices/gd-1", headers=wa, json={"name": "x"}), 404, "not-found")
    assert (await api.client.post("/api/v1/devices/pd-9/disable", headers=wa)).json()["enabled"] is False
    assert (await api.client.post("/api/v1/devices/pd-9/enable", headers=wa)).json()["enabled"] is True
    cur = await api.conn.execute("SELECT action FROM audit_log WHERE object_id = 'pd-9' ORDER BY id")
    assert [r[0] for r in await cur.fetchall()] == [
        "device.create",
        "device.update",
        "device.disable",
        "device.enable",
    ]
