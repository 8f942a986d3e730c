"""What every route needs: the database pool, the caller, the clock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from psycopg_pool import AsyncConnectionPool

from cityops.apikeys import Principal, Role, authenticate
from cityops.db.connection import AsyncConn
from control_api.problems import Problem

bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer cok_…`")


def pool(request: Request) -> AsyncConnectionPool[AsyncConn]:
    return request.app.state.pool  # type: ignore[no-any-return]


async def conn(request: Request) -> AsyncIterator[AsyncConn]:
    async with pool(request).connection() as connection:
        yield connection


Conn = Annotated[AsyncConn, Depends(conn)]


def now(request: Request) -> datetime:
    clock: Callable[[], datetime] = request.app.state.clock
    return clock()


Now = Annotated[datetime, Depends(now)]


async def principal(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Principal:
    if credentials is None:
        raise Problem(401, "unauthorized", "Unauthorized", "send `Authorization: Bearer <api key>`",
                      headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
    async with pool(request).connection() as connection:
        found = await authenticate(connection, credentials.credentials)
    if found is None:
        raise Problem(401, "unauthorized", "Unauthorized", "unknown or revoked API key",
                      headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
    return found


def role(needed: Role) -> Callable[..., Coroutine[Any, Any, Principal]]:
    async def check(caller: Annotated[Principal, Depends(principal)]) -> Principal:
        if not caller.role.allows(needed):
            raise Problem(
                403,
                "forbidden",
                "Forbidden",
                f"this needs the {needed.value} role; the key is {caller.role.value}",
            )
        return caller

    return check


Viewer = Annotated[Principal, Depends(role(Role.VIEWER))]
Operator = Annotated[Principal, Depends(role(Role.OPERATOR))]
Admin = Annotated[Principal, Depends(role(Role.ADMIN))]


def scope_sql(caller: Principal, column: str = "tenant") -> tuple[str, list[Any]]:
    """A WHERE fragment limiting rows to the caller's tenants (``TRUE`` for an all-tenant key)."""
    if caller.tenants is None:
        return "TRUE", []
    return f"{column} = ANY(%s)", [sorted(caller.tenants)]
