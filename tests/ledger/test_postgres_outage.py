"""The ledger on PostgreSQL when the server goes away: rows to the spool, replayed in order, each once.

The shared server cannot be stopped, so the proxy's connection goes through a TCP relay on loopback
(tests/support/relay.py) that the test cuts and restores; a server restart is a terminated backend.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from proxy.ledger import rollups
from proxy.ledger.writer import Ledger
from tests.ledger.test_writer import make_record
from tests.support import ledger_rows
from tests.support.ledger import assert_exact, connect
from tests.support.relay import Relay


async def wait_until(check, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def assert_requests(pg_url: str, numbers: range) -> None:
    """The ledger holds exactly these requests, each once, in this order, its rollups exact."""
    assert [r["request_id"] for r in ledger_rows(pg_url)] == [f"req-{n}" for n in numbers]
    assert_exact(pg_url)


@pytest.fixture
def relay(pg_url: str):  # type: ignore[no-untyped-def]
    relay = Relay.to(pg_url)
    yield relay
    relay.close()


async def test_rows_made_while_the_server_is_cut_off_are_spooled_then_replayed_once(
        pg_url: str, relay: Relay, tmp_path: Path) -> None:
    spool = tmp_path / "pg.spool.jsonl"
    ledger = Ledger(relay.url(pg_url), spool_path=spool, retry_interval=0.1, busy_timeout_ms=1000)
    ledger.db.after_insert.append(rollups.apply)
    await ledger.open()
    try:
        await asyncio.gather(*(ledger.record(make_record(n)) for n in range(20)))
        assert ledger.stats["spooled"] == 0
        relay.cut()
        # Each call returns once its row is durable: committed, or fsynced to the spool.
        for wave in range(5):
            await asyncio.gather(*(ledger.record(make_record(100 + wave * 10 + n)) for n in range(10)))
        assert ledger.stats["spooled"] == 50 and not ledger.accepting
        assert "refuses writes" in (ledger.degraded or "")
        assert len(ledger_rows(pg_url)) == 20  # nothing of it reached the server
        relay.restore()
        await wait_until(lambda: ledger.accepting)
        await asyncio.gather(*(ledger.record(make_record(200 + n)) for n in range(5)))
    finally:
        await ledger.close()
    rows = ledger_rows(pg_url)
    ids = [r["request_id"] for r in rows]
    assert len(ids) == len(set(ids)) == 75  # every row once
    # The spooled rows went in in the order they came, before the ones made after the outage.
    assert ids == [f"req-{n}" for n in [*range(20), *range(100, 150), *range(200, 205)]]
    assert ledger.stats["replayed"] == 50 and not spool.exists() or spool.stat().st_size == 0
    assert_exact(pg_url)


async def test_a_write_the_network_swallows_is_interrupted_and_its_rows_spooled(
        pg_url: str, relay: Relay, tmp_path: Path) -> None:
    """Packets dropped silently (no reset, no answer): without a bound the batch, and every call waiting for
    it, would hang until TCP gave up (minutes). Past write_timeout the write is interrupted, its rows go to
    the spool, and once the network is back they are replayed, each once."""
    ledger = Ledger(relay.url(pg_url), spool_path=tmp_path / "s.jsonl", retry_interval=0.2,
                    busy_timeout_ms=1000, write_timeout=1.0)
    ledger.db.after_insert.append(rollups.apply)
    await ledger.open()
    try:
        await ledger.record(make_record(1))
        relay.black_hole()
        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(ledger.record(make_record(n)) for n in range(2, 12))), 10)
        waited = time.monotonic() - started
        assert ledger.stats["spooled"] == 10 and not ledger.accepting
        assert "no answer from the database within 1 s" in (ledger.degraded or "")
        assert waited < 5, waited
        relay.cut()  # the swallowed connection ends; new ones go through again
        relay.restore()
        await wait_until(lambda: ledger.accepting)
        await ledger.record(make_record(12))
    finally:
        await ledger.close()
    assert_requests(pg_url, range(1, 13))


async def test_a_server_restart_loses_no_row(pg_url: str, tmp_path: Path) -> None:
    """The writer's backend terminated (what a restart does to it): the next batch fails, goes to the
    spool, and the writer connects again and replays it."""
    ledger = Ledger(pg_url, spool_path=tmp_path / "s.jsonl", retry_interval=0.1)
    ledger.db.after_insert.append(rollups.apply)
    await ledger.open()
    try:
        await ledger.record(make_record(1))
        assert ledger.db._conn is not None
        pid = ledger.db._conn.raw.info.backend_pid
        admin = connect(pg_url)
        try:
            assert admin.execute("SELECT pg_terminate_backend(?)", (pid,)).fetchone()[0]
        finally:
            admin.close()
        await asyncio.gather(*(ledger.record(make_record(n)) for n in range(2, 12)))
        await wait_until(lambda: ledger.accepting)
        await ledger.record(make_record(12))
    finally:
        await ledger.close()
    assert_requests(pg_url, range(1, 13))


async def test_replaying_a_spool_twice_adds_nothing(pg_url: str, tmp_path: Path) -> None:
    """A crash after the replay committed but before the spool was cleared: the next start replays the
    same rows again, and the database (request_id unique, present rows skipped) keeps one of each."""
    from proxy.ledger.spool import Spool
    from proxy.ledger.writer import record_row

    spool_path = tmp_path / "again.jsonl"
    rows = [record_row(make_record(n)) for n in range(30)]
    for _ in range(2):
        spool = Spool(spool_path, 0)
        spool.append(rows)
        ledger = Ledger(pg_url, spool_path=spool_path, retry_interval=0.1)
        ledger.db.after_insert.append(rollups.apply)
        await ledger.open()
        try:
            await wait_until(lambda: ledger.accepting)
        finally:
            await ledger.close()
    ids = [r["request_id"] for r in ledger_rows(pg_url)]
    assert ids == [f"req-{n}" for n in range(30)]
    assert_exact(pg_url)  # the hook saw each row once: the rollups count 30 calls, not 60


async def test_a_server_that_refuses_writes_is_said_at_open_and_rows_wait_in_the_spool(
        pg_url: str, tmp_path: Path) -> None:
    connect(pg_url).close()  # migrated while it could write
    read_only = pg_url + "%20-cdefault_transaction_read_only%3Don"  # one more option in options=
    ledger = Ledger(read_only, spool_path=tmp_path / "ro.jsonl", retry_interval=0.1)
    ledger.db.after_insert.append(rollups.apply)
    await ledger.open()
    try:
        assert not ledger.accepting and "read-only" in (ledger.degraded or "")
        await asyncio.gather(*(ledger.record(make_record(n)) for n in range(5)))
        assert ledger.stats["spooled"] == 5 and ledger.spool_depth == 5
    finally:
        await ledger.close()
    assert ledger_rows(pg_url) == []
    # Opened again on a session that may write: the spool is replayed at once.
    ledger = Ledger(pg_url, spool_path=tmp_path / "ro.jsonl", retry_interval=0.1)
    ledger.db.after_insert.append(rollups.apply)
    await ledger.open()
    try:
        await wait_until(lambda: ledger.accepting)
    finally:
        await ledger.close()
    assert [r["request_id"] for r in ledger_rows(pg_url)] == [f"req-{n}" for n in range(5)]
    assert_exact(pg_url)
