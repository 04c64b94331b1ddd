"""The accounting side wired into the running proxy: metrics, rollup-backed reports, export, reprice."""

from __future__ import annotations

import json
import sqlite3
from typing import Callable

from tests.support import ADMIN_TOKEN, FakeUpstream, ProxyServer
from tests.test_cli import run_cli
from tests.test_forwarding import request

USAGE = {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100}


def traffic(proxy: ProxyServer, upstream: FakeUpstream, model: str = "gpt-4o", n: int = 3) -> None:
    upstream.json({"model": model, "usage": USAGE})
    for i in range(n):
        assert request(proxy.url, body=json.dumps({"model": model}).encode(),
                       headers={"X-Meter-User": f"u{i % 2}", "X-Meter-Team": "search"})[0] == 200


def test_metrics_endpoint_counts_calls_tokens_and_cost(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    traffic(proxy, upstream)
    status, headers, body = request(proxy.url, method="GET", path="/metrics", body=None,
                                    headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    text = body.decode()
    assert status == 200 and "text/plain" in headers["Content-Type"]
    assert 'meterproxy_requests_total{endpoint="/v1/chat/completions",model="gpt-4o",status="200"} 3.0' in text
    assert 'kind="prompt"' in text and "meterproxy_ledger_commit_seconds" in text
    assert 'meterproxy_calls_by_usage_source_total{source="upstream"} 3.0' in text


def test_reports_from_rollups_equal_the_raw_scan(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    from proxy import reports

    traffic(proxy, upstream, n=5)
    conn = reports.connect_readonly(proxy.settings.db)
    try:
        for group_by in (["user"], ["tag:team", "week"], ["model", "day"]):
            fast = reports.usage_report(conn, group_by=group_by, tz="Europe/Berlin")
            slow = reports.usage_report(conn, group_by=group_by, tz="Europe/Berlin", use_rollups=False)
            assert fast == slow
        rolled = conn.execute("SELECT count(*) FROM sqlite_master WHERE name LIKE 'rollup%'").fetchone()[0]
        assert rolled >= 1
    finally:
        conn.close()
    status, _, body = request(proxy.url, method="GET", path="/admin/usage?group_by=week&tz=Asia/Kolkata",
                              body=None, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    report = json.loads(body)
    assert status == 200 and report["totals"]["calls"] == 5 and report["rows"][0]["week"].startswith("20")


def test_export_and_reprice(upstream: FakeUpstream, start_proxy: Callable[..., ProxyServer], tmp_path: object) -> None:
    proxy = start_proxy()
    traffic(proxy, upstream, model="my-new-model", n=2)  # unpriced when called
    db = proxy.settings.db
    lines = run_cli("export", "--db", db, "--format", "jsonl").stdout.splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["priced"] is False
    pricing = f"{tmp_path}/prices.yaml"
    with open(pricing, "w") as f:
        f.write("models:\n  my-new-model:\n    input: 1\n    output: 2\n")
    result = run_cli("reprice", "--db", db, "--pricing", pricing)
    assert result.returncode == 0, result.stderr
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT priced, cost_usd, original_cost_usd FROM calls").fetchall()
        assert rows == [(1, "0.0012", "0")] * 2  # (1000 * 1 + 100 * 2) / 1e6
    finally:
        conn.close()
    report = json.loads(run_cli("report", "--db", db, "--format", "json").stdout)
    assert report["totals"]["cost_usd"] == "0.0024" and report["totals"]["unpriced_calls"] == 0
