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


async def test_a_total_budget_keeps_pruned_spend_and_both_backends_agree(ledger_target: str) -> None:
    now = time.time()
    write_calls(ledger_target, calls(now))
    conn = writer(ledger_target)
    try:
        assert retention.prune(conn, now - 30 * DAY) == 5
        assert conn.execute("SELECT count(*) FROM calls").fetchone()[0] == 1
    finally:
        conn.close()
    refused = await admit(ledger_target, "total", "0.20", now)  # 0.90 + 0.20 > 1.00
    assert isinstance(refused, BudgetRefusal) and refused.spent == Decimal("0.90")
    fits = await admit(ledger_target, "total", "0.10", now)
    assert isinstance(fits, (Reservation, SharedHold))
    # A month budget counts this month only: the pruned calls were in a month that is over.
    month = await admit(ledger_target, "month", "0.80", now)
    assert isinstance(month, (Reservation, SharedHold))
