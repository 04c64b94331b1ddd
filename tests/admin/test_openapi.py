"""The admin API's OpenAPI document: valid, in step with the routes the app serves, and served behind the token."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aiohttp import web
from openapi_spec_validator import validate

from proxy.admin import openapi
from proxy.app import make_admin_site, make_app
from proxy.metering.metrics import Metrics
from tests.support import ADMIN_TOKEN, ProxyServer, proxy_settings
from tests.support.http import request

# Not part of the document: the forwarded OpenAI API and the 404 catch-alls; and the dashboard's HTML pages
# (proxy/ui/: browser forms with a session cookie and CSRF tokens, a view of this API, tested by its own tests).
UNDOCUMENTED = {("*", "/v1/{tail}"), ("*", "/{tail}"), ("*", "/admin/{tail}"), ("*", "/admin")}
HTML_PAGES = ("/admin/ui", "/meter/ui")


def served_routes(app: web.Application) -> set[tuple[str, str]]:
    """(method, path template) of every route `app` and its sub-apps serve; HEAD (added beside GET) left out."""
    found: set[tuple[str, str]] = set()
    for resource in app.router.resources():
        if isinstance(resource, web.PrefixedSubAppResource):
            found |= served_routes(resource._app)
            continue
        path = resource.canonical.replace("{tail:.*}", "{tail}")
        if path.startswith(HTML_PAGES):
            continue
        found |= {(route.method, path) for route in resource if route.method != "HEAD"}
    return found - UNDOCUMENTED


def documented(served_on: set[str] | None = None) -> set[tuple[str, str]]:
    paths = openapi.document()["paths"]
    return {(method.upper(), path) for path, item in paths.items()
            if served_on is None or item["x-served-on"] in served_on
            for method in item if method in ("get", "put", "post", "patch", "delete")}


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = openapi.document()
    assert doc["openapi"] == "3.1.0"
    validate(doc)  # raises OpenAPIValidationError with the path of the fault


def test_every_route_of_the_proxy_port_is_documented_and_nothing_more(tmp_path: Path) -> None:
    app = make_app(proxy_settings(tmp_path, "http://127.0.0.1:9"))
    assert served_routes(app) == documented()


def test_with_admin_port_each_listener_serves_what_the_document_says(tmp_path: Path) -> None:
    settings = proxy_settings(tmp_path, "http://127.0.0.1:9", admin_port=9999)
    assert served_routes(make_app(settings)) == documented({"proxy"})
    # The admin site only stores what it shares with the proxy; listing its routes needs none of it.
    site = make_admin_site(settings, gate=Any, live=Any, metrics=Metrics())  # type: ignore[arg-type]
    assert served_routes(site) == documented({"admin"})


def test_a_route_without_an_entry_fails_the_comparison(tmp_path: Path) -> None:
    app = make_app(proxy_settings(tmp_path, "http://127.0.0.1:9"))

    async def extra(request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_post("/healthz", extra)
    assert served_routes(app) - documented() == {("POST", "/healthz")}


def admin_get(proxy: ProxyServer, path: str, headers: dict[str, str]) -> tuple[int, Any]:
    status, _, body = request(proxy.url, method="GET", path=path, body=None, headers=headers)
    return status, json.loads(body)


def test_served_behind_the_admin_token(proxy: ProxyServer) -> None:
    status, doc = admin_get(proxy, "/admin/openapi.json", {"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert status == 200 and doc == openapi.document()
    status, body = admin_get(proxy, "/admin/openapi.json", {"Authorization": "Bearer wrong"})
    assert status == 401 and body["error"]["code"] == "invalid_admin_token"
