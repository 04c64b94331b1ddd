"""Bad numbers are 400s, not 500s, and a key that could not be listed is never written (issue 11).

Over real HTTP against a managed-keys proxy: huge times, counts and cursors, digits that are not ASCII, a
non-UTF-8 admin token. Every refusal is a 400 (or 401) in OpenAI's shape naming the parameter.
"""

from __future__ import annotations

import json
import socket
from typing import Any, Callable
from urllib.parse import quote

import pytest

from tests.support import ADMIN_TOKEN, ProxyServer
from tests.support.http import request

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def managed(start_proxy: Callable[..., ProxyServer]) -> ProxyServer:
    return start_proxy(keys="managed", upstream_api_key="sk-upstream-real")


def call(proxy: ProxyServer, method: str, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    status, _, got = request(proxy.url, method=method, path=path, body=data, headers=AUTH)
    return status, json.loads(got)


def refused(proxy: ProxyServer, method: str, path: str, param: str, body: Any = None,
            raw: bytes | None = None) -> str:
    status, got = call(proxy, method, path, body, raw)
    assert status == 400, got
    assert set(got["error"]) == {"message", "type", "param", "code"}
    assert got["error"]["param"] == param, got
    return str(got["error"]["message"])


HUGE_TIMES = ["99999999999999", "253402300799", "9999-12-31T23:59:59-05:00", "1" * 65]


@pytest.mark.parametrize("value", HUGE_TIMES)
@pytest.mark.parametrize("path", ["/admin/usage", "/admin/accuracy", "/admin/usage?group_by=day&tz=Pacific/Apia"])
@pytest.mark.parametrize("param", ["since", "until"])
def test_huge_report_times_are_400s(managed: ProxyServer, path: str, param: str, value: str) -> None:
    sep = "&" if "?" in path else "?"
    refused(managed, "GET", f"{path}{sep}{param}={value}", param)


def test_huge_times_on_the_key_holders_view_are_400s(managed: ProxyServer) -> None:
    status, _, body = request(managed.url, method="POST", path="/admin/keys", headers=AUTH,
                              body=json.dumps({"user": "alice"}).encode())
    key = json.loads(body)["key"]
    for value in HUGE_TIMES:
        status, _, body = request(managed.url, method="GET", path=f"/meter/usage?since={value}", body=None,
                                  headers={"Authorization": f"Bearer {key}"})
        assert status == 400 and json.loads(body)["error"]["param"] == "since", body


def listed(proxy: ProxyServer) -> list[dict[str, Any]]:
    status, got = call(proxy, "GET", "/admin/keys")
    assert status == 200, got
    return list(got["keys"])


BAD_KEY_FIELDS = [
    ("expires_at", 10**15), ("expires_at", "99999999999999"), ("expires_at", "9999-12-31T23:59:59-05:00"),
    ("expires_at", -1), ("expires_at", "1" * 65),
    ("rpm", 10**30), ("rpm", 2**63), ("tpm", "9" * 5000), ("tpm", "²"), ("rpm", "٣"),
    ("models", ["x" * 257]), ("routes", ["POST /v1/" + "x" * 300]), ("organization", "o" * 257),
]


@pytest.mark.parametrize(("field", "value"), BAD_KEY_FIELDS, ids=[f"{f}={str(v)[:20]}" for f, v in BAD_KEY_FIELDS])
def test_a_key_that_cannot_be_listed_is_never_written(managed: ProxyServer, field: str, value: Any) -> None:
    refused(managed, "POST", "/admin/keys", field, {"user": "alice", field: value})
    assert listed(managed) == []
    status, made = call(managed, "POST", "/admin/keys", {"user": "bob"})
    assert status == 201
    refused(managed, "PATCH", f"/admin/keys/{made['key_id']}", field, {field: value})
    (key,) = listed(managed)
    assert key[field] is None  # the PATCH changed nothing


def test_a_json_number_too_large_to_hold_is_refused_at_once(managed: ProxyServer) -> None:
    # Read with parse_float=Decimal, this is Decimal("1E+999999999"): int() of it would never finish.
    for field in ("rpm", "tpm"):
        refused(managed, "POST", "/admin/keys", field, raw=b'{"user": "a", "%s": 1e999999999}' % field.encode())
        refused(managed, "PUT", "/admin/budgets/user/carol", field, raw=b'{"%s": 1e999999999}' % field.encode())
    refused(managed, "POST", "/admin/keys", "expires_at", raw=b'{"user": "a", "expires_at": 1e999999999}')
    assert listed(managed) == []


@pytest.mark.parametrize("value", [10**13, 2**63, "99999999999999999999"])
@pytest.mark.parametrize("field", ["rpm", "tpm"])
def test_huge_rates_on_passthrough_subjects_are_400s(managed: ProxyServer, field: str, value: Any) -> None:
    refused(managed, "PUT", "/admin/budgets/team/search", field, {field: value})
    status, got = call(managed, "GET", "/admin/budgets")
    assert status == 200 and got["budgets"] == []


def test_a_put_without_a_body_does_not_clear_limits(managed: ProxyServer) -> None:
    assert call(managed, "PUT", "/admin/budgets/team/search", {"budget_usd": "10"})[0] == 200
    status, _, body = request(managed.url, method="PUT", path="/admin/budgets/team/search", body=None, headers=AUTH)
    assert status == 400, body
    assert call(managed, "GET", "/admin/budgets/team/search")[1]["budget_usd"] == "10"


@pytest.mark.parametrize("name", ["x" * 257, " "])
def test_subject_names_have_the_bound_of_every_stored_name(managed: ProxyServer, name: str) -> None:
    refused(managed, "PUT", f"/admin/budgets/user/{name.replace(' ', '%20')}", "name", {"rpm": 5})


@pytest.mark.parametrize(("query", "param"), [
    ("limit=²", "limit"), ("limit=" + "9" * 5000, "limit"), ("limit=1001", "limit"),
    ("before=9999999999999999999", "before"), ("before=١٢", "before"), ("key=" + "k" * 1025, "key"),
])
def test_bad_listing_numbers_are_400s(managed: ProxyServer, query: str, param: str) -> None:
    name, _, value = query.partition("=")
    refused(managed, "GET", f"/admin/calls?{name}={quote(value)}", param)


def raw_get(proxy: ProxyServer, path: str, authorization: bytes) -> tuple[int, bytes]:
    """A GET written byte by byte: http.client would refuse to send a header that is not Latin-1 text."""
    with socket.create_connection(("127.0.0.1", proxy.server.port), timeout=30) as sock:
        sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Authorization: " + authorization + b"\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.parametrize("token", [b"Bearer \xff\xfe\xfd", b"Bearer admin-secret\xc3\x28", b"Bearer \xed\xa0\x80"])
def test_a_non_utf8_admin_token_is_a_401(managed: ProxyServer, token: bytes) -> None:
    for path in ("/admin/usage", "/admin/keys", "/admin/openapi.json"):
        status, body = raw_get(managed, path, token)
        assert status == 401, body
        assert json.loads(body)["error"]["code"] == "invalid_admin_token"


@pytest.mark.parametrize("tz", ["UTC", "Asia/Tokyo", "Pacific/Kiritimati", "Etc/GMT+12", "Etc/GMT-14"])
def test_the_widest_accepted_range_is_answered(managed: ProxyServer, tz: str) -> None:
    # The bound is tight enough: at its ends, every grouping renders in every zone.
    path = ("/admin/usage?since=1970-01-02&until=9999-12-30T00:00:00Z&group_by=hour,day,week,month"
            f"&tz={quote(tz)}")
    status, got = call(managed, "GET", path)
    assert status == 200, got
    assert got["until"] == "9999-12-30T00:00:00.000Z"
    status, got = call(managed, "GET", "/admin/accuracy?since=0&until=253402128000")
    assert status == 200, got
    status, made = call(managed, "POST", "/admin/keys", {"user": "a", "expires_at": "9999-12-30T00:00:00Z",
                                                         "rpm": 10**12, "tpm": "1000000000000"})
    assert status == 201, made
    assert (made["expires_at"], made["rpm"], made["tpm"]) == ("9999-12-30T00:00:00.000Z", 10**12, 10**12)
    assert listed(managed)[0]["key_id"] == made["key_id"]


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_past_its_bound_is_a_413_in_openai_shape(managed: ProxyServer, chunked: bool) -> None:
    body = json.dumps({"user": "alice", "name": "x" * (70 * 1024)}).encode()
    with socket.create_connection(("127.0.0.1", managed.server.port), timeout=30) as sock:
        framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % len(body)
        sock.sendall(b"POST /admin/keys HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer "
                     + ADMIN_TOKEN.encode() + b"\r\nContent-Type: application/json\r\n" + framing + b"\r\n\r\n")
        sock.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if chunked else body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, got = reply.partition(b"\r\n\r\n")
    assert head.split()[1] == b"413", head
    assert json.loads(got)["error"]["code"] == "request_too_large"
    assert listed(managed) == []
