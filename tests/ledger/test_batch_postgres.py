"""A ledger batch on PostgreSQL: what its round trips ask, and that asking less never changes what it writes.

The hooks' questions (rollup state; is there any spend row or reservation) are statements prepared once per
connection and executed with BEGIN and the write lock (`db.TwoPhase`); settling skips its work when the
answer is "none"; covered_id reads only the primary key's edge."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from decimal import Decimal
from typing import Iterator

import pytest

from proxy.control.limits import Limits, Subject, period_of
from proxy.control.shared import SharedHold, SharedLimits
from proxy.core.record import CallRecord
from proxy.ledger import budget_store, rollups
from proxy.ledger.db import LedgerDB
from proxy.ledger.sqlconn import Conn, connect_postgres, pg_sql
from proxy.ledger.target import parse_target
from proxy.ledger.writer import record_row
from tests.support.ledger import assert_exact, random_call


@pytest.fixture
def db(pg_url: str) -> Iterator[LedgerDB]:
    ledger = LedgerDB(parse_target(pg_url), 5000)
    ledger.after_insert.extend([rollups.apply, budget_store.settle_rows])
    ledger.open()
    yield ledger
    ledger.close()


def team_row(request_id: str, cost: str) -> tuple[object, ...]:
    return record_row(CallRecord(request_id=request_id, started_at=time.time(), method="POST",
                                 endpoint="/v1/chat/completions", ended_at=time.time(), status=200,
                                 tags={"team": "ml"}, cost_usd=Decimal(cost), priced=True))


def test_covered_id_reads_the_primary_key_not_the_table(pg_url: str, db: LedgerDB) -> None:
    # The generic plan (what a prepared statement settles on) of the covered_id update, on a young ledger
    # (not analyzed yet, as in the first minutes of a deployment) and an analyzed one: before, `id > $1`
    # alone made it a sequential scan of calls at every batch, on a table that only grows.
    rng = random.Random(3)
    db.insert([record_row(random_call(rng, n)) for n in range(3000)])
    for analyzed in (False, True):
        plan = generic_plan(pg_url, analyzed)
        assert "calls_pkey" in plan, plan
        assert "Seq Scan on calls" not in plan, plan


def generic_plan(pg_url: str, analyzed: bool) -> str:
    conn = connect_postgres(parse_target(pg_url))
    try:
        if analyzed:
            conn.execute("ANALYZE calls")
        conn.begin()
        conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        conn.execute(f"PREPARE covered_probe AS {pg_sql(rollups.COVERED_SQL).replace('%s', '$1', 1)}"
                     .replace("%s", "$2", 1).replace("%s", "$3", 1))
        plan = "\n".join(r[0] for r in conn.execute("EXPLAIN EXECUTE covered_probe (14, 100, 15)"))
        conn.rollback()
    finally:
        conn.close()
    return plan


def test_a_batch_commits_after_its_prepared_statements_are_gone(pg_url: str, db: LedgerDB) -> None:
    # The batch's prepared questions dropped between two batches (a DEALLOCATE by anyone sharing the
    # session): the next batch prepares them again and commits, and the rollups stay exact.
    rng = random.Random(4)
    db.insert([record_row(random_call(rng, n)) for n in range(50)])
    raw = db._current().raw  # the write connection
    raw.execute("DEALLOCATE meterproxy_rollup_state")
    db.insert([record_row(random_call(rng, n)) for n in range(50, 100)])
    raw.execute("DEALLOCATE meterproxy_any_spend")
    db.insert([record_row(random_call(rng, n)) for n in range(100, 150)])
    assert raw.execute("SELECT count(*) FROM calls").fetchone()[0] == 150
    assert_exact(pg_url)


async def test_spend_rows_made_while_batches_skip_settling_are_exact(pg_url: str, db: LedgerDB) -> None:
    # No spend row and no reservation exist when the writer starts: its batches skip settling. Spend rows
    # are made (day, month, total) while it writes. Every row is in the made sum or added by a batch that
    # saw the row, never both, never neither — the skip is decided under the write lock.
    shared = SharedLimits(parse_target(pg_url), lease=60)
    await shared.open()
    stop = threading.Event()
    written: list[int] = []

    def write() -> None:
        n = 0
        while not stop.is_set():
            db.insert([team_row(f"w{n}-{i}", "0.001") for i in range(3)])
            n += 1
        written.append(n)

    thread = threading.Thread(target=write)
    thread.start()
    try:
        team = Subject("team", "ml")
        for period in ("day", "month", "total"):
            await asyncio.sleep(0.05)
            held = await shared.acquire(f"c-{period}", [(team, Limits(budget_usd=Decimal("1000"),
                                                                      budget_period=period))],
                                        0, Decimal(0), time.time())
            assert isinstance(held, SharedHold)
        await asyncio.sleep(0.05)
    finally:
        stop.set()
        thread.join()
        await shared.close()
    assert written[0] > 10
    conn: Conn = connect_postgres(parse_target(pg_url))
    try:
        total = Decimal(conn.execute("SELECT decimal_sum(cost_usd) FROM calls").fetchone()[0])
        spent = {}
        for period in ("day", "month", "total"):
            _, label = period_of(period, time.time())
            spent[period] = Decimal(conn.execute(
                "SELECT spent FROM budget_spend WHERE kind = 'team' AND name = 'ml' AND period = ? AND label = ?",
                (period, label)).fetchone()[0])
    finally:
        conn.close()
    assert spent == {"day": total, "month": total, "total": total}


def test_dimension_sets_are_added_and_found_in_one_statement(pg_url: str, db: LedgerDB) -> None:
    # New and existing sets at once, NULLs (a value: one id per set), text beyond ASCII, a status: each set
    # gets one id, the same whether it was there already or not, and a second call adds nothing.
    conn = db._current()
    first = [("k1", "gpt-4o", None, None, "/v1/chat/completions", 200, None),
             ("k1", None, "zoë ☃ 𝄞", "op", None, None, "ml")]
    more = [*first, (None, None, None, None, None, None, None), ("k2", "gpt-4o", "u", "op", "/v1/embeddings", 429, "t")]
    conn.begin()
    ids = rollups.dim_ids(conn, first)
    conn.commit()
    conn.begin()
    again = rollups.dim_ids(conn, list(reversed(more)), newest=None)
    conn.commit()
    assert {d: again[d] for d in first} == ids
    assert len(set(again.values())) == 4
    stored = {tuple(r[1:]): r[0] for r in conn.execute(
        'SELECT id, key_id, model, "user", operation, endpoint, status, team FROM rollup_dims')}
    assert stored == again
