"""The embedded services: PostgreSQL 18 from its wheel, the broker with 3.1.1 and 5 listeners."""

from __future__ import annotations

from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg

from cityops.embedded import EmbeddedBroker, EmbeddedPostgres, port_open
from cityops.settings import MqttEndpoint
from tests.mqtt_helpers import collect, publish, publisher, subscriber


def test_embedded_postgres_is_18_on_localhost(embedded_postgres: EmbeddedPostgres) -> None:
    with psycopg.connect(embedded_postgres.url) as conn:
        row = conn.execute(
            "SELECT current_setting('server_version_num')::int, inet_server_addr()::text"
        ).fetchone()
    assert row is not None and row[0] >= 180000 and row[1].startswith("127.0.0.1")


def test_embedded_postgres_restarts_on_its_data(tmp_path: Path) -> None:
    server = EmbeddedPostgres(tmp_path / "pg")
    with server:
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (x int)")
            conn.execute("INSERT INTO kept VALUES (42)")
        port = server.port
    assert port is not None and not port_open("127.0.0.1", port)
    with server, psycopg.connect(server.url) as conn:
        assert conn.execute("SELECT x FROM kept").fetchone() == (42,)


def test_embedded_broker_speaks_both_protocols(tmp_path: Path) -> None:
    with EmbeddedBroker(tmp_path / "broker") as broker:
        assert broker.url != broker.url_v311
        for url, protocol in ((broker.url, mqtt.MQTTv5), (broker.url_v311, mqtt.MQTTv311)):
            with subscriber(url, "$share/g/a/+/b", protocol) as inbox, publisher(url, protocol) as client:
                publish(client, "a/x/b", b"hello")
                assert collect(inbox, 1)[0].payload == b"hello"
        endpoint = MqttEndpoint.parse(broker.url)
    assert not port_open(endpoint.host, endpoint.port)
