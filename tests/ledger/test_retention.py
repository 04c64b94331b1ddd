"""Retention: old call rows deleted in bounded batches at whole hours, rollups kept, reports still answer."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.core.times import iso
from proxy.ledger import retention, rollup_build, rollups
from proxy.ledger.migrations import MIGRATIONS, _apply
from proxy.ledger.rollup_build import in_transaction
from proxy.ledger.writer import INSERT_SQL, record_row
from proxy.reports import queries as reports
from tests.support.ledger import (
    DAY,
    T0,
    actual_rollups,
    assert_exact,
    build,
    expected_rollups,
    plain_writer,
    random_call,
    write_through_ledger,
)

CUTOFF = T0 + 30 * DAY + 1234.5  # mid-hour: pruning stops at the hour below it
HOUR_CUT = int(CUTOFF) // 3600 * 3600


def report(path: Path, **kwargs: Any) -> dict[str, Any]:
    conn = reports.connect_readonly(path)
    try:
        return reports.usage_report(conn, **kwargs)
    finally:
        conn.close()


GROUPINGS = [[], ["key", "model"], ["user", "day"], ["month", "tag:team"], ["hour", "status"], ["week"]]


async def test_prune_deletes_whole_hours_in_batches_and_reports_still_answer(tmp_path: Path) -> None:
    path = await build(tmp_path)
    before = {(tuple(g), tz): report(path, group_by=g, tz=tz) for g in GROUPINGS for tz in (None, "Europe/Berlin")}
    kolkata = report(path, group_by=["day"], tz="Asia/Kolkata")
    conn = plain_writer(path)
    try:
        old = conn.execute("SELECT count(*) FROM calls WHERE started_at < ?", (HOUR_CUT,)).fetchone()[0]
        kept = conn.execute("SELECT count(*) FROM calls WHERE started_at >= ?", (HOUR_CUT,)).fetchone()[0]
        roll = actual_rollups(conn)
        statements: list[str] = []
        conn.raw.set_trace_callback(statements.append)
        assert retention.prune(conn, CUTOFF, batch_size=100) == old
        conn.raw.set_trace_callback(None)
        assert sum(s.startswith("DELETE FROM calls") for s in statements) == old // 100 + 1
        assert conn.execute("SELECT count(*) FROM calls").fetchone()[0] == kept
        assert conn.execute("SELECT min(started_at) FROM calls").fetchone()[0] >= HOUR_CUT
        assert actual_rollups(conn) == roll  # not one rollup changed
        state = rollups.read_state(conn)
        assert state.pruned_before == HOUR_CUT and state.current
        assert retention.prune(conn, CUTOFF) == 0  # nothing left to do
    finally:
        conn.close()
    for (group_by, tz), was in before.items():
        now = report(path, group_by=list(group_by), tz=tz)
        assert now.pop("pruned_before") == iso(HOUR_CUT)
        assert now == was, (group_by, tz)
    # A zone whose day boundaries cut UTC hours: the pruned period's cut hours count, whole, in the local
    # day they start in. Totals stay exact; a day's figure may shift by that hour.
    assert report(path, group_by=["day"], tz="Asia/Kolkata")["totals"] == kolkata["totals"]


async def test_a_stopped_prune_leaves_everything_as_it_was(tmp_path: Path, ledger_target: str) -> None:
    import threading

    path = await build(tmp_path, n=500, db=ledger_target)
    conn = plain_writer(path)
    try:
        conn.execute("UPDATE calls SET cost_usd = '1' WHERE id % 7 = 0")  # dirty hours before the cutoff
        stop = threading.Event()
        stop.set()
        assert retention.prune(conn, CUTOFF, stop=stop) == 0
        assert rollups.read_state(conn).pruned_before is None
        assert conn.execute("SELECT count(*) FROM calls").fetchone()[0] == 500
        assert conn.execute("SELECT count(*) FROM rollup_dirty").fetchone()[0] > 0
    finally:
        conn.close()


async def test_pruned_period_answers_from_rollups_for_whole_hours(tmp_path: Path) -> None:
    path = await build(tmp_path)
    span = {"since": T0 + 2 * DAY + 3600, "until": float(HOUR_CUT)}
    was = report(path, group_by=["key", "day"], **span)
    conn = plain_writer(path)
    retention.prune(conn, CUTOFF)
    conn.close()
    now = report(path, group_by=["key", "day"], **span)
    assert now.pop("pruned_before") == iso(HOUR_CUT)
    assert now == was


async def test_groups_the_rollups_do_not_hold_lose_their_detail_in_the_pruned_period(tmp_path: Path) -> None:
    path = await build(tmp_path)
    conn = plain_writer(path)
    try:
        pruned = dict(conn.execute("SELECT coalesce(session, '-'), count(*) FROM calls WHERE started_at < ? "
                                   "GROUP BY 1", (HOUR_CUT,)).fetchall())
        conn.execute("UPDATE calls SET session = 's1' WHERE id % 2 = 0")  # some detail that will be lost
        in_old = conn.execute("SELECT count(*) FROM calls WHERE session = 's1' AND started_at < ?",
                              (HOUR_CUT,)).fetchone()[0]
        rollup_build.rebuild_dirty(conn, max_hours=10_000)
    finally:
        conn.close()
    was = report(path, group_by=["session"])
    conn = plain_writer(path)
    retention.prune(conn, CUTOFF)
    conn.close()
    now = report(path, group_by=["session"])
    assert now["totals"] == was["totals"]  # every call still counted
    by_session = {r["session"]: r["calls"] for r in now["rows"]}
    was_by = {r["session"]: r["calls"] for r in was["rows"]}
    assert by_session["s1"] == was_by["s1"] - in_old  # the pruned ones read as "no session"
    assert by_session[None] == was_by[None] + in_old
    assert sum(pruned.values()) > in_old > 0


async def test_dirty_hours_are_rebuilt_before_their_calls_go(tmp_path: Path, ledger_target: str) -> None:
    path = await build(tmp_path, db=ledger_target)
    conn = plain_writer(path)
    try:
        conn.execute("UPDATE calls SET cost_usd = '3.5' WHERE id % 5 = 0 AND started_at < ?", (HOUR_CUT,))
        assert conn.execute("SELECT count(*) FROM rollup_dirty").fetchone()[0] > 0
        expected = expected_rollups(conn, rollups.read_state(conn).days_until, rollups.read_state(conn).projected_until)
        retention.prune(conn, CUTOFF)
        assert actual_rollups(conn) == expected
        assert conn.execute("SELECT count(*) FROM rollup_dirty").fetchone()[0] == 0
    finally:
        conn.close()


async def test_rows_written_without_the_hook_are_rolled_up_before_pruning(tmp_path: Path, ledger_target: str) -> None:
    path = await build(tmp_path, db=ledger_target)
    rng = random.Random(12)
    conn = plain_writer(path)
    try:
        conn.executemany(INSERT_SQL, [record_row(random_call(rng, n)) for n in range(10_000, 10_100)])
        assert not rollups.read_state(conn).current
        expected = expected_rollups(conn, rollups.read_state(conn).days_until, rollups.read_state(conn).projected_until)
        retention.prune(conn, CUTOFF)
        # The hours losing their calls were rebuilt first; later ones wait, marked, for the upkeep.
        left = [h for (h,) in conn.execute("SELECT hour FROM rollup_dirty")]
        assert left and min(left) >= int(CUTOFF) // 3600 * 3600
        in_transaction(conn, lambda: rollup_build.rebuild_dirty(conn, max_hours=None))
        assert actual_rollups(conn) == expected
    finally:
        conn.close()


async def test_pruning_everything_and_writing_again_keeps_rollups_current(tmp_path: Path, ledger_target: str) -> None:
    path = await build(tmp_path, n=300, db=ledger_target)
    conn = plain_writer(path)
    try:
        retention.prune(conn, T0 + 400 * DAY)
        assert conn.execute("SELECT count(*) FROM calls").fetchone()[0] == 0
        assert rollups.read_state(conn).current
    finally:
        conn.close()
    rng = random.Random(13)
    await write_through_ledger(path, [random_call(rng, n, start=T0 + 401 * DAY) for n in range(50)], rng)
    conn = plain_writer(path)
    try:
        assert rollups.read_state(conn).current  # ids started again at 1, and the hook kept count
    finally:
        conn.close()


def test_a_ledger_without_rollups_is_not_pruned(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = plain_writer(path)
    try:
        for number, migration in enumerate(MIGRATIONS[:4], start=1):
            _apply(conn.raw, number, migration)
        with pytest.raises(retention.RetentionError, match="no rollups"):
            retention.prune(conn, CUTOFF)
    finally:
        conn.close()


async def test_retention_task_rolls_days_up_prunes_and_stops(tmp_path: Path, ledger_target: str) -> None:
    path = await build(tmp_path, db=ledger_target)
    conn = plain_writer(path)
    conn.execute("UPDATE rollup_state SET days_until = ?", (int(T0 + 10 * DAY),))
    conn.execute("UPDATE calls SET cost_usd = '2' WHERE id = 7")  # a dirty hour for the task to rebuild
    conn.close()
    now = CUTOFF + 5 * DAY
    task = retention.RetentionTask(str(path), retention_days=5, interval=3600, batch_size=200, clock=lambda: now,
                                   gap=0)
    task.start()
    for _ in range(200):
        if task.runs:
            break
        await asyncio.sleep(0.05)
    await asyncio.wait_for(task.stop(), 5)
    assert task.runs == 1
    assert task.last["pruned"] > 0 and task.last["dirty_rebuilt"] == 1
    assert task.last["days_rolled"] == (int(now) // DAY * DAY - int(T0 + 10 * DAY)) // DAY
    conn = plain_writer(path)
    try:
        assert rollups.read_state(conn).pruned_before == HOUR_CUT
    finally:
        conn.close()
    assert_exact_after_prune(path)


def assert_exact_after_prune(path: Path | str) -> None:
    conn = plain_writer(path)
    try:
        state = rollups.read_state(conn)
        assert state.current and not conn.execute("SELECT 1 FROM rollup_dirty").fetchone()
    finally:
        conn.close()


async def test_retention_task_without_retention_keeps_every_call(tmp_path: Path) -> None:
    path = await build(tmp_path, n=200)
    task = retention.RetentionTask(str(path), retention_days=None, interval=0.01, gap=0)
    task.start()
    # Each run does real upkeep on the real clock: on a loaded machine two runs can take seconds.
    deadline = time.monotonic() + 60
    while task.runs < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await task.stop()
    assert task.runs >= 2 and task.last["pruned"] == 0
    assert_exact(path)


async def test_the_upkeep_leaves_the_ledger_writer_its_turns(tmp_path: Path) -> None:
    """Many short upkeep transactions (each hour's own rows, each day rolled up) while another connection
    writes with a short busy timeout: paced, the writer is never refused. (With gap=0, back to back, it
    was refused in every one of 7 runs: its busy handler's retries landed inside the next transaction.)"""
    import threading

    path = await build(tmp_path, n=300)
    conn = plain_writer(path)
    conn.execute("UPDATE rollup_state SET days_until = NULL, projected_until = NULL")
    conn.execute("DELETE FROM rollups WHERE grain NOT IN (0, 3)")
    conn.close()
    task = retention.RetentionTask(str(path), retention_days=None, clock=lambda: T0 + 25 * DAY, gap=0.02)
    refused: list[str] = []
    wrote = 0
    done = threading.Event()

    def write() -> None:
        nonlocal wrote
        other = sqlite3.connect(path, timeout=0.25, isolation_level=None)
        try:
            while not done.is_set():
                try:
                    other.execute("BEGIN IMMEDIATE")
                    other.execute("COMMIT")
                    wrote += 1
                except sqlite3.OperationalError as exc:
                    refused.append(str(exc))
                time.sleep(0.005)
        finally:
            other.close()

    thread = threading.Thread(target=write)
    thread.start()
    try:
        result = await task.run_once()
    finally:
        done.set()
        thread.join()
    assert result["days_rolled"] == 25
    assert wrote > 20 and refused == []
    assert_exact(path)


@pytest.mark.parametrize("days", [0, -1])
def test_retention_days_must_be_positive(days: float) -> None:
    with pytest.raises(ValueError):
        retention.RetentionTask("x.db", retention_days=days)
