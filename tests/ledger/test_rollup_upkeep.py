"""Rollup upkeep: each dimension's own rows, the upgrade to them, and rebuilding without blocking the writer.

Every check compares reports through the rollups with reports over `calls` alone, or the rollups with
sums computed in Python from every call (tests/test_rollups.py), at each step.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from proxy.ledger import rollup_build, rollups
from proxy.ledger.migrations import MIGRATIONS, migrate
from proxy.ledger.rollup_build import in_transaction
from proxy.ledger.writer import INSERT_SQL, record_row
from proxy.reports import queries as reports
from tests.support.ledger import DAY, T0, assert_exact, random_call, write_through_ledger, writer

GROUPINGS = [[], ["key"], ["model"], ["user"], ["tag:team"], ["status"], ["week", "model"], ["day", "key"],
             ["hour", "operation"], ["month", "endpoint"], ["user", "model"], ["day"]]  # fmt: skip
FILTERS: list[dict[str, str]] = [{}, {"key": "k2"}, {"model": "gpt-4o"}, {"key": "k1", "user": "bob"}]


def same_reports(path: Path, tz: str | None = None, since: float | None = None, until: float | None = None,
                 groupings: list[list[str]] = GROUPINGS, filters_list: list[dict[str, str]] = FILTERS) -> None:
    conn = reports.connect_readonly(path)
    try:
        for group_by in groupings:
            for filters in filters_list:
                args: dict[str, Any] = {"group_by": group_by, "tz": tz, "since": since, "until": until, **filters}
                fast = reports.usage_report(conn, **args)
                assert fast == reports.usage_report(conn, use_rollups=False, **args), args
    finally:
        conn.close()


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3,000 calls over 40 days, the first 30 rolled up (with each dimension's own rows)."""
    import asyncio

    from tests.support.ledger import build

    return asyncio.run(build(tmp_path_factory.mktemp("upkeep"), n=3000, seed=21, days=30))


def copy(ledger: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy.db"
    shutil.copyfile(ledger, target)
    return target


@pytest.mark.parametrize("tz", [None, "Europe/Berlin", "Asia/Kolkata"])
def test_reports_by_one_dimension_read_its_own_rows(ledger: Path, tmp_path: Path, tz: str | None) -> None:
    """With the full dimension sets of finished days zeroed, reports by one dimension still give the
    answer over calls (they read the dimension's own rows); reports by two do not (the zeroing bites)."""
    path = copy(ledger, tmp_path)
    conn = writer(path)
    try:
        conn.execute(f"UPDATE rollups SET calls = 0 WHERE grain IN ({rollups.HOUR}, {rollups.DAY}, {rollups.MONTH}) "
                     "AND bucket < ?", (T0 + 30 * DAY,))
    finally:
        conn.close()
    finished = (T0 + 2 * DAY, T0 + 29 * DAY)
    same_reports(path, tz, *finished, groupings=[["model"], ["week", "model"], ["hour", "user"], ["month", "tag:team"]],
                 filters_list=[{}])
    same_reports(path, tz, *finished, groupings=[[], ["key"], ["day", "key"]], filters_list=[{"key": "k2"}])
    conn = reports.connect_readonly(path)
    try:
        args: dict[str, Any] = {"group_by": ["user", "model"], "tz": tz, "since": finished[0], "until": finished[1]}
        assert reports.usage_report(conn, **args) != reports.usage_report(conn, use_rollups=False, **args)
    finally:
        conn.close()


def test_a_dimension_and_a_filter_on_another_read_the_full_sets(ledger: Path) -> None:
    same_reports(ledger, None, T0 + DAY, T0 + 35 * DAY)  # with FILTERS on other dimensions


def test_late_calls_for_finished_days_reach_their_own_rows_too(ledger: Path, tmp_path: Path) -> None:
    import asyncio

    path = copy(ledger, tmp_path)
    rng = random.Random(22)
    late = [random_call(rng, n, start=T0, span=30 * DAY) for n in range(5000, 5400)]
    asyncio.run(write_through_ledger(path, late, rng))
    assert_exact(path)
    same_reports(path, "Europe/Berlin")


def test_hours_given_their_own_rows_ahead_of_their_day_stay_exact(ledger: Path, tmp_path: Path) -> None:
    """project_hours runs ahead of roll_days (a few hours per transaction); calls arriving late for those
    hours reach their own rows through the hook, and rolling the day up later uses them."""
    import asyncio

    path = copy(ledger, tmp_path)
    conn = writer(path)
    try:
        assert in_transaction(conn, lambda: rollup_build.project_hours(conn, T0 + 33 * DAY, max_hours=30)) == 30
        assert in_transaction(conn, lambda: rollup_build.project_hours(conn, T0 + 33 * DAY, max_hours=100)) == 42
        assert in_transaction(conn, lambda: rollup_build.project_hours(conn, T0 + 33 * DAY)) == 0
        state = rollups.read_state(conn)
        assert (state.days_until, state.projected_until) == (T0 + 30 * DAY, T0 + 33 * DAY)
    finally:
        conn.close()
    assert_exact(path)
    rng = random.Random(25)
    asyncio.run(write_through_ledger(path, [random_call(rng, n, start=T0 + 29 * DAY, span=5 * DAY)
                                            for n in range(7000, 7300)], rng))
    assert_exact(path)
    same_reports(path, None, T0 + 30 * DAY, T0 + 33 * DAY, groupings=[["model"], ["hour", "key"]], filters_list=[{}])
    conn = writer(path)
    try:
        assert in_transaction(conn, lambda: rollup_build.roll_days(conn, T0 + 34 * DAY)) == 4
        assert rollups.read_state(conn).projected_until == T0 + 34 * DAY
    finally:
        conn.close()
    assert_exact(path)
    same_reports(path, "Europe/Berlin")


def as_version_5(path: Path) -> None:
    """What a ledger rolled up before migration 6 holds: day and month rows, no dimension's own rows."""
    conn = writer(path)
    try:
        conn.execute("DELETE FROM rollups WHERE grain >= ?", (rollups.PROJECTED,))
        conn.execute("ALTER TABLE rollup_state DROP COLUMN projected_until")
        conn.execute("ALTER TABLE rollup_state DROP COLUMN views")  # migration 9's, and its table
        conn.execute("DROP TABLE rollup_views")
        for column in ("routes", "organization", "project"):  # migration 7's, which version 5 had not either
            conn.execute(f"ALTER TABLE api_keys DROP COLUMN {column}")
        conn.execute("PRAGMA user_version = 5")
    finally:
        conn.close()


def test_upgrading_to_migration_6_reads_hours_until_the_days_are_rolled_up_again(ledger: Path,
                                                                                 tmp_path: Path) -> None:
    path = copy(ledger, tmp_path)
    as_version_5(path)
    same_reports(path, "Europe/Berlin")  # read as it is (reports never migrate): day rows, no own rows
    conn = writer(path)
    try:
        assert migrate(conn.raw) == len(MIGRATIONS)
        assert rollups.read_state(conn).days_until is None
        assert conn.execute("SELECT count(*) FROM rollups WHERE grain NOT IN (0, 3)").fetchone()[0] == 0
    finally:
        conn.close()
    same_reports(path, "Europe/Berlin")  # from hours alone: slower, the same
    conn = writer(path)
    try:
        days = 0
        while in_transaction(conn, lambda: rollup_build.roll_days(conn, T0 + 30 * DAY, max_days=1)):
            days += 1
            if days in (1, 14):
                same_reports(path, None, groupings=[["model"], ["week", "key"], ["month", "user"]])
        assert days >= 30
    finally:
        conn.close()
    assert_exact(path)
    same_reports(path)


def test_rows_written_without_the_hook_are_marked_not_rebuilt_at_once(ledger: Path, tmp_path: Path) -> None:
    """make_current is one short transaction: it marks hours dirty; reports stay right while the upkeep
    rebuilds them an hour at a time, and the days are rolled up again once their last hour is."""
    path = copy(ledger, tmp_path)
    rng = random.Random(23)
    conn = writer(path)
    try:
        conn.executemany(INSERT_SQL, [record_row(random_call(rng, n)) for n in range(9000, 9200)])
        assert not rollups.read_state(conn).current
        hour_rows = conn.execute("SELECT count(*) FROM rollups WHERE grain = 0").fetchone()[0]
        assert rollup_build.make_current(conn) is True
        state = rollups.read_state(conn)
        assert state.current
        dirty = conn.execute("SELECT count(*) FROM rollup_dirty").fetchone()[0]
        with_calls = conn.execute("SELECT count(DISTINCT CAST(started_at AS INTEGER) / 3600) FROM calls").fetchone()[0]
        assert dirty == with_calls  # every hour holding a call, nothing rebuilt yet
        assert conn.execute("SELECT count(*) FROM rollups WHERE grain = 0").fetchone()[0] == hour_rows
        assert rollup_build.make_current(conn) is False
    finally:
        conn.close()
    same_reports(path, "Asia/Kolkata")
    conn = writer(path)
    try:
        steps = 0
        while in_transaction(conn, lambda: rollup_build.rebuild_dirty(conn, max_hours=7)):
            steps += 1
            if steps % 40 == 1:  # days with dirty hours left are read from hours; clean ones from day rows
                same_reports(path, "Europe/Berlin", groupings=[["key"], ["day", "model"], ["month"]])
        assert steps > 40
    finally:
        conn.close()
    assert_exact(path)


def test_the_proxy_starts_on_a_stale_ledger_at_once_and_says_so(
        ledger: Path, tmp_path: Path, start_proxy: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Rows written without the hook: the proxy marks their hours (no rebuild before serving), logs it, and
    its upkeep rebuilds them in the background; reports are right all along."""
    import time

    path = copy(ledger, tmp_path)
    rng = random.Random(26)
    conn = writer(path)
    try:
        conn.executemany(INSERT_SQL, [record_row(random_call(rng, n)) for n in range(9500, 9600)])
    finally:
        conn.close()
    with caplog.at_level("WARNING", logger="meterproxy"):
        start_proxy(db=str(path))
    assert any("written without rollups" in r.getMessage() for r in caplog.records)
    def dirty() -> int:
        conn = writer(path)
        try:
            return int(conn.execute("SELECT count(*) FROM rollup_dirty").fetchone()[0])
        finally:
            conn.close()

    marked = dirty()
    assert marked > 500  # every hour holding a call (40 days of them), none rebuilt before serving
    same_reports(path, None, groupings=[["model"], ["day", "key"]], filters_list=[{}])
    for _ in range(100):  # the upkeep works through them in the background, paced
        if dirty() < marked - 10:
            break
        time.sleep(0.1)
    assert dirty() < marked - 10
    same_reports(path, "Europe/Berlin", groupings=[["model"], ["day", "key"]], filters_list=[{}])
