"""Provisioning through the API on a real Mosquitto with the dynamic-security plugin: the device's
credentials work, reach only its own topics, and stop working when the device is disabled."""

from __future__ import annotations

import secrets
import threading
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from cityops.apikeys import Role, create_key
from cityops.catalogue import Catalogue
from cityops.codec import encode_values
from cityops.db.connection import AsyncConn
from cityops.embedded import MosquittoProcess
from cityops.settings import BrokerAdmin, Settings
from cityops.topics import Topics
from control_api.app import create_app
from control_api.broker_accounts import DynsecAdmin
from tests.conftest import MqttServer
from tests.pipeline_helpers import pipeline_settings, running_pipeline
from tests.waiting import eventually

TS = 1_782_835_200_000


class Device:
    """A device connecting with its credentials (MQTT 5, so the broker says why it refuses)."""

    def __init__(self, port: int, username: str, password: str) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"dev-{username}", protocol=mqtt.MQTTv5
        )
        self.client.username_pw_set(username, password)
        self.connack: object = None
        self.acks: dict[int, object] = {}
        self._connected = threading.Event()
        self._acked = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.port = port

    def _on_connect(self, _c: object, _u: object, _f: object, rc: object, _p: object = None) -> None:
        self.connack = rc
        self._connected.set()

    def _on_publish(self, _c: object, _u: object, mid: int, rc: object, _p: object = None) -> None:
        with self._acked:
            self.acks[mid] = rc
            self._acked.notify_all()

    def connect(self) -> object:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        assert self._connected.wait(10)
        return self.connack

    def publish(self, topic: str, payload: bytes) -> object:
        info = self.client.publish(topic, payload, qos=1)
        with self._acked:
            assert self._acked.wait_for(lambda: info.mid in self.acks, 10)
        return self.acks[info.mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def test_provisioned_credentials_reach_only_the_devices_topics_until_disabled(
    migrated_conn: AsyncConn,
    database_url: str,
    mosquitto: str,
    topic_root: str,
    tmp_path: Path,
    catalogue: Catalogue,
) -> None:
    admin_password = secrets.token_urlsafe(12)
    with MosquittoProcess(tmp_path / "broker", mosquitto, dynsec_admin=("admin", admin_password)) as broker:
        admin_url = f"mqtt://admin:{admin_password}@127.0.0.1:{broker.port}"
        pipeline_password = secrets.token_urlsafe(12)
        await DynsecAdmin(admin_url, Topics(topic_root)).create_service(
            "pipeline", pipeline_password,
            [{"acltype": kind, "topic": f"{topic_root}/v1/+/{leaf}", "priority": 0, "allow": True}
             for kind in ("subscribePattern", "publishClientReceive") for leaf in ("telemetry", "status")],
        )  # fmt: skip
        pipeline_url = f"mqtt://pipeline:{pipeline_password}@127.0.0.1:{broker.port}"
        server = MqttServer(pipeline_url, pipeline_url)
        settings = pipeline_settings(
            database_url, server, topic_root, tmp_path, subscription_group="", rules_enabled=False
        )
        api_settings = Settings(
            database_url=database_url, mqtt_url=f"mqtt://127.0.0.1:{broker.port}", topic_root=topic_root,
            broker_admin=BrokerAdmin.MOSQUITTO_DYNSEC, broker_admin_url=admin_url, data_dir=tmp_path / "api",
        )  # fmt: skip
        _, key = await create_key(migrated_conn, "water admin", Role.ADMIN, ["water"])
        auth = {"Authorization": f"Bearer {key}"}
        app = create_app(api_settings, catalogue, database_url, api_settings.mqtt_url)
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            running_pipeline(settings, catalogue),
            httpx.AsyncClient(transport=transport, base_url="http://api") as client,
        ):
            body = {
                "id": "pd-77",
                "tenant": "water",
                "kind": "ponding_gauge",
                "name": "Gauge 77",
                "district": "tianhe",
            }
            made = await client.post("/api/v1/devices", json=body, headers=auth)
            assert made.status_code == 201, made.text
            creds = made.json()["credentials"]
            assert creds["username"] == "pd-77" and creds["publish_under"] == f"{topic_root}/v1/pd-77/#"
            other = await client.post("/api/v1/devices", json={**body, "id": "pd-78"}, headers=auth)
            assert other.status_code == 201
            assert (await client.post("/api/v1/devices", json=body, headers=auth)).status_code == 409

            device = Device(broker.port, creds["username"], creds["password"])
            assert not device.connect().is_failure  # type: ignore[attr-defined]
            topics = Topics(topic_root)
            ok = device.publish(topics.telemetry("pd-77"), encode_values({"ponding_depth": 4.0}, TS))
            assert not ok.is_failure  # type: ignore[attr-defined]
            refused = device.publish(topics.telemetry("pd-78"), encode_values({"ponding_depth": 99.0}, TS))
            assert refused.is_failure and refused.value == 135  # type: ignore[attr-defined]  # not authorized
            device.close()

            async def stored() -> None:
                cur = await migrated_conn.execute(
                    "SELECT d.external_id, r.value FROM readings r JOIN devices d ON d.id = r.device_id"
                )
                assert await cur.fetchall() == [("pd-77", 4.0)]

            await eventually(stored, deadline_s=20)
            disabled = await client.post("/api/v1/devices/pd-77/disable", headers=auth)
            assert disabled.json()["enabled"] is False
            again = Device(broker.port, creds["username"], creds["password"])
            refusal = again.connect()
            again.close()
            assert refusal.is_failure  # type: ignore[attr-defined]
    cur = await migrated_conn.execute("SELECT action FROM audit_log ORDER BY id")
    assert [r[0] for r in await cur.fetchall()] == ["device.create", "device.create", "device.disable"]
