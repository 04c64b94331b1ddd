"""The dashboard's sessions, CSRF, headers and errors over real HTTP (no browser needed), and the admin API's
call filters the Calls page uses."""

from __future__ import annotations

import html
import http.client
import json
import os
from http.cookies import SimpleCookie
from typing import Any, Callable
from urllib.parse import urlencode

from proxy.ui.pages import CSP
from proxy.ui.session import Signer
from tests.support import ADMIN_TOKEN, FakeUpstream, ProxyServer
from tests.support.http import request

USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


def fetch(proxy: ProxyServer, method: str, path: str, form: dict[str, str] | None = None,
         cookie: str | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any, str]:
    conn = _conn(proxy)
    hdrs = dict(headers or {})
    body = None
    if form is not None:
        body = urlencode(form).encode()
        hdrs["Content-Type"] = "application/x-www-form-urlencoded"
    if cookie:
        hdrs["Cookie"] = cookie
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read().decode()
    finally:
        conn.close()


def _conn(proxy: ProxyServer) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", proxy.server.port, timeout=30)


def cookie_of(headers: Any, name: str) -> tuple[str, Any]:
    jar = SimpleCookie()
    for line in headers.get_all("Set-Cookie") or []:
        jar.load(line)
    morsel = jar[name]
    return f"{name}={morsel.value}", morsel


def log_in(proxy: ProxyServer) -> tuple[str, str]:
    """(cookie header, csrf token) of a fresh admin session."""
    status, headers, _ = fetch(proxy, "POST", "/admin/ui/login", {"token": ADMIN_TOKEN})
    assert status == 303 and headers["Location"] == "/admin/ui/"
    cookie, _ = cookie_of(headers, "meterproxy_admin")
    status, _, page = fetch(proxy, "GET", "/admin/ui/keys", cookie=cookie)
    assert status == 200
    csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    return cookie, csrf


def test_login_sets_a_strict_httponly_expiring_cookie_without_the_token(proxy: ProxyServer) -> None:
    status, headers, page = fetch(proxy, "GET", "/admin/ui/")
    assert (status, headers["Location"]) == (303, "/admin/ui/login")
    status, headers, page = fetch(proxy, "POST", "/admin/ui/login", {"token": "wrong"})
    assert status == 401 and "not the admin token" in page and "Set-Cookie" not in headers
    status, headers, _ = fetch(proxy, "POST", "/admin/ui/login", {"token": ADMIN_TOKEN})
    cookie, morsel = cookie_of(headers, "meterproxy_admin")
    assert status == 303
    assert morsel["httponly"] and morsel["samesite"] == "Strict" and morsel["path"] == "/admin/ui/"
    assert int(morsel["max-age"]) == 28800 and not morsel["secure"]  # plain http here: https sets Secure
    assert ADMIN_TOKEN not in cookie
    for path in ("/admin/ui/", "/admin/ui/usage", "/admin/ui/calls", "/admin/ui/keys", "/admin/ui/budgets",
                 "/admin/ui/pricing", "/admin/ui/accuracy"):
        status, headers, page = fetch(proxy, "GET", path, cookie=cookie)
        assert status == 200, (path, page[:300])
        assert headers["Content-Security-Policy"] == CSP and "default-src 'self'" in CSP
        assert headers["X-Content-Type-Options"] == "nosniff" and headers["Cache-Control"] == "no-store"
        assert ADMIN_TOKEN not in page
    assert fetch(proxy, "GET", "/admin/ui/login", cookie=cookie)[1]["Location"] == "/admin/ui/"  # logged in
    assert fetch(proxy, "GET", "/admin/ui/login")[1]["Content-Security-Policy"] == CSP


def test_a_session_survives_a_restart_and_ends_at_logout(start_proxy: Callable[..., ProxyServer],
                                                         tmp_path: Any) -> None:
    first = start_proxy()
    cookie, csrf = log_in(first)
    other = start_proxy(db=str(tmp_path / "other.db"))  # another process with the same token verifies it
    assert fetch(other, "GET", "/admin/ui/", cookie=cookie)[0] == 200
    changed = start_proxy(db=str(tmp_path / "third.db"), admin_token="a-different-token")
    assert fetch(changed, "GET", "/admin/ui/", cookie=cookie)[0] == 303  # a new token ends every session

    status, headers, _ = fetch(first, "POST", "/admin/ui/logout", {"csrf": csrf}, cookie=cookie)
    assert status == 303 and headers["Location"] == "/admin/ui/login"
    assert 'meterproxy_admin=""' in headers["Set-Cookie"]
    assert fetch(first, "GET", "/admin/ui/", cookie=cookie)[0] == 303  # the copied cookie is refused now


def test_forged_expired_and_foreign_cookies_are_refused(proxy: ProxyServer) -> None:
    cookie, _ = log_in(proxy)
    name, value = cookie.split("=", 1)
    payload, mac = value.split(".")
    tampered = f"{name}={payload}.{mac[:-1]}{'0' if mac[-1] != '0' else '1'}"
    assert fetch(proxy, "GET", "/admin/ui/", cookie=tampered)[0] == 303
    assert fetch(proxy, "GET", "/admin/ui/", cookie=f"{name}=garbage")[0] == 303
    # Signed with the right key but expired: refused.
    expired = Signer(ADMIN_TOKEN.encode(), "admin", name, -10, "/admin/ui/")

    class Resp:
        def set_cookie(self, n: str, v: str, **kw: Any) -> None:
            self.value = v

    class Req:
        secure = False

    resp = Resp()
    expired.start(resp, Req(), "admin")  # type: ignore[arg-type]
    assert fetch(proxy, "GET", "/admin/ui/", cookie=f"{name}={resp.value}")[0] == 303
    # A key holder's cookie (another purpose, another signing key) does not open the dashboard.
    meter = Signer(ADMIN_TOKEN.encode(), "meter", name, 60, "/admin/ui/")
    meter.start(resp, Req(), "admin")  # type: ignore[arg-type]
    assert fetch(proxy, "GET", "/admin/ui/", cookie=f"{name}={resp.value}")[0] == 303


def test_state_changes_need_the_csrf_token_and_this_origin(start_proxy: Callable[..., ProxyServer]) -> None:
    proxy = start_proxy(keys="managed", upstream_api_key="sk-up")
    cookie, csrf = log_in(proxy)
    status, _, body = fetch(proxy, "POST", "/admin/ui/keys", {"user": "eve"}, cookie=cookie)
    assert status == 403 and json.loads(body)["error"]["code"] == "invalid_csrf_token"
    status, _, body = fetch(proxy, "POST", "/admin/ui/keys", {"user": "eve", "csrf": "0" * 64}, cookie=cookie)
    assert status == 403
    status, _, body = fetch(proxy, "POST", "/admin/ui/keys", {"user": "eve", "csrf": csrf}, cookie=cookie,
                           headers={"Origin": "http://evil.example"})
    assert status == 403 and json.loads(body)["error"]["code"] == "cross_origin"
    status, _, body = fetch(proxy, "POST", "/admin/ui/keys", {"user": "eve", "csrf": csrf})  # no session
    assert status == 303
    assert request(proxy.url, method="GET", path="/admin/keys", body=None,
                   headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})[2] == b'{"keys": []}'
    status, _, page = fetch(proxy, "POST", "/admin/ui/keys", {"user": "eve", "csrf": csrf}, cookie=cookie,
                           headers={"Origin": proxy.url})
    assert status == 201 and "shown this once" in page
    # A bad field is a clear message on the page, not a 500.
    status, _, page = fetch(proxy, "POST", "/admin/ui/keys", {"user": "eve", "rpm": "lots", "csrf": csrf},
                           cookie=cookie)
    assert status == 400 and "rpm must be a whole number" in page
    status, _, body = fetch(proxy, "POST", "/admin/ui/keys", {"user": "eve" * 30_000, "csrf": csrf}, cookie=cookie)
    assert status == 400 and "at most 65536 bytes" in json.loads(body)["error"]["message"]


def test_bad_filters_are_clear_messages(proxy: ProxyServer) -> None:
    cookie, _ = log_in(proxy)
    status, _, page = fetch(proxy, "GET", "/admin/ui/usage?tz=Mars/Olympus", cookie=cookie)
    assert status == 400 and "unknown time zone" in page
    status, _, page = fetch(proxy, "GET", "/admin/ui/usage?group_by=colour", cookie=cookie)
    assert status == 400 and "unknown field" in page
    status, _, page = fetch(proxy, "GET", "/admin/ui/calls?status=ok", cookie=cookie)
    assert status == 400 and "is not an HTTP status" in page
    status, _, body = fetch(proxy, "GET", "/admin/ui/usage.csv?since=yesterday", cookie=cookie)
    assert status == 400 and json.loads(body)["error"]["param"] == "since"
    status, _, body = fetch(proxy, "GET", "/admin/ui/nothing-here", cookie=cookie)
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
    assert fetch(proxy, "GET", "/admin/ui")[1]["Location"] == "/admin/ui/"


def test_without_an_admin_token_the_dashboard_is_disabled(start_proxy: Callable[..., ProxyServer]) -> None:
    proxy = start_proxy(admin_token=None)
    status, _, page = fetch(proxy, "GET", "/admin/ui/login")
    assert status == 200 and "disabled" in page
    status, headers, _ = fetch(proxy, "POST", "/admin/ui/login", {"token": ""})
    assert status == 401 and "Set-Cookie" not in headers


def test_a_key_holder_session_carries_no_key(start_proxy: Callable[..., ProxyServer], upstream: FakeUpstream) -> None:
    proxy = start_proxy()  # passthrough: the presented key is its own subject, as on /meter/usage
    upstream.json({"id": "x", "object": "chat.completion", "model": "gpt-4o", "choices": [], "usage": USAGE})
    key = "sk-holder-secret-0042"
    request(proxy.url, headers={"Authorization": f"Bearer {key}"})
    status, headers, _ = fetch(proxy, "POST", "/meter/ui/login", {"key": key})
    cookie, morsel = cookie_of(headers, "meterproxy_meter")
    assert status == 303 and morsel["httponly"] and morsel["samesite"] == "Strict" and key not in cookie
    assert "holder" not in cookie and "0042" not in cookie
    status, _, page = fetch(proxy, "GET", "/meter/ui/", cookie=cookie)
    assert status == 200 and key not in page and "gpt-4o" in page
    assert fetch(proxy, "GET", "/admin/ui/", cookie=cookie.replace("meterproxy_meter", "meterproxy_admin"))[0] == 303


def test_admin_calls_filters_and_one_call(proxy: ProxyServer, upstream: FakeUpstream) -> None:
    upstream.json({"id": "x", "object": "chat.completion", "model": "gpt-4o", "choices": [], "usage": USAGE})
    request(proxy.url, headers={"X-Meter-User": "ann"})
    upstream.json({"error": {"message": "nope"}}, status=429)
    request(proxy.url, headers={"X-Meter-User": "ben"})

    def calls(query: str) -> Any:
        status, _, raw = request(proxy.url, method="GET", path="/admin/calls?" + query, body=None,
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        return status, json.loads(raw)

    assert [c["user"] for c in calls("user=ann")[1]["calls"]] == ["ann"]
    assert [c["user"] for c in calls("status=429")[1]["calls"]] == ["ben"]
    assert [c["user"] for c in calls("usage_source=upstream&model=gpt-4o")[1]["calls"]] == ["ann"]
    assert calls("usage_source=guessed")[0] == 400
    assert calls("status=2xx")[1]["error"]["param"] == "status"
    rid = calls("user=ann")[1]["calls"][0]["request_id"]
    status, _, raw = request(proxy.url, method="GET", path=f"/admin/calls/{rid}", body=None,
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    one = json.loads(raw)
    assert status == 200 and one["request_id"] == rid and one["user"] == "ann" and "pricing_version" in one
    status, _, raw = request(proxy.url, method="GET", path="/admin/calls/no-such-call", body=None,
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert status == 404 and json.loads(raw)["error"]["code"] == "call_not_found"


def test_accuracy_page_shows_the_apis_figures(start_proxy: Callable[..., ProxyServer],
                                              upstream: FakeUpstream) -> None:
    proxy = start_proxy(accuracy_sample_rate=1.0)
    upstream.json({"id": "x", "object": "chat.completion", "model": "gpt-4o", "usage": USAGE,
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi there, friend"},
                                "finish_reason": "stop"}]})
    request(proxy.url)
    status, _, raw = request(proxy.url, method="GET", path="/admin/accuracy", body=None,
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    (model,) = json.loads(raw)["models"]
    cookie, _ = log_in(proxy)
    status, _, page = fetch(proxy, "GET", "/admin/ui/accuracy", cookie=cookie)
    row = page.split("<td>gpt-4o</td>", 1)[1].split("</tr>", 1)[0]
    cells = [c.split(">", 1)[1] for c in row.split("</td>") if ">" in c]
    expected = [str(model["calls_sampled"])]
    for side in ("prompt", "completion"):
        s = model[side]
        expected += ["—" if v is None else str(v) for v in (s["mean_error"], s["mean_abs_error"],
                                                             s["worst_abs_error"])]
        expected.append("—" if s["mean_abs_error_pct"] is None else f"{s['mean_abs_error_pct']}%")
    assert cells == expected


def test_pricing_page_shows_a_refused_edit_and_why(start_proxy: Callable[..., ProxyServer], tmp_path: Any) -> None:
    from proxy.config import SHIPPED_PRICING

    table = tmp_path / "pricing.yaml"
    table.write_text(SHIPPED_PRICING.read_text())
    proxy = start_proxy(pricing=str(table))
    cookie, csrf = log_in(proxy)
    status, _, page = fetch(proxy, "GET", "/admin/ui/pricing", cookie=cookie)
    assert status == 200 and "No edit has been refused" in page
    table.write_text("models: [this is not a table\n")
    status, _, page = fetch(proxy, "POST", "/admin/ui/pricing/reload", {"csrf": csrf}, cookie=cookie)
    assert status == 400 and "pricing edit refused" in page
    status, _, raw = request(proxy.url, method="GET", path="/admin/pricing", body=None,
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    error = json.loads(raw)["error"]
    status, _, page = fetch(proxy, "GET", "/admin/ui/pricing", cookie=cookie)
    refused = page.split('id="refused">', 1)[1].split("</p>", 1)[0]
    assert error["at"] in refused and error["message"] in html.unescape(refused)


def test_overview_of_an_unreadable_ledger_is_a_503_page(proxy: ProxyServer) -> None:
    # The overview's figures once shadowed the page renderer: a ledger it could not read was a 500.
    cookie, _ = log_in(proxy)
    db = proxy.settings.db
    os.rename(db, db + ".away")
    try:
        status, _, page = fetch(proxy, "GET", "/admin/ui/", cookie=cookie)
    finally:
        os.rename(db + ".away", db)
    assert status == 503 and "no ledger at" in page
