"""`meterproxy copy-ledger`: a SQLite ledger written by the real writer, into a real PostgreSQL; resumable,
verified by comparing exact totals per model."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import sqlite3
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.ledger import copy_store
from proxy.ledger.copy_store import Copied
from proxy.ledger.target import parse_target
from tests.support.cli import run_cli
from tests.support.ledger import assert_exact, random_call, write_through_ledger

N = 1200


def source_ledger(tmp_path: Path, n: int = N) -> Path:
    """`n` random calls through the real Ledger (rollups hook on), two managed keys, limits, a sent alert
    and a re-pricing run: every table copy-ledger moves holds rows."""
    rng = random.Random(5)
    path = tmp_path / "meterproxy.db"
    asyncio.run(write_through_ledger(path, [random_call(rng, i) for i in range(n)], rng))
    for user in ("alice", "bob"):
        made = run_cli("keys", "create", "--db", str(path), "--user", user, "--team", "search",
                       "--budget-usd", "25.125", "--route", "POST /v1/files")
        assert made.returncode == 0, made.stderr
    limited = run_cli("budgets", "set", "--db", str(path), "team", "search", "--budget-usd", "0.000000000000001",
                      "--rpm", "7")
    assert limited.returncode == 0, limited.stderr
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("INSERT INTO budget_alerts (kind, name, period, threshold, created_at, outcome, attempts, "
                     "finished_at) VALUES ('team', 'search', '2026-01', '0.8', ?, 'sent', 1, ?)",
                     (time.time(), time.time()))
        conn.execute("INSERT INTO reprice_runs (at, since, until, model, pricing_version, calls, changed, "
                     "old_cost_usd, new_cost_usd) VALUES (?, NULL, NULL, 'gpt-4o', 'abc', 10, 3, '1.10', "
                     "'0.000000000000000012')", (time.time(),))
    conn.close()
    return path


def rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return [tuple(r) for r in conn.execute(sql)]


def sqlite_rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return [tuple(r) for r in conn.execute(sql)]
    finally:
        conn.close()


def calls_of(url: str) -> dict[str, tuple[Any, ...]]:
    return {r[0]: r[1:] for r in rows(url, "SELECT request_id, model, prompt_tokens, total_tokens, cost_usd, tags, "
                                           "started_at FROM calls")}


def test_copies_everything_and_the_totals_agree(tmp_path: Path, pg_url: str) -> None:
    path = source_ledger(tmp_path)
    done = run_cli("copy-ledger", "--from", str(path), "--to", pg_url, "--batch", "100", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"calls: {N} copied, 0 already there" in done.stdout
    assert "api_keys: 2 copied" in done.stdout and "subject_limits: 1 copied" in done.stdout
    assert "budget_alerts: 1 copied" in done.stdout and "reprice_runs: 1 copied" in done.stdout
    assert "the ledgers agree" in done.stdout
    # every call, its cost to the last digit (NUMERIC keeps the scale: '0.10' stays 0.10)
    copied = calls_of(pg_url)
    source = {r[0]: r[1:] for r in sqlite_rows(path, "SELECT request_id, model, prompt_tokens, total_tokens, "
                                                     "cost_usd, tags, started_at FROM calls")}
    assert copied.keys() == source.keys()
    for rid, (model, prompt, total, cost, tags, started) in source.items():
        assert copied[rid] == (model, prompt, total, Decimal(cost), tags, started)
        assert format(copied[rid][3], "f") == cost
    keys = "SELECT key_id, key_hash, \"user\", team, budget_usd, routes FROM api_keys ORDER BY key_id"
    assert [(*r[:4], format(r[4], "f"), r[5]) for r in rows(pg_url, keys)] == sqlite_rows(path, keys)
    assert rows(pg_url, "SELECT budget_usd, rpm FROM subject_limits") == [(Decimal("0.000000000000001"), 7)]
    assert rows(pg_url, "SELECT new_cost_usd FROM reprice_runs") == [(Decimal("0.000000000000000012"),)]
    # the rollups were written with the calls, as the proxy's ledger writes them: current and exact
    assert_exact(pg_url)


def test_an_interrupted_copy_is_resumed_copying_only_what_is_missing(tmp_path: Path, pg_url: str) -> None:
    path = source_ledger(tmp_path)
    src, dst = copy_store.open_source(str(path)), copy_store.open_target(parse_target(pg_url))

    def interrupt(done: Copied) -> None:
        if done.copied >= 300:
            raise KeyboardInterrupt  # what ^C does between two batches

    try:
        with pytest.raises(KeyboardInterrupt):
            copy_store.copy_calls(src, dst, 100, interrupt)
    finally:
        src.close()
        dst.close()
    assert rows(pg_url, "SELECT count(*) FROM calls") == [(300,)]  # three whole batches, no more

    resumed = run_cli("copy-ledger", "--from", str(path), "--to", pg_url, "--batch", "100", timeout=120)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"calls: {N - 300} copied, 300 already there" in resumed.stdout
    assert "the ledgers agree" in resumed.stdout
    assert rows(pg_url, "SELECT count(*), count(DISTINCT request_id) FROM calls") == [(N, N)]
    assert_exact(pg_url)  # each batch's rollups committed with it: none lost or counted twice by the resume

    again = run_cli("copy-ledger", "--from", str(path), "--to", pg_url, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"calls: 0 copied, {N} already there" in again.stdout and "api_keys: 0 copied, 2 already" in again.stdout
    assert "reprice_runs: 0 copied, 1 already there" in again.stdout
    assert rows(pg_url, "SELECT count(*) FROM api_keys") == [(2,)]


def test_a_target_already_in_use_is_compared_on_the_copied_calls_only(tmp_path: Path, pg_url: str) -> None:
    path = source_ledger(tmp_path, n=50)
    assert run_cli("copy-ledger", "--from", str(path), "--to", pg_url, timeout=120).returncode == 0
    with psycopg.connect(pg_url, autocommit=True) as conn:  # a call a PostgreSQL replica recorded since
        conn.execute("INSERT INTO calls (request_id, started_at, ended_at, method, endpoint, model, stream, status, "
                     "latency_ms, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, total_tokens, "
                     "usage_source, priced, cost_usd) VALUES ('new-on-pg', 1, 1, 'POST', '/v1/chat/completions', "
                     "'gpt-4o', 0, 200, 1, 1, 1, 0, 0, 2, 'upstream', 1, 1)")
    again = run_cli("copy-ledger", "--from", str(path), "--to", pg_url, timeout=120)
    assert again.returncode == 0 and "the ledgers agree" in again.stdout, again.stdout


def test_a_target_that_differs_is_reported_with_exit_1(tmp_path: Path, pg_url: str) -> None:
    path = source_ledger(tmp_path, n=200)
    assert run_cli("copy-ledger", "--from", str(path), "--to", pg_url, timeout=120).returncode == 0
    rid, model = sqlite_rows(path, "SELECT request_id, model FROM calls WHERE model = 'gpt-4o' LIMIT 1")[0]
    with psycopg.connect(pg_url, autocommit=True) as conn:  # one picodollar more on one call
        conn.execute("UPDATE calls SET cost_usd = cost_usd + 0.000000000001 WHERE request_id = %s", (rid,))
    again = run_cli("copy-ledger", "--from", str(path), "--to", pg_url, timeout=120)
    assert again.returncode == 1, again.stdout + again.stderr
    line = next(line for line in again.stdout.splitlines() if line.strip().startswith("gpt-4o "))
    assert "DIFFERS" in line and " / " in line
    assert "the ledgers DIFFER for 1 model(s)" in again.stdout


@pytest.mark.parametrize("args, message", [
    (("--from", "postgresql://u@h/db", "--to", "postgresql://u@h/db2"), "reads a SQLite ledger"),
    (("--from", "x.db", "--to", "y.db"), "writes a PostgreSQL ledger"),
    (("--from", "missing.db", "--to", "postgresql://u:hunter2@127.0.0.1:1/db"), "no ledger at missing.db"),
])  # fmt: skip
def test_refusals_are_one_line_with_exit_2(args: tuple[str, ...], message: str) -> None:
    done = run_cli("copy-ledger", *args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "hunter2" not in done.stderr


def test_an_unreachable_target_is_named_without_its_password(tmp_path: Path) -> None:
    path = source_ledger(tmp_path, n=5)
    done = run_cli("copy-ledger", "--from", str(path), "--to", "postgresql://u:hunter2@127.0.0.1:1/db")
    assert done.returncode == 2 and "cannot open postgresql://u:***@127.0.0.1:1/db" in done.stderr
    assert "hunter2" not in done.stderr + done.stdout and len(done.stderr.strip().splitlines()) == 1


def test_nul_in_text_is_copied_as_the_postgresql_ledger_writes_it(tmp_path: Path, pg_url: str) -> None:
    path = tmp_path / "nul.db"
    calls = [random_call(random.Random(n), n) for n in range(20)]
    calls[3] = dataclasses.replace(calls[3], model="gpt\x00x", user="a\x00b", cost_usd=Decimal("0.5"))
    asyncio.run(write_through_ledger(path, calls, random.Random(1)))
    done = run_cli("copy-ledger", "--from", str(path), "--to", pg_url, timeout=120)
    assert done.returncode == 0 and "the ledgers agree" in done.stdout, done.stdout + done.stderr
    assert rows(pg_url, "SELECT model, \"user\" FROM calls WHERE request_id = 'r3'") == [("gpt\ufffdx", "a\ufffdb")]
