"""Admin routes for managed keys and for limits of passthrough subjects; and a key holder's own view.

`add_key_routes(admin, GATE)` adds, to the admin sub-app (behind its token):

    POST   /keys                 create a key; the answer holds the key, shown this once
    GET    /keys                 every key, with spend so far and budget left (?user= ?team= ?revoked=false)
    GET    /keys/{key_id}        one key
    PATCH  /keys/{key_id}        change its fields (null clears one)
    DELETE /keys/{key_id}        revoke it (the row stays, for reports)
    GET    /budgets              limits of every subject (config and API), with spend
    GET|PUT|DELETE /budgets/{kind}/{name}    one subject's limits (kind: key, user, team)

`meter_usage(GATE)` is the handler of `GET /meter/usage` on the main app: the presenting key's own usage
per day and model, and its budgets left — no admin token, the key itself is the credential. In passthrough
mode that is the key's own budget only: X-Meter-User / X-Meter-Team prove nothing, so they show nothing.

Bodies are read with parse_float=Decimal, so money sent as a JSON number keeps its exact digits. Every
error is in OpenAI's shape. This module must never return a key except in the answer that created it.
"""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal
from typing import Any, Awaitable, Callable, Sequence

from aiohttp import web

from proxy.control.budgets import BudgetState
from proxy.control.db import ControlDBError
from proxy.control.gate import Gate, Refusal
from proxy.control.keys import KeyStore, ManagedKey, parse_key_fields
from proxy.control.limits import (
    KINDS,
    Limits,
    Subject,
    iso,
    parse_limits,
    parse_text,
    period_of,
)
from proxy.core.attribution import caller_of
from proxy.core.errors import ParameterError
from proxy.core.money import usd_text
from proxy.core.times import parse_time
from proxy.forwarding.responses import error_response, unknown_parameter
from proxy.reports import queries as reports

__all__ = ["add_key_routes", "budget_views", "key_views", "meter_report", "meter_usage"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _bad(message: str, param: str | None = None, code: str = "invalid_parameter") -> web.Response:
    return error_response(400, message, "invalid_request_error", code, param)


def _not_found(what: str, code: str) -> web.Response:
    return error_response(404, f"No {what}", "invalid_request_error", code)


class _TooLarge(ParameterError):
    """A body past MAX_BODY: answered 413, unread beyond the bound."""


MAX_BODY = 64 * 1024  # a key with 100 globs of 256 characters is under 30 KiB; JSON is parsed on the loop


def _refused(exc: ParameterError) -> web.Response:
    if isinstance(exc, _TooLarge):
        return error_response(413, str(exc), "invalid_request_error", "request_too_large")
    return _bad(str(exc), exc.param)


async def _body(request: web.Request) -> dict[str, Any]:
    too_large = _TooLarge(f"the body is larger than {MAX_BODY} bytes")
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise too_large
    raw = b""
    while chunk := await request.content.read(MAX_BODY + 1 - len(raw)):  # chunked bodies have no length
        raw += chunk
        if len(raw) > MAX_BODY:
            raise too_large
    if not raw.strip():  # a PUT without its body must not wipe a subject's limits
        raise ParameterError("a JSON object body is required (send {} to mean no fields)")
    try:
        data = json.loads(raw, parse_float=Decimal)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ParameterError(f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ParameterError("the body must be a JSON object")
    return data


def state_json(state: BudgetState) -> dict[str, Any]:
    return {"kind": state.subject.kind, "name": state.subject.name, "period": state.period,
            "period_start": iso(state.period_start), "budget_usd": usd_text(state.budget),
            "spent_usd": usd_text(state.spent), "reserved_usd": usd_text(state.reserved), "left_usd": usd_text(state.left)}


async def key_views(gate: Gate, keys: list[ManagedKey]) -> list[dict[str, Any]]:
    """Each key's public fields with its spend so far and budget left (what GET /admin/keys answers)."""
    now = time.time()
    states = await gate.budgets.states([(Subject("key", k.key_id), k.budget_period, k.budget_usd) for k in keys],
                                       now)
    out = []
    for key, state in zip(keys, states):
        view = key.public(now)
        view.update({k: v for k, v in state_json(state).items() if k not in ("kind", "name", "period")})
        out.append(view)
    return out


def _unavailable(handler: Handler) -> Handler:
    """`handler`, answering 503 in OpenAI's shape while the control tables or the ledger cannot be reached."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ControlDBError as exc:
            return error_response(503, f"The key and limit store is unavailable: {exc}", "server_error",
                                  "control_store_unavailable")
        except reports.ReportDatabaseError as exc:
            return error_response(503, f"The ledger cannot be read: {exc}", "server_error", "ledger_unavailable")

    return guarded


class _Guarded:
    """The admin app's router, with every handler behind `_unavailable`."""

    def __init__(self, admin: Any) -> None:
        self._admin = admin
        self.router = self

    def __getattr__(self, name: str) -> Any:
        add = getattr(self._admin.router, name)
        if not name.startswith("add_"):
            return add
        return lambda path, handler, *args, **kwargs: add(path, _unavailable(handler), *args, **kwargs)


def add_key_routes(admin: Any, gate_key: web.AppKey[Gate]) -> None:
    """Add the routes above. Call it before the admin app's catch-all route (routes match in order)."""
    admin = _Guarded(admin)

    def store(request: web.Request) -> tuple[Gate, KeyStore]:
        gate = request.config_dict[gate_key]
        assert gate.keys is not None
        return gate, gate.keys

    async def create(request: web.Request) -> web.StreamResponse:
        gate, keys = store(request)
        try:
            fields = parse_key_fields(await _body(request), creating=True)
        except ParameterError as exc:
            return _refused(exc)
        key, record = await keys.create(fields)
        (view,) = await key_views(gate, [record])
        return web.json_response({"key": key, **view}, status=201)

    async def list_all(request: web.Request) -> web.StreamResponse:
        gate, keys = store(request)
        if (refused := unknown_parameter(request.query, ("user", "team", "revoked"))) is not None:
            return refused
        revoked = request.query.get("revoked", "true")
        if revoked not in ("true", "false"):
            return _bad("revoked must be true or false", "revoked")
        found = await keys.list(user=request.query.get("user"), team=request.query.get("team"),
                                include_revoked=revoked == "true")
        return web.json_response({"keys": await key_views(gate, found)})

    async def show(request: web.Request) -> web.StreamResponse:
        gate, keys = store(request)
        if (refused := unknown_parameter(request.query, ())) is not None:
            return refused
        key = await keys.get(request.match_info["key_id"])
        if key is None:
            return _not_found(f"key {request.match_info['key_id']!r}", "key_not_found")
        return web.json_response((await key_views(gate, [key]))[0])

    async def update(request: web.Request) -> web.StreamResponse:
        gate, keys = store(request)
        try:
            fields = parse_key_fields(await _body(request), creating=False)
        except ParameterError as exc:
            return _refused(exc)
        key = await keys.update(request.match_info["key_id"], fields)
        if key is None:
            return _not_found(f"key {request.match_info['key_id']!r}", "key_not_found")
        return web.json_response((await key_views(gate, [key]))[0])

    async def revoke(request: web.Request) -> web.StreamResponse:
        gate, keys = store(request)
        key = await keys.revoke(request.match_info["key_id"])
        if key is None:
            return _not_found(f"key {request.match_info['key_id']!r}", "key_not_found")
        return web.json_response((await key_views(gate, [key]))[0])

    admin.router.add_post("/keys", create)
    admin.router.add_get("/keys", list_all)
    admin.router.add_get("/keys/{key_id}", show)
    admin.router.add_patch("/keys/{key_id}", update)
    admin.router.add_delete("/keys/{key_id}", revoke)
    _add_budget_routes(admin, gate_key)


async def budget_views(gate: Gate, entries: list[tuple[Subject, Any, str]]) -> list[dict[str, Any]]:
    """Each subject's limits with its spend (what GET /admin/budgets answers); `entries` from limits.entries()."""
    states = await gate.budgets.states([(s, lim.budget_period, lim.budget_usd) for s, lim, _ in entries],
                                       time.time())
    return [{**state_json(st), "source": source, "rpm": lim.rpm, "tpm": lim.tpm}
            for (_, lim, source), st in zip(entries, states)]


def _add_budget_routes(admin: Any, gate_key: web.AppKey[Gate]) -> None:
    views = budget_views

    def subject_of(request: web.Request) -> Subject | web.Response:
        kind, name = request.match_info["kind"], request.match_info["name"]
        if kind not in KINDS:
            return _bad(f"kind must be one of {', '.join(KINDS)}", "kind")
        try:
            return Subject(kind, parse_text(name, "name"))  # the bound every stored name has
        except ParameterError as exc:
            return _refused(exc)

    async def list_all(request: web.Request) -> web.StreamResponse:
        gate = request.config_dict[gate_key]
        if (refused := unknown_parameter(request.query, ())) is not None:
            return refused
        return web.json_response({"budgets": await views(gate, gate.limits.entries())})

    async def show(request: web.Request) -> web.StreamResponse:
        gate, subject = request.config_dict[gate_key], subject_of(request)
        if isinstance(subject, web.Response):
            return subject
        if request.method == "GET" and (refused := unknown_parameter(request.query, ())) is not None:
            return refused
        found = [e for e in gate.limits.entries() if e[0] == subject]
        if not found:
            return _not_found(f"limits for {subject.kind} {subject.name!r}", "limits_not_found")
        return web.json_response((await views(gate, found))[0])

    async def put(request: web.Request) -> web.StreamResponse:
        gate, subject = request.config_dict[gate_key], subject_of(request)
        if isinstance(subject, web.Response):
            return subject
        try:
            limits = parse_limits(await _body(request))
        except ParameterError as exc:
            return _refused(exc)
        if subject.kind == "key" and gate.keys is not None and await gate.keys.get(subject.name) is not None:
            return error_response(409, f"{subject.name} is a managed key: set its limits with PATCH "
                                  f"/admin/keys/{subject.name}", "invalid_request_error", "managed_key")
        await gate.limits.put(subject, limits)
        return await show(request)

    async def delete(request: web.Request) -> web.StreamResponse:
        gate, subject = request.config_dict[gate_key], subject_of(request)
        if isinstance(subject, web.Response):
            return subject
        if not await gate.limits.delete(subject):
            return _not_found(f"limits set through the API for {subject.kind} {subject.name!r}",
                              "limits_not_found")
        return web.json_response({"kind": subject.kind, "name": subject.name, "deleted": True})

    admin.router.add_get("/budgets", list_all)
    admin.router.add_get("/budgets/{kind}/{name}", show)
    admin.router.add_put("/budgets/{kind}/{name}", put)
    admin.router.add_delete("/budgets/{kind}/{name}", delete)


def meter_usage(gate_key: web.AppKey[Gate]) -> Handler:
    """`GET /meter/usage[?since=&until=]`: the presenting key's usage per day and model, and budgets left."""

    async def handler(request: web.Request) -> web.StreamResponse:
        gate = request.config_dict[gate_key]
        now = time.time()
        if gate.managed:
            key = await gate.resolve(request.headers)
            if isinstance(key, Refusal):
                return error_response(key.status, key.message, key.type, key.code, headers=key.headers)
            key_id, user, team = key.key_id, key.user, key.team
            charges = [(Subject("key", key_id), key.limits)]
        else:
            found = caller_of(request.headers)  # the subject exactly as the ledger row records it
            if found.key_id is None:
                return error_response(401, "Send your API key (Authorization: Bearer ...) to see its usage",
                                      "invalid_request_error", "invalid_api_key")
            key_id = found.key_id
            # Only what the key itself proves: X-Meter-User / X-Meter-Team could name anyone's user or team.
            user, team = None, None
            charges = [(Subject("key", key_id), gate.limits.get(Subject("key", key_id)) or Limits())]
        if (refused := unknown_parameter(request.query, ("since", "until"))) is not None:
            return refused
        try:
            q = request.query
            since = parse_time(q["since"], "since") if "since" in q else None
            until = parse_time(q["until"], "until") if "until" in q else None
            return web.json_response(await meter_report(gate, key_id, user, team, charges, since, until, now))
        except ParameterError as exc:
            return _bad(str(exc), exc.param)
        except reports.ReportDatabaseError as exc:
            return error_response(503, f"The ledger cannot be read: {exc}", "server_error", "ledger_unavailable")

    return handler


async def meter_report(gate: Gate, key_id: str, user: str | None, team: str | None,
                       charges: Sequence[tuple[Subject, Limits | None]], since: float | None, until: float | None,
                       now: float) -> dict[str, Any]:
    """A key holder's own view (GET /meter/usage, /meter/ui/): usage per day and model since `since` (default:
    this month's start), and the budgets left of the key and of its user and team."""
    charges = [*charges, *((Subject(kind, name), gate.limits.get(Subject(kind, name)))
                           for kind, name in (("user", user), ("team", team)) if name)]
    since = period_of("month", now)[0] if since is None else since
    usage = await asyncio.to_thread(_usage, gate.budgets.ledger_path, key_id, since, until)
    items = [(s, lim.budget_period, lim.budget_usd) for s, lim in charges if lim is not None]
    states = await gate.budgets.states(items, now)
    return {
        "key_id": key_id, "user": user, "team": team, "since": usage["since"], "until": usage["until"],
        "budgets": [state_json(st) for st in states], "rows": usage["rows"], "totals": usage["totals"],
    }  # fmt: skip


def _usage(path: str, key_id: str, since: float, until: float | None) -> dict[str, Any]:
    with reports.open_read(path) as conn:
        return reports.usage_report(conn, group_by=["day", "model"], since=since, until=until, key=key_id)
