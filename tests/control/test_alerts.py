"""Budget alerts against a real webhook server on loopback that fails the first attempts."""

from __future__ import annotations

import asyncio
import json
import logging
from decimal import Decimal
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
from aiohttp import web

from proxy.control.alerts import Alerts
from proxy.control.budgets import Budgets, Reservation
from proxy.control.db import ControlDB
from proxy.control.limits import Limits, Subject
from proxy.ledger.writer import Ledger
from tests.support.control import query

SHARES = (Decimal("0.8"), Decimal("1.0"))
ALICE = Subject("user", "alice")


class Hook:
    """A webhook that answers `statuses` in turn (then 200) and keeps every body it got."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.bodies: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(json.loads(await request.read()))
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status)


async def _open(db: str) -> ControlDB:
    if not db.startswith("postgresql://"):
        led = Ledger(db)  # the ledger makes the file, as in the proxy
        await led.open()
        await led.close()
    control = ControlDB(db)
    await control.open()
    return control


@pytest.fixture
async def db(ledger_target: str) -> AsyncIterator[ControlDB]:
    control = await _open(ledger_target)
    yield control
    await control.close()


@pytest.fixture
async def sqlite_db(tmp_path: Path) -> AsyncIterator[ControlDB]:
    control = await _open(str(tmp_path / "ledger.db"))
    yield control
    await control.close()


@pytest.fixture
def hook_url(aiohttp_server: Callable[..., Any]) -> Callable[[Hook], Any]:
    async def start(hook: Hook) -> str:
        app = web.Application()
        app.router.add_post("/hook", hook.handle)
        server = await aiohttp_server(app)
        return str(server.make_url("/hook"))

    return start


def outcomes(db: ControlDB) -> list[tuple[Any, ...]]:
    return sorted(query(db.path, "SELECT kind, name, period, threshold, outcome, attempts FROM budget_alerts"))


async def test_retried_with_backoff_then_sent_once_even_after_a_restart(
        db: ControlDB, hook_url: Callable[[Hook], Any], caplog: pytest.LogCaptureFixture) -> None:
    hook = Hook([500, 503])
    url = await hook_url(hook)
    alerts = Alerts(db, url, SHARES, base_delay=0.01)
    caplog.set_level(logging.INFO, logger="meterproxy")
    alerts.observe(ALICE, "month", "2026-11", Decimal("7.99"), Decimal(10))  # below 80%: nothing
    alerts.observe(ALICE, "month", "2026-11", Decimal("8.5"), Decimal(10))
    alerts.observe(ALICE, "month", "2026-11", Decimal("8.6"), Decimal(10))  # the same share again
    await alerts.idle()
    assert len(hook.bodies) == 3  # two failures, then delivered
    body = hook.bodies[-1]
    assert {k: body[k] for k in ("event", "subject", "period", "period_label", "threshold", "spend_usd",
                                 "budget_usd", "reason")} == {
        "event": "budget_threshold", "subject": {"kind": "user", "name": "alice"}, "period": "month",
        "period_label": "2026-11", "threshold": "0.8", "spend_usd": "8.5", "budget_usd": "10", "reason": "spend"}
    assert outcomes(db) == [("user", "alice", "month:2026-11", "0.8", "sent", 3)]
    assert any("sent after 3 attempt" in r.getMessage() for r in caplog.records)
    await alerts.close()

    restarted = Alerts(db, url, SHARES, base_delay=0.01)  # a new process: memory is empty, the table is not
    restarted.observe(ALICE, "month", "2026-11", Decimal("9"), Decimal(10))
    await restarted.idle()
    assert len(hook.bodies) == 3
    restarted.observe(ALICE, "month", "2026-12", Decimal("9"), Decimal(10))  # a new period alerts again
    await restarted.idle()
    assert len(hook.bodies) == 4 and hook.bodies[-1]["period_label"] == "2026-12"
    await restarted.close()


@pytest.mark.parametrize("statuses,attempts,outcome", [
    ([500] * 10, 3, "failed: HTTP 500"),
    ([400], 1, "failed: HTTP 400 (not retried)"),
    ([429, 200], 2, "sent"),
])
async def test_delivery_is_bounded_and_its_outcome_recorded(
        db: ControlDB, hook_url: Callable[[Hook], Any], statuses: list[int], attempts: int, outcome: str) -> None:
    hook = Hook(statuses)
    alerts = Alerts(db, await hook_url(hook), (Decimal(1),), attempts=3, base_delay=0.01)
    alerts.observe(ALICE, "day", "2026-11-15", Decimal(10), Decimal(10))
    await alerts.idle()
    await alerts.close()
    assert len(hook.bodies) == attempts
    assert outcomes(db) == [("user", "alice", "day:2026-11-15", "1", outcome, attempts)]


async def test_an_unreachable_webhook_fails_after_its_attempts(db: ControlDB) -> None:
    alerts = Alerts(db, "http://127.0.0.1:9/hook", (Decimal(1),), attempts=2, base_delay=0.01, timeout=2)
    alerts.observe(ALICE, "total", "total", Decimal(3), Decimal(2))
    await alerts.idle()
    await alerts.close()
    (row,) = outcomes(db)
    assert row[4] is not None and row[4].startswith("failed") and row[5] == 2


async def test_a_budget_refusal_fires_the_shares_up_to_one(sqlite_db: ControlDB, hook_url: Callable[[Hook], Any]
                                                           ) -> None:
    db = sqlite_db
    hook = Hook([])
    alerts = Alerts(db, await hook_url(hook), (Decimal("0.5"), Decimal("1"), Decimal("1.5")), base_delay=0.01)
    budgets = Budgets(db.path, alerts=alerts)
    charges = [(ALICE, Limits(Decimal(1), "total"))]
    held = await budgets.reserve(charges, Decimal("0.6"), 0.0)
    assert isinstance(held, Reservation)
    budgets.settle(held, Decimal("0.55"))  # 55%: the 0.5 share
    await budgets.reserve(charges, Decimal("0.6"), 0.0)  # 0.55 + 0.6 > 1: refused, spend still 55%
    await alerts.idle()
    await alerts.close()
    got = sorted((b["threshold"], b["reason"]) for b in hook.bodies)
    assert got == [("0.5", "spend"), ("1", "refused")]  # 1.5 is not reached by a refusal


async def test_no_webhook_or_a_zero_budget_sends_nothing(db: ControlDB) -> None:
    for url, budget in ((None, Decimal(10)), ("http://127.0.0.1:9/", Decimal(0))):
        alerts = Alerts(db, url, SHARES)
        alerts.observe(ALICE, "day", "d", Decimal(100), budget, refused=True)
        assert not alerts._tasks
        await alerts.close()
    assert outcomes(db) == []


async def test_replicas_claiming_the_same_alert_at_once_send_it_once(ledger_target: str,
                                                                     hook_url: Callable[[Hook], Any]) -> None:
    """Three stores (as three replicas) see every subject pass the same share at the same moment: one send
    per subject, period and share, whichever claims it first."""
    hook = Hook([])
    url = await hook_url(hook)
    replicas = [await _open(ledger_target) for _ in range(3)]
    senders = [Alerts(db, url, SHARES, base_delay=0.01) for db in replicas]
    try:
        periods = [f"2026-{month:02d}" for month in range(1, 13)]
        for label in periods:
            for alerts in senders:  # each replica schedules its own claim; they run concurrently
                alerts.observe(ALICE, "month", label, Decimal(9), Decimal(10))
        await asyncio.gather(*(alerts.idle() for alerts in senders))
        got = sorted(body["period_label"] for body in hook.bodies)
        assert got == periods  # each once, none twice, none lost
        assert len(outcomes(replicas[0])) == len(periods)
    finally:
        for alerts in senders:
            await alerts.close()
        for db in replicas:
            await db.close()
