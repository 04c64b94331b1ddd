"""Shared budgets and rate limits on a real PostgreSQL: several SharedLimits (one connection and thread each,
as replicas have) on one schema; rows settled by the ledger's hook inside their own transaction."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import AsyncIterator, Iterator

import pytest

from proxy.control.budgets import BudgetRefusal
from proxy.control.limits import Limits, Subject, period_of
from proxy.control.ratelimit import RateLimiter, RateRefusal
from proxy.control.shared import SharedHold, SharedLimits
from proxy.core.record import CallRecord
from proxy.ledger import budget_store
from proxy.ledger.db import INSERT_SQL
from proxy.ledger.migrations_postgres import migrate
from proxy.ledger.sqlconn import Conn, connect_postgres
from proxy.ledger.target import parse_target
from proxy.ledger.writer import record_row
from tests.support.relay import Relay

TEAM = Subject("team", "ml")


@pytest.fixture
def conn(pg_url: str) -> Iterator[Conn]:
    c = connect_postgres(parse_target(pg_url))
    migrate(c)
    yield c
    c.close()


@pytest.fixture
async def replicas(pg_url: str, conn: Conn) -> AsyncIterator[list[SharedLimits]]:
    opened = [SharedLimits(parse_target(pg_url), lease=60) for _ in range(3)]
    for shared in opened:
        await shared.open()
    yield opened
    for shared in opened:
        await shared.close()


def row(request_id: str, cost: str, *, team: str = "ml", started: float | None = None) -> tuple[object, ...]:
    return record_row(CallRecord(request_id=request_id, started_at=started or time.time(), method="POST",
                                 endpoint="/v1/chat/completions", ended_at=time.time(), status=200,
                                 tags={"team": team}, cost_usd=Decimal(cost), priced=True))


def write_rows(conn: Conn, rows: list[tuple[object, ...]], *, commit: bool = True) -> None:
    """What the ledger's batch transaction does on PostgreSQL: insert the rows, run the hook, commit."""
    conn.begin()
    try:
        conn.executemany(INSERT_SQL, rows)
        budget_store.settle_rows(conn, list(rows))
    except BaseException:
        conn.rollback()
        raise
    if commit:
        conn.commit()
    else:
        conn.rollback()


def team_spend(conn: Conn, period: str = "day") -> Decimal:
    _, label = period_of(period, time.time())
    found = conn.execute("SELECT spent FROM budget_spend WHERE kind = 'team' AND name = 'ml' AND period = ? "
                         "AND label = ?", (period, label)).fetchone()
    return Decimal(found[0]) if found else Decimal(-1)


def budget(usd: str, period: str = "day") -> list[tuple[Subject, Limits]]:
    return [(TEAM, Limits(budget_usd=Decimal(usd), budget_period=period))]


@pytest.fixture
async def many(pg_url: str, conn: Conn) -> AsyncIterator[list[SharedLimits]]:
    opened = [SharedLimits(parse_target(pg_url), lease=60) for _ in range(8)]
    for shared in opened:
        await shared.open()
    yield opened
    for shared in opened:
        await shared.close()


async def test_concurrent_reservations_on_eight_connections_never_pass_the_budget(
        many: list[SharedLimits]) -> None:
    # 200 calls at once, spread over eight connections (replicas), against a budget that fits 10 worst cases.
    calls = [many[i % 8].acquire(os.urandom(8).hex(), budget("1.00"), 0, Decimal("0.10"), time.time())
             for i in range(200)]
    results = await asyncio.gather(*calls)
    granted = [r for r in results if isinstance(r, SharedHold)]
    refused = [r for r in results if isinstance(r, BudgetRefusal)]
    assert len(granted) == 10 and len(refused) == 190
    assert refused[-1].reserved == Decimal("1.00") and refused[-1].spent == 0
    assert "Budget exceeded: team 'ml' may spend 1.00 USD per day" in refused[-1].message


async def test_settled_rows_free_their_holds_and_spend_never_passes_the_budget(
        replicas: list[SharedLimits], conn: Conn) -> None:
    # Each call reserves 0.10 and really costs 0.03: settling lets more in, never past 1.00 in total.
    admitted = 0
    for _ in range(11):
        results = await asyncio.gather(*[
            replicas[i % 3].acquire(os.urandom(8).hex(), budget("1.00"), 0, Decimal("0.10"), time.time())
            for i in range(12)])
        holds = [r for r in results if isinstance(r, SharedHold)]
        admitted += len(holds)
        write_rows(conn, [row(h.id, "0.03") for h in holds])
        for h in holds:
            h.settle(Decimal("0.03"))
    total = conn.execute("SELECT decimal_sum(cost_usd) FROM calls").fetchone()[0]
    assert Decimal(total) <= Decimal("1.00") and team_spend(conn) == Decimal(total)
    assert admitted == 31  # 0.93 spent; a 32nd would need 0.10 of the 0.07 left
    assert conn.execute("SELECT count(*) FROM reservations").fetchone()[0] == 0


async def test_spend_row_starts_from_the_exact_ledger_sum(replicas: list[SharedLimits], conn: Conn) -> None:
    write_rows(conn, [row("a", "0.000000000001"), row("b", "0.4"), row("c", "9", team="other"),
                      row("d", "5", started=period_of("day", time.time())[0] - 1)])  # yesterday: not today's
    held = await replicas[0].acquire("e", budget("1"), 0, Decimal("0.5"), time.time())
    assert isinstance(held, SharedHold)
    assert team_spend(conn) == Decimal("0.400000000001")
    refused = await replicas[1].acquire("f", budget("1"), 0, Decimal("0.1"), time.time())
    assert isinstance(refused, BudgetRefusal)
    assert (refused.spent, refused.reserved) == (Decimal("0.400000000001"), Decimal("0.5"))
    assert team_spend(conn, "month") == -1  # only the periods asked for get rows


async def test_a_rolled_back_batch_settles_nothing(replicas: list[SharedLimits], conn: Conn) -> None:
    held = await replicas[0].acquire("r1", budget("1"), 0, Decimal("0.6"), time.time())
    assert isinstance(held, SharedHold)
    write_rows(conn, [row("r1", "0.2")], commit=False)
    assert team_spend(conn) == 0
    assert conn.execute("SELECT count(*) FROM reservations WHERE id = 'r1'").fetchone()[0] == 1
    assert isinstance(await replicas[1].acquire("r2", budget("1"), 0, Decimal("0.6"), time.time()), BudgetRefusal)
    write_rows(conn, [row("r1", "0.2")])
    assert team_spend(conn) == Decimal("0.2")
    assert conn.execute("SELECT count(*) FROM reservations").fetchone()[0] == 0
    assert isinstance(await replicas[1].acquire("r2", budget("1"), 0, Decimal("0.6"), time.time()), SharedHold)


async def test_an_expired_lease_frees_its_hold_and_a_renewed_one_does_not(pg_url: str, conn: Conn) -> None:
    target = parse_target(pg_url)
    dying, living, other = (SharedLimits(target, lease=0.6) for _ in range(3))
    for shared in (dying, living, other):
        await shared.open()
    try:
        assert isinstance(await dying.acquire("d", budget("1"), 0, Decimal("0.5"), time.time()), SharedHold)
        assert isinstance(await living.acquire("l", budget("1"), 0, Decimal("0.5"), time.time()), SharedHold)
        await dying.close()  # a replica that died: nobody renews its lease
        assert isinstance(await other.acquire("o", budget("1"), 0, Decimal("0.5"), time.time()), BudgetRefusal)
        await asyncio.sleep(1.3)  # two leases: the living replica renewed its own (every 0.2 s)
        freed = await other.acquire("o", budget("1"), 0, Decimal("0.5"), time.time())
        assert isinstance(freed, SharedHold)
        again = await other.acquire("o2", budget("1"), 0, Decimal("0.1"), time.time())
        assert isinstance(again, BudgetRefusal) and again.reserved == Decimal("1.0")
    finally:
        await living.close()
        await other.close()


async def test_a_call_not_recorded_gives_its_hold_back(replicas: list[SharedLimits], conn: Conn) -> None:
    held = await replicas[0].acquire("x", budget("1"), 0, Decimal("0.9"), time.time())
    assert isinstance(held, SharedHold)
    held.settle(Decimal("0.1"), recorded=False)
    await replicas[0].close()  # waits for the release it started
    assert isinstance(await replicas[1].acquire("y", budget("1"), 0, Decimal("0.9"), time.time()), SharedHold)


async def test_shared_rpm_admits_at_most_its_limit_across_replicas(many: list[SharedLimits]) -> None:
    limits = [(TEAM, Limits(rpm=30))]
    results = await asyncio.gather(*[many[i % 8].acquire(f"q{i}", limits, 5, Decimal(0), time.time())
                                     for i in range(200)])
    granted = [r for r in results if isinstance(r, SharedHold)]
    refused = [r for r in results if isinstance(r, RateRefusal)]
    assert len(granted) == 30 and len(refused) == 170
    # The same words and headers as the in-process limiter's refusal of a 31st request.
    local = RateLimiter()
    for _ in range(30):
        local.try_acquire([(TEAM, 30, None)], 5)
    expected = local.try_acquire([(TEAM, 30, None)], 5)
    assert isinstance(expected, RateRefusal)
    assert refused[0].message.split(" Please")[0] == expected.message.split(" Please")[0]
    assert refused[0].headers.keys() == expected.headers.keys()
    assert refused[0].headers["x-ratelimit-remaining-requests"] == "0"
    assert 58 < refused[0].retry_after <= 60  # type: ignore[operator]


async def test_shared_tpm_counts_real_tokens_once_adjusted(replicas: list[SharedLimits], conn: Conn) -> None:
    limits = [(TEAM, Limits(tpm=1000))]
    first = await replicas[0].acquire("t1", limits, 900, Decimal(0), time.time())
    assert isinstance(first, SharedHold) and first.headers["x-ratelimit-remaining-tokens"] == "100"
    refused = await replicas[1].acquire("t2", limits, 200, Decimal(0), time.time())
    assert isinstance(refused, RateRefusal) and refused.kind == "tokens" and refused.used == 900
    too_big = await replicas[1].acquire("t3", limits, 1001, Decimal(0), time.time())
    assert isinstance(too_big, RateRefusal) and too_big.retry_after is None
    first.settle(Decimal(0), tokens=50)
    await replicas[0].close()  # waits for the adjustment it started
    assert isinstance(await replicas[1].acquire("t2", limits, 200, Decimal(0), time.time()), SharedHold)


async def test_spend_stays_the_exact_row_sum_while_rows_are_written_during_its_creation(
        replicas: list[SharedLimits], pg_url: str, conn: Conn) -> None:
    # A writer commits rows of the team on its own connection while the spend row is being created: every
    # row is in the created sum or added by the hook, never both, never neither.
    writer = connect_postgres(parse_target(pg_url))
    stop = threading.Event()
    written: list[int] = []

    def write() -> None:
        n = 0
        while not stop.is_set():
            write_rows(writer, [row(f"w{n}-{i}", "0.001") for i in range(3)])
            n += 1
        written.append(n)

    thread = threading.Thread(target=write)
    thread.start()
    try:
        for period in ("day", "month", "total"):
            await asyncio.sleep(0.05)
            held = await replicas[0].acquire(f"c-{period}", budget("1000", period), 0, Decimal(0), time.time())
            assert isinstance(held, SharedHold)
        await asyncio.sleep(0.05)
    finally:
        stop.set()
        thread.join()
        writer.close()
    assert written[0] > 10
    total = Decimal(conn.execute("SELECT decimal_sum(cost_usd) FROM calls").fetchone()[0])
    assert team_spend(conn, "day") == team_spend(conn, "month") == team_spend(conn, "total") == total


async def test_budget_states_read_spend_and_every_replicas_holds(replicas: list[SharedLimits], conn: Conn) -> None:
    from proxy.control.shared import SharedBudgets

    write_rows(conn, [row("s1", "0.25")])
    assert isinstance(await replicas[0].acquire("s2", budget("1"), 0, Decimal("0.3"), time.time()), SharedHold)
    assert isinstance(await replicas[1].acquire("s3", budget("1"), 0, Decimal("0.2"), time.time()), SharedHold)
    (state,) = await SharedBudgets(replicas[2], "").states([(TEAM, "day", Decimal("1"))], time.time())
    assert (state.spent, state.reserved, state.left) == (Decimal("0.25"), Decimal("0.5"), Decimal("0.25"))


async def test_the_ledger_writer_settles_a_reservation_with_its_row(pg_url: str) -> None:
    from proxy.ledger.writer import Ledger

    ledger = Ledger(pg_url)
    ledger.db.after_insert.append(budget_store.settle_rows)  # as app.py does on PostgreSQL
    await ledger.open()  # migrates the schema
    shared = SharedLimits(parse_target(pg_url))
    await shared.open()
    try:
        held = await shared.acquire("w1", budget("1"), 0, Decimal("0.9"), time.time())
        assert isinstance(held, SharedHold)
        await ledger.record(CallRecord(request_id="w1", started_at=time.time(), method="POST",
                                       endpoint="/v1/chat/completions", ended_at=time.time(), status=200,
                                       tags={"team": "ml"}, cost_usd=Decimal("0.0625"), priced=True))
        held.settle(Decimal("0.0625"))
        conn = connect_postgres(parse_target(pg_url))
        try:
            assert team_spend(conn) == Decimal("0.0625")
            assert conn.execute("SELECT count(*) FROM reservations").fetchone()[0] == 0
        finally:
            conn.close()
        assert isinstance(await shared.acquire("w2", budget("1"), 0, Decimal("0.9"), time.time()), SharedHold)
    finally:
        await shared.close()
        await ledger.close()


async def test_a_lost_connection_is_opened_anew_and_an_unreachable_database_raises(
        replicas: list[SharedLimits], conn: Conn) -> None:
    assert isinstance(await replicas[0].acquire("c1", budget("1"), 0, Decimal("0.1"), time.time()), SharedHold)
    killed = conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                          " WHERE application_name = 'meterproxy-limits'").fetchone()[0]
    assert killed == 3
    assert isinstance(await replicas[0].acquire("c2", budget("1"), 0, Decimal("0.1"), time.time()), SharedHold)
    away = SharedLimits(parse_target("postgresql://nobody:secret-pw@127.0.0.1:1/none"))
    with pytest.raises(Exception) as caught:
        await away.acquire("c3", budget("1"), 0, Decimal("0.1"), time.time())
    assert "secret-pw" not in str(caught.value)
    await away.close()


async def test_one_replicas_pool_runs_admissions_side_by_side_and_never_passes_the_budget(
        pg_url: str, conn: Conn) -> None:
    """A pool of three connections in one SharedLimits: 60 concurrent admissions use more than one
    connection (never more than three), and still admit exactly what the budget fits."""
    shared = SharedLimits(parse_target(pg_url), lease=60, connections=3)
    await shared.open()
    seen: set[int] = set()

    def backend(c: Conn) -> None:
        seen.add(c.raw.info.backend_pid)
        time.sleep(0.05)  # hold the connection: the others must be used meanwhile

    try:
        await asyncio.gather(*(shared.call(backend) for _ in range(6)))
        results = await asyncio.gather(*(shared.acquire(os.urandom(8).hex(), budget("1.00"), 0, Decimal("0.10"),
                                                        time.time()) for _ in range(60)))
    finally:
        await shared.close()
    assert len(seen) == 3
    assert sum(isinstance(r, SharedHold) for r in results) == 10
    deadline = time.monotonic() + 5  # closed with the pool (a backend leaves pg_stat_activity a moment later)
    while conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'meterproxy-limits' "
                       "AND datname = current_database() AND pid = ANY(?)", (list(seen),)).fetchone()[0]:
        assert time.monotonic() < deadline, "the pool's connections stayed open"
        await asyncio.sleep(0.05)


async def test_an_admission_that_finds_no_free_connection_in_time_is_refused_and_reserves_nothing(
        pg_url: str, conn: Conn) -> None:
    from proxy.control.shared import PoolTimeout

    shared = SharedLimits(parse_target(pg_url), lease=60, connections=1, wait_timeout=0.2)
    await shared.open()
    try:
        busy = asyncio.ensure_future(shared.call(lambda c: time.sleep(1.0)))  # the only connection, taken
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(PoolTimeout, match="free within 0.2 s"):
            await shared.acquire("req-late", budget("1.00"), 0, Decimal("0.10"), time.time())
        assert time.monotonic() - started < 0.8
        await busy
        # Taken off the queue: it never ran, so nothing is held for it.
        assert conn.execute("SELECT count(*) FROM reservations WHERE id = 'req-late'").fetchone()[0] == 0
        held = await shared.acquire("req-next", budget("1.00"), 0, Decimal("0.10"), time.time())
        assert isinstance(held, SharedHold)
    finally:
        await shared.close()
async def test_reprice_moves_the_shared_spend_by_its_delta_and_admission_follows(
        replicas: list[SharedLimits], conn: Conn) -> None:
    # Calls of a model without a price cost 0; the spend rows exist (the first reservation made them).
    from proxy.core.record import Usage
    from proxy.ledger.reprice import reprice
    from proxy.pricing.table import PriceTable

    first = await replicas[0].acquire("r0", budget("1.00"), 0, Decimal("0.10"), time.time())
    assert isinstance(first, SharedHold)
    recs = []
    for i in range(4):
        rec = CallRecord(request_id=f"r{i}", started_at=time.time(), method="POST", model="local-x",
                         endpoint="/v1/chat/completions", ended_at=time.time(), status=200, tags={"team": "ml"},
                         cost_usd=Decimal(0), priced=False)
        rec.set_usage(Usage(prompt_tokens=100_000, completion_tokens=0, total_tokens=100_000), "upstream")
        recs.append(record_row(rec))
    write_rows(conn, recs)
    first.settle(Decimal(0))
    assert team_spend(conn) == 0
    admitted = await replicas[1].acquire("r9", budget("1.00"), 0, Decimal("0.10"), time.time())
    assert isinstance(admitted, SharedHold)
    admitted.settle(Decimal(0), recorded=False)
    # The model gets a price: 100,000 tokens x 2.40 per 1M = 0.24 a call, 0.96 for the four.
    table = PriceTable.from_mapping({"models": {"local-x": {"input": "2.40", "output": "1"}}})
    report = reprice(conn, table)
    assert report.changed == 4
    total = Decimal(conn.execute("SELECT decimal_sum(cost_usd) FROM calls").fetchone()[0])
    assert total == Decimal("0.96")
    assert team_spend(conn) == total
    refused = await replicas[2].acquire("r10", budget("1.00"), 0, Decimal("0.10"), time.time())
    assert isinstance(refused, BudgetRefusal) and refused.spent == total
    # And back: a cheaper table lowers the spend by the same delta, and the call fits again.
    reprice(conn, PriceTable.from_mapping({"models": {"local-x": {"input": "0.60", "output": "1"}}}))
    assert team_spend(conn) == Decimal("0.24")
    again = await replicas[2].acquire("r11", budget("1.00"), 0, Decimal("0.10"), time.time())
    assert isinstance(again, SharedHold)


async def test_spooled_rows_keep_their_cost_held_across_an_outage_longer_than_the_lease(
        pg_url: str, conn: Conn, tmp_path: Path) -> None:
    # The replica's ledger and limits both reach PostgreSQL through a relay; three calls of 0.30 end while it
    # is cut, their rows spooled; the outage outlasts the lease (1 s) and another replica prunes the lapsed
    # holds. Back, before the spool is replayed: the 0.90 must still count against the budget of 1.00.
    from proxy.ledger.hooks import after_insert_hooks
    from proxy.ledger.writer import Ledger

    relay = Relay.to(pg_url)
    url = relay.url(pg_url)
    ledger = Ledger(url, spool_path=tmp_path / "spool.jsonl", retry_interval=3600)  # no replay until close
    ledger.db.after_insert.extend(after_insert_hooks(ledger.db.target))
    await ledger.open()
    here = SharedLimits(parse_target(url), lease=1.0)
    here.ledger_clear = lambda: ledger.accepting
    other = SharedLimits(parse_target(pg_url), lease=1.0)
    await here.open()
    await other.open()
    try:
        holds = [await here.acquire(f"s{i}", budget("1.00"), 0, Decimal("0.30"), time.time()) for i in range(3)]
        assert all(isinstance(h, SharedHold) for h in holds)
        relay.cut()
        for h in holds:
            assert isinstance(h, SharedHold)
            rec = CallRecord(request_id=h.id, started_at=time.time(), method="POST", endpoint="/v1/chat/completions",
                             ended_at=time.time(), status=200, tags={"team": "ml"}, cost_usd=Decimal("0.30"),
                             priced=True)
            await ledger.record(rec)  # spooled: durable, the call completes
            h.settle(Decimal("0.30"))
        assert ledger.spool_depth == 3 and not ledger.accepting
        await asyncio.sleep(1.5)
        await other.renew()  # the other replica's upkeep deletes the expired holds
        assert conn.execute("SELECT count(*) FROM reservations").fetchone()[0] == 0
        relay.restore()
        refused = await here.acquire("after", budget("1.00"), 0, Decimal("0.20"), time.time())
        assert isinstance(refused, BudgetRefusal) and refused.reserved == Decimal("0.90")
        elsewhere = await other.acquire("after2", budget("1.00"), 0, Decimal("0.20"), time.time())
        assert isinstance(elsewhere, BudgetRefusal)  # every replica sees it
    finally:
        await ledger.close()  # the last replay: the rows land, their hook settles the kept holds
    await assert_settled_by_the_replay(conn, here, other, relay)


async def assert_settled_by_the_replay(conn: Conn, here: SharedLimits, other: SharedLimits, relay: Relay) -> None:
    """After the replay of three spooled calls of 0.30: 0.90 spent, nothing held, 0.10 fits and no more.
    Closes both replicas and the relay."""
    try:
        assert team_spend(conn) == Decimal("0.90")
        await here.renew()
        assert conn.execute("SELECT count(*) FROM reservations").fetchone()[0] == 0 and not here._kept
        fits = await other.acquire("last", budget("1.00"), 0, Decimal("0.10"), time.time())
        assert isinstance(fits, SharedHold)
        over = await other.acquire("over", budget("1.00"), 0, Decimal("0.01"), time.time())
        assert isinstance(over, BudgetRefusal)
    finally:
        await here.close()
        await other.close()
        relay.close()


async def test_spooled_holds_survive_a_restart_of_the_replica_during_the_outage(
        pg_url: str, conn: Conn, tmp_path: Path) -> None:
    # Three calls of 0.30 end while the replica's database is cut off: their rows are spooled, their cost
    # held in memory. The replica restarts while still cut off (a new ledger and new limits over the same
    # spool, as a new process would have), its old leases lapse and another replica prunes them. Back,
    # before the spool is replayed, the other replica must still see the 0.90 held: the restarted one
    # rebuilt the holds from the spool at start (what proxy/app.py does) and its renewal made them again.
    from proxy.ledger.hooks import after_insert_hooks
    from proxy.ledger.writer import Ledger

    relay = Relay.to(pg_url)
    url = relay.url(pg_url)
    spool = tmp_path / "spool.jsonl"

    async def start() -> tuple[Ledger, SharedLimits]:
        ledger = Ledger(url, spool_path=spool, retry_interval=3600)  # no replay until close
        ledger.db.after_insert.extend(after_insert_hooks(ledger.db.target))
        await ledger.open()
        shared = SharedLimits(parse_target(url), lease=1.0)
        shared.ledger_clear = lambda: ledger.accepting
        await shared.open()
        shared.keep_spooled(await ledger.spooled_rows())
        return ledger, shared

    ledger, here = await start()
    other = SharedLimits(parse_target(pg_url), lease=1.0)
    await other.open()
    try:
        holds = [await here.acquire(f"s{i}", budget("1.00"), 0, Decimal("0.30"), time.time()) for i in range(3)]
        relay.cut()
        for h in holds:
            assert isinstance(h, SharedHold)
            await ledger.record(CallRecord(request_id=h.id, started_at=time.time(), method="POST",
                                           endpoint="/v1/chat/completions", ended_at=time.time(), status=200,
                                           tags={"team": "ml"}, cost_usd=Decimal("0.30"), priced=True))
            h.settle(Decimal("0.30"))
        assert ledger.spool_depth == 3 and len(here._kept) == 3
        await ledger.close()  # the replica stops; its last replay finds no database: the rows stay spooled
        await here.close()
        ledger, here = await start()  # and starts again, still cut off
        assert ledger.spool_depth == 3 and not ledger.accepting
        await asyncio.sleep(1.5)
        await other.renew()  # the lapsed holds of the first run are pruned
        assert conn.execute("SELECT count(*) FROM reservations").fetchone()[0] == 0
        relay.restore()
        deadline = time.monotonic() + 10  # its next renewal, within a second (more on a loaded machine)
        while conn.execute("SELECT count(*) FROM reservations").fetchone()[0] == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        refused = await other.acquire("after", budget("1.00"), 0, Decimal("0.20"), time.time())
        assert isinstance(refused, BudgetRefusal) and refused.reserved == Decimal("0.90")
        # Held where a budget is checked (its spend row exists), not on all nine keys the replay charges.
        assert conn.execute("SELECT count(*), count(DISTINCT id) FROM reservations WHERE kind = 'team' "
                            "AND period = 'day'").fetchone() == (3, 3)
    finally:
        await ledger.close()  # the replay: the rows land, their hook settles the holds
    await assert_settled_by_the_replay(conn, here, other, relay)


async def test_spooled_holds_of_an_earlier_run_are_made_at_once_not_a_renewal_period_later(
        pg_url: str, conn: Conn, replicas: list[SharedLimits]) -> None:
    # A lease of 60 s renews every 20 s; the holds of a restarted replica's spooled calls are made at start.
    first = await replicas[0].acquire("pre", budget("1.00"), 0, Decimal(0), time.time())  # makes the spend row
    assert isinstance(first, SharedHold)
    conn.execute("DELETE FROM reservations")
    here = SharedLimits(parse_target(pg_url), lease=60)
    await here.open()
    try:
        here.keep_spooled([row("s1", "0.30"), row("s2", "0.25"), row("free", "0")])
        deadline = time.monotonic() + 5
        while conn.execute("SELECT count(*) FROM reservations").fetchone()[0] < 2:
            assert time.monotonic() < deadline, "not held at once"
            await asyncio.sleep(0.02)
        assert Decimal(conn.execute("SELECT sum(worst_usd) FROM reservations").fetchone()[0]) == Decimal("0.55")
    finally:
        await here.close()
