"""The admin API: usage reports and call listings, read-only, behind a bearer token.

Never forwarded upstream, never writes. Reports run on their own read-only SQLite connection in a worker
thread (reports.py), so a large report does not stall the proxy's event loop.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from typing import Any, Awaitable, Callable

from aiohttp import web

from proxy.admin import openapi
from proxy.config import ADMIN_TOKEN_ENV
from proxy.control.limits import MAX_QUERY_VALUE
from proxy.core.errors import ParameterError
from proxy.core.times import parse_time
from proxy.forwarding.responses import error_response, unknown_parameter
from proxy.reports import accuracy, render
from proxy.reports import queries as reports

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_USAGE_PARAMS = ("group_by", "since", "until", "key", "user", "model", "tz", "format")


def admin_guard(token: str | None) -> Callable[[Handler], Handler]:
    """Wrap an admin handler in the bearer-token check.

    A wrapper per handler rather than a middleware: an aiohttp sub-app with middlewares makes every
    request of the parent app — every /v1 call — pass through an extra middleware layer."""
    expected = token.encode() if token else None

    def guard(handler: Handler) -> Handler:
        async def check(request: web.Request) -> web.StreamResponse:
            if expected is None:
                return error_response(401, f"The admin API is disabled: set {ADMIN_TOKEN_ENV} to enable it",
                                      "authentication_error", "admin_disabled")
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            # Header bytes that are not UTF-8 arrive as lone surrogates: surrogateescape gives the bytes
            # back (never equal to a UTF-8 token) instead of an UnicodeEncodeError.
            presented = given.strip().encode("utf-8", "surrogateescape")
            if scheme.lower() != "bearer" or not hmac.compare_digest(presented, expected):
                return error_response(401, "Invalid admin token: send 'Authorization: Bearer <"
                                      f"{ADMIN_TOKEN_ENV}>'", "authentication_error", "invalid_admin_token")
            for name, value in request.query.items():
                if len(value) > MAX_QUERY_VALUE:
                    return error_response(400, f"{name[:64]}: at most {MAX_QUERY_VALUE} characters",
                                          "invalid_request_error", "invalid_parameter", name[:64])
            return await handler(request)

        return check

    return guard


class GuardedRoutes:
    """What route-adding functions get: `.router.add_get(path, handler)` and friends, every handler guarded."""

    def __init__(self, app: web.Application, guard: Callable[[Handler], Handler]) -> None:
        self.router = self
        self._app, self._guard = app, guard

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        self._app.router.add_route(method, path, self._guard(handler))

    def add_get(self, path: str, handler: Handler) -> None:
        self.add_route("GET", path, handler)

    def add_post(self, path: str, handler: Handler) -> None:
        self.add_route("POST", path, handler)

    def add_put(self, path: str, handler: Handler) -> None:
        self.add_route("PUT", path, handler)

    def add_patch(self, path: str, handler: Handler) -> None:
        self.add_route("PATCH", path, handler)

    def add_delete(self, path: str, handler: Handler) -> None:
        self.add_route("DELETE", path, handler)


def _report_failed(exc: Exception) -> web.Response:
    if isinstance(exc, ParameterError):
        return error_response(400, str(exc), "invalid_request_error", "invalid_parameter", exc.param)
    return error_response(503, f"The ledger cannot be read: {exc}", "server_error", "ledger_unavailable")


async def _in_thread(path: str, fn: Callable[..., dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    def run() -> dict[str, Any]:
        with reports.open_read(path) as conn:
            return fn(conn, **kwargs)

    return await asyncio.to_thread(run)


def _one_call(path: str, request_id: str) -> dict[str, Any] | None:
    with reports.open_read(path) as conn:
        return reports.get_call(conn, request_id)


def make_admin_app(db: str, token: str | None,
                   extra_routes: Callable[[GuardedRoutes], None] | None = None) -> web.Application:
    """The admin API over the ledger at `db`; mount it at /admin (on the proxy's port or its own).

    `extra_routes` adds routes (keys, budgets) before the catch-all 404.
    """

    def db_path(request: web.Request) -> str:
        return db

    async def usage(request: web.Request) -> web.StreamResponse:
        q = request.query
        if (refused := unknown_parameter(q, _USAGE_PARAMS)) is not None:
            return refused
        try:
            fmt = q.get("format", "json")
            if fmt not in ("json", "csv"):
                raise ParameterError("format must be json or csv", param="format")
            group_by = [g.strip() for g in q.get("group_by", "").split(",") if g.strip()]
            since = parse_time(q["since"], "since", q.get("tz")) if "since" in q else None
            until = parse_time(q["until"], "until", q.get("tz")) if "until" in q else None
            report = await _in_thread(db_path(request), reports.usage_report, group_by=group_by, since=since,
                                      until=until, key=q.get("key"), user=q.get("user"), model=q.get("model"),
                                      tz=q.get("tz"))
        except (ParameterError, reports.ReportDatabaseError) as exc:
            return _report_failed(exc)
        if fmt == "csv":
            return web.Response(text=render.to_csv(report), content_type="text/csv")
        return web.json_response(report)

    async def calls(request: web.Request) -> web.StreamResponse:
        q = request.query
        if (refused := unknown_parameter(q, ("key", "limit", "before", "user", "model", "status",
                                             "usage_source"))) is not None:
            return refused
        try:
            limit_text = q.get("limit", "50")
            if not re.fullmatch(r"[0-9]{1,6}", limit_text):  # ASCII: "²".isdigit(), yet int("²") fails
                raise ParameterError(f"limit must be a whole number from 1 to {reports.MAX_LIMIT}",
                                          param="limit")
            result = await _in_thread(db_path(request), reports.list_calls, key=q.get("key"),
                                      limit=int(limit_text), before=q.get("before"), user=q.get("user"),
                                      model=q.get("model"), status=q.get("status"),
                                      usage_source=q.get("usage_source"))
        except (ParameterError, reports.ReportDatabaseError) as exc:
            return _report_failed(exc)
        return web.json_response(result)

    async def one_call(request: web.Request) -> web.StreamResponse:
        try:
            found = await asyncio.to_thread(_one_call, db_path(request), request.match_info["request_id"])
        except reports.ReportDatabaseError as exc:
            return _report_failed(exc)
        if found is None:
            return error_response(404, f"No call with request_id {request.match_info['request_id']!r}",
                                  "invalid_request_error", "call_not_found")
        return web.json_response(found)

    async def accuracy_view(request: web.Request) -> web.StreamResponse:
        q = request.query
        if (refused := unknown_parameter(q, ("since", "until", "model"))) is not None:
            return refused
        try:
            since = parse_time(q["since"], "since") if "since" in q else None
            until = parse_time(q["until"], "until") if "until" in q else None
            result = await _in_thread(db_path(request), accuracy.accuracy_report, since=since, until=until,
                                      model=q.get("model"))
        except (ParameterError, reports.ReportDatabaseError) as exc:
            return _report_failed(exc)
        return web.json_response(result)

    async def not_found(request: web.Request) -> web.Response:
        served = sorted({str(info.get("path") or info.get("formatter", "")) for info in
                         (r.get_info() for r in admin.router.resources())} - {"/admin/{tail}", "/{tail}"})
        return error_response(404, f"No admin route {request.method} {request.path}: the admin API serves "
                              f"{', '.join(served)}", "invalid_request_error", "not_found")

    spec = json.dumps(openapi.document()).encode()

    async def openapi_view(request: web.Request) -> web.StreamResponse:
        return web.Response(body=spec, content_type="application/json")

    admin = web.Application()
    routes = GuardedRoutes(admin, admin_guard(token))
    routes.add_get("/openapi.json", openapi_view)
    routes.add_get("/usage", usage)
    routes.add_get("/calls", calls)
    routes.add_get("/calls/{request_id}", one_call)
    routes.add_get("/accuracy", accuracy_view)
    if extra_routes is not None:
        extra_routes(routes)
    routes.add_route("*", "/{tail:.*}", not_found)
    return admin
