"""The ledger writer: exact round trips, commit-before-return, group commit, failures, migrations."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from proxy.core.record import CallRecord
from proxy.ledger.migrations import MIGRATIONS, Migration, MigrationError, _apply, migrate
from proxy.ledger.writer import Ledger, LedgerError
from tests.support import ledger_rows
from tests.support.ledger import connect


def make_record(n: int = 0, **fields: object) -> CallRecord:
    values: dict[str, object] = {
        "request_id": f"req-{n}",
        "started_at": 1795000000.0 + n,
        "method": "POST",
        "endpoint": "/v1/chat/completions",
    }
    values.update(fields)
    return CallRecord(**values)  # type: ignore[arg-type]


def read_rows(path: Path | str) -> dict[str, dict[str, Any]]:
    """The ledger's rows by request_id, through a connection of the test's own (either backend; money as
    the exact text SQLite holds, NUMERIC formatted the same)."""
    rows = ledger_rows(str(path))
    return {row["request_id"]: {k: format(v, "f") if isinstance(v, Decimal) else v for k, v in row.items()}
            for row in rows}


@pytest.fixture
async def ledger(tmp_path: Path):
    led = Ledger(tmp_path / "ledger.db")
    await led.open()
    yield led
    await led.close()


@pytest.fixture
async def any_ledger(ledger_target: str):
    """A Ledger on each backend: a SQLite file, then a PostgreSQL schema."""
    led = Ledger(ledger_target)
    await led.open()
    yield led
    await led.close()


FULL = make_record(
    1,
    ended_at=1795000001.25,
    key_id="key_7f3a",
    key_hint="sk-...9xQz",
    user="alice",
    session="sess-42",
    operation="summarise",
    tags={"team": "search", "env": "prod", "ünï": "cödé"},
    requested_model="gpt-4o",
    model="gpt-4o-2024-08-06",
    stream=True,
    status=200,
    latency_ms=1250.5,
    ttfb_ms=180.25,
    prompt_tokens=1200,
    completion_tokens=350,
    cached_tokens=1024,
    reasoning_tokens=64,
    total_tokens=1550,
    usage_source="upstream",
    priced=True,
    cost_usd=Decimal("0.0061400"),
)


async def test_full_record_round_trips_exactly(any_ledger: Ledger) -> None:
    await any_ledger.record(FULL)
    row = read_rows(any_ledger.target.where)["req-1"]
    assert row["tags"] == '{"env":"prod","team":"search","ünï":"cödé"}'
    assert json.loads(row["tags"]) == FULL.tags
    assert (row["stream"], row["priced"]) == (1, 1)
    assert row["cost_usd"] == "0.0061400" and Decimal(row["cost_usd"]) == FULL.cost_usd
    for name in ("started_at", "ended_at", "key_id", "key_hint", "user", "session", "operation",
                 "method", "endpoint", "requested_model", "model", "status", "error", "latency_ms",
                 "ttfb_ms", "prompt_tokens", "completion_tokens", "cached_tokens",
                 "reasoning_tokens", "total_tokens", "usage_source"):  # fmt: skip
        assert row[name] == getattr(FULL, name), name


async def test_defaults_round_trip(any_ledger: Ledger) -> None:
    await any_ledger.record(make_record(2, status=502, error="upstream reset"))
    row = read_rows(any_ledger.target.where)["req-2"]
    assert row["tags"] == "{}"
    assert (row["stream"], row["priced"], row["usage_source"]) == (0, 0, "none")
    assert (row["key_id"], row["user"], row["ttfb_ms"]) == (None, None, None)
    assert (row["status"], row["error"], row["cost_usd"]) == (502, "upstream reset", "0")


@pytest.mark.parametrize(
    ("cost", "stored"),
    [
        (Decimal("0.1"), "0.1"),
        (Decimal("1E-12"), "0.000000000001"),
        (Decimal("2.5E+3"), "2500"),
        (Decimal("0.000002500000"), "0.000002500000"),
        (Decimal("123456789.123456789123456789"), "123456789.123456789123456789"),
    ],
)
async def test_cost_is_stored_as_plain_exact_decimal(any_ledger: Ledger, cost: Decimal, stored: str) -> None:
    await any_ledger.record(make_record(3, cost_usd=cost))
    assert read_rows(any_ledger.target.where)["req-3"]["cost_usd"] == stored


@pytest.mark.parametrize("cost", [0.1, Decimal("NaN"), Decimal("Infinity")])
async def test_cost_that_is_not_a_finite_decimal_is_refused(any_ledger: Ledger, cost: object) -> None:
    with pytest.raises(LedgerError, match="cost_usd"):
        await any_ledger.record(make_record(4, cost_usd=cost))
    await any_ledger.record(make_record(5))  # the writer is unaffected
    assert set(read_rows(any_ledger.target.where)) == {"req-5"}


async def test_each_record_is_visible_to_another_connection_when_it_returns(any_ledger: Ledger) -> None:
    other = connect(any_ledger.target.where)
    try:
        for n in range(25):
            await any_ledger.record(make_record(n))
            count = other.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
            assert count == n + 1
    finally:
        other.close()


async def test_concurrent_records_share_commits(any_ledger: Ledger) -> None:
    await asyncio.gather(*(any_ledger.record(make_record(n)) for n in range(200)))
    assert len(read_rows(any_ledger.target.where)) == 200
    assert any_ledger.stats["rows_committed"] == 200
    assert any_ledger.stats["batches"] <= 10
    assert any_ledger.stats["max_batch_size"] >= 20
    assert any_ledger.stats["errors"] == 0


async def test_max_batch_caps_a_transaction(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "capped.db", max_batch=16)
    await led.open()
    try:
        await asyncio.gather(*(led.record(make_record(n)) for n in range(100)))
    finally:
        await led.close()
    assert led.stats["max_batch_size"] == 16
    assert led.stats["batches"] >= 7  # ceil(100 / 16)
    assert len(read_rows(tmp_path / "capped.db")) == 100


async def test_duplicate_request_id_fails_only_its_own_record(any_ledger: Ledger) -> None:
    await any_ledger.record(make_record(1))
    results = await asyncio.gather(
        any_ledger.record(make_record(2)),
        any_ledger.record(make_record(1, user="again")),
        any_ledger.record(make_record(3)),
        return_exceptions=True,
    )
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], LedgerError)
    assert "unique" in str(results[1]).lower() and any_ledger.path in str(results[1])
    with pytest.raises(LedgerError, match="(?i)unique"):  # alone in its batch
        await any_ledger.record(make_record(2))
    await any_ledger.record(make_record(4))
    rows = read_rows(any_ledger.target.where)
    assert set(rows) == {"req-1", "req-2", "req-3", "req-4"}
    assert rows["req-1"]["user"] is None  # the first write stands
    assert any_ledger.stats["errors"] == 2


async def test_failed_batch_raises_for_its_callers_and_the_writer_goes_on(ledger: Ledger) -> None:
    other = sqlite3.connect(ledger.path)
    try:
        other.execute("DROP TABLE calls")
        other.commit()
        results = await asyncio.gather(
            *(ledger.record(make_record(n)) for n in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, LedgerError) for r in results), results
        assert all("no such table" in str(r) for r in results)
        assert ledger.stats["errors"] == 3

        for migration in MIGRATIONS[:5]:  # put the table back (with its columns, indexes and trigger)
            other.executescript(migration.sql)
        await ledger.record(make_record(10))
    finally:
        other.close()
    assert set(read_rows(Path(ledger.path))) == {"req-10"}


async def test_record_does_not_hang_when_the_writer_has_died(ledger: Ledger) -> None:
    queued = [asyncio.create_task(ledger.record(make_record(n))) for n in range(3)]
    await asyncio.sleep(0)  # let them queue
    writer = ledger._writer  # fault injection: kill the writer
    assert writer is not None
    writer.cancel()
    results = await asyncio.wait_for(asyncio.gather(*queued, return_exceptions=True), 5)
    assert all(r is None or isinstance(r, LedgerError) for r in results)
    with pytest.raises(LedgerError, match="writer has stopped"):
        await asyncio.wait_for(ledger.record(make_record(9)), 5)


async def test_a_cancelled_caller_does_not_break_the_writer(any_ledger: Ledger) -> None:
    waiting = asyncio.create_task(any_ledger.record(make_record(1)))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await any_ledger.record(make_record(2))
    assert "req-2" in read_rows(any_ledger.target.where)
    assert any_ledger._writer is not None and not any_ledger._writer.done()


async def test_close_flushes_queued_rows_and_is_idempotent(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "flush.db")
    await led.open()
    pending = [asyncio.create_task(led.record(make_record(n))) for n in range(50)]
    await asyncio.sleep(0)
    await led.close()
    assert all(task.done() and task.exception() is None for task in pending)
    assert len(read_rows(tmp_path / "flush.db")) == 50
    await led.close()
    with pytest.raises(LedgerError, match="not open"):
        await led.record(make_record(99))


async def test_record_before_open_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="not open"):
        await Ledger(tmp_path / "never.db").record(make_record())


async def test_open_twice_is_refused(ledger: Ledger) -> None:
    with pytest.raises(LedgerError, match="already opened"):
        await ledger.open()


async def test_wal_mode_and_schema_version(ledger: Ledger) -> None:
    other = sqlite3.connect(ledger.path)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    finally:
        other.close()


def _make_bad_path(tmp_path: Path, kind: str) -> Path:
    if kind == "missing directory":
        return tmp_path / "nope" / "ledger.db"
    if kind == "directory":
        return tmp_path
    if kind == "not a database":
        path = tmp_path / "notes.db"
        path.write_text("this is not SQLite, just some words " * 100)
        return path
    if kind == "foreign database":
        path = tmp_path / "other.db"
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE invoices (id INTEGER)")
        conn.commit()
        conn.close()
        return path
    path = tmp_path / "future.db"  # a newer schema
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    return path


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("missing directory", "unable to open"),
        ("directory", "unable to open"),
        ("not a database", "not a database"),
        ("foreign database", "not a meterproxy ledger"),
        ("newer schema", "newer"),
    ],
)
async def test_open_on_unusable_path_names_the_path(tmp_path: Path, kind: str, says: str) -> None:
    path = _make_bad_path(tmp_path, kind)
    led = Ledger(path)
    with pytest.raises(LedgerError) as caught:
        await led.open()
    assert str(path) in str(caught.value)
    assert says in str(caught.value)
    await led.close()


def test_migrate_is_idempotent(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "m.db")
    try:
        assert migrate(conn) == len(MIGRATIONS)
        assert migrate(conn) == len(MIGRATIONS)
        columns = [row[1] for row in conn.execute("PRAGMA table_info(calls)")]
        assert columns[:3] == ["id", "request_id", "started_at"] and "cost_usd" in columns
        assert columns[-1] == "repriced_at"
        indexes = {row[1] for row in conn.execute("PRAGMA index_list(calls)")}
        assert {"calls_started_at", "calls_key_started_at", "calls_user_started_at"} <= indexes
        assert not conn.in_transaction
    finally:
        conn.close()


def test_migrate_refuses_a_newer_database(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "m.db")
    try:
        migrate(conn)
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 3}")
        with pytest.raises(MigrationError, match=f"version {len(MIGRATIONS) + 3} is newer"):
            migrate(conn)
    finally:
        conn.close()


def test_a_failing_migration_is_rolled_back_whole(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "m.db")
    broken = Migration("half works", "CREATE TABLE half (a); INSERT INTO missing VALUES (1);")
    try:
        with pytest.raises(MigrationError, match="half works"):
            _apply(conn, 1, broken)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == []
        assert not conn.in_transaction
    finally:
        conn.close()


def test_migrating_an_older_ledger_keeps_its_rows(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "old.db")
    try:
        conn.executescript(MIGRATIONS[0].sql)
        conn.execute("PRAGMA user_version = 1")
        conn.execute(
            "INSERT INTO calls (request_id, started_at, ended_at, method, endpoint, stream, status, latency_ms,"
            " prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, total_tokens, usage_source,"
            " priced, cost_usd) VALUES ('old-1', 1, 2, 'POST', '/v1/chat/completions', 0, 200, 1.5,"
            " 10, 5, 0, 0, 15, 'upstream', 1, '0.000075')")
        conn.commit()
        assert migrate(conn) == len(MIGRATIONS)
        row = conn.execute("SELECT request_id, total_tokens, cost_usd, approximate, counted_prompt_tokens"
                           " FROM calls").fetchall()
        assert row == [("old-1", 15, "0.000075", 0, None)]
    finally:
        conn.close()


@pytest.mark.parametrize("field", ["prompt_tokens", "started_at", "latency_ms"])
def test_a_number_beyond_64_bits_fails_its_row_alone_in_any_numeric_column(field: str) -> None:
    """record_row's fast path must not let an integer SQLite cannot hold through, wherever it stands (an int
    column, or a float column given an int): the row is refused here, never its batch."""
    from proxy.ledger.writer import record_row

    with pytest.raises(LedgerError, match="out of SQLite's range"):
        record_row(make_record(1, **{field: 2**70}))


def test_a_lone_surrogate_in_a_text_column_is_replaced_not_stored() -> None:
    from proxy.ledger.db import COLUMNS
    from proxy.ledger.writer import record_row

    row = record_row(make_record(1, user="bad\udc80user"))
    assert row[COLUMNS.index("user")] == "bad?user"  # encodable now: SQLite and the spool can take it
