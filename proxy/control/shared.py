"""Budgets and rate limits shared by every replica on one PostgreSQL database.

`SharedLimits.acquire` takes a call's reservation (its worst case against each budget) and its place in
each rate window in one short database transaction, before the call is forwarded; the reservation is
settled by the ledger itself, in the transaction that writes the call's row (`ledger/budget_store.py:
settle_rows`). A reservation has a lease: this replica renews the leases of its calls in flight every
lease/3 seconds, so those of a replica that died expire and hold nothing. Refusals read as the in-process
limits' (`budgets.py`, `ratelimit.py`); SQLite keeps those. The SQL is in `ledger/budget_store.py`.

Never on the event loop: every statement runs on this object's one worker thread, on its own connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable, Sequence, TypeVar

from proxy.control.budgets import AlertSink, BudgetRefusal, Budgets, BudgetState
from proxy.control.limits import Limits, Subject, period_of
from proxy.control.ratelimit import WINDOW, Figures, RateRefusal, headers_of, refusal_of
from proxy.core.errors import MeterproxyError
from proxy.core.recent import Recent
from proxy.ledger import budget_store as store
from proxy.ledger.sqlconn import Conn, connect_postgres, unreachable
from proxy.ledger.target import Target

__all__ = ["DEFAULT_LEASE", "SharedBudgets", "SharedHold", "SharedLimits"]

log = logging.getLogger("meterproxy")
T = TypeVar("T")
DEFAULT_LEASE = 60.0
DEFAULT_CONNECTIONS = 2  # see bench/reservations.py and docs/ledger-postgres.md
DEFAULT_WAIT = 5.0  # seconds an admission waits for a free connection
_ZERO = Decimal(0)
_NEXT = {"day": 86400.0}


@dataclass(frozen=True, slots=True)
class _Budget:
    subject: Subject
    period: str
    label: str
    start: float
    end: float | None
    budget: Decimal

    @property
    def key(self) -> store.SpendKey:
        return (self.subject.kind, self.subject.name, self.period, self.label)


class PoolTimeout(MeterproxyError):
    """No shared-limits connection came free in time (the gate answers 503 budget_unavailable)."""


class _Missing(MeterproxyError):
    """Rows to create before the reservation can lock them (a subject's first call in a period)."""

    def __init__(self, spend: list[_Budget], rates: list[store.RateKey]) -> None:
        self.spend, self.rates = spend, rates


class SharedHold:
    """A call's reservation and rate events in the database, until its row settles it."""

    __slots__ = ("_limits", "budgets", "headers", "id", "rated", "seen", "settled")

    def __init__(self, limits: SharedLimits, request_id: str, budgets: Sequence[_Budget],
                 seen: dict[store.SpendKey, Decimal], rated: bool, headers: dict[str, str]) -> None:
        self._limits = limits
        self.id, self.budgets, self.seen, self.rated, self.headers = request_id, budgets, seen, rated, headers
        self.settled = False

    def settle(self, cost_usd: Decimal, tokens: int | None = None, recorded: bool = True) -> None:
        """The call ended. Recorded: its row took the reservation with it (correct the rate tokens only);
        not recorded: take the holds and events back. Once; never blocks the loop."""
        if self.settled:
            return
        self.settled = True
        self._limits.forget(self.id)
        if not recorded:
            self._limits.later(store.release, self.id)
            return
        self._limits.keep_if_spooled(self.id, [b.key for b in self.budgets], cost_usd)
        if self.rated and tokens is not None:
            self._limits.later(store.adjust_tokens, self.id, tokens)
        alerts = self._limits.alerts
        if alerts is not None and cost_usd:
            for b in self.budgets:
                alerts.observe(b.subject, b.period, b.label, self.seen.get(b.key, _ZERO) + cost_usd, b.budget)


class SharedLimits:
    """See the module docstring. `lease`: seconds a reservation outlives its replica's last renewal."""

    def __init__(self, target: Target, *, lease: float = DEFAULT_LEASE, alerts: AlertSink | None = None,
                 replica: str | None = None, connections: int = DEFAULT_CONNECTIONS,
                 wait_timeout: float = DEFAULT_WAIT) -> None:
        if lease <= 0:
            raise ValueError("reservation_lease_seconds must be positive")
        if connections < 1:
            raise ValueError("pg_pool_size must be at least 1")
        self.target, self.lease, self.alerts = target, lease, alerts
        self.replica = replica or os.urandom(8).hex()
        # The pool: `connections` worker threads, each with its own connection (opened on first use, opened
        # anew when lost), so admissions of concurrent calls run side by side; a call waits at most
        # `wait_timeout` for a free one.
        self._thread = ThreadPoolExecutor(connections, thread_name_prefix="shared-limits")
        self._size, self._wait_timeout = connections, wait_timeout
        self._local = threading.local()
        self._conns: set[Conn] = set()
        self._conns_lock = threading.Lock()
        self._open: set[str] = set()  # reservations of calls in flight here: their leases are renewed
        self._renewer: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Future[Any]] = set()
        self._closed = False
        # (seconds waited for the connection, seconds of the transaction) of each admission, from the thread
        self.on_admission: Callable[[float, float], None] | None = None
        self.admissions = Recent()  # for /healthz: a slow shared-limits database
        # Whether the ledger writes into the database now (the app sets it: `Ledger.accepting`). A call that
        # ends while it does not may have its row in the spool: its cost stays held (`_kept`) until the row
        # is in `calls`, renewed, and made again before this replica's next admission if a lease ran out.
        self.ledger_clear: Callable[[], bool] | None = None
        self._kept: dict[str, tuple[list[store.SpendKey], Decimal]] = {}
        self._kept_stale = False  # kept holds to make sure of before the next admission

    # --- the worker thread and its connection ----------------------------------------------------
    def _connection(self) -> Conn:
        conn: Conn | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = self._local.conn = connect_postgres(self.target, application_name="meterproxy-limits")
            with self._conns_lock:
                self._conns.add(conn)
        return conn

    def _drop(self) -> None:
        """Close this thread's connection (lost, or the pool is closing)."""
        conn: Conn | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close_quietly()
            self._local.conn = None
            with self._conns_lock:
                self._conns.discard(conn)

    def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn` on the connection; once more on a new one if the connection was lost (a server restart,
        a failover), so only a database that stays away costs a call its admission."""
        for attempt in (1, 2):
            conn = self._connection()
            try:
                return fn(conn, *args)
            except Exception as exc:
                lost = isinstance(exc, conn.OperationalError) or conn.closed
                if not lost:
                    conn.rollback()
                    raise
                self._drop()  # opened anew by the next call
                if attempt == 2:
                    raise
                log.warning("shared limits on %s: connection lost (%s); connecting again", self.target, exc)
        raise AssertionError("unreachable")  # pragma: no cover

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(conn, *args)` on one of the pool's threads."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._run, fn, *args)

    async def _call_bounded(self, fn: Callable[..., T], *args: Any) -> T:
        """`call`, but a call that finds no free connection within wait_timeout raises PoolTimeout (and is
        never run: it is taken off the queue; should it start in that very moment, its reservation is not
        renewed and lapses with its lease)."""

        def run(conn: Conn, *a: Any) -> T:
            started_at.append(time.perf_counter())
            return fn(conn, *a)

        started_at: list[float] = []
        fut = asyncio.ensure_future(self.call(run, *args))
        done, _ = await asyncio.wait({fut}, timeout=self._wait_timeout)
        if not done and not started_at:
            fut.cancel()
            await asyncio.gather(fut, return_exceptions=True)
            if fut.cancelled():
                raise PoolTimeout(f"no connection to {self.target.shown} free within {self._wait_timeout:.3g} s "
                                  f"(pg_pool_size {self._size})")
        return await fut

    def later(self, fn: Callable[..., Any], *args: Any) -> None:
        """`call` without waiting for it (a failure is logged: the lease or the window ends it anyway)."""
        fut = asyncio.ensure_future(self.call(fn, *args))
        self._pending.add(fut)
        fut.add_done_callback(self._done)

    def _done(self, fut: asyncio.Future[Any]) -> None:
        self._pending.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            log.warning("shared limits on %s: %s", self.target, fut.exception())

    def forget(self, request_id: str) -> None:
        self._open.discard(request_id)

    def keep_if_spooled(self, request_id: str, keys: list[store.SpendKey], cost_usd: Decimal) -> None:
        """The call's row was stored; if the ledger is not writing into the database, keep its cost held."""
        if self.ledger_clear is None or self.ledger_clear() or not keys or not cost_usd:
            return
        self._kept[request_id] = (keys, cost_usd)
        self._kept_stale = True

    def keep_spooled(self, rows: Sequence[Sequence[Any]]) -> None:
        """At start, before the first admission: hold again the cost of the rows an earlier run of this
        replica left in its spool (`Ledger.spooled_rows`), as `keep_if_spooled` did before the restart. The
        spool is their durable record, so nothing more is written while calls end; a renewal started at once
        (or the first admission, or the renewal loop once the database answers) makes their holds again and
        drops those whose rows are in `calls` already. Call it on the event loop."""
        kept = store.spooled_holds(rows)
        if not kept:
            return
        self._kept.update(kept)
        self._kept_stale = True
        log.warning("shared limits on %s: %d spooled call(s) of an earlier run hold their cost until their rows "
                    "are replayed", self.target.shown, len(kept))
        # Held now, not a renewal period (lease/3) from now: the first run's leases may be lapsing already.
        # A database away now fails this one; the renewal loop tries again.
        first = asyncio.ensure_future(self.renew())
        self._pending.add(first)
        first.add_done_callback(self._done)

    def _hold_kept(self, conn: Conn, kept: dict[str, tuple[list[store.SpendKey], Decimal]]) -> set[str]:
        return store.keep_holds(conn, kept, self.replica, store.db_now(conn) + self.lease)

    def _settled_kept(self, done: set[str], sent: dict[str, Any]) -> None:
        for rid in done:
            if self._kept.get(rid) is sent.get(rid):
                self._kept.pop(rid, None)

    # --- opening, leases, closing ----------------------------------------------------------------
    async def open(self) -> None:
        try:
            await self.call(lambda conn: None)
        except Exception as exc:
            if not unreachable(exc):
                raise
            # Away at start: an outage like any other — admissions are refused (503) until it answers.
            log.error("shared limits on %s: cannot reach the database yet (%s); budgeted calls are refused "
                      "until it answers", self.target.shown, exc)
        self._renewer = asyncio.create_task(self._renew_loop(), name="shared limits leases")

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                await self.renew()
            except Exception as exc:  # the database is away: the leases run on; the next turn tries again
                self._kept_stale = True
                log.warning("shared limits on %s: leases not renewed: %s", self.target, exc)
                while not self._closed:  # back soon after the database is: kept holds made again first
                    await asyncio.sleep(min(1.0, self.lease / 3))
                    try:
                        await self.renew()
                        break
                    except Exception:
                        continue

    async def renew(self) -> None:
        """Extend the leases of this replica's calls in flight; drop what expired and old windows."""
        kept = dict(self._kept)
        done = await self.call(self._renew, list(self._open), kept)
        self._settled_kept(done, kept)
        if not self._kept:
            self._kept_stale = False

    def _renew(self, conn: Conn, ids: list[str], kept: dict[str, tuple[list[store.SpendKey], Decimal]]) -> set[str]:
        done = self._hold_kept(conn, kept)
        now = store.db_now(conn)
        store.renew(conn, ids, now + self.lease)
        _, day = period_of("day", now - 86400)
        _, month = period_of("month", period_of("month", now)[0] - 1)
        store.prune(conn, now, WINDOW, day, month)
        return done

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
            self._renewer = None
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        self._thread.shutdown(wait=True)  # the pool's threads are idle now: their connections can go
        with self._conns_lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            conn.close_quietly()

    # --- admission -------------------------------------------------------------------------------
    async def acquire(self, request_id: str, active: Sequence[tuple[Subject, Limits]], tokens: int,
                      worst_usd: Decimal, now: float) -> SharedHold | RateRefusal | BudgetRefusal:
        """Reserve `worst_usd` against every budget of `active` and count the request in every rate window,
        all or nothing; a refusal holds and counts nothing. `now` (this replica's clock) picks the periods."""
        budgets = []
        for subject, limits in active:
            if limits.budget_usd is not None:
                start, label = period_of(limits.budget_period, now)
                end = None if limits.budget_period == "total" else _period_end(limits.budget_period, start)
                budgets.append(_Budget(subject, limits.budget_period, label, start, end, limits.budget_usd))
        rates = [(s, lim.rpm, lim.tpm) for s, lim in active if lim.rpm is not None or lim.tpm is not None]
        self._open.add(request_id)  # renewed from the moment it may exist
        kept: dict[str, tuple[list[store.SpendKey], Decimal]] = {}
        if self._kept_stale and self._kept:  # spooled rows' costs held again before anything is admitted
            kept, self._kept_stale = dict(self._kept), False
        try:
            result, done = await self._call_bounded(self._timed_acquire, time.perf_counter(), request_id, budgets,
                                                    rates, tokens, worst_usd, kept)
        except BaseException:
            self._open.discard(request_id)
            if kept:
                self._kept_stale = True
            raise
        self._settled_kept(done, kept)
        if not isinstance(result, SharedHold):
            self._open.discard(request_id)
            if isinstance(result, BudgetRefusal) and self.alerts is not None:
                self.alerts.observe(result.subject, result.period, result.label, result.spent, result.budget,
                                    refused=True)
        return result

    def _timed_acquire(self, conn: Conn, queued: float,
                       *args: Any) -> tuple[SharedHold | RateRefusal | BudgetRefusal, set[str]]:
        started = time.perf_counter()
        try:
            return self._acquire(conn, *args)
        finally:
            took = time.perf_counter() - started
            # One figure per admission, what it cost its call (the wait for a connection and the
            # transaction): the pool's threads run admissions side by side, so none is "the one under way".
            self.admissions.add(started - queued + took)
            if self.on_admission is not None:
                self.on_admission(started - queued, took)

    def _acquire(self, conn: Conn, request_id: str, budgets: list[_Budget],
                 rates: list[tuple[Subject, int | None, int | None]], tokens: int, worst_usd: Decimal,
                 kept: dict[str, tuple[list[store.SpendKey], Decimal]]
                 ) -> tuple[SharedHold | RateRefusal | BudgetRefusal, set[str]]:
        done = self._hold_kept(conn, kept) if kept else set()
        for _ in range(3):
            try:
                return self._transaction(conn, request_id, budgets, rates, tokens, worst_usd), done
            except _Missing as missing:
                for b in sorted(missing.spend, key=lambda b: b.key):
                    store.create_spend(conn, b.key, b.start, b.end)
                store.create_rate_subjects(conn, missing.rates)
        raise RuntimeError("budget rows kept disappearing while they were created")  # pragma: no cover

    def _transaction(self, conn: Conn, request_id: str, budgets: list[_Budget],
                     rates: list[tuple[Subject, int | None, int | None]], tokens: int,
                     worst_usd: Decimal) -> SharedHold | RateRefusal | BudgetRefusal:
        keys = [b.key for b in budgets]
        subjects = [(s.kind, s.name) for s, _, _ in rates]
        store.begin_reservation(conn)
        try:
            spent = store.lock_spend(conn, keys)
            locked = store.lock_rate_subjects(conn, subjects)
            if len(spent) < len(set(keys)) or len(locked) < len(set(subjects)):
                raise _Missing([b for b in budgets if b.key not in spent],
                               [s for s in subjects if s not in locked])
            now, held = store.holds_now(conn, keys)
            refusal = self._refusal(conn, budgets, spent, held, rates, subjects, tokens, worst_usd, now)
            if isinstance(refusal, (RateRefusal, BudgetRefusal)):
                conn.rollback()
                return refusal
            store.commit_reservation(conn, request_id, self.replica, keys, worst_usd, now + self.lease, subjects,
                                     now, tokens)
        except BaseException:
            conn.rollback()
            raise
        shown = refusal
        return SharedHold(self, request_id, budgets, spent, bool(rates), headers_of(shown, now) if shown else {})

    def _refusal(self, conn: Conn, budgets: list[_Budget], spent: dict[store.SpendKey, Decimal],
                 held: dict[store.SpendKey, Decimal], rates: list[tuple[Subject, int | None, int | None]],
                 subjects: list[store.RateKey], tokens: int, worst_usd: Decimal,
                 now: float) -> RateRefusal | BudgetRefusal | list[tuple[int | None, int | None, Figures]]:
        """The first limit the request would pass (rate limits first, as in process), else the windows as
        they will be with it (for the x-ratelimit-* headers)."""
        shown: list[tuple[int | None, int | None, Figures]] = []
        if rates:
            windows = store.rate_windows(conn, subjects, now - WINDOW)
            for (subject, rpm, tpm), key in zip(rates, subjects):
                count, used, _ = windows.get(key, (0, 0, 0.0))
                if (rpm is not None and count + 1 > rpm) or (tpm is not None and used + tokens > tpm):
                    refusal = refusal_of(subject, store.rate_entries(conn, key, now - WINDOW), rpm, tpm, tokens, now)
                    if refusal is not None:
                        return refusal
                shown.append((rpm, tpm, Figures(count + 1, used + tokens, now)))
        for b in budgets:
            s, h = spent[b.key], held.get(b.key, _ZERO)
            if s >= b.budget or s + h + worst_usd > b.budget:
                return BudgetRefusal(b.subject, b.period, b.label, b.budget, s, h, worst_usd)
        return shown

    # --- reading, for the admin API --------------------------------------------------------------
    def _states(self, conn: Conn, items: list[tuple[Subject, str, Decimal | None]],
                now: float) -> list[BudgetState]:
        out = []
        db_time = store.db_now(conn)
        for subject, period, budget in items:
            start, label = period_of(period, now)
            spent = store.spend_since(conn, subject.kind, subject.name, start)
            held = store.live_holds(conn, [(subject.kind, subject.name, period, label)], db_time)
            out.append(BudgetState(subject, period, start, label, budget, spent, sum(held.values(), _ZERO)))
        return out


def _period_end(period: str, start: float) -> float:
    if period == "day":
        return start + _NEXT["day"]
    moment = period_of("month", start + 32 * 86400)  # a day of the next month: its start is this one's end
    return moment[0]


class SharedBudgets(Budgets):
    """`Budgets` for the admin API when the limits are shared: spend and holds read from the database."""

    def __init__(self, shared: SharedLimits, ledger_path: str) -> None:
        super().__init__(ledger_path, alerts=shared.alerts)
        self.shared = shared

    async def states(self, items: Sequence[tuple[Subject, str, Decimal | None]], now: float) -> list[BudgetState]:
        return await self.shared.call(self.shared._states, list(items), now)
