"""API keys: ``cok_<prefix>_<secret>``, stored as the prefix (for lookup) and a hash of the secret.

The secret has 256 bits of entropy, so one SHA-256 is as strong as a slow password hash would be,
and checking a key costs microseconds per request. A key is shown once, when it is created.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from enum import StrEnum

from cityops.db.connection import AsyncConn
from cityops.errors import CityopsError

KEY_PREFIX = "cok"


class Role(StrEnum):
    VIEWER = "viewer"  # reads
    OPERATOR = "operator"  # acts on alerts
    ADMIN = "admin"  # manages devices, rules, silences, keys

    def allows(self, needed: Role) -> bool:
        order = (Role.VIEWER, Role.OPERATOR, Role.ADMIN)
        return order.index(self) >= order.index(needed)


class ApiKeyError(CityopsError):
    """A key could not be created (bad role or tenant list)."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the key's id and name, its role and its tenants (None: every tenant)."""

    key_id: int
    name: str
    role: Role
    tenants: frozenset[str] | None

    def sees(self, tenant: str) -> bool:
        return self.tenants is None or tenant in self.tenants

    @property
    def actor(self) -> str:
        return f"key:{self.key_id}:{self.name}"


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


async def create_key(conn: AsyncConn, name: str, role: Role, tenants: list[str] | None) -> tuple[int, str]:
    """A new key; returns its id and the key itself (shown once, never stored)."""
    if not name.strip():
        raise ApiKeyError("a key needs a name (who or what uses it)")
    if tenants is not None and (not tenants or any(not t.strip() for t in tenants)):
        raise ApiKeyError("tenants: give at least one non-empty tenant, or none for every tenant")
    prefix = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    cur = await conn.execute(
        "INSERT INTO api_keys (prefix, secret_hash, name, role, tenants) "
        "VALUES (%s, %s, %s, %s, %s) RETURNING id",
        (prefix, _hash(secret), name.strip(), role.value, tenants),
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0]), f"{KEY_PREFIX}_{prefix}_{secret}"


async def authenticate(conn: AsyncConn, key: str) -> Principal | None:
    """The principal of a valid, unrevoked key; None otherwise (the caller says 401, whatever the cause)."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX:
        return None
    _, prefix, secret = parts
    cur = await conn.execute(
        "SELECT id, name, role, tenants, secret_hash FROM api_keys WHERE prefix = %s AND revoked_at IS NULL",
        (prefix,),
    )
    row = await cur.fetchone()
    if row is None or not hmac.compare_digest(row[4], _hash(secret)):
        return None
    key_id, name, role, tenants, _ = row
    return Principal(key_id, name, Role(role), frozenset(tenants) if tenants is not None else None)


async def has_admin_key(conn: AsyncConn) -> bool:
    cur = await conn.execute(
        "SELECT EXISTS (SELECT 1 FROM api_keys WHERE role = 'admin' AND revoked_at IS NULL)"
    )
    row = await cur.fetchone()
    return bool(row and row[0])
