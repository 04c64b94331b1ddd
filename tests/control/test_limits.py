"""Budgets: spend loaded exactly from the ledger, periods in UTC, and reservations that hold under concurrency.

Real SQLite ledger rows written through `Ledger`; the trackers read them back through their own connection.
"""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import uuid
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import AsyncIterator

import pytest

from proxy.control.budgets import BudgetRefusal, Budgets, Reservation
from proxy.control.db import ControlDB
from proxy.control.limits import (
    Limits,
    LimitStore,
    Subject,
    parse_limits_setting,
    parse_thresholds,
    period_of,
)
from proxy.core.record import CallRecord
from proxy.ledger.migrations import migrate
from proxy.ledger.rollups import TEAM_SQL
from proxy.ledger.writer import Ledger
from tests.support.cli import cli
from tests.support.control import other_process


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


NOW = ts("2026-11-15T12:00:00")


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[Ledger]:
    led = Ledger(tmp_path / "ledger.db")
    await led.open()
    yield led
    await led.close()


async def spend(ledger: Ledger, cost: str, *, at: float = NOW, key: str | None = None, user: str | None = None,
                team: str | None = None) -> None:
    rec = CallRecord(request_id=uuid.uuid4().hex, started_at=at, method="POST", endpoint="/v1/chat/completions",
                     key_id=key, user=user, tags={"team": team} if team else {}, status=200,
                     cost_usd=Decimal(cost), priced=True)
    await ledger.record(rec)


@pytest.mark.parametrize("period,moment,start,label", [
    ("day", "2026-11-15T23:59:59", "2026-11-15T00:00:00", "2026-11-15"),
    ("day", "2026-11-16T00:00:00", "2026-11-16T00:00:00", "2026-11-16"),
    ("month", "2026-11-30T23:59:59", "2026-11-01T00:00:00", "2026-11"),
    ("month", "2028-02-29T10:00:00", "2028-02-01T00:00:00", "2028-02"),
    ("month", "2026-12-01T00:00:00", "2026-12-01T00:00:00", "2026-12"),
])
def test_periods_are_utc_days_and_calendar_months(period: str, moment: str, start: str, label: str) -> None:
    assert period_of(period, ts(moment)) == (ts(start), label)


def test_total_period_starts_at_the_beginning() -> None:
    assert period_of("total", NOW) == (0.0, "total")


def test_limits_setting_and_thresholds() -> None:
    parsed = parse_limits_setting({"user": {"alice": {"budget_usd": 5.10, "budget_period": "day", "rpm": 60}},
                                   "team": {"ml": {"budget_usd": "1000"}}})
    assert parsed[Subject("user", "alice")] == Limits(Decimal("5.1"), "day", 60, None)
    assert parsed[Subject("team", "ml")] == Limits(Decimal(1000), "month")
    for bad in ({"group": {}}, {"user": {"a": {"budget_usd": -1}}}, {"user": {"a": {"burst": 3}}}, ["user"]):
        with pytest.raises(ValueError):
            parse_limits_setting(bad)
    assert parse_thresholds([1.0, 0.8, 0.8]) == (Decimal("0.8"), Decimal("1.0"))
    with pytest.raises(ValueError):
        parse_thresholds([0])


async def test_spend_is_loaded_exactly_per_subject_and_period(ledger: Ledger) -> None:
    for cost in ("0.1", "0.2", "0.000001"):
        await spend(ledger, cost, key="k1", user="alice", team="ml")
    await spend(ledger, "7", key="k1", user="alice", team="ml", at=ts("2026-10-31T23:59:59"))  # last month
    await spend(ledger, "3", key="k2", user="bob", team="ops")
    budgets = Budgets(ledger.path)
    states = await budgets.states([(Subject("key", "k1"), "month", Decimal(1)),
                                   (Subject("user", "alice"), "total", None),
                                   (Subject("team", "ml"), "day", Decimal("0.5")),
                                   (Subject("team", "nobody"), "day", None)], NOW)
    assert [s.spent for s in states] == [Decimal("0.300001"), Decimal("7.300001"), Decimal("0.300001"), 0]
    assert states[0].left == Decimal("0.699999") and states[1].left is None


def test_team_spend_uses_the_index_from_migration_3(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "x.db")
    migrate(conn)
    plan = conn.execute(f"EXPLAIN QUERY PLAN SELECT cost_usd FROM calls WHERE {TEAM_SQL} = ? AND started_at >= ?",
                        ("ml", 0)).fetchall()
    conn.close()
    assert any("calls_team_started_at" in str(row) for row in plan), plan


async def test_fifty_concurrent_reservations_against_a_budget_for_ten(ledger: Ledger) -> None:
    await spend(ledger, "0.5", user="alice")  # spent before: the tracker must start from it
    budgets = Budgets(ledger.path)
    worst = Decimal("0.25")
    charges = [(Subject("user", "alice"), Limits(Decimal("3.0"), "month"))]  # 0.5 + 10 x 0.25 = 3.0

    results = await asyncio.gather(*(budgets.reserve(charges, worst, NOW) for _ in range(50)))
    admitted = [r for r in results if isinstance(r, Reservation)]
    refused = [r for r in results if isinstance(r, BudgetRefusal)]
    assert len(admitted) == 10 and len(refused) == 40
    assert refused[0].message.startswith("Budget exceeded: user 'alice' may spend 3.0 USD per month")
    assert budgets.held(Subject("user", "alice"), "month", "2026-11") == Decimal("2.50")

    for reservation in admitted:
        budgets.settle(reservation, Decimal("0.2"))
        budgets.settle(reservation, Decimal("0.2"))  # a second settle must change nothing
    state = (await budgets.states([(Subject("user", "alice"), "month", Decimal("3.0"))], NOW))[0]
    assert state.reserved == 0
    assert budgets._trackers[(Subject("user", "alice"), "month")].spent == Decimal("2.5")


async def test_concurrent_calls_with_real_ledger_rows_never_pass_the_budget(ledger: Ledger) -> None:
    """50 clients call again and again until refused; each call's real cost is up to its worst case."""
    budgets = Budgets(ledger.path)
    budget, worst = Decimal("1.00"), Decimal("0.1")
    charges = [(Subject("team", "ml"), Limits(budget, "day")), (Subject("user", "u"), Limits(Decimal(100), "day"))]
    rng = random.Random(7)

    async def client() -> int:
        calls = 0
        while True:
            held = await budgets.reserve(charges, worst, NOW)
            if isinstance(held, BudgetRefusal):
                return calls
            await asyncio.sleep(rng.random() / 200)
            cost = (worst * Decimal(rng.randint(1, 10)) / 10).normalize()
            await spend(ledger, str(cost), user="u", team="ml")
            budgets.settle(held, cost)
            calls += 1

    counts = await asyncio.gather(*(client() for _ in range(50)))
    ledger_spend = (await Budgets(ledger.path).states([(Subject("team", "ml"), "day", budget)], NOW))[0].spent
    assert ledger_spend <= budget and sum(counts) >= 10
    assert budgets._trackers[(Subject("team", "ml"), "day")].spent == ledger_spend


async def test_a_call_that_costs_more_than_its_estimate_passes_by_that_call_only(ledger: Ledger) -> None:
    budgets = Budgets(ledger.path)
    charges = [(Subject("key", "k"), Limits(Decimal(1), "total"))]
    first = await budgets.reserve(charges, Decimal("0.6"), NOW)
    assert isinstance(first, Reservation)
    budgets.settle(first, Decimal("1.3"))  # longer than the configured cap
    after = await budgets.reserve(charges, Decimal(0), NOW)
    assert isinstance(after, BudgetRefusal)  # used up: not even a free call passes
    assert "1.3" in after.message and "in total" in after.message


async def test_a_refusal_on_one_budget_holds_nothing_on_the_others(ledger: Ledger) -> None:
    budgets = Budgets(ledger.path)
    charges = [(Subject("key", "k"), Limits(Decimal(10), "day")), (Subject("team", "t"), Limits(Decimal(1), "day"))]
    assert isinstance(await budgets.reserve(charges, Decimal(2), NOW), BudgetRefusal)
    assert budgets.held(Subject("key", "k"), "day", "2026-11-15") == 0


async def test_a_new_day_starts_from_the_ledger_again(ledger: Ledger) -> None:
    budgets = Budgets(ledger.path)
    charges = [(Subject("user", "v"), Limits(Decimal(1), "day"))]
    held = await budgets.reserve(charges, Decimal(1), NOW)
    assert isinstance(held, Reservation)
    await spend(ledger, "1", user="v")
    budgets.settle(held, Decimal(1))
    assert isinstance(await budgets.reserve(charges, Decimal("0.5"), NOW + 60), BudgetRefusal)
    tomorrow = ts("2026-11-16T00:00:01")
    assert isinstance(await budgets.reserve(charges, Decimal("0.5"), tomorrow), Reservation)
    # A request whose clock was read before the new day began is charged to it, not to a reload of the old.
    assert isinstance(await budgets.reserve(charges, Decimal("0.5"), NOW + 120), Reservation)
    assert isinstance(await budgets.reserve(charges, Decimal("0.5"), tomorrow), BudgetRefusal)


async def test_limit_store_table_wins_over_config_and_reloads_on_change(ledger_target: str) -> None:
    db = ControlDB(ledger_target)
    await db.open()
    try:
        alice = Subject("user", "alice")
        store = LimitStore(db, {alice: Limits(Decimal(5), "day")})
        await store.load()
        assert store.get(alice) == Limits(Decimal(5), "day")
        await store.put(alice, Limits(Decimal("7.5"), "month", rpm=3))
        assert store.get(alice) == Limits(Decimal("7.5"), "month", 3)
        assert store.entries() == [(alice, Limits(Decimal("7.5"), "month", 3), "api")]
        await store.put(alice, Limits(Decimal("0.000000000001"), "total", tpm=10**12))  # an upsert, exactly
        assert store.get(alice) == Limits(Decimal("0.000000000001"), "total", tpm=10**12)
        other_process(db.path, "DELETE FROM subject_limits")  # another process removes it
        assert await db.check_changes()
        await store.reloaded()
        assert store.get(alice) == Limits(Decimal(5), "day")
        assert await store.delete(alice) is False
    finally:
        await db.close()


def test_budgets_cli_set_list_delete_on_either_backend(ledger_target: str, capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    db = ledger_target
    assert cli("budgets", "set", "team", "search", "--budget-usd", "500.25", "--budget-period", "day",
               "--rpm", "60", "--db", db, "--format", "json") == 0
    made = json.loads(capsys.readouterr().out)
    assert (made["budget_usd"], made["period"], made["rpm"], made["spent_usd"]) == ("500.25", "day", 60, "0")
    assert cli("budgets", "set", "user", "alice", "--budget-usd", "0.000000000001", "--db", db) == 0
    capsys.readouterr()
    assert cli("budgets", "list", "--db", db, "--format", "json") == 0
    listed = {(b["kind"], b["name"]): b for b in json.loads(capsys.readouterr().out)}
    assert listed[("user", "alice")]["budget_usd"] == "0.000000000001" and listed[("user", "alice")]["period"] == "month"
    assert listed[("team", "search")]["left_usd"] == "500.25"
    assert cli("budgets", "delete", "team", "search", "--db", db) == 0
    capsys.readouterr()
    assert cli("budgets", "delete", "team", "search", "--db", db) == 2
    err = capsys.readouterr().err
    assert "no limits" in err and err.count("\n") == 1
    assert cli("keys", "create", "--db", db, "--user", "carol", "--format", "json") == 0
    key_id = json.loads(capsys.readouterr().out)["key_id"]
    assert cli("budgets", "set", "key", key_id, "--rpm", "5", "--db", db) == 2
    assert "is a managed key" in capsys.readouterr().err


async def test_spooled_calls_of_an_earlier_run_count_in_budgets_until_and_after_their_replay(tmp_path: Path) -> None:
    # SQLite, one process: three calls of 0.30 end while another connection locks the ledger, so their rows
    # are spooled; the proxy restarts still locked out. Its trackers are new: loaded from `calls` alone they
    # would admit 0.20 on a day budget of 1.00 holding 0.90. Counted from the spool, they refuse it; after
    # the replay the same trackers (and new ones) read 0.90 once, not twice.
    db = tmp_path / "ledger.db"
    spool = tmp_path / "ledger.spool.jsonl"
    team = [(Subject("team", "ml"), Limits(budget_usd=Decimal("1.00"), budget_period="day"))]
    ledger = Ledger(db, spool_path=spool, busy_timeout_ms=100, retry_interval=3600)
    await ledger.open()
    budgets = Budgets(str(db))
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # the next rows go to the spool
    try:
        now = datetime.now(timezone.utc).timestamp()
        for i in range(3):
            held = await budgets.reserve(team, Decimal("0.30"), now)
            assert isinstance(held, Reservation)
            await ledger.record(CallRecord(request_id=f"s{i}", started_at=now, ended_at=now, method="POST",
                                           endpoint="/v1/chat/completions", status=200, tags={"team": "ml"},
                                           cost_usd=Decimal("0.30"), priced=True))
            budgets.settle(held, Decimal("0.30"))
        assert ledger.spool_depth == 3
        await ledger.close()  # the last replay finds the ledger locked: the rows stay spooled
        ledger = Ledger(db, spool_path=spool, busy_timeout_ms=100, retry_interval=3600)  # the restart
        await ledger.open()
        budgets = Budgets(str(db))
        budgets.keep_spooled(await ledger.spooled_rows())  # what proxy/app.py does at start
        refused = await budgets.reserve(team, Decimal("0.20"), now)
        assert isinstance(refused, BudgetRefusal) and refused.spent == Decimal("0.90")
    finally:
        locker.rollback()
        locker.close()
    await ledger.close()  # replayed now
    assert ledger.stats["replayed"] == 3
    for trackers in (budgets, Budgets(str(db))):  # loaded before the replay, and after it
        assert isinstance(await trackers.reserve(team, Decimal("0.10"), now), Reservation)
        refused = await trackers.reserve(team, Decimal("0.01"), now)
        assert isinstance(refused, BudgetRefusal) and refused.spent == Decimal("0.90")
