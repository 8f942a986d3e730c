"""Fixtures shared by the pipeline tests."""

from __future__ import annotations

import pytest

from cityops.db.connection import AsyncConn
from tests.pipeline_helpers import register_fleet


@pytest.fixture
async def fleet_conn(migrated_conn: AsyncConn) -> AsyncConn:
    """A migrated database of this test's own with the test fleet registered."""
    await register_fleet(migrated_conn)
    return migrated_conn
