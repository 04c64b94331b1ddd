"""The dashboard at /admin/ui/: server-rendered HTML over the admin API, behind the admin token.

Every page is a view of the admin API, never a second implementation of a query: handlers call what the
admin routes call (reports, accuracy, admin_keys.key_views / budget_views, the key store, the limit store,
LivePrices), so a page and the API asked the same question agree to the last digit.

Who gets in: see session.py. The login form exchanges the admin token for a session cookie; the token is never
put in a URL, a page or browser storage.
"""

from __future__ import annotations

import hmac
import time
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from proxy.admin.keys import budget_views, key_views
from proxy.config import ADMIN_TOKEN_ENV, Settings
from proxy.control.gate import Gate
from proxy.control.keys import parse_key_fields
from proxy.control.limits import KINDS, Subject, parse_limits
from proxy.core.errors import ParameterError
from proxy.core.times import parse_time
from proxy.forwarding.responses import error_response
from proxy.pricing.live import LivePrices, Outcome
from proxy.reports import accuracy, render
from proxy.reports import queries as reports
from proxy.ui import data, svg
from proxy.ui.pages import (
    HEADERS,
    clean,
    guarded,
    in_thread,
    page,
    read_form,
    redirect,
    refused,
    same_origin,
    secret_of,
    static_routes,
)
from proxy.ui.session import Session, Signer

__all__ = ["REFRESH_SECONDS", "explain", "make_ui", "overview_page"]

REFRESH_SECONDS = 30  # the overview reloads itself this often while open

NAV = (("overview", "./", "Overview"), ("usage", "usage", "Usage"), ("calls", "calls", "Calls"),
       ("keys", "keys", "Keys"), ("budgets", "budgets", "Budgets"), ("pricing", "pricing", "Pricing"),
       ("accuracy", "accuracy", "Accuracy"))


def overview_page(view: dict[str, Any], near: list[dict[str, Any]], csrf: str, base: str = "/admin/ui/",
                  managed: bool = False) -> web.Response:
    """The overview's HTML from data.overview's figures and the budgets near their limit (bench/ui_scale.py
    times this with the query)."""
    chart = svg.stacked(view["trend"]["labels"], view["trend"]["series"])
    legend = [(name, svg.PALETTE[i % len(svg.PALETTE)]) for i, (name, _) in enumerate(view["trend"]["series"])]
    return page("overview.html", nav=NAV, active="overview", csrf=csrf, base=base, managed=managed, v=view,
                 chart=chart, legend=legend, dims=list(data.DIMENSIONS), near=near, refresh=REFRESH_SECONDS)


def make_ui(settings: Settings, gate_key: web.AppKey[Gate], live_key: web.AppKey[LivePrices]) -> web.Application:
    """The dashboard; mount it at /admin/ui (before the admin API's /admin)."""
    app = web.Application()
    base = "/admin/ui/"
    signer = Signer(secret_of(settings), "admin", "meterproxy_admin", settings.ui_session_ttl, base)
    guard = guarded(signer, base + "login")
    token = settings.admin_token
    db = settings.db

    def view(template: str, request: web.Request, session: Session, active: str, status: int = 200,
             **context: Any) -> web.Response:
        return page(template, status, nav=NAV, active=active, csrf=session.csrf, base=base,
                     managed=settings.keys == "managed", **context)

    async def login_form(request: web.Request) -> web.StreamResponse:
        if signer.read(request) is not None:
            return redirect(base)
        return page("login.html", base=base, who="admin", error=None, disabled=token is None,
                     env=ADMIN_TOKEN_ENV)

    async def login(request: web.Request) -> web.StreamResponse:
        if not same_origin(request):
            return refused("This form was sent from another site", "cross_origin")
        try:
            given = (await read_form(request)).get("token", "").strip()
        except ParameterError:
            given = ""
        if token is None or not hmac.compare_digest(given.encode(), token.encode()):
            error = (f"The admin UI is disabled: set {ADMIN_TOKEN_ENV} to enable it" if token is None
                     else "That is not the admin token")
            return page("login.html", 401, base=base, who="admin", error=error, disabled=token is None,
                         env=ADMIN_TOKEN_ENV)
        response = redirect(base)
        signer.start(response, request, "admin")
        return response

    @guard
    async def logout(request: web.Request, session: Session, form: dict[str, str]) -> web.StreamResponse:
        response = redirect(base + "login")
        signer.end(response, session)
        return response

    @guard
    async def overview(request: web.Request, session: Session) -> web.StreamResponse:
        dim = request.query.get("by", "model")
        if dim not in data.DIMENSIONS:
            dim = "model"
        gate = request.config_dict[gate_key]
        try:
            figures = await in_thread(db, data.overview, time.time(), dim)
        except reports.ReportDatabaseError as exc:
            return view("error.html", request, session, "overview", 503, message=str(exc))
        return overview_page(figures, await _near_limits(gate), session.csrf, base, settings.keys == "managed")

    async def _near_limits(gate: Gate) -> list[dict[str, Any]]:
        """Budgets (of subjects and managed keys) at 80% or more of their limit, fullest first."""
        budgets = [b for b in await budget_views(gate, gate.limits.entries()) if b["budget_usd"] is not None]
        if gate.keys is not None:
            keys = [k for k in await key_views(gate, await gate.keys.list(include_revoked=False))
                    if k["budget_usd"] is not None]
            budgets += [{**k, "kind": "key", "name": k["key_id"]} for k in keys]
        out = []
        for b in budgets:
            limit = Decimal(b["budget_usd"])
            used = Decimal(b["spent_usd"]) + Decimal(b["reserved_usd"])
            if limit > 0 and used >= limit * Decimal("0.8") or limit == 0:
                out.append({**b, "used": used, "fraction": float(used / limit) if limit else 1.0,
                            "bar": svg.meter(Decimal(b["spent_usd"]), Decimal(b["reserved_usd"]), limit)})
        return sorted(out, key=lambda b: -b["fraction"])

    def usage_query(q: Any) -> dict[str, Any]:
        params = clean(q, "group_by", "since", "until", "tz", "key", "user", "model")
        group_by = [g.strip() for g in params.get("group_by", "").split(",") if g.strip()]
        tz = params.get("tz")
        return {"params": params, "args": dict(
            group_by=group_by, tz=tz, key=params.get("key"), user=params.get("user"), model=params.get("model"),
            since=parse_time(params["since"], "since", tz) if "since" in params else None,
            until=parse_time(params["until"], "until", tz) if "until" in params else None)}

    @guard
    async def usage(request: web.Request, session: Session) -> web.StreamResponse:
        error, report, chart, params = None, None, None, clean(request.query, "group_by", "since", "until", "tz",
                                                                "key", "user", "model")
        try:
            asked = usage_query(request.query)
            report = await in_thread(db, reports.usage_report, **asked["args"])
        except ParameterError as exc:
            error = str(exc)
        except reports.ReportDatabaseError as exc:
            return view("error.html", request, session, "usage", 503, message=str(exc))
        columns = []
        if report is not None:
            columns = [reports.GROUP_ROW_KEYS.get(g, g) for g in report["group_by"]]

            def label(r: dict[str, Any]) -> str:
                return " · ".join("—" if r[c] is None else str(r[c]) for c in columns) or "all"

            chart = svg.bars([(label(r), Decimal(r["cost_usd"])) for r in report["rows"][:40]])
        return view("usage.html", request, session, "usage", status=400 if error else 200, error=error,
                    report=report, columns=columns, chart=chart, params=params, fields=reports.GROUP_FIELDS,
                    counters=reports.COUNTERS, csv_href="usage.csv?" + urlencode(params))

    @guard
    async def usage_csv(request: web.Request, session: Session) -> web.StreamResponse:
        try:
            asked = usage_query(request.query)
            report = await in_thread(db, reports.usage_report, **asked["args"])
        except ParameterError as exc:
            return error_response(400, str(exc), "invalid_request_error", "invalid_parameter", exc.param)
        except reports.ReportDatabaseError as exc:
            return error_response(503, f"The ledger cannot be read: {exc}", "server_error", "ledger_unavailable")
        return web.Response(text=render.to_csv(report), content_type="text/csv",
                            headers={**HEADERS, "Content-Disposition": 'attachment; filename="usage.csv"'})

    @guard
    async def calls(request: web.Request, session: Session) -> web.StreamResponse:
        params = clean(request.query, "key", "user", "model", "status", "usage_source", "before")
        error: str | None = None
        found: dict[str, Any] = {"calls": [], "next": None}
        try:
            found = await in_thread(db, reports.list_calls, limit=50, **params)
        except ParameterError as exc:
            error = str(exc)
        except reports.ReportDatabaseError as exc:
            return view("error.html", request, session, "calls", 503, message=str(exc))
        first = {k: v for k, v in params.items() if k != "before"}
        more = None if found["next"] is None else "calls?" + urlencode({**first, "before": found["next"]})
        return view("calls.html", request, session, "calls", status=400 if error else 200, error=error,
                    calls=found["calls"], more=more, params=params, first=urlencode(first),
                    sources=reports.USAGE_SOURCES)

    @guard
    async def one_call(request: web.Request, session: Session) -> web.StreamResponse:
        request_id = request.match_info["request_id"]
        try:
            call = await in_thread(db, reports.get_call, request_id)
        except reports.ReportDatabaseError as exc:
            return view("error.html", request, session, "calls", 503, message=str(exc))
        if call is None:
            return view("error.html", request, session, "calls", 404, message=f"No call {request_id!r}")
        return view("call.html", request, session, "calls", call=call, why=explain(call))

    async def keys(request: web.Request, session: Session, shown: dict[str, Any] | None = None,
                   error: str | None = None, status: int = 200) -> web.StreamResponse:
        gate = request.config_dict[gate_key]
        found = [] if gate.keys is None else await key_views(gate, await gate.keys.list())
        return view("keys.html", request, session, "keys", status=status, keys=found, shown=shown, error=error)

    def key_fields(form: dict[str, str], creating: bool) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        for name in ("user", "team", "name", "budget_usd", "budget_period", "expires_at", "rpm", "tpm", "models"):
            if name not in form:
                continue
            value = form[name].strip()
            if not value:
                if not creating and name not in ("user", "budget_period"):
                    fields[name] = None  # an emptied field clears it
                continue
            fields[name] = [m.strip() for m in value.split(",") if m.strip()] if name == "models" else value
        return parse_key_fields(fields, creating=creating)

    async def create_key(request: web.Request, session: Session, form: dict[str, str]) -> web.StreamResponse:
        gate = request.config_dict[gate_key]
        if gate.keys is None:
            return await keys(request, session, error="Keys are managed only with keys: managed",
                                          status=400)
        try:
            fields = key_fields(form, creating=True)
        except ParameterError as exc:
            return await keys(request, session, error=str(exc), status=400)
        key, record = await gate.keys.create(fields)
        (view,) = await key_views(gate, [record])
        return await keys(request, session, shown={"key": key, **view}, status=201)

    async def change_key(request: web.Request, session: Session, form: dict[str, str]) -> web.StreamResponse:
        gate = request.config_dict[gate_key]
        key_id = request.match_info["key_id"]
        if gate.keys is None:
            return await keys(request, session, error="Keys are managed only with keys: managed",
                                          status=400)
        if form.get("action") == "revoke":
            done = await gate.keys.revoke(key_id)
        else:
            try:
                fields = key_fields({k: v for k, v in form.items() if k in ("budget_usd", "budget_period", "rpm",
                                                                             "tpm", "models", "expires_at")},
                                    creating=False)
            except ParameterError as exc:
                return await keys(request, session, error=f"{key_id}: {exc}", status=400)
            done = await gate.keys.update(key_id, fields)
        if done is None:
            return await keys(request, session, error=f"No key {key_id!r}", status=404)
        return redirect(base + "keys")

    async def budgets(request: web.Request, session: Session, error: str | None = None,
                      status: int = 200) -> web.StreamResponse:
        gate = request.config_dict[gate_key]
        found = await budget_views(gate, gate.limits.entries())
        for b in found:
            b["bar"] = svg.meter(Decimal(b["spent_usd"]), Decimal(b["reserved_usd"]),
                                 None if b["budget_usd"] is None else Decimal(b["budget_usd"]))
        return view("budgets.html", request, session, "budgets", status=status, budgets=found, error=error,
                    kinds=KINDS, thresholds=settings.alert_thresholds, webhook=settings.alert_webhook is not None)

    async def set_budget(request: web.Request, session: Session, form: dict[str, str]) -> web.StreamResponse:
        gate = request.config_dict[gate_key]
        kind, name = form.get("kind", ""), form.get("name", "").strip()
        if kind not in KINDS or not name:
            return await budgets(request, session, error=f"kind must be one of {', '.join(KINDS)} "
                                             "and name must be set", status=400)
        subject = Subject(kind, name)
        if form.get("action") == "delete":
            if not await gate.limits.delete(subject):
                return await budgets(request, session, status=404, error=(
                    f"No limits set through the API for {kind} {name!r} (limits from the config file stay)"))
            return redirect(base + "budgets")
        body = {k: form[k].strip() for k in ("budget_usd", "budget_period", "rpm", "tpm") if form.get(k, "").strip()}
        try:
            limits = parse_limits(body)
        except ParameterError as exc:
            return await budgets(request, session, error=str(exc), status=400)
        if kind == "key" and gate.keys is not None and await gate.keys.get(name) is not None:
            return await budgets(request, session, status=409, error=(
                f"{name} is a managed key: change its limits on the Keys page"))
        await gate.limits.put(subject, limits)
        return redirect(base + "budgets")

    async def pricing(request: web.Request, session: Session, error: str | None = None,
                      status: int = 200) -> web.StreamResponse:
        live = request.config_dict[live_key]
        try:
            seen = await in_thread(db, reports.usage_report, group_by=["model"])
        except reports.ReportDatabaseError as exc:
            return view("error.html", request, session, "pricing", 503, message=str(exc))
        unpriced = [r for r in seen["rows"] if r["unpriced_calls"]]
        return view("pricing.html", request, session, "pricing", status=status, p=live.status(),
                    unpriced=unpriced, error=error, path=live.path)

    async def reload_pricing(request: web.Request, session: Session, form: dict[str, str]) -> web.StreamResponse:
        live = request.config_dict[live_key]
        outcome = await live.refresh(force=True)
        if outcome is Outcome.REFUSED and live.error is not None:
            return await pricing(request, session, status=400, error=(
                f"pricing edit refused, version {live.version} stays in force: {live.error.message}"))
        return redirect(base + "pricing")

    @guard
    async def accuracy_page(request: web.Request, session: Session) -> web.StreamResponse:
        try:
            found = await in_thread(db, accuracy.accuracy_report)
        except reports.ReportDatabaseError as exc:
            return view("error.html", request, session, "accuracy", 503, message=str(exc))
        return view("accuracy.html", request, session, "accuracy", models=found["models"])

    async def not_found(request: web.Request) -> web.Response:
        return error_response(404, f"No dashboard page {request.method} {request.path}", "invalid_request_error",
                              "not_found", headers=HEADERS)

    r = app.router
    r.add_get("/login", login_form)
    r.add_post("/login", login)
    r.add_post("/logout", logout)
    r.add_get("/", overview)
    r.add_get("/usage", usage)
    r.add_get("/usage.csv", usage_csv)
    r.add_get("/calls", calls)
    r.add_get("/calls/{request_id}", one_call)
    r.add_get("/keys", guard(keys))
    r.add_post("/keys", guard(create_key))
    r.add_post("/keys/{key_id}", guard(change_key))
    r.add_get("/budgets", guard(budgets))
    r.add_post("/budgets", guard(set_budget))
    r.add_get("/pricing", guard(pricing))
    r.add_post("/pricing/reload", guard(reload_pricing))
    r.add_get("/accuracy", accuracy_page)
    static_routes(app)
    r.add_route("*", "/{tail:.*}", not_found)
    return app


def explain(call: dict[str, Any]) -> list[str]:
    """In words: where the row's token figures came from, how exact they are, and how it was priced."""
    words = []
    source = call.get("usage_source")
    if source == "upstream":
        words.append("Tokens: read from the provider's own usage in the response (exact).")
    elif source == "counted":
        words.append("Tokens: counted by the proxy with tiktoken, because the response carried no usage "
                     "(a stream without stream_options.include_usage, or a provider that sends none).")
        if call.get("approximate"):
            words.append("Approximate: part of the count was estimated (images, unknown message framing, or a "
                         "model tiktoken does not know).")
        if call.get("lower_bound"):
            words.append("A lower bound: a reasoning model's hidden reasoning tokens are never in a stream, so the "
                         "real figure is higher.")
    else:
        words.append("Tokens: none recorded — the call produced no usage (an error, a refusal, or an endpoint "
                     "without tokens).")
    if call.get("usage_note"):
        words.append(f"Note: {call['usage_note']}")
    if call.get("priced"):
        words.append(f"Priced from the table in force ({call.get('pricing_version') or 'unknown version'}).")
    elif source != "none" or call.get("total_tokens"):
        words.append(f"Unpriced: the model {call.get('model')!r} has no entry in the price table, so its cost is "
                     "unknown (recorded as 0 and flagged, never counted as free). Price it, then re-price its calls "
                     "with `meterproxy reprice --model ...`.")
    if call.get("original_cost_usd") is not None:
        words.append(f"Re-priced: the cost first recorded was {call['original_cost_usd']} USD.")
    if call.get("counted_prompt_tokens") is not None or call.get("counted_completion_tokens") is not None:
        words.append("Sampled for accuracy: the proxy also counted this call itself (counted_prompt_tokens, "
                     "counted_completion_tokens) to measure its counting error.")
    return words


