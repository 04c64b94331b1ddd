"""Rollups: kept exact by the ledger's hook, rebuilt exactly from calls, trusted only while current."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from proxy.ledger import picodollars, rollup_build, rollups
from proxy.ledger.db import LedgerDB
from proxy.ledger.migrations import MIGRATIONS, _apply, migrate
from proxy.ledger.rollup_build import in_transaction
from proxy.ledger.writer import INSERT_SQL, Ledger, LedgerError, record_row
from tests.support.ledger import (
    DAY,
    SPAN,
    T0,
    actual_rollups,
    assert_exact,
    random_call,
    write_through_ledger,
    writer,
)


def in_tx(conn: Any, fn: Any, *args: Any) -> Any:
    """fn(conn, *args) in one write transaction (the ledger's write lock held, on either backend)."""
    return in_transaction(conn, lambda: fn(rollups.as_conn(conn), *args))


@pytest.mark.parametrize("seed", [1, 2])
async def test_hook_keeps_every_rollup_equal_to_a_group_by_over_calls(ledger_target: str, seed: int) -> None:
    rng = random.Random(seed)
    path = ledger_target
    calls = [random_call(rng, n) for n in range(3000)]
    await write_through_ledger(path, calls[:2000], rng)
    assert_exact(path)  # hours only: no day has been rolled up yet
    conn = writer(path)
    try:
        in_tx(conn, rollup_build.roll_days, T0 + 20 * DAY)  # days and months for the first 20 days
        assert rollups.read_state(conn).days_until == T0 + 20 * DAY
    finally:
        conn.close()
    assert_exact(path)
    # More calls, many of them late (in days already rolled up): the hook updates those days too.
    await write_through_ledger(path, calls[2000:], rng)
    assert_exact(path)
    conn = writer(path)
    try:
        day_rows = conn.execute("SELECT count(*) FROM rollups WHERE grain = 1").fetchone()[0]
        month_rows = conn.execute("SELECT count(*) FROM rollups WHERE grain = 2").fetchone()[0]
        slow = conn.execute("SELECT count(*) FROM rollups WHERE cost_pico IS NULL").fetchone()[0]
        own = {g % rollups.PROJECTED for (g,) in conn.execute(
            "SELECT DISTINCT grain FROM rollups WHERE grain >= ?", (rollups.PROJECTED,))}
    finally:
        conn.close()
    assert day_rows and month_rows and slow  # every kind was exercised
    assert own == {rollups.HOUR, rollups.DAY, rollups.MONTH}


async def test_rebuild_gives_exactly_what_the_hook_gave(ledger_target: str) -> None:
    rng = random.Random(3)
    path = ledger_target
    await write_through_ledger(path, [random_call(rng, n) for n in range(1500)], rng)
    conn = writer(path)
    try:
        in_tx(conn, rollup_build.roll_days, T0 + 30 * DAY)
        before = actual_rollups(conn)
        in_tx(conn, rollup_build.rebuild)
        assert actual_rollups(conn) == before
        in_tx(conn, rollup_build.rebuild, T0 + 5 * DAY + 1234.5, T0 + 9 * DAY)  # a range, cut mid-hour
        assert actual_rollups(conn) == before
    finally:
        conn.close()
    assert_exact(path)


async def test_rows_written_without_the_hook_make_rollups_not_current_until_ensure(ledger_target: str) -> None:
    rng = random.Random(4)
    path = ledger_target
    await write_through_ledger(path, [random_call(rng, n) for n in range(300)], rng)
    conn = writer(path)
    try:
        assert rollups.read_state(conn).current
        conn.executemany(INSERT_SQL, [record_row(random_call(rng, n)) for n in range(300, 310)])
        assert not rollups.read_state(conn).current
        assert rollup_build.ensure(conn, until=T0 + SPAN) is True
        assert rollups.read_state(conn).current
        assert rollup_build.ensure(conn, until=T0 + SPAN) is False  # nothing to do the second time
    finally:
        conn.close()
    assert_exact(path)
    # And the hook carries on from there.
    await write_through_ledger(path, [random_call(rng, n) for n in range(310, 400)], rng)
    assert_exact(path)


async def test_once_broken_the_count_stays_broken_even_if_ids_line_up_again(tmp_path: Path) -> None:
    rng = random.Random(5)
    path = tmp_path / "ledger.db"
    await write_through_ledger(path, [random_call(rng, n) for n in range(50)], rng)
    conn = writer(path)
    try:
        conn.execute("DELETE FROM calls WHERE id = (SELECT max(id) FROM calls)")  # behind the hook's back
    finally:
        conn.close()
    await write_through_ledger(path, [random_call(rng, 50)], rng)  # takes the deleted id again
    conn = writer(path)
    try:
        assert not rollups.read_state(conn).current
        assert conn.execute("SELECT covered_id FROM rollup_state").fetchone()[0] == -1
    finally:
        conn.close()


def test_an_existing_ledger_is_marked_for_a_rebuild_by_migration_5(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for number, migration in enumerate(MIGRATIONS[:4], start=1):
            _apply(conn, number, migration)
        rng = random.Random(6)
        conn.executemany(INSERT_SQL, [record_row(random_call(rng, n)) for n in range(200)])
        assert migrate(conn) == len(MIGRATIONS)
        state = rollups.read_state(conn)
        assert state.exists and not state.current
        # At start-up: one short transaction marks the hours; nothing is built yet, reports read calls.
        assert rollup_build.make_current(conn) is True
        assert rollups.read_state(conn).current
        assert conn.execute("SELECT count(*) FROM rollups").fetchone()[0] == 0
        hours = conn.execute("SELECT count(DISTINCT CAST(started_at AS INTEGER) / 3600) FROM calls").fetchone()[0]
        assert conn.execute("SELECT count(*) FROM rollup_dirty").fetchone()[0] == hours
        rollup_build.ensure(conn, until=T0 + SPAN)  # what the upkeep does, an hour or a day per transaction
        assert rollups.read_state(conn).current
    finally:
        conn.close()
    assert_exact(path)


def test_a_failed_batch_leaves_no_rollups_and_no_stale_dimension_ids(tmp_path: Path) -> None:
    path = str(tmp_path / "l.db")
    db = LedgerDB(path, 5000)
    failing = {"on": True}

    def fail(conn: sqlite3.Connection, rows: list[Any]) -> None:
        if failing["on"]:
            raise RuntimeError("injected")

    db.after_insert.extend([rollups.apply, fail])
    db.open()
    try:
        rng = random.Random(7)
        first = [record_row(random_call(rng, n)) for n in range(40)]
        with pytest.raises(RuntimeError):
            db.insert(first)  # the hook added dims and rollups, then the batch rolled back
        failing["on"] = False
        db.insert([record_row(random_call(rng, n)) for n in range(40, 80)])
        db.insert(first)
    finally:
        db.close()
    assert_exact(Path(path))


async def test_duplicates_and_spool_replays_are_counted_once(tmp_path: Path) -> None:
    rng = random.Random(8)
    path = tmp_path / "ledger.db"
    calls = [random_call(rng, n) for n in range(100)]
    ledger = Ledger(path, spool_path=tmp_path / "spool.jsonl")
    ledger.db.after_insert.append(rollups.apply)
    await ledger.open()
    try:
        results = await asyncio.gather(*(ledger.record(c) for c in [*calls[:50], calls[3]]),
                                       return_exceptions=True)  # a repeated request_id in the batch
        assert sum(isinstance(r, LedgerError) for r in results) == 1
        await asyncio.to_thread(ledger.db.replay, [record_row(c) for c in calls[40:60]])  # half already in
        await asyncio.gather(*(ledger.record(c) for c in calls[60:]))
    finally:
        await ledger.close()
    assert_exact(path)


def test_a_changed_call_marks_its_hours_dirty_and_rebuild_dirty_clears_them(tmp_path: Path) -> None:
    path = tmp_path / "d.db"
    conn = writer(path)
    try:
        migrate(conn.raw)
        rng = random.Random(9)
        rows = [record_row(random_call(rng, n)) for n in range(100)]
        in_tx(conn, lambda c, r: (c.executemany(INSERT_SQL, r), rollups.apply(c, r)), rows)
        conn.execute("UPDATE calls SET cost_usd = '1.5', original_cost_usd = cost_usd WHERE id IN (3, 4)")
        conn.execute("UPDATE calls SET pricing_version = 'v2' WHERE id = 5")  # changes no counter: not dirty
        hours = {int(s) // 3600 * 3600 for (s,) in conn.execute("SELECT started_at FROM calls WHERE id IN (3, 4)")}
        assert {h for (h,) in conn.execute("SELECT hour FROM rollup_dirty")} == hours
        assert in_tx(conn, rollup_build.rebuild_dirty) == len(hours)
        assert conn.execute("SELECT count(*) FROM rollup_dirty").fetchone()[0] == 0
    finally:
        conn.close()
    assert_exact(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", (0, 0)), ("0.1", (100_000_000_000, -1)), ("0.000010000", (10_000_000, -9)), ("12", (12 * 10**12, 0)),
        ("0.000000000001", (1, -12)), ("0.0000000000001", None), ("1E-5", None), ("-0.5", None),
        ("99999999", None),  # beyond 2**62 picodollars: summed as decimals instead
    ],
)  # fmt: skip
def test_picodollars(text: str, expected: tuple[int, int] | None) -> None:
    assert picodollars.parse_plain(text) == expected
    value = Decimal(text)
    exact = rollups.pico(value)
    if expected is not None:
        assert exact == expected
        assert format(rollups.from_pico(*expected), "f") == format(value, "f")
        assert rollups.pico_text(*expected) == format(value, "f")


async def test_a_repricing_rebuilds_the_hours_it_changed_in_its_own_transaction(tmp_path: Path) -> None:
    from proxy.ledger.reprice import reprice
    from proxy.pricing.table import PriceTable

    rng = random.Random(10)
    path = tmp_path / "ledger.db"
    await write_through_ledger(path, [random_call(rng, n) for n in range(1500)], rng)
    table = PriceTable.from_mapping({"models": {"x": {"input": "1.5", "output": "2.125"}}})
    conn = writer(path)
    try:
        rollup_build.ensure(conn, until=T0 + 20 * DAY)
        report = reprice(conn, table, model="x", since=T0 + 3 * DAY, after=rollup_build.after_reprice)
        assert report.changed > 50
        assert conn.execute("SELECT count(*) FROM rollup_dirty").fetchone()[0] == 0
        # A dry run changes nothing, marks nothing.
        reprice(conn, PriceTable.from_mapping({"models": {"x": {"input": "9"}}}), model="x", dry_run=True)
        assert conn.execute("SELECT count(*) FROM rollup_dirty").fetchone()[0] == 0
    finally:
        conn.close()
    assert_exact(path)


async def test_sums_beyond_the_integer_range_stay_exact(tmp_path: Path) -> None:
    """Costs each within picodollars whose sums pass 2**63: SQLite's SUM fails, the decimal path takes over."""
    from dataclasses import replace

    from proxy.reports import queries as reports

    rng = random.Random(14)
    path = tmp_path / "ledger.db"
    calls = [random_call(rng, n, span=2 * DAY) for n in range(300)]
    calls = [replace(c, cost_usd=Decimal("4000000.000000000001"), model="big") if n % 15 == 0 else c
             for n, c in enumerate(calls)]
    await write_through_ledger(path, calls, rng)
    conn = writer(path)
    try:
        rollup_build.ensure(conn, until=T0 + DAY)  # the second day is read by the hour: sums of fitting rows
        assert rollups.read_state(conn).days_until == T0 + DAY
        big = conn.execute(f"SELECT count(*) FROM rollups WHERE grain = {rollups.projected(rollups.DAY, 'model')} "
                           "AND cost_pico IS NULL").fetchone()[0]
        assert big  # the model's own day rows hold more than 2**62 picodollars
    finally:
        conn.close()
    assert_exact(path)
    conn = reports.connect_readonly(path)
    try:
        for group_by in ([], ["model"], ["day"], ["day", "model"], ["hour", "key"]):
            fast = reports.usage_report(conn, group_by=group_by)
            assert fast == reports.usage_report(conn, group_by=group_by, use_rollups=False)
        assert Decimal(fast["totals"]["cost_usd"]) > 100 * 4_000_000
    finally:
        conn.close()


def test_the_hook_registers_its_sql_functions_once_per_connection(tmp_path: Path) -> None:
    """Registering a function makes SQLite prepare every statement again: once per batch, that cost more
    than the rest of a one-row batch."""
    registered: list[str] = []

    class Counting(sqlite3.Connection):
        def create_function(self, name: str, *args: Any, **kwargs: Any) -> None:
            registered.append(name)
            super().create_function(name, *args, **kwargs)

    conn = sqlite3.connect(tmp_path / "l.db", isolation_level=None, factory=Counting)
    try:
        migrate(conn)
        rng = random.Random(15)
        for n in range(20):
            rows = [record_row(random_call(rng, n))]
            in_tx(conn, lambda c, r: (c.executemany(INSERT_SQL, r), rollups.apply(c, r)), rows)
        assert registered == ["mp_decimal_add"]
    finally:
        conn.close()
    assert_exact(tmp_path / "l.db")


async def test_two_writers_on_one_ledger_keep_the_rollups_exact_and_current(ledger_target: str) -> None:
    """Two Ledgers (two replicas: a connection and a thread each) writing at once, in many small batches
    over the same hours and dimensions: every row counted once, covered_id still right at the end."""
    rng = random.Random(21)
    calls = [random_call(rng, n, span=6 * 3600) for n in range(1600)]
    ledgers = [Ledger(ledger_target, max_batch=rng.choice([3, 17])) for _ in range(2)]
    for ledger in ledgers:
        ledger.db.after_insert.append(rollups.apply)
        await ledger.open()
    try:
        for i in range(0, len(calls), 80):  # each wave split between the two, so their batches interleave
            wave = calls[i:i + 80]
            await asyncio.gather(*(ledgers[n % 2].record(c) for n, c in enumerate(wave)))
    finally:
        for ledger in ledgers:
            await ledger.close()
    assert sum(ledger.stats["rows_committed"] for ledger in ledgers) == len(calls)
    assert all(ledger.stats["spooled"] == 0 for ledger in ledgers)
    assert_exact(ledger_target)  # current (covered_id = max(id)) and equal to the raw rows' sums
