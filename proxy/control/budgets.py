"""Budgets that hold under concurrency: reserve a request's worst case before forwarding, settle after.

Per subject (a key_id, a user, a team) and period (UTC day, UTC calendar month, total) a tracker keeps
the spend so far and what calls in flight hold. It is loaded once from the ledger (an exact Decimal sum of
`calls.cost_usd` since the period began), then kept up to date in memory by `settle()`: the request path
never queries SQLite once a tracker is loaded.

A request is refused when spend + held + its worst case would pass the budget. As long as a call's real
cost is at most its worst case, spend never passes a budget; a call that costs more than its estimate
(a completion beyond the configured cap) passes it by at most that one call's excess.

Why a tracker is never double-counted: a reservation only ever references a tracker loaded before it was
made, so the call's ledger row, committed after, cannot be in the loaded sum. Calls in flight when a
budget is first set are not in any tracker and may be missed (at most the calls then in flight). Rows an
earlier run left in the spool are not in `calls` yet: `keep_spooled` counts them in the trackers loaded
before their replay (docs/budgets.md).

This module must never hold money as a float, never query SQLite on the event loop, and never let two
loads of one tracker race (the second would forget the first's reservations).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Iterable, Protocol, Sequence

from proxy.control.limits import Limits, Subject, period_of
from proxy.core.money import EXACT
from proxy.ledger.budget_store import SpendKey, in_calls, spooled_holds
from proxy.ledger.budget_store import spend_since as ledger_spend
from proxy.ledger.read import open_read, read_snapshot
from proxy.ledger.sqlconn import Conn

__all__ = ["BudgetRefusal", "BudgetState", "Budgets", "Reservation", "spend_since"]

_ZERO = Decimal(0)


class AlertSink(Protocol):
    def observe(self, subject: Subject, period: str, label: str, spent: Decimal, budget: Decimal,
                refused: bool = False) -> None: ...


def spend_since(conn: Conn, subject: Subject, since: float) -> Decimal:
    """Exact spend of a subject in calls started at or after `since` (a connection from open_read)."""
    return ledger_spend(conn, subject.kind, subject.name, since)


class _Tracker:
    __slots__ = ("label", "reserved", "spent")

    def __init__(self, label: str, spent: Decimal) -> None:
        self.label = label
        self.spent = spent
        self.reserved = _ZERO


@dataclass(frozen=True, slots=True)
class _Hold:
    subject: Subject
    period: str
    budget: Decimal
    tracker: _Tracker


class Reservation:
    """A request's worst case, held against each of its budgets until `Budgets.settle()`."""

    __slots__ = ("_open", "holds", "worst_usd")

    def __init__(self, holds: Sequence[_Hold], worst_usd: Decimal) -> None:
        self.holds = holds
        self.worst_usd = worst_usd
        self._open = True

    @property
    def open(self) -> bool:
        return self._open


@dataclass(frozen=True, slots=True)
class BudgetRefusal:
    subject: Subject
    period: str
    label: str
    budget: Decimal
    spent: Decimal
    reserved: Decimal
    worst_usd: Decimal

    @property
    def message(self) -> str:
        per = "in total" if self.period == "total" else f"per {self.period} ({self.label}, UTC)"
        held = f", {format(self.reserved, 'f')} held by calls in flight" if self.reserved else ""
        return (f"Budget exceeded: {self.subject.kind} {self.subject.name!r} may spend "
                f"{format(self.budget, 'f')} USD {per}; spent {format(self.spent, 'f')}{held}; this request "
                f"could cost up to {format(self.worst_usd, 'f')} USD. It was not forwarded.")


@dataclass(frozen=True, slots=True)
class BudgetState:
    """A subject's budget in its current period, for the admin API and the key holder's view."""

    subject: Subject
    period: str
    period_start: float
    label: str
    budget: Decimal | None
    spent: Decimal
    reserved: Decimal

    @property
    def left(self) -> Decimal | None:
        return None if self.budget is None else max(self.budget - self.spent - self.reserved, _ZERO)


class Budgets:
    """The trackers of one proxy process; see the module docstring."""

    def __init__(self, ledger_path: str, *, alerts: AlertSink | None = None) -> None:
        self.ledger_path = ledger_path
        self.alerts = alerts
        self._trackers: dict[tuple[Subject, str], _Tracker] = {}
        self._loading: dict[tuple[Subject, str, str], asyncio.Future[None]] = {}
        # Rows an earlier run of this process left in its spool: their cost counts in every tracker loaded
        # while they are not in `calls` yet (they were settled into the trackers of that run, which are gone).
        self._spooled: dict[str, tuple[list[SpendKey], Decimal]] = {}

    def keep_spooled(self, rows: Sequence[Sequence[Any]]) -> None:
        """At start: count the cost of the rows waiting in the spool (`Ledger.spooled_rows`) in the trackers
        loaded before their replay (a tracker loaded after it reads them from `calls`, once)."""
        self._spooled.update(spooled_holds(rows))

    async def prepare(self, charges: Iterable[tuple[Subject, Limits]], now: float) -> list[_Hold]:
        """Load the trackers these budgets need (once each); returns what `try_reserve` takes."""
        wanted: list[tuple[Subject, str, str, float, Decimal]] = []
        for subject, limits in charges:
            if limits.budget_usd is not None:
                start, label = period_of(limits.budget_period, now)
                wanted.append((subject, limits.budget_period, label, start, limits.budget_usd))
        missing = [w for w in wanted if self._stale(w[0], w[1], w[2])]
        if missing:
            await self._load(missing)
        # No await from here to the caller's try_reserve: the trackers seen are the ones reserved on.
        return [_Hold(subject, period, budget, self._trackers[(subject, period)])
                for subject, period, _, _, budget in wanted]

    def _stale(self, subject: Subject, period: str, label: str) -> bool:
        tracker = self._trackers.get((subject, period))
        # Labels of one period sort in time order; a request computed just before midnight uses the new day.
        return tracker is None or tracker.label < label

    async def _load(self, missing: list[tuple[Subject, str, str, float, Decimal]]) -> None:
        waits: list[asyncio.Future[None]] = []
        mine: list[tuple[Subject, str, str, float, Decimal]] = []
        for item in missing:
            loading = self._loading.get(item[:3])
            if loading is not None:
                waits.append(loading)
            else:
                mine.append(item)
        if mine:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            for item in mine:
                self._loading[item[:3]] = done
            try:
                totals = await self._spend([(s, period, label, start) for s, period, label, start, _ in mine])
                for (subject, period, label, _, _), total in zip(mine, totals):
                    if self._stale(subject, period, label):
                        self._trackers[(subject, period)] = _Tracker(label, total)
                done.set_result(None)
            except BaseException as exc:
                done.set_exception(exc)
                done.exception()  # retrieved: waiters get it; nobody else must be told it was lost
                raise
            finally:
                for item in mine:
                    self._loading.pop(item[:3], None)
        for wait in waits:
            await wait

    async def _spend(self, items: list[tuple[Subject, str, str, float]]) -> list[Decimal]:
        """The spend of each (subject, period, label, start) from the ledger, plus that of spooled rows of an
        earlier run not in it yet; those found in it are forgotten (they are read from `calls` from now on)."""
        spooled = dict(self._spooled)
        totals, landed = await asyncio.to_thread(self._query, items, spooled)
        for rid in landed:
            self._spooled.pop(rid, None)
        return totals

    def _query(self, items: list[tuple[Subject, str, str, float]],
               spooled: dict[str, tuple[list[SpendKey], Decimal]]) -> tuple[list[Decimal], set[str]]:
        with open_read(self.ledger_path) as conn, read_snapshot(conn):  # a replay commits whole or not at all
            landed = in_calls(conn, list(spooled)) if spooled else set()
            totals = []
            for subject, period, label, since in items:
                total, key = spend_since(conn, subject, since), (subject.kind, subject.name, period, label)
                for rid, (keys, cost) in spooled.items():
                    if rid not in landed and key in keys:
                        total = EXACT.add(total, cost)
                totals.append(total)
            return totals, landed

    def try_reserve(self, holds: Sequence[_Hold], worst_usd: Decimal) -> Reservation | BudgetRefusal:
        """Hold `worst_usd` against every budget, or refuse without holding anything. Never awaits."""
        for hold in holds:
            t = hold.tracker
            if t.spent >= hold.budget or EXACT.add(EXACT.add(t.spent, t.reserved), worst_usd) > hold.budget:
                if self.alerts is not None:
                    self.alerts.observe(hold.subject, hold.period, t.label, t.spent, hold.budget, refused=True)
                return BudgetRefusal(hold.subject, hold.period, t.label, hold.budget, t.spent, t.reserved,
                                     worst_usd)
        for hold in holds:
            hold.tracker.reserved = EXACT.add(hold.tracker.reserved, worst_usd)
        return Reservation(holds, worst_usd)

    async def reserve(self, charges: Iterable[tuple[Subject, Limits]], worst_usd: Decimal,
                      now: float) -> Reservation | BudgetRefusal:
        return self.try_reserve(await self.prepare(charges, now), worst_usd)

    def settle(self, reservation: Reservation, cost_usd: Decimal) -> None:
        """Release the hold and add the real cost (already in the ledger row). A second call does nothing."""
        if not reservation._open:
            return
        reservation._open = False
        for hold in reservation.holds:
            t = hold.tracker
            t.reserved = EXACT.subtract(t.reserved, reservation.worst_usd)
            t.spent = EXACT.add(t.spent, cost_usd)
            if self.alerts is not None and cost_usd:
                self.alerts.observe(hold.subject, hold.period, t.label, t.spent, hold.budget)

    def held(self, subject: Subject, period: str, label: str) -> Decimal:
        """What calls in flight hold against this subject's budget in the period `label`."""
        tracker = self._trackers.get((subject, period))
        return tracker.reserved if tracker is not None and tracker.label == label else _ZERO

    async def states(self, items: Sequence[tuple[Subject, str, Decimal | None]], now: float) -> list[BudgetState]:
        """Budget, spend (read from the ledger) and held amounts of (subject, period, budget) items."""
        bounds = [period_of(period, now) for _, period, _ in items]
        spent = await self._spend([(s, period, b[1], b[0]) for (s, period, _), b in zip(items, bounds)])
        return [BudgetState(subject, period, start, label, budget, total, self.held(subject, period, label))
                for (subject, period, budget), (start, label), total in zip(items, bounds, spent)]
