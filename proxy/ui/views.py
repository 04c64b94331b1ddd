"""The dashboard at /admin/ui/ and the key holder's page at /meter/ui/: server-rendered HTML over the API.

Every page is a view of the admin API, never a second implementation of a query: handlers call what the
admin routes call (reports, accuracy, admin_keys.key_views / budget_views / meter_report, the key store, the
limit store, LivePrices). Templates are jinja2 with autoescaping, so every client-controlled value (user,
session, operation, tag, model) renders as text. Pages send a Content-Security-Policy that allows only this
origin, and nothing on them loads from anywhere else.

Who gets in: see session.py. A login form exchanges the admin token (or a key holder's key) for a session
cookie; the token is never put in a URL, a page or browser storage. Every POST carries the session's CSRF
token and, when the browser sends one, an Origin of this very host.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import urlencode, urlsplit

import jinja2
from aiohttp import web
from markupsafe import Markup

from proxy import accuracy, render, reports
from proxy.admin_keys import budget_views, key_views, meter_report
from proxy.attribution import key_id_of
from proxy.config import ADMIN_TOKEN_ENV, Settings
from proxy.errors import error_response
from proxy.gate import Gate, Refusal
from proxy.keys import parse_key_fields
from proxy.limits import KINDS, FieldError, Limits, Subject, parse_limits, period_of
from proxy.pricing_live import LivePrices, Outcome
from proxy.ui import data, svg
from proxy.ui.session import Session, Signer

__all__ = ["CSP", "make_meter_ui", "make_ui", "mount", "overview_page"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'")
_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
            "X-Frame-Options": "DENY", "Cache-Control": "no-store"}
_MAX_FIELD = 4096  # no form field is longer
_MAX_FORM = 65536  # nor any form
REFRESH_SECONDS = 30  # the overview reloads itself this often while open

_env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                          undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def usd(value: Any) -> Markup:
    """Money for display: rounded to cents (more places for small sums), the exact decimal string on hover."""
    if value is None:
        return Markup('<span class="none">—</span>')
    exact = value if isinstance(value, Decimal) else Decimal(str(value))
    size = abs(exact)
    places = 2 if size >= 1 or size == 0 else 4 if size >= Decimal("0.01") else 6
    shown = exact.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_EVEN)
    return Markup('<span class="usd" title="{0}" data-exact="{0}">${1}</span>').format(format(exact, "f"),
                                                                                    f"{shown:,}")


def count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else ("—" if value is None else str(value))


def share(value: float | Decimal | None) -> str:
    return "—" if value is None else f"{100 * float(value):.1f}%"


def field(value: Any) -> str:
    """A row's value as the API's JSON spells it (null, true, {"team": ...}); text as it is."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


_env.globals.update(usd=usd, count=count, share=share, urlencode=urlencode, field=field)


def _page(template: str, status: int = 200, **context: Any) -> web.Response:
    html = _env.get_template(template).render(**context)
    return web.Response(text=html, content_type="text/html", charset="utf-8", status=status, headers=_HEADERS)


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={**_HEADERS, "Location": location})


def _same_origin(request: web.Request) -> bool:
    """A POST's Origin (or Referer), when the browser sends one, must be this very host."""
    origin = request.headers.get("Origin") or request.headers.get("Referer")
    if not origin:
        return True  # SameSite=Strict and the CSRF token still stand
    parts = urlsplit(origin)
    return parts.netloc == request.host and parts.scheme in ("http", "https")


async def _form(request: web.Request) -> dict[str, str]:
    """A posted form's text fields; a form without a length or over _MAX_FORM bytes is not read at all."""
    if request.content_length is None or request.content_length > _MAX_FORM:
        raise FieldError(f"a form of at most {_MAX_FORM} bytes, sent with its Content-Length, is expected", None)
    form = await request.post()
    out = {}
    for name, value in form.items():
        if not isinstance(value, str) or len(value) > _MAX_FIELD:
            raise FieldError(f"{name}: a text field of at most {_MAX_FIELD} characters", name)
        out[name] = value
    return out


def _refused(message: str, code: str) -> web.Response:
    return error_response(403, message, "invalid_request_error", code, headers=_HEADERS)


def _static_routes(app: web.Application) -> None:
    names = {p.name: p for p in STATIC.iterdir() if p.is_file()}

    async def static(request: web.Request) -> web.StreamResponse:
        path = names.get(request.match_info["name"])
        if path is None:
            return error_response(404, "No such file", "invalid_request_error", "not_found")
        kind = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}.get(path.suffix,
                                                                                           "text/plain")
        return web.Response(body=path.read_bytes(), content_type=kind,
                            headers={**_HEADERS, "Cache-Control": "max-age=300"})

    app.router.add_get("/static/{name}", static)


def _guarded(signer: Signer, login: str) -> Callable[[Callable[..., Awaitable[web.StreamResponse]]], Handler]:
    """Handlers get (request, session). No session: a GET goes to the login page, anything else is refused.
    A POST must carry the session's CSRF token and come from this origin."""

    def wrap(handler: Callable[..., Awaitable[web.StreamResponse]]) -> Handler:
        async def check(request: web.Request) -> web.StreamResponse:
            session = signer.read(request)
            if request.method == "POST":
                if not _same_origin(request):
                    return _refused("This form was sent from another site", "cross_origin")
                if session is None:
                    return _redirect(login)
                try:
                    form = await _form(request)
                except FieldError as exc:
                    return error_response(400, str(exc), "invalid_request_error", "invalid_parameter", exc.param)
                if not Signer.csrf_ok(session, form.get("csrf")):
                    return _refused("The form's CSRF token is missing or wrong: reload the page and try again",
                                    "invalid_csrf_token")
                return await handler(request, session, form)
            if session is None:
                return _redirect(login)
            return await handler(request, session)

        return check

    return wrap


def _secret(settings: Settings) -> bytes:
    # Derived from the admin token, so restarts and replicas sharing it accept each other's sessions. Without
    # one there is no admin UI; key holders' sessions then last as long as this process.
    return settings.admin_token.encode() if settings.admin_token else secrets.token_bytes(32)


def _in_thread(db: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Awaitable[Any]:
    def run() -> Any:
        conn = reports.connect_readonly(db)
        try:
            return fn(conn, *args, **kwargs)
        finally:
            conn.close()

    return asyncio.to_thread(run)


def _clean(q: Any, *names: str) -> dict[str, str]:
    """The named query parameters that are set (non-empty), trimmed."""
    return {n: q[n].strip() for n in names if q.get(n, "").strip()}


NAV = (("overview", "./", "Overview"), ("usage", "usage", "Usage"), ("calls", "calls", "Calls"),
       ("keys", "keys", "Keys"), ("budgets", "budgets", "Budgets"), ("pricing", "pricing", "Pricing"),
       ("accuracy", "accuracy", "Accuracy"))


def overview_page(view: dict[str, Any], near: list[dict[str, Any]], csrf: str, base: str = "/admin/ui/",
                  managed: bool = False) -> web.Response:
    """The overview's HTML from data.overview's figures and the budgets near their limit (bench/ui_scale.py
    times this with the query)."""
    chart = svg.stacked(view["trend"]["labels"], view["trend"]["series"])
    legend = [(name, svg.PALETTE[i % len(svg.PALETTE)]) for i, (name, _) in enumerate(view["trend"]["series"])]
    return _page("overview.html", nav=NAV, active="overview", csrf=csrf, base=base, managed=managed, v=view,
                 chart=chart, legend=legend, dims=list(data.DIMENSIONS), near=near, refresh=REFRESH_SECONDS)


def make_ui(settings: Settings, gate_key: web.AppKey[Gate], live_key: web.AppKey[LivePrices]) -> web.Application:
    """The dashboard; mount it at /admin/ui (before the admin API's /admin)."""
    app = web.Application()
    base = "/admin/ui/"
    signer = Signer(_secret(settings), "admin", "meterproxy_admin", settings.ui_session_ttl, base)
    guard = _guarded(signer, base + "login")
    token = settings.admin_token
    db = settings.db

    def page(template: str, request: web.Request, session: Session, active: str, status: int = 200,
             **context: Any) -> web.Response:
        return _page(template, status, nav=NAV, active=active, csrf=session.csrf, base=base,
                     managed=settings.keys == "managed", **context)

    async def login_form(request: web.Request) -> web.StreamResponse:
        if signer.read(request) is not None:
            return _redirect(base)
        return _page("login.html", base=base, who="admin", error=None, disabled=token is None,
                     env=ADMIN_TOKEN_ENV)

    async def login(request: web.Request) -> web.StreamResponse:
        if not _same_origin(request):
            return _refused("This form was sent from another site", "cross_origin")
        try:
            given = (await _form(request)).get("token", "").strip()
        except FieldError:
            given = ""
        if token is None or not hmac.compare_digest(given.encode(), token.encode()):
            error = (f"The admin UI is disabled: set {ADMIN_TOKEN_ENV} to enable it" if token is None
                     else "That is not the admin token")
            return _page("login.html", 401, base=base, who="admin", error=error, disabled=token is None,
                         env=ADMIN_TOKEN_ENV)
        response = _redirect(base)
        signer.start(response, request, "admin")
        return response

    @guard
    async def logout(request: web.Request, session: Session, form: dict[str, str]) -> web.StreamResponse:
        response = _redirect(base + "login")
        signer.end(response, session)
        return response

    @guard
    async def overview(request: web.Request, session: Session) -> web.StreamResponse:
        dim = request.query.get("by", "model")
        if dim not in data.DIMENSIONS:
            dim = "model"
        gate = request.config_dict[gate_key]
        try:
            view = await _in_thread(db, data.overview, time.time(), dim)
        except reports.ReportDatabaseError as exc:
            return page("error.html", request, session, "overview", 503, message=str(exc))
        return overview_page(view, await _near_limits(gate), session.csrf, base, settings.keys == "managed")

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
        params = _clean(q, "group_by", "since", "until", "tz", "key", "user", "model")
        group_by = [g.strip() for g in params.get("group_by", "").split(",") if g.strip()]
        tz = params.get("tz")
        return {"params": params, "args": dict(
            group_by=group_by, tz=tz, key=params.get("key"), user=params.get("user"), model=params.get("model"),
            since=reports.parse_time(params["since"], "since", tz) if "since" in params else None,
            until=reports.parse_time(params["until"], "until", tz) if "until" in params else None)}

    @guard
    async def usage(request: web.Request, session: Session) -> web.StreamResponse:
        error, report, chart, params = None, None, None, _clean(request.query, "group_by", "since", "until", "tz",
                                                                "key", "user", "model")
        try:
            asked = usage_query(request.query)
            report = await _in_thread(db, reports.usage_report, **asked["args"])
        except reports.ReportError as exc:
            error = str(exc)
        except reports.ReportDatabaseError as exc:
            return page("error.html", request, session, "usage", 503, message=str(exc))
        columns = []
        if report is not None:
            columns = [reports.GROUP_ROW_KEYS.get(g, g) for g in report["group_by"]]
            label = (lambda r: " · ".join("—" if r[c] is None else str(r[c]) for c in columns) or "all")
            chart = svg.bars([(label(r), Decimal(r["cost_usd"])) for r in report["rows"][:40]])
        return page("usage.html", request, session, "usage", status=400 if error else 200, error=error,
                    report=report, columns=columns, chart=chart, params=params, fields=reports.GROUP_FIELDS,
                    counters=reports.COUNTERS, csv_href="usage.csv?" + urlencode(params))

    @guard
    async def usage_csv(request: web.Request, session: Session) -> web.StreamResponse:
        try:
            asked = usage_query(request.query)
            report = await _in_thread(db, reports.usage_report, **asked["args"])
        except reports.ReportError as exc:
            return error_response(400, str(exc), "invalid_request_error", "invalid_parameter", exc.param)
        except reports.ReportDatabaseError as exc:
            return error_response(503, f"The ledger cannot be read: {exc}", "server_error", "ledger_unavailable")
        return web.Response(text=render.to_csv(report), content_type="text/csv",
                            headers={**_HEADERS, "Content-Disposition": 'attachment; filename="usage.csv"'})

    @guard
    async def calls(request: web.Request, session: Session) -> web.StreamResponse:
        params = _clean(request.query, "key", "user", "model", "status", "usage_source", "before")
        error, found = None, {"calls": [], "next": None}
        try:
            found = await _in_thread(db, reports.list_calls, limit=50, **params)
        except reports.ReportError as exc:
            error = str(exc)
        except reports.ReportDatabaseError as exc:
            return page("error.html", request, session, "calls", 503, message=str(exc))
        first = {k: v for k, v in params.items() if k != "before"}
        more = None if found["next"] is None else "calls?" + urlencode({**first, "before": found["next"]})
        return page("calls.html", request, session, "calls", status=400 if error else 200, error=error,
                    calls=found["calls"], more=more, params=params, first=urlencode(first),
                    sources=reports.USAGE_SOURCES)

    @guard
    async def one_call(request: web.Request, session: Session) -> web.StreamResponse:
        request_id = request.match_info["request_id"]
        try:
            call = await _in_thread(db, reports.get_call, request_id)
        except reports.ReportDatabaseError as exc:
            return page("error.html", request, session, "calls", 503, message=str(exc))
        if call is None:
            return page("error.html", request, session, "calls", 404, message=f"No call {request_id!r}")
        return page("call.html", request, session, "calls", call=call, why=explain(call))

    async def keys(request: web.Request, session: Session, shown: dict[str, Any] | None = None,
                   error: str | None = None, status: int = 200) -> web.StreamResponse:
        gate = request.config_dict[gate_key]
        found = [] if gate.keys is None else await key_views(gate, await gate.keys.list())
        return page("keys.html", request, session, "keys", status=status, keys=found, shown=shown, error=error)

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
        except FieldError as exc:
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
            except FieldError as exc:
                return await keys(request, session, error=f"{key_id}: {exc}", status=400)
            done = await gate.keys.update(key_id, fields)
        if done is None:
            return await keys(request, session, error=f"No key {key_id!r}", status=404)
        return _redirect(base + "keys")

    async def budgets(request: web.Request, session: Session, error: str | None = None,
                      status: int = 200) -> web.StreamResponse:
        gate = request.config_dict[gate_key]
        found = await budget_views(gate, gate.limits.entries())
        for b in found:
            b["bar"] = svg.meter(Decimal(b["spent_usd"]), Decimal(b["reserved_usd"]),
                                 None if b["budget_usd"] is None else Decimal(b["budget_usd"]))
        return page("budgets.html", request, session, "budgets", status=status, budgets=found, error=error,
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
            return _redirect(base + "budgets")
        body = {k: form[k].strip() for k in ("budget_usd", "budget_period", "rpm", "tpm") if form.get(k, "").strip()}
        try:
            limits = parse_limits(body)
        except FieldError as exc:
            return await budgets(request, session, error=str(exc), status=400)
        if kind == "key" and gate.keys is not None and await gate.keys.get(name) is not None:
            return await budgets(request, session, status=409, error=(
                f"{name} is a managed key: change its limits on the Keys page"))
        await gate.limits.put(subject, limits)
        return _redirect(base + "budgets")

    async def pricing(request: web.Request, session: Session, error: str | None = None,
                      status: int = 200) -> web.StreamResponse:
        live = request.config_dict[live_key]
        try:
            seen = await _in_thread(db, reports.usage_report, group_by=["model"])
        except reports.ReportDatabaseError as exc:
            return page("error.html", request, session, "pricing", 503, message=str(exc))
        unpriced = [r for r in seen["rows"] if r["unpriced_calls"]]
        return page("pricing.html", request, session, "pricing", status=status, p=live.status(),
                    unpriced=unpriced, error=error, path=live.path)

    async def reload_pricing(request: web.Request, session: Session, form: dict[str, str]) -> web.StreamResponse:
        live = request.config_dict[live_key]
        outcome = await live.refresh(force=True)
        if outcome is Outcome.REFUSED and live.error is not None:
            return await pricing(request, session, status=400, error=(
                f"pricing edit refused, version {live.version} stays in force: {live.error.message}"))
        return _redirect(base + "pricing")

    @guard
    async def accuracy_page(request: web.Request, session: Session) -> web.StreamResponse:
        try:
            found = await _in_thread(db, accuracy.accuracy_report)
        except reports.ReportDatabaseError as exc:
            return page("error.html", request, session, "accuracy", 503, message=str(exc))
        return page("accuracy.html", request, session, "accuracy", models=found["models"])

    async def not_found(request: web.Request) -> web.Response:
        return error_response(404, f"No dashboard page {request.method} {request.path}", "invalid_request_error",
                              "not_found", headers=_HEADERS)

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
    _static_routes(app)
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


def make_meter_ui(settings: Settings, gate_key: web.AppKey[Gate]) -> web.Application:
    """A key holder's own page; mount it at /meter/ui. The key is entered once and exchanged for a session
    that carries only its key_id; in managed mode the key is looked up on every request (a revoked key's
    session ends with it)."""
    app = web.Application()
    base = "/meter/ui/"
    signer = Signer(_secret(settings), "meter", "meterproxy_meter", settings.ui_session_ttl, base)

    def login_page(error: str | None = None, status: int = 200) -> web.Response:
        return _page("login.html", status, base=base, who="meter", error=error, disabled=False, env=ADMIN_TOKEN_ENV)

    async def login_form(request: web.Request) -> web.StreamResponse:
        return _redirect(base) if signer.read(request) is not None else login_page()

    async def login(request: web.Request) -> web.StreamResponse:
        if not _same_origin(request):
            return _refused("This form was sent from another site", "cross_origin")
        try:
            key = (await _form(request)).get("key", "").strip()
        except FieldError:
            key = ""
        if not key:
            return login_page("Enter your API key", 401)
        gate = request.config_dict[gate_key]
        if gate.managed:
            found = await gate.resolve({"Authorization": f"Bearer {key}"})
            if isinstance(found, Refusal):  # its message quotes the key's last characters: not on a page
                return login_page("That key is not an active meterproxy key (unknown, revoked or expired)", 401)
            key_id = found.key_id
        else:
            key_id = key_id_of(key)  # passthrough: any key is its own subject, as on /meter/usage
        response = _redirect(base)
        signer.start(response, request, key_id)
        return response

    async def logout(request: web.Request) -> web.StreamResponse:
        session = signer.read(request)
        if not _same_origin(request):
            return _refused("This form was sent from another site", "cross_origin")
        if session is not None:
            try:
                form = await _form(request)
            except FieldError:
                form = {}
            if not Signer.csrf_ok(session, form.get("csrf")):
                return _refused("The form's CSRF token is missing or wrong", "invalid_csrf_token")
        response = _redirect(base + "login")
        signer.end(response, session)
        return response

    async def own(request: web.Request) -> web.StreamResponse:
        session = signer.read(request)
        if session is None:
            return _redirect(base + "login")
        gate = request.config_dict[gate_key]
        key_id, now = session.subject, time.time()
        if gate.managed:
            assert gate.keys is not None
            key = await gate.keys.get(key_id)
            if key is None or key.status(now) != "active":
                response = login_page("This key is no longer active: your session has ended", 401)
                signer.end(response, session)
                return response
            user, team, charges = key.user, key.team, [(Subject("key", key_id), key.limits)]
        else:
            user = team = None
            charges = [(Subject("key", key_id), gate.limits.get(Subject("key", key_id)) or Limits())]
        try:
            view = await meter_report(gate, key_id, user, team, charges, None, None, now)
        except reports.ReportDatabaseError as exc:
            return _page("error.html", 503, nav=(), active="", csrf=session.csrf, base=base, managed=False,
                         message=str(exc))
        start = period_of("month", now)[0]  # every day of the month so far, as on the overview
        days = [datetime.fromtimestamp(start + i * 86400, UTC).strftime("%Y-%m-%d")
                for i in range(int((period_of("day", now)[0] - start) // 86400) + 1)]
        models = sorted({str(r["model"]) for r in view["rows"]})
        series = [(m, [sum((Decimal(r["cost_usd"]) for r in view["rows"] if r["day"] == d and str(r["model"]) == m),
                           Decimal(0)) for d in days]) for m in models]
        legend = [(name, svg.PALETTE[i % len(svg.PALETTE)]) for i, (name, _) in enumerate(series)]
        for b in view["budgets"]:
            b["bar"] = svg.meter(Decimal(b["spent_usd"]), Decimal(b["reserved_usd"]),
                                 None if b["budget_usd"] is None else Decimal(b["budget_usd"]))
        return _page("meter.html", base=base, csrf=session.csrf, v=view, chart=svg.stacked(days, series),
                     legend=legend)

    async def not_found(request: web.Request) -> web.Response:
        return error_response(404, f"No page {request.method} {request.path}", "invalid_request_error",
                              "not_found", headers=_HEADERS)

    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/", own)
    _static_routes(app)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


def mount(app: web.Application, prefix: str, ui: web.Application) -> None:
    """Mount `ui` at `prefix` (/admin/ui, /meter/ui), with `prefix` alone redirected to `prefix`/."""

    async def slash(request: web.Request) -> web.StreamResponse:
        return _redirect(prefix + "/")

    app.router.add_get(prefix, slash)
    app.add_subapp(prefix, ui)
