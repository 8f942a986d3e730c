"""RFC 9457 problem details: every error the API returns, with a stable ``type``.

Handlers translate at one boundary: FastAPI's validation errors (422, naming each field), our
:class:`Problem`, the domain errors of :mod:`rules` and the database's, so no path answers a bare
500 on bad input.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from psycopg_pool import PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from rules.actions import AlertNotFoundError, AlertTransitionError
from rules.backtest import BacktestLimitError
from rules.spec import RuleSpecError

log = logging.getLogger(__name__)

TYPE_BASE = "https://cityops.dev/problems/"
MEDIA_TYPE = "application/problem+json"
RETRY_AFTER_S = 2  # what an overloaded or database-less API asks clients to wait


class Problem(Exception):  # noqa: N818 - it is the problem, not an error about one
    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str = "",
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail or title)
        self.status, self.slug, self.title, self.detail = status, slug, title, detail
        self.headers = headers or {}
        self.extra = extra or {}


def not_found(what: str) -> Problem:
    return Problem(404, "not-found", "Not found", f"{what} not found")


def invalid(field: str, where: str, message: str) -> Problem:
    """A 422 for one parameter, shaped like FastAPI's own validation errors."""
    errors = [{"field": field, "in": where, "message": message}]
    return Problem(
        422, "invalid-parameters", "Invalid parameters", f"{field}: {message}", extra={"errors": errors}
    )


def problem_response(
    status: int,
    slug: str,
    title: str,
    detail: str,
    instance: str,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response:
    body = {
        "type": TYPE_BASE + slug,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": instance,
        **extra,
    }
    return Response(orjson.dumps(body), status_code=status, media_type=MEDIA_TYPE, headers=headers)


_LOCATIONS = ("body", "query", "path", "header")


def _field_error(error: Any) -> dict[str, str]:
    loc = error["loc"]
    field = ".".join(str(p) for p in loc if p not in _LOCATIONS) or "body"
    return {"field": field, "in": str(loc[0]) if loc else "body", "message": error["msg"]}


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> Response:
        return problem_response(
            exc.status, exc.slug, exc.title, exc.detail, request.url.path, headers=exc.headers, **exc.extra
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        errors = [_field_error(e) for e in exc.errors()]
        detail = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
        return problem_response(
            422, "invalid-parameters", "Invalid parameters", detail, request.url.path, errors=errors
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        slug = {401: "unauthorized", 403: "forbidden", 404: "not-found", 405: "method-not-allowed"}.get(
            exc.status_code, "http-error"
        )
        headers = dict(exc.headers) if exc.headers else None
        return problem_response(
            exc.status_code, slug, str(exc.detail), str(exc.detail), request.url.path, headers=headers
        )

    @app.exception_handler(AlertNotFoundError)
    async def _alert_missing(request: Request, exc: AlertNotFoundError) -> Response:
        return problem_response(404, "not-found", "Not found", str(exc), request.url.path)

    @app.exception_handler(AlertTransitionError)
    async def _transition(request: Request, exc: AlertTransitionError) -> Response:
        return problem_response(
            409, "invalid-transition", "Not allowed in this state", str(exc), request.url.path
        )

    @app.exception_handler(RuleSpecError)
    async def _rule(request: Request, exc: RuleSpecError) -> Response:
        return problem_response(422, "invalid-rule", "Invalid rule", str(exc), request.url.path)

    @app.exception_handler(BacktestLimitError)
    async def _backtest(request: Request, exc: BacktestLimitError) -> Response:
        return problem_response(422, "backtest-too-large", "Backtest too large", str(exc), request.url.path)

    @app.exception_handler(psycopg.DataError)
    async def _bad_data(request: Request, exc: psycopg.DataError) -> Response:
        # A value PostgreSQL cannot take (SQLSTATE class 22, or psycopg refusing it first): a NUL
        # character in text or JSON, a number out of range. The request's fault, not ours.
        detail = (exc.diag.message_primary or str(exc) or "a value the database cannot store").strip()
        return problem_response(422, "invalid-data", "Invalid data", detail, request.url.path)

    @app.exception_handler(PoolTimeout)
    async def _busy(request: Request, exc: PoolTimeout) -> Response:
        return problem_response(
            503, "overloaded", "Overloaded", "every database connection is busy: try again shortly",
            request.url.path, headers={"Retry-After": str(RETRY_AFTER_S)},
        )  # fmt: skip

    @app.exception_handler(psycopg.OperationalError)
    async def _database_down(request: Request, exc: psycopg.OperationalError) -> Response:
        return problem_response(
            503, "database-unavailable", "Database unavailable", "no database connection: retry shortly",
            request.url.path, headers={"Retry-After": str(RETRY_AFTER_S)},
        )  # fmt: skip

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error", extra={"path": request.url.path})
        return problem_response(500, "internal", "Internal error", "the error was logged", request.url.path)
