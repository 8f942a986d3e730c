"""Device accounts on the broker: Mosquitto's dynamic-security plugin, driven over ``$CONTROL``.

Each device gets a client (its id as the username) with a role of its own whose ACL lets it publish
only under ``{root}/v1/{id}/`` and subscribe only to its ``cmd/`` topics. Disabling a device disables
its client: the broker refuses its next connection. With ``CITYOPS_BROKER_ADMIN=none`` (a broker
without an account API) nothing is done here and devices authenticate however that broker says.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from cityops.errors import CityopsError
from cityops.settings import MqttEndpoint
from cityops.topics import Topics

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
TIMEOUT_S = 10.0


class BrokerAdminError(CityopsError):
    """The broker refused an account command, or did not answer."""


class DynsecAdmin:
    def __init__(self, admin_url: str, topics: Topics) -> None:
        self._endpoint = MqttEndpoint.parse(admin_url)
        self._topics = topics

    async def create_device(self, device_id: str, password: str) -> None:
        role = f"device-{device_id}"
        prefix = f"{self._topics.root}/v1/{device_id}"
        await self.run([
            {"command": "createRole", "rolename": role, "acls": [
                {"acltype": "publishClientSend", "topic": f"{prefix}/#", "priority": 0, "allow": True},
                {"acltype": "subscribePattern", "topic": f"{prefix}/cmd/#", "priority": 0, "allow": True},
                {"acltype": "publishClientReceive", "topic": f"{prefix}/cmd/#", "priority": 0, "allow": True},
            ]},
            {"command": "createClient", "username": device_id, "password": password,
             "roles": [{"rolename": role}]},
        ])  # fmt: skip

    async def create_service(self, username: str, password: str, acls: list[dict[str, Any]]) -> None:
        """An account for a service (a pipeline), with the ACLs given."""
        role = f"service-{username}"
        await self.run([
            {"command": "createRole", "rolename": role, "acls": acls},
            {"command": "createClient", "username": username, "password": password,
             "roles": [{"rolename": role}]},
        ])  # fmt: skip

    async def set_enabled(self, device_id: str, enabled: bool) -> None:
        await self.run([{"command": "enableClient" if enabled else "disableClient", "username": device_id}])

    async def run(self, commands: list[dict[str, Any]]) -> None:
        """Send commands in one request; raise with the broker's words if any fails."""
        responses = await asyncio.to_thread(self._exchange, commands)
        failures = [f"{r.get('command')}: {r['error']}" for r in responses if r.get("error")]
        if failures:
            raise BrokerAdminError("broker refused: " + "; ".join(failures))

    def _exchange(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        correlation = uuid.uuid4().hex
        tagged = [{**c, "correlationData": f"{correlation}-{i}"} for i, c in enumerate(commands)]
        answered = threading.Event()
        subscribed = threading.Event()
        result: list[dict[str, Any]] = []

        def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
            body = orjson.loads(message.payload)
            mine = [
                r
                for r in body.get("responses", [])
                if str(r.get("correlationData", "")).startswith(correlation)
            ]
            if mine:
                result.extend(mine)
                if len(result) >= len(tagged):
                    answered.set()

        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"cityops-admin-{correlation[:8]}")
        if self._endpoint.username:
            client.username_pw_set(self._endpoint.username, self._endpoint.password)
        client.on_message = on_message
        client.on_subscribe = lambda *args: subscribed.set()
        client.on_connect = lambda c, u, f, rc, p=None: (
            c.subscribe(RESPONSE_TOPIC, qos=1) if not rc.is_failure else None
        )
        try:
            client.connect(self._endpoint.host, self._endpoint.port, 30)
        except OSError as exc:
            raise BrokerAdminError(f"cannot reach the broker for account management: {exc}") from None
        client.loop_start()
        try:
            if not subscribed.wait(TIMEOUT_S):
                raise BrokerAdminError("the broker did not let the admin account listen for answers")
            client.publish(CONTROL_TOPIC, orjson.dumps({"commands": tagged}), qos=1)
            if not answered.wait(TIMEOUT_S):
                raise BrokerAdminError(
                    f"no answer from the broker's dynamic-security plugin in {TIMEOUT_S} s"
                )
        finally:
            client.disconnect()
            client.loop_stop()
        return result
