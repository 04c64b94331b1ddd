"""A proxy restarted while its ledger cannot write into the database: the calls waiting in its spool keep
their cost counted. On PostgreSQL the app rebuilds their holds from the spool at start (proxy/app.py), so
another replica refuses what would pass the budget until the spool is replayed, and the spend is exact
after it; the database refuses the writes (a trigger on calls, as a full disk or a read-only role would)
while the limits' own statements work, so the lapse of the first run's leases is the only thing between.
On SQLite (one process) the new trackers count the spooled rows until their replay, and once after it.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import urllib.request
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

import openai

from proxy.control.budgets import BudgetRefusal
from proxy.control.limits import Limits, Subject
from proxy.control.shared import SharedHold, SharedLimits
from proxy.ledger.target import parse_target
from tests.support import FakeUpstream, ProxyServer, ledger_rows, proxy_settings
from tests.support.ledger import connect

TEAM = Subject("team", "ml")
# 20 prompt and 300,000 completion tokens at 1 USD per 1M each: 0.30002 a call; three are 0.90006.
PRICES = "models:\n  m:\n    input: '1'\n    output: '1'\n"
REPLY = {"id": "c1", "object": "chat.completion", "created": 1, "model": "m", "choices": [],
         "usage": {"prompt_tokens": 20, "completion_tokens": 300_000, "total_tokens": 300_020}}


def healthz(proxy: ProxyServer) -> dict[str, Any]:
    with urllib.request.urlopen(f"{proxy.url}/healthz", timeout=5) as resp:
        return dict(json.load(resp))


def reservations(pg_url: str) -> int:
    conn = connect(pg_url)
    try:
        return int(conn.execute("SELECT count(*) FROM reservations").fetchone()[0])
    finally:
        conn.close()


def wait(check: Callable[[], bool], timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def calls(proxy: ProxyServer, n: int, max_tokens: int = 300_000) -> list[str]:
    """`n` calls of team ml one after another: "ok" or the error code of each."""
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="sk-test", max_retries=0)
    out = []
    try:
        for _ in range(n):
            try:
                client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=max_tokens, extra_headers={"X-Meter-Team": "ml"})
                out.append("ok")
            except openai.APIStatusError as exc:
                out.append(str(exc.body["code"]) if isinstance(exc.body, dict) else str(exc.status_code))
    finally:
        client.close()
    return out


def test_a_restarted_proxy_holds_its_spooled_calls_cost_for_every_replica(
        upstream: FakeUpstream, start_proxy: Callable[..., ProxyServer], pg_url: str, tmp_path: Path) -> None:
    (tmp_path / "prices.yaml").write_text(PRICES)
    upstream.json(REPLY)
    settings = dict(db=pg_url, pricing=str(tmp_path / "prices.yaml"), reservation_lease_seconds=1.0,
                    limits={TEAM: Limits(budget_usd=Decimal("1.00"), budget_period="day")})
    conn = connect(pg_url)  # migrated; the schema is the test's own
    conn.execute("CREATE FUNCTION refuse_rows() RETURNS trigger LANGUAGE plpgsql AS "
                 "$$ BEGIN RAISE EXCEPTION 'no room for rows'; END $$")
    conn.execute("CREATE TRIGGER refuse_rows BEFORE INSERT ON calls FOR EACH ROW EXECUTE FUNCTION refuse_rows()")
    first = proxy = ProxyServer(proxy_settings(tmp_path, upstream.url, **settings))  # stopped here, not by the fixture
    first.server.start()
    running = True

    async def other_admits(worst: str) -> object:
        other = SharedLimits(parse_target(pg_url), lease=1.0)
        await other.open()
        try:
            await other.renew()  # its upkeep: prunes lapsed holds
            got = await other.acquire(f"other-{worst}-{time.time()}", [(TEAM, Limits(budget_usd=Decimal("1.00"),
                                      budget_period="day"))], 0, Decimal(worst), time.time())
            if isinstance(got, SharedHold):
                got.settle(Decimal(0), recorded=False)  # a probe: its hold goes again
            return got
        finally:
            await other.close()

    try:
        assert calls(proxy, 4) == ["ok", "ok", "ok", "budget_exceeded"]  # spooled, held: the fourth is over
        assert healthz(proxy)["spool_depth"] == 4 and ledger_rows(pg_url) == []  # the refusal has its row
        first.server.stop()  # its last replay is refused too: the rows stay in the spool
        running = False
        time.sleep(1.5)  # the first run's leases lapse
        assert isinstance(asyncio.run(other_admits("0")), SharedHold) and reservations(pg_url) == 0
        proxy = start_proxy(**settings)  # the same settings: the same spool
        assert healthz(proxy)["spool_depth"] == 4
        wait(lambda: reservations(pg_url) > 0)  # its first renewal holds them again (lease / 3)
        refused = asyncio.run(other_admits("0.20"))
        assert isinstance(refused, BudgetRefusal) and refused.reserved == Decimal("0.90006")
        assert calls(proxy, 1) == ["budget_exceeded"]
        conn.execute("DROP TRIGGER refuse_rows ON calls")  # the database takes rows again: the spool replays
        assert wait(lambda: healthz(proxy)["status"] == "ok")
        assert wait(lambda: reservations(pg_url) == 0)  # settled by the replay's hook; the rest renewed away
        spent = conn.execute("SELECT spent FROM budget_spend WHERE kind = 'team' AND name = 'ml' AND period = 'day'"
                             ).fetchone()[0]
        assert Decimal(spent) == sum((r["cost_usd"] for r in ledger_rows(pg_url)), Decimal(0)) == Decimal("0.90006")
        assert isinstance(asyncio.run(other_admits("0.09")), SharedHold)
        assert isinstance(asyncio.run(other_admits("0.10")), BudgetRefusal)
    finally:
        if running:
            first.server.stop()
        conn.close()


def test_a_restarted_sqlite_proxy_counts_its_spooled_calls_in_its_budgets(
        upstream: FakeUpstream, start_proxy: Callable[..., ProxyServer], tmp_path: Path) -> None:
    # One process on SQLite: its trackers are memory, loaded from `calls`; the spool is counted at start.
    (tmp_path / "prices.yaml").write_text(PRICES)
    upstream.json(REPLY)
    settings = dict(pricing=str(tmp_path / "prices.yaml"), spool=str(tmp_path / "ledger.spool.jsonl"),
                    ledger_busy_timeout=0.2, limits={TEAM: Limits(budget_usd=Decimal("1.00"), budget_period="day")})
    first = ProxyServer(proxy_settings(tmp_path, upstream.url, **settings))
    first.server.start()
    running = True
    locker = sqlite3.connect(first.settings.db, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")  # the rows go to the spool
        assert calls(first, 4) == ["ok", "ok", "ok", "budget_exceeded"]
        first.server.stop()  # its last replay finds the ledger locked
        running = False
        proxy = start_proxy(**settings)
        assert healthz(proxy)["spool_depth"] == 4
        assert calls(proxy, 1) == ["budget_exceeded"]  # 0.90006 spooled + a worst case of 0.30002 > 1.00
        locker.rollback()
        assert wait(lambda: healthz(proxy)["status"] == "ok")
        assert sum((Decimal(r["cost_usd"]) for r in ledger_rows(proxy.settings.db)),
                   Decimal(0)) == Decimal("0.90006")
        assert calls(proxy, 1, max_tokens=50_000) == ["ok"]  # counted once: 0.90006 + 0.05002 fits
    finally:
        if running:
            first.server.stop()
        locker.close()
