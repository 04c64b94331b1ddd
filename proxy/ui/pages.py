"""What every dashboard page shares: the response headers (CSP), the templates, money and number display,
forms, the session guard and static files. See dashboard.py (/admin/ui/) and meter.py (/meter/ui/).

Templates are jinja2 with autoescaping, so every client-controlled value (user, session, operation, tag, model)
renders as text. Pages send a Content-Security-Policy that allows only this origin (no inline script or style),
and nothing on them loads from anywhere else. Every POST carries the session's CSRF token and, when the browser
sends one, an Origin (or Referer) of this very host.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import urlencode, urlsplit

import jinja2
from aiohttp import web
from markupsafe import Markup

from proxy.config import Settings
from proxy.core.errors import ParameterError
from proxy.forwarding.responses import error_response
from proxy.reports import queries as reports
from proxy.ui.session import Signer

__all__ = ["CSP", "HEADERS", "clean", "count", "guarded", "in_thread", "mount", "page", "read_form", "redirect",
           "refused", "same_origin", "secret_of", "share", "static_routes", "usd"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'")
# same-origin, not no-referrer: with no-referrer a browser sends "Origin: null" on a form POST.
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
           "X-Frame-Options": "DENY", "Cache-Control": "no-store"}
_MAX_FIELD = 4096  # no form field is longer
_MAX_FORM = 65536  # nor any form

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


def page(template: str, status: int = 200, **context: Any) -> web.Response:
    html = _env.get_template(template).render(**context)
    return web.Response(text=html, content_type="text/html", charset="utf-8", status=status, headers=HEADERS)


def redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={**HEADERS, "Location": location})


def same_origin(request: web.Request) -> bool:
    """A POST's Origin (or Referer), when the browser sends one, must be this very host."""
    origin = request.headers.get("Origin") or request.headers.get("Referer")
    if not origin:
        return True  # SameSite=Strict and the CSRF token still stand
    parts = urlsplit(origin)
    return parts.netloc == request.host and parts.scheme in ("http", "https")


async def read_form(request: web.Request) -> dict[str, str]:
    """A posted form's text fields; a form without a length or over _MAX_FORM bytes is not read at all."""
    if request.content_length is None or request.content_length > _MAX_FORM:
        raise ParameterError(f"a form of at most {_MAX_FORM} bytes, sent with its Content-Length, is expected", None)
    form = await request.post()
    out = {}
    for name, value in form.items():
        if not isinstance(value, str) or len(value) > _MAX_FIELD:
            raise ParameterError(f"{name}: a text field of at most {_MAX_FIELD} characters", name)
        out[name] = value
    return out


def refused(message: str, code: str) -> web.Response:
    return error_response(403, message, "invalid_request_error", code, headers=HEADERS)


def static_routes(app: web.Application) -> None:
    names = {p.name: p for p in STATIC.iterdir() if p.is_file()}

    async def static(request: web.Request) -> web.StreamResponse:
        path = names.get(request.match_info["name"])
        if path is None:
            return error_response(404, "No such file", "invalid_request_error", "not_found")
        kind = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}.get(path.suffix,
                                                                                           "text/plain")
        return web.Response(body=path.read_bytes(), content_type=kind,
                            headers={**HEADERS, "Cache-Control": "max-age=300"})

    app.router.add_get("/static/{name}", static)


def guarded(signer: Signer, login: str) -> Callable[[Callable[..., Awaitable[web.StreamResponse]]], Handler]:
    """Handlers get (request, session). No session: a GET goes to the login page, anything else is refused.
    A POST must carry the session's CSRF token and come from this origin."""

    def wrap(handler: Callable[..., Awaitable[web.StreamResponse]]) -> Handler:
        async def check(request: web.Request) -> web.StreamResponse:
            session = signer.read(request)
            if request.method == "POST":
                if not same_origin(request):
                    return refused("This form was sent from another site", "cross_origin")
                if session is None:
                    return redirect(login)
                try:
                    form = await read_form(request)
                except ParameterError as exc:
                    return error_response(400, str(exc), "invalid_request_error", "invalid_parameter", exc.param)
                if not Signer.csrf_ok(session, form.get("csrf")):
                    return refused("The form's CSRF token is missing or wrong: reload the page and try again",
                                    "invalid_csrf_token")
                return await handler(request, session, form)
            if session is None:
                return redirect(login)
            return await handler(request, session)

        return check

    return wrap


def secret_of(settings: Settings) -> bytes:
    # Derived from the admin token, so restarts and replicas sharing it accept each other's sessions. Without
    # one there is no admin UI; key holders' sessions then last as long as this process.
    return settings.admin_token.encode() if settings.admin_token else secrets.token_bytes(32)


def in_thread(db: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Awaitable[Any]:
    def run() -> Any:
        with reports.open_read(db) as conn:
            return fn(conn, *args, **kwargs)

    return asyncio.to_thread(run)


def clean(q: Any, *names: str) -> dict[str, str]:
    """The named query parameters that are set (non-empty), trimmed."""
    return {n: q[n].strip() for n in names if q.get(n, "").strip()}


def mount(app: web.Application, prefix: str, ui: web.Application) -> None:
    """Mount `ui` at `prefix` (/admin/ui, /meter/ui), with `prefix` alone redirected to `prefix`/."""

    async def slash(request: web.Request) -> web.StreamResponse:
        return redirect(prefix + "/")

    app.router.add_get(prefix, slash)
    app.add_subapp(prefix, ui)

