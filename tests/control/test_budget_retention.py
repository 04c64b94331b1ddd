"""A budget's spend after retention pruned its calls: the same admission answer on SQLite (in-process
trackers) and PostgreSQL (shared spend rows), because pruned hours are read from the rollups."""

from __future__ import annotations

import time
from decimal import Decimal

from proxy.control.budgets import BudgetRefusal, Budgets, Reservation
from proxy.control.limits import Limits, Subject
from proxy.control.shared import SharedHold, SharedLimits
from proxy.core.record import CallRecord
from proxy.ledger import retention
from proxy.ledger.target import parse_target
from tests.support.ledger import is_postgres, write_calls, writer

TEAM = Subject("team", "ml")
DAY = 86400.0


def calls(now: float) -> list[CallRecord]:
    # Five calls of 0.15 forty days ago (pruned below), one of 0.15 now: 0.90 spent in total.
    return [CallRecord(request_id=f"r{i}", started_at=now - (40 * DAY if i < 5 else 0) + i, ended_at=now,
                       method="POST", endpoint="/v1/chat/completions", status=200, tags={"team": "ml"},
                       cost_usd=Decimal("0.15"), priced=True) for i in range(6)]


async def admit(db: str, period: str, worst: str, now: float) -> object:
    charges = [(TEAM, Limits(budget_usd=Decimal("1.00"), budget_period=period))]
    if is_postgres(db):
        shared = SharedLimits(parse_target(db))
        await shared.open()
        try:
            return await shared.acquire(f"new-{period}-{worst}", charges, 0, Decimal(worst), now)
        finally:
            await shared.close()
    return await Budgets(db).reserve(charges, Decimal(worst), now)


async def refuses_then_fits(db: str, now: float, *, spent: str, over: str, fits: str) -> None:
    """A total budget of 1.00 that has `spent`: a call whose worst case is `over` is refused, `fits` fits."""
    refused = await admit(db, "total", over, now)
    assert isinstance(refused, BudgetRefusal) and refused.spent == Decimal(spent)
    assert isinstance(await admit(db, "total", fits, now), (Reservation, SharedHold))


async def test_a_total_budget_keeps_pruned_spend_and_both_backends_agree(ledger_target: str) -> None:
    now = time.time()
    write_calls(ledger_target, calls(now))
    conn = writer(ledger_target)
    try:
        assert retention.prune(conn, now - 30 * DAY) == 5
        assert conn.execute("SELECT count(*) FROM calls").fetchone()[0] == 1
    finally:
        conn.close()
    await refuses_then_fits(ledger_target, now, spent="0.90", over="0.20", fits="0.10")
    # A month budget counts this month only: the pruned calls were in a month that is over.
    month = await admit(ledger_target, "month", "0.80", now)
    assert isinstance(month, (Reservation, SharedHold))


async def test_a_reprice_into_pruned_hours_moves_their_rollups_and_the_spend_by_its_delta(ledger_target: str) -> None:
    # Five calls of 0.15 forty days ago, rolled up into days and months, then pruned: 0.75 lives in the
    # rollups alone. A late row in that very hour (a spooled row replayed after the prune) is an unpriced
    # call of 100,000 tokens; a re-pricing gives it 0.24. The rollups of its hour, day and month (full
    # dimension sets, totals, each dimension's own rows) must move by that delta and nothing else, so the
    # spend a budget reads is 0.99 and both backends refuse what no longer fits.
    from proxy.core.record import Usage
    from proxy.ledger import budget_store, rollup_build
    from proxy.ledger.hooks import after_insert_hooks
    from proxy.ledger.reprice import reprice
    from proxy.ledger.writer import Ledger
    from proxy.pricing.table import PriceTable
    from proxy.reports import queries as reports
    from tests.support.ledger import actual_rollups

    now = time.time()
    write_calls(ledger_target, calls(now)[:5])
    conn = writer(ledger_target)
    try:
        rollup_build.ensure(conn)
        assert retention.prune(conn, now - 30 * DAY) == 5
        before_late = actual_rollups(conn)
    finally:
        conn.close()
    late = CallRecord(request_id="late", started_at=now - 40 * DAY + 100, ended_at=now, method="POST",
                      endpoint="/v1/chat/completions", model="local-x", status=200, tags={"team": "ml"},
                      cost_usd=Decimal(0), priced=False)
    late.set_usage(Usage(prompt_tokens=100_000, completion_tokens=0, total_tokens=100_000), "upstream")
    ledger = Ledger(ledger_target)
    ledger.db.after_insert.extend(after_insert_hooks(ledger.db.target))  # as a replay writes it
    await ledger.open()
    try:
        await ledger.record(late)
    finally:
        await ledger.close()
    conn = writer(ledger_target)
    try:
        with_late = actual_rollups(conn)
        touched = {k for k, v in with_late.items() if before_late.get(k) != v}
        grains = {(k[0], k[2] if isinstance(k[2], str) else k[2][0] if k[2][0] == "own" else "full")
                  for k in touched}
        assert {("hour", "full"), ("hour", "*"), ("hour", "own"), ("day", "full"), ("day", "*"), ("day", "own"),
                ("month", "full"), ("month", "*"), ("month", "own")} == grains
        assert budget_store.spend_since(conn, "team", "ml", 0) == Decimal("0.75")
        table = PriceTable.from_mapping({"models": {"local-x": {"input": "2.40", "output": "1"}}})
        report = reprice(conn, table, after=rollup_build.after_reprice)  # as `meterproxy reprice` runs it
        assert report.changed == 1 and report.new_cost == Decimal("0.24")
        after = actual_rollups(conn)
        expected = dict(with_late)
        for k in touched:
            ints, cost = list(with_late[k][:-1]), Decimal(with_late[k][-1])
            ints[2] -= 1  # unpriced_calls: it has a price now
            expected[k] = (*ints, format(cost + Decimal("0.24"), "f"))
        assert {k: (Decimal(v[-1]), v[:-1]) for k, v in after.items()} == \
            {k: (Decimal(v[-1]), v[:-1]) for k, v in expected.items()}
        assert budget_store.spend_since(conn, "team", "ml", 0) == Decimal("0.99")
    finally:
        conn.close()
    read = reports.connect_readonly(ledger_target)
    try:  # reports over the pruned period read those rollups: by time, by team (its own rows), by model
        for group_by in ([], ["month"], ["tag:team"], ["model", "day"]):
            totals = reports.usage_report(read, group_by=group_by)["totals"]
            assert (Decimal(totals["cost_usd"]), totals["unpriced_calls"]) == (Decimal("0.99"), 0), group_by
    finally:
        read.close()
    await refuses_then_fits(ledger_target, now, spent="0.99", over="0.02", fits="0.01")
