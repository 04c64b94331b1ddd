"""GET /admin/replicas: every running proxy's heartbeat row, alive or not, and version mismatches."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

from proxy.admin.replicas import replicas_view
from proxy.ledger import replica_store
from proxy.ledger.migrations import migrate
from proxy.ledger.replica_store import Replica
from proxy.pricing.table import PriceTable
from tests.support import ADMIN_TOKEN, ProxyServer
from tests.support.http import request
from tests.support.paths import ROOT

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def replicas(proxy: ProxyServer) -> tuple[int, Any]:
    status, _, body = request(proxy.url, method="GET", path="/admin/replicas", body=None, headers=AUTH)
    return status, json.loads(body)


def test_a_running_proxy_lists_itself_alive_with_its_versions(proxy: ProxyServer) -> None:
    status, body = replicas(proxy)
    assert status == 200
    (me,) = body["replicas"]
    assert me["pid"] == os.getpid() and me["alive"] is True and body["alive"] == 1
    assert me["pricing_version"] == PriceTable.load(proxy.settings.pricing).version
    assert me["interval_seconds"] == proxy.settings.heartbeat_interval
    assert body["warnings"] == []


def second_proxy(first: ProxyServer, **overrides: Any) -> ProxyServer:
    """Another proxy on `first`'s ledger, stopped by the test itself."""
    proxy = ProxyServer(dataclasses.replace(first.settings, **overrides))
    proxy.server.start()
    return proxy


def test_a_clean_stop_deletes_the_row(proxy: ProxyServer) -> None:
    first = proxy
    second = second_proxy(first)
    assert len(replicas(first)[1]["replicas"]) == 2
    second.server.stop()
    (left,) = replicas(first)[1]["replicas"]
    conn = sqlite3.connect(first.settings.db)
    try:
        assert [r[0] for r in conn.execute("SELECT id FROM replicas")] == [left["id"]]
    finally:
        conn.close()


def test_heartbeats_refresh_last_seen(start_proxy: Callable[..., ProxyServer]) -> None:
    proxy = start_proxy(heartbeat_interval=0.2)
    first = replicas(proxy)[1]["replicas"][0]["last_seen"]
    deadline = time.monotonic() + 10
    while replicas(proxy)[1]["replicas"][0]["last_seen"] == first:
        assert time.monotonic() < deadline, "the heartbeat never refreshed the row"
        time.sleep(0.1)


def test_live_replicas_on_different_pricing_versions_are_warned_about(proxy: ProxyServer, tmp_path: Path) -> None:
    other = tmp_path / "pricing.yaml"
    other.write_text((ROOT / "config" / "pricing.yaml").read_text() + "\n# edited\n")
    first = proxy
    second = second_proxy(first, pricing=str(other))
    status, body = replicas(first)
    assert status == 200 and body["alive"] == 2
    (warning,) = body["warnings"]
    assert "different pricing versions" in warning
    for version in {r["pricing_version"] for r in body["replicas"]}:
        assert version in warning
    second.server.stop()
    assert replicas(first)[1]["warnings"] == []


def test_a_replica_not_seen_for_three_intervals_is_not_alive_and_not_warned_about() -> None:
    now = 1_000_000.0
    rows = [Replica("a", "h", 1, "1", "p1", now - 100, now - 1, 5.0),
            Replica("b", "h", 2, "1", "p2", now - 100, now - 15.5, 5.0),  # killed: 3 intervals are 15 s
            Replica("c", "h", 3, "1", "p1", now - 100, now - 15.0, 5.0)]
    view = replicas_view(rows, now)
    assert [r["alive"] for r in view["replicas"]] == [True, False, True]
    assert view["alive"] == 2 and view["warnings"] == []
    rows[1] = dataclasses.replace(rows[1], seen_at=now - 2)  # seen again: alive, and on another version
    assert len(replicas_view(rows, now)["warnings"]) == 1


def test_rows_not_seen_for_a_day_are_forgotten(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    conn = sqlite3.connect(path)
    migrate(conn)
    conn.close()
    store = replica_store.open_conn(str(path))
    try:
        now = time.time()
        replica_store.beat(store, Replica("old", "h", 1, "1", None, now - 3 * 86400, now - 2 * 86400, 5.0))
        replica_store.beat(store, Replica("new", "h", 2, "1", None, now, now, 5.0))
        assert [r.id for r in replica_store.list_replicas(store)] == ["new"]
    finally:
        store.close()


def test_unreadable_ledger_is_a_503(proxy: ProxyServer) -> None:
    os.unlink(proxy.settings.db)
    status, body = replicas(proxy)
    assert status == 503 and body["error"]["code"] == "ledger_unavailable"
