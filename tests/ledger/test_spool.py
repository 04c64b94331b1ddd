"""The spool, called directly: append, read back in order, a torn last line, replay exactly once, mode 0600."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from proxy.core.record import CallRecord
from proxy.ledger.db import LedgerDB
from proxy.ledger.spool import Spool
from proxy.ledger.writer import record_row
from tests.support.ledger import connect


def row(n: int) -> tuple[object, ...]:
    return record_row(CallRecord(request_id=f"req-{n}", started_at=1795000000.0 + n, method="POST",
                                 endpoint="/v1/chat/completions", model="gpt-4o", status=200))


def test_append_reads_back_every_row_in_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.jsonl")
    assert spool.read() == [] and not spool.has_rows()
    spool.append([row(1), row(2)])
    spool.append([row(3)])
    spool.append([row(4), row(5), row(6)])
    assert spool.has_rows()
    assert spool.read() == [row(n) for n in range(1, 7)]
    # One line per row, in COLUMNS order as JSON.
    assert (tmp_path / "spool.jsonl").read_text().count("\n") == 6


def test_files_are_owner_only(tmp_path: Path) -> None:
    old = os.umask(0)  # even a permissive umask makes no world-readable spool
    try:
        spool = Spool(tmp_path / "spool.jsonl", reserve_bytes=4096)
        spool.append([row(1)])
        assert spool.reserve()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(spool.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(spool.reserve_path).st_mode) == 0o600
    spool.clear()
    assert stat.S_IMODE(os.stat(spool.path).st_mode) == 0o600
    assert spool.read() == [] and not spool.has_rows()


def test_a_torn_last_line_is_skipped_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path / "spool.jsonl")
    spool.append([row(1), row(2)])
    whole = (tmp_path / "spool.jsonl").read_bytes()
    line3 = Spool(tmp_path / "other.jsonl")
    line3.append([row(3)])
    torn = (tmp_path / "other.jsonl").read_bytes()[:-20]  # a crash mid-append: no end of line, cut JSON
    (tmp_path / "spool.jsonl").write_bytes(whole + torn)
    with caplog.at_level(logging.ERROR, logger="meterproxy"):
        assert spool.read() == [row(1), row(2)]
    assert "line 3 is not a complete row" in caplog.text


def test_replay_commits_each_spooled_row_exactly_once(tmp_path: Path, ledger_target: str) -> None:
    spool = Spool(tmp_path / "spool.jsonl")
    spool.append([row(1), row(2)])
    spool.append([row(3)])
    db = LedgerDB(ledger_target, 5000)
    db.open()
    try:
        db.insert([row(2)])  # committed before the crash that left it in the spool too
        db.replay(spool.read())
        db.replay(spool.read())  # interrupted before the spool was cleared: replayed again at the next start
        assert db.refuses_writes() is None
        db.replay([])  # with no rows: a probe that the database takes writes
    finally:
        db.close()
    conn = connect(ledger_target)
    try:
        got = conn.execute("SELECT request_id, count(*) FROM calls GROUP BY request_id, id ORDER BY id").fetchall()
    finally:
        conn.close()
    assert [tuple(r) for r in got] == [("req-2", 1), ("req-1", 1), ("req-3", 1)]
