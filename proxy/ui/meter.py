"""A key holder's own page at /meter/ui/: their spend by day and model this month and their budgets left.

The key is entered once and exchanged for a session that carries only its key_id (session.py); in managed mode
the key is looked up on every request, so a revoked key's session ends with it. The figures are
admin_keys.meter_report's, the answer of GET /meter/usage.
"""

from __future__ import annotations

import time
from decimal import Decimal

from aiohttp import web

from proxy.admin.keys import meter_report
from proxy.config import ADMIN_TOKEN_ENV, Settings
from proxy.control.gate import Gate, Refusal
from proxy.control.limits import Limits, Subject, period_of
from proxy.core.credentials import key_id_of
from proxy.core.errors import ParameterError
from proxy.core.money import exact_sum
from proxy.core.times import utc_day
from proxy.forwarding.responses import error_response
from proxy.reports import queries as reports
from proxy.ui import svg
from proxy.ui.pages import HEADERS, page, read_form, redirect, refused, same_origin, secret_of, static_routes
from proxy.ui.session import Signer

__all__ = ["make_meter_ui"]

def make_meter_ui(settings: Settings, gate_key: web.AppKey[Gate]) -> web.Application:
    """A key holder's own page; mount it at /meter/ui. The key is entered once and exchanged for a session
    that carries only its key_id; in managed mode the key is looked up on every request (a revoked key's
    session ends with it)."""
    app = web.Application()
    base = "/meter/ui/"
    signer = Signer(secret_of(settings), "meter", "meterproxy_meter", settings.ui_session_ttl, base)

    def login_page(error: str | None = None, status: int = 200) -> web.Response:
        return page("login.html", status, base=base, who="meter", error=error, disabled=False, env=ADMIN_TOKEN_ENV)

    async def login_form(request: web.Request) -> web.StreamResponse:
        return redirect(base) if signer.read(request) is not None else login_page()

    async def login(request: web.Request) -> web.StreamResponse:
        if not same_origin(request):
            return refused("This form was sent from another site", "cross_origin")
        try:
            key = (await read_form(request)).get("key", "").strip()
        except ParameterError:
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
        response = redirect(base)
        signer.start(response, request, key_id)
        return response

    async def logout(request: web.Request) -> web.StreamResponse:
        session = signer.read(request)
        if not same_origin(request):
            return refused("This form was sent from another site", "cross_origin")
        if session is not None:
            try:
                form = await read_form(request)
            except ParameterError:
                form = {}
            if not Signer.csrf_ok(session, form.get("csrf")):
                return refused("The form's CSRF token is missing or wrong", "invalid_csrf_token")
        response = redirect(base + "login")
        signer.end(response, session)
        return response

    async def own(request: web.Request) -> web.StreamResponse:
        session = signer.read(request)
        if session is None:
            return redirect(base + "login")
        gate = request.config_dict[gate_key]
        key_id, now = session.subject, time.time()
        user: str | None
        team: str | None
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
            return page("error.html", 503, nav=(), active="", csrf=session.csrf, base=base, managed=False,
                         message=str(exc))
        start = period_of("month", now)[0]  # every day of the month so far, as on the overview
        days = [utc_day(start + i * 86400)
                for i in range(int((period_of("day", now)[0] - start) // 86400) + 1)]
        models = sorted({str(r["model"]) for r in view["rows"]})
        series = [(m, [exact_sum(Decimal(r["cost_usd"]) for r in view["rows"]
                                 if r["day"] == d and str(r["model"]) == m) for d in days]) for m in models]
        legend = [(name, svg.PALETTE[i % len(svg.PALETTE)]) for i, (name, _) in enumerate(series)]
        for b in view["budgets"]:
            b["bar"] = svg.meter(Decimal(b["spent_usd"]), Decimal(b["reserved_usd"]),
                                 None if b["budget_usd"] is None else Decimal(b["budget_usd"]))
        return page("meter.html", base=base, csrf=session.csrf, v=view, chart=svg.stacked(days, series),
                     legend=legend)

    async def not_found(request: web.Request) -> web.Response:
        return error_response(404, f"No page {request.method} {request.path}", "invalid_request_error",
                              "not_found", headers=HEADERS)

    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/", own)
    static_routes(app)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


