"""Schemathesis against the OpenAPI schema: bounded generated requests (valid and invalid) to every
operation, as an admin; no 5xx, and every response conforms to the schema it documents."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from cityops.apikeys import Role, create_key
from cityops.catalogue import load_default_catalogue
from cityops.db.connection import connection
from cityops.db.migrate import migrate
from cityops.embedded import free_port
from cityops.settings import Settings
from control_api.app import create_app
from control_api.component import _Server
from tests.conftest import create_database, drop_database
from tests.pipeline_helpers import FLEET, register_fleet

CATALOGUE = load_default_catalogue()
# The schema does not depend on the database: build it from an app that never starts.
SCHEMA = schemathesis.openapi.from_dict(create_app(Settings(), CATALOGUE, "postgresql://unused/x").openapi())
EXAMPLES = 15  # per operation: enough to find a 500, short enough for CI


@pytest.fixture(scope="module")
def api_url(postgres_admin_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    name, url = create_database(postgres_admin_url)
    settings_ = Settings(database_url=url, data_dir=tmp_path_factory.mktemp("api"), api_rate_limit=0)
    key = asyncio.run(_prepare(url, settings_))
    app = create_app(settings_, CATALOGUE, url)
    port = free_port()
    server = _Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, name="schema-test-api", daemon=True)
    thread.start()
    started = threading.Event()
    for _ in range(200):
        if server.started:
            started.set()
            break
        threading.Event().wait(0.05)
    assert started.is_set(), "the API did not start"
    try:
        yield f"http://127.0.0.1:{port}", key
    finally:
        server.should_exit = True
        thread.join(15)
        drop_database(postgres_admin_url, name)


async def _prepare(url: str, settings_: Settings) -> str:
    async with connection(url) as conn:
        await migrate(conn, settings_, CATALOGUE)
        await register_fleet(conn, FLEET)
        _, key = await create_key(conn, "schemathesis", Role.ADMIN, None)
    return key


def test_every_operation_answers_within_its_schema(api_url: tuple[str, str]) -> None:
    # One test looping over the operations, not schemathesis' parametrize: spread over xdist workers
    # with --dist loadgroup, its generated items were dropped from the run without a word.
    base_url, key = api_url
    headers = {"Authorization": f"Bearer {key}"}
    failures: list[str] = []
    operations = [result.ok() for result in SCHEMA.get_all_operations()]
    operations = [op for op in operations if not op.path.endswith("/stream")]  # an endless response
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def answers(case: schemathesis.Case) -> None:
            response = case.call(base_url=base_url, headers=headers, timeout=30)
            case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])

        try:
            answers()
        except Exception as exc:
            failures.append(f"{operation.label}: {exc}")
    assert len(operations) >= 30
    assert failures == []


def test_the_schema_documents_every_route() -> None:
    paths = set(SCHEMA.raw_schema["paths"])
    assert {"/api/v1/alerts", "/api/v1/devices", "/api/v1/readings", "/api/v1/rules", "/api/v1/rules/backtest",
            "/api/v1/silences", "/api/v1/overview", "/api/v1/map/devices.geojson", "/api/v1/dead-letters",
            "/healthz", "/readyz", "/metrics"} <= paths  # fmt: skip
