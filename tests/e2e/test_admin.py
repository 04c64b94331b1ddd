"""The admin API over real HTTP: its token, usage reports for several keys, and call listings."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

import pytest

from tests.support import ADMIN_TOKEN, FakeUpstream, ProxyServer
from tests.support.http import request

KEYS = {"sk-team-a-0000aaaa": "alice", "sk-team-b-0000bbbb": "bob"}


def kid(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def admin(proxy: ProxyServer, path: str, token: str | None = ADMIN_TOKEN) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {"Authorization": ""}
    status, hdrs, body = request(proxy.url, method="GET", path=path, body=None, headers=headers)
    if hdrs.get("Content-Type", "").startswith("application/json"):
        return status, json.loads(body)
    return status, body.decode()


def make_traffic(proxy: ProxyServer, upstream: FakeUpstream) -> None:
    plan = [("sk-team-a-0000aaaa", "gpt-4o", 1000, 200, 200), ("sk-team-a-0000aaaa", "gpt-4o-mini", 5000, 100, 200),
            ("sk-team-b-0000bbbb", "gpt-4o", 300, 30, 200), ("sk-team-b-0000bbbb", "gpt-4o", 0, 0, 429)]
    for key, model, prompt, completion, status in plan:
        if status == 200:
            upstream.json({"model": model, "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                                     "total_tokens": prompt + completion}})
        else:
            upstream.json({"error": {"message": "Rate limit reached"}}, status=status)
        request(proxy.url, headers={"Authorization": f"Bearer {key}", "X-Meter-User": KEYS[key],
                                    "X-Meter-Project": "p1"}, body=json.dumps({"model": model}).encode())


@pytest.fixture
def any_proxy(start_proxy: Callable[..., ProxyServer], ledger_target: str) -> ProxyServer:
    """A proxy on each backend: a SQLite ledger, then a PostgreSQL one."""
    return start_proxy(db=ledger_target)


@pytest.mark.parametrize("token", [None, "wrong", ADMIN_TOKEN + "x", ""])
def test_admin_rejects_without_the_token(proxy: ProxyServer, token: str | None) -> None:
    status, body = admin(proxy, "/admin/usage", token)
    assert status == 401 and body["error"]["type"] == "authentication_error"


def test_admin_disabled_without_env_names_the_variable(start_proxy: Callable[..., ProxyServer]) -> None:
    proxy = start_proxy(admin_token=None)
    status, body = admin(proxy, "/admin/usage")
    assert status == 401 and "METERPROXY_ADMIN_TOKEN" in body["error"]["message"]


def test_usage_by_key_and_model(any_proxy: ProxyServer, upstream: FakeUpstream) -> None:
    proxy = any_proxy
    make_traffic(proxy, upstream)
    status, report = admin(proxy, "/admin/usage?group_by=key,model")
    assert status == 200
    rows = {(r["key_id"], r["model"]): r for r in report["rows"]}
    a_4o = rows[(kid("sk-team-a-0000aaaa"), "gpt-4o")]
    assert (a_4o["calls"], a_4o["prompt_tokens"], a_4o["completion_tokens"], a_4o["cost_usd"]) == (
        1, 1000, 200, "0.0045")
    b_4o = rows[(kid("sk-team-b-0000bbbb"), "gpt-4o")]
    assert (b_4o["calls"], b_4o["errors"], b_4o["cost_usd"]) == (2, 1, "0.00105")
    # 0.0045 + (5000 * 0.15 + 100 * 0.6) / 1e6 + 0.00105
    assert report["totals"]["cost_usd"] == "0.00636"
    assert report["totals"]["calls"] == 4 and report["totals"]["errors"] == 1


def test_usage_by_user_and_tag_with_filters(any_proxy: ProxyServer, upstream: FakeUpstream) -> None:
    proxy = any_proxy
    make_traffic(proxy, upstream)
    _, by_user = admin(proxy, "/admin/usage?group_by=user")
    assert {r["user"]: r["total_tokens"] for r in by_user["rows"]} == {"alice": 6300, "bob": 330}
    _, by_tag = admin(proxy, "/admin/usage?group_by=tag:project,day")
    assert [r["tag:project"] for r in by_tag["rows"]] == ["p1"]
    _, only_b = admin(proxy, f"/admin/usage?key={kid('sk-team-b-0000bbbb')}&model=gpt-4o")
    assert only_b["totals"]["calls"] == 2
    _, future = admin(proxy, "/admin/usage?since=2100-01-01T00:00:00Z")
    assert future["totals"]["calls"] == 0 and future["rows"] == []


def test_usage_csv(any_proxy: ProxyServer, upstream: FakeUpstream) -> None:
    proxy = any_proxy
    make_traffic(proxy, upstream)
    status, text = admin(proxy, "/admin/usage?group_by=user&format=csv")
    assert status == 200
    lines = text.splitlines()
    assert "alice" in text and "bob" in text and len(lines) == 4


@pytest.mark.parametrize("query,param", [
    ("group_by=colour", "group_by"), ("since=yesterday", "since"), ("format=xml", "format"),
])
def test_bad_report_parameters_are_400(proxy: ProxyServer, query: str, param: str) -> None:
    status, body = admin(proxy, f"/admin/usage?{query}")
    assert status == 400 and body["error"]["param"] == param and body["error"]["message"]


def test_calls_listing_pages_newest_first(any_proxy: ProxyServer, upstream: FakeUpstream) -> None:
    proxy = any_proxy
    make_traffic(proxy, upstream)
    make_traffic(proxy, upstream)
    key_a = kid("sk-team-a-0000aaaa")
    status, page1 = admin(proxy, f"/admin/calls?key={key_a}&limit=3")
    assert status == 200 and len(page1["calls"]) == 3 and page1["next"]
    _, page2 = admin(proxy, f"/admin/calls?key={key_a}&limit=3&before={page1['next']}")
    assert len(page2["calls"]) == 1 and page2["next"] is None
    calls = page1["calls"] + page2["calls"]
    assert {c["key_id"] for c in calls} == {key_a}
    assert [c["model"] for c in calls] == ["gpt-4o-mini", "gpt-4o", "gpt-4o-mini", "gpt-4o"]
    first = calls[0]
    assert first["priced"] is True and first["stream"] is False and isinstance(first["cost_usd"], str)
    assert first["tags"] == {"project": "p1"} and first["usage_source"] == "upstream"
    status, bad = admin(proxy, "/admin/calls?limit=lots")
    assert status == 400 and bad["error"]["param"] == "limit"


def test_admin_token_never_forwarded(proxy: ProxyServer, upstream: FakeUpstream) -> None:
    upstream.json({"model": "gpt-4o"})
    request(proxy.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    admin(proxy, "/admin/usage")
    assert len(upstream.seen) == 1  # the admin call itself went nowhere
