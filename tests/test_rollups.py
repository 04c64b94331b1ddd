"""Rollups: kept exact by the ledger's hook, rebuilt exactly from calls, trusted only while current."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import time
from calendar import timegm
from decimal import Context, Decimal, Inexact
from pathlib import Path
from typing import Any

import pytest

from proxy.core.record import CallRecord
from proxy.ledger import picodollars, rollups
from proxy.ledger.db import LedgerDB
from proxy.ledger.migrations import MIGRATIONS, _apply, migrate
from proxy.ledger.writer import INSERT_SQL, Ledger, LedgerError, record_row

T0 = float(timegm((2026, 1, 27, 0, 0, 0)))  # a span over two month ends
SPAN = 40 * 86400
DAY = 86400
EXACT = Context(prec=200, traps=[Inexact])  # the default 28 digits would round these sums


def random_call(rng: random.Random, n: int, start: float = T0, span: float = SPAN) -> CallRecord:
    """A call with every dimension varied, None and "" included, and costs of every shape."""
    status = rng.choice([200, 200, 200, 201, 429, 500, 499, 0])
    prompt, completion = rng.randrange(0, 5000), rng.randrange(0, 800)
    cost = rng.choice([
        Decimal(0), Decimal(rng.randrange(10**6)).scaleb(-rng.randrange(0, 11)),
        Decimal(rng.randrange(1, 10**9)).scaleb(-rng.randrange(13, 20)),  # beyond picodollars
        Decimal("123456789012.5"), Decimal("0.10"),
    ])  # fmt: skip
    tags = rng.choice([{}, {"team": "search"}, {"team": "ads", "env": "prod"}, {"team": ""}, {"env": "x"}])
    return CallRecord(
        request_id=f"r{n}", started_at=start + rng.random() * span, method="POST",
        endpoint=rng.choice(["/v1/chat/completions", "/v1/embeddings", "/v1/responses"]),
        key_id=rng.choice(["k1", "k2", "k3", None]), user=rng.choice(["alice", "bob", "", None]),
        operation=rng.choice(["chat", "summarise", None]), model=rng.choice(["gpt-4o", "gpt-4o-mini", "x", None]),
        tags=tags, status=status, prompt_tokens=prompt, completion_tokens=completion,
        cached_tokens=prompt // 3, reasoning_tokens=completion // 4, total_tokens=prompt + completion,
        usage_source=rng.choice(["upstream", "counted", "none"]), priced=rng.random() > 0.1, cost_usd=cost,
    )  # fmt: skip


async def write_through_ledger(path: Path, calls: list[CallRecord], rng: random.Random) -> None:
    """Through a real Ledger with the hook, in waves of random size, so batches vary."""
    ledger = Ledger(path, max_batch=rng.choice([7, 64, 500]))
    ledger.db.after_insert.append(rollups.apply)
    await ledger.open()
    try:
        i = 0
        while i < len(calls):
            wave = calls[i:i + rng.randrange(1, 300)]
            await asyncio.gather(*(ledger.record(c) for c in wave))
            i += len(wave)
    finally:
        await ledger.close()


def expected_rollups(conn: sqlite3.Connection, days_until: int | None,
                     projected_until: int | None = None) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    """Rollups computed in Python from every call row, independently of rollups.py: day and month rows
    before `days_until`, each dimension's own rows for hours before `projected_until` (default: the same)
    and for those days and months."""
    own_until = days_until if projected_until is None else projected_until
    sums: dict[tuple[Any, ...], list[Any]] = {}
    sql = ('SELECT started_at, key_id, model, "user", operation, endpoint, status, tags, priced, usage_source, '
           "prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, total_tokens, cost_usd FROM calls")
    for row in conn.execute(sql):
        started, *dims6, tags, priced, source, p, c, ca, r, t, cost = row
        dims = (*dims6, json.loads(tags).get("team"))
        hour = int(started) // 3600 * 3600
        day = hour - hour % DAY
        month = timegm((*time.gmtime(day)[:2], 1, 0, 0, 0))
        keys = [("hour", hour)]
        if days_until is not None and day < days_until:
            keys += [("day", day), ("month", month)]
        counted = source == "counted"
        add = [1, not 200 <= row[6] <= 299, not priced, p, c, ca, r, t, counted, t if counted else 0]
        for grain, bucket in keys:
            # "*": the bucket's totals over every dimension set; ("own", dim, value): a dimension's own
            # rows, for hours before own_until and the days and months before days_until.
            has_own = own_until is not None and (hour < own_until if grain == "hour" else True)
            own = [("own", name, value) for name, value in zip(rollups.DIMS, dims)] if has_own else []
            for of in (dims, "*", *own):
                acc = sums.setdefault((grain, bucket, of), [[0] * 10, Decimal(0)])
                acc[0] = [a + b for a, b in zip(acc[0], add)]
                acc[1] = EXACT.add(acc[1], Decimal(cost))
    return {k: (*map(int, v[0]), format(v[1], "f")) for k, v in sums.items()}


def actual_rollups(conn: sqlite3.Connection) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    names = {0: "hour", 1: "day", 2: "month", 3: "hour", 4: "day", 5: "month"}
    out = {}
    sql = (f"SELECT r.grain, r.bucket, d.key_id, d.model, d.\"user\", d.operation, d.endpoint, d.status, d.team, "
           f"{', '.join('r.' + c for c in rollups.INT_COUNTERS)}, r.cost_usd, r.cost_pico, r.cost_exp, "
           "r.dim_id FROM rollups r LEFT JOIN rollup_dims d ON d.id = r.dim_id")
    for row in conn.execute(sql):
        grain, bucket, *rest = row
        dims, ints, (cost, pico, exp, dim_id) = tuple(rest[:7]), tuple(rest[7:17]), rest[17:]
        if grain >= rollups.PROJECTED:
            index = grain // rollups.PROJECTED - 1
            assert dims == rollups.projection_dims(index, dims[index])  # the others are NULL
            dims = ("own", rollups.DIMS[index], dims[index])
            grain %= rollups.PROJECTED
            assert grain in (rollups.HOUR, rollups.DAY, rollups.MONTH)
        elif grain >= rollups.TOTALS:
            assert dim_id == rollups.SERIES
            dims = "*"
        if pico is not None:  # the integer form, when present, says exactly what the text says
            assert format(rollups.from_pico(pico, exp), "f") == cost
        assert (names[grain], bucket, dims) not in out
        out[(names[grain], bucket, dims)] = (*ints, cost)
    return out


def assert_exact(path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        state = rollups.read_state(conn)
        assert state.current
        expected = expected_rollups(conn, state.days_until, state.projected_until)
        actual = actual_rollups(conn)
        assert actual.keys() == expected.keys()
        wrong = {k: (actual[k], expected[k]) for k in expected if actual[k] != expected[k]}
        assert not wrong, repr(list(wrong.items())[:3])
    finally:
        conn.close()


def writer(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    rollups.register_functions(conn)
    return conn


def in_tx(conn: sqlite3.Connection, fn: Any, *args: Any) -> Any:
    conn.execute("BEGIN IMMEDIATE")
    result = fn(conn, *args)
    conn.execute("COMMIT")
    return result


@pytest.mark.parametrize("seed", [1, 2])
async def test_hook_keeps_every_rollup_equal_to_a_group_by_over_calls(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    path = tmp_path / "ledger.db"
    calls = [random_call(rng, n) for n in range(3000)]
    await write_through_ledger(path, calls[:2000], rng)
    assert_exact(path)  # hours only: no day has been rolled up yet
    conn = writer(path)
    try:
        in_tx(conn, rollups.roll_days, T0 + 20 * DAY)  # days and months for the first 20 days
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


async def test_rebuild_gives_exactly_what_the_hook_gave(tmp_path: Path) -> None:
    rng = random.Random(3)
    path = tmp_path / "ledger.db"
    await write_through_ledger(path, [random_call(rng, n) for n in range(1500)], rng)
    conn = writer(path)
    try:
        in_tx(conn, rollups.roll_days, T0 + 30 * DAY)
        before = actual_rollups(conn)
        in_tx(conn, rollups.rebuild)
        assert actual_rollups(conn) == before
        in_tx(conn, rollups.rebuild, T0 + 5 * DAY + 1234.5, T0 + 9 * DAY)  # a range, cut mid-hour
        assert actual_rollups(conn) == before
    finally:
        conn.close()
    assert_exact(path)


async def test_rows_written_without_the_hook_make_rollups_not_current_until_ensure(tmp_path: Path) -> None:
    rng = random.Random(4)
    path = tmp_path / "ledger.db"
    await write_through_ledger(path, [random_call(rng, n) for n in range(300)], rng)
    conn = writer(path)
    try:
        assert rollups.read_state(conn).current
        conn.executemany(INSERT_SQL, [record_row(random_call(rng, n)) for n in range(300, 310)])
        assert not rollups.read_state(conn).current
        assert rollups.ensure(conn, until=T0 + SPAN) is True
        assert rollups.read_state(conn).current
        assert rollups.ensure(conn, until=T0 + SPAN) is False  # nothing to do the second time
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
        assert rollups.make_current(conn) is True
        assert rollups.read_state(conn).current
        assert conn.execute("SELECT count(*) FROM rollups").fetchone()[0] == 0
        hours = conn.execute("SELECT count(DISTINCT CAST(started_at AS INTEGER) / 3600) FROM calls").fetchone()[0]
        assert conn.execute("SELECT count(*) FROM rollup_dirty").fetchone()[0] == hours
        rollups.ensure(conn, until=T0 + SPAN)  # what the upkeep does, an hour or a day per transaction
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
        migrate(conn)
        rng = random.Random(9)
        rows = [record_row(random_call(rng, n)) for n in range(100)]
        in_tx(conn, lambda c, r: (c.executemany(INSERT_SQL, r), rollups.apply(c, r)), rows)
        conn.execute("UPDATE calls SET cost_usd = '1.5', original_cost_usd = cost_usd WHERE id IN (3, 4)")
        conn.execute("UPDATE calls SET pricing_version = 'v2' WHERE id = 5")  # changes no counter: not dirty
        hours = {int(s) // 3600 * 3600 for (s,) in conn.execute("SELECT started_at FROM calls WHERE id IN (3, 4)")}
        assert {h for (h,) in conn.execute("SELECT hour FROM rollup_dirty")} == hours
        assert in_tx(conn, rollups.rebuild_dirty) == len(hours)
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
        rollups.ensure(conn, until=T0 + 20 * DAY)
        report = reprice(conn, table, model="x", since=T0 + 3 * DAY, after=rollups.after_reprice)
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
        rollups.ensure(conn, until=T0 + DAY)  # the second day is read by the hour: sums of fitting rows
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
