"""The storage seam's base: one connection type over SQLite and PostgreSQL, targets, PostgreSQL migrations."""

from __future__ import annotations

import sqlite3
import threading
from decimal import Decimal

import pytest

from proxy.ledger import migrations_postgres
from proxy.ledger.sqlconn import Conn, connect_postgres, pg_sql, wrap_sqlite
from proxy.ledger.target import parse_target, redact_url


def test_targets() -> None:
    assert parse_target("./meterproxy.db").kind == "sqlite"
    assert parse_target("postgres.db").kind == "sqlite"  # a file whose name starts so is still a file
    for url in ("postgresql://u@h/db", "postgres://u@h:5432/db", "POSTGRESQL://u@h/db"):
        assert parse_target(url).is_postgres
    secret = parse_target("postgresql://alice:s3cret@db.internal:5432/meter?password=other&sslmode=require")
    assert "s3cret" not in secret.shown and "other" not in secret.shown
    assert "s3cret" not in str(secret) and "s3cret" not in repr(secret) and "other" not in repr(secret)
    assert secret.shown == "postgresql://alice:***@db.internal:5432/meter?password=***&sslmode=require"
    assert redact_url("postgresql://alice@h/db") == "postgresql://alice@h/db"


def test_placeholders_outside_quotes_only() -> None:
    assert pg_sql("SELECT ? WHERE a = '?' AND b LIKE '5%' AND \"c?\" = ?") == (
        "SELECT %s WHERE a = '?' AND b LIKE '5%%' AND \"c?\" = %s")
    assert pg_sql("SELECT strftime('%Y', x) % 2") == "SELECT strftime('%%Y', x) %% 2"


def _sqlite(tmp_path: object) -> Conn:
    return wrap_sqlite(sqlite3.connect(f"{tmp_path}/x.db", isolation_level=None), "x.db")


@pytest.fixture(params=["sqlite", "postgres"])
def conn(request: pytest.FixtureRequest, tmp_path: object) -> Conn:
    if request.param == "sqlite":
        c = _sqlite(tmp_path)
    else:
        c = connect_postgres(parse_target(request.getfixturevalue("pg_url")))
    request.addfinalizer(c.close)
    c.execute("CREATE TABLE t (k TEXT PRIMARY KEY, n BIGINT NOT NULL)")
    return c


def test_one_sql_text_on_both(conn: Conn) -> None:
    conn.executemany("INSERT INTO t (k, n) VALUES (?, ?)", [("a", 1), ("b", 2), ("100%", 3)])
    conn.execute("INSERT INTO t (k, n) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET n = t.n + excluded.n",
                 ("a", 10))
    rows = conn.execute("SELECT k, n FROM t WHERE k LIKE '%a%' OR k = ? ORDER BY k", ("100%",)).fetchall()
    assert [tuple(r) for r in rows] == [("100%", 3), ("a", 11)]
    assert conn.execute("SELECT COALESCE(SUM(CASE WHEN n > 1 THEN 1 ELSE 0 END), 0) FROM t").fetchone()[0] == 3


def test_transactions_and_errors(conn: Conn) -> None:
    with conn.transaction():
        conn.execute("INSERT INTO t (k, n) VALUES ('x', 1)")
    assert not conn.in_transaction
    with pytest.raises(conn.IntegrityError):
        with conn.transaction():
            conn.execute("INSERT INTO t (k, n) VALUES ('y', 1)")
            conn.execute("INSERT INTO t (k, n) VALUES ('x', 1)")  # duplicate: the whole block goes
    assert not conn.in_transaction
    assert [r[0] for r in conn.execute("SELECT k FROM t ORDER BY k")] == ["x"]
    conn.rollback()  # nothing open: a no-op


def test_postgres_migrations_once_under_a_lock(pg_url: str) -> None:
    target = parse_target(pg_url)
    conns = [connect_postgres(target) for _ in range(4)]
    results: list[object] = []

    def run(c: Conn) -> None:
        try:
            results.append(migrations_postgres.migrate(c))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            results.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [len(migrations_postgres.MIGRATIONS)] * 4
    c = conns[0]
    assert c.execute("SELECT COUNT(*) FROM meterproxy_schema").fetchone()[0] == len(migrations_postgres.MIGRATIONS)
    # Money is NUMERIC and sums exactly, with the exponent Decimal addition gives.
    for rid, cost in (("a", "0.00150"), ("b", "0.0000001"), ("c", "0.1")):
        c.execute(
            "INSERT INTO calls (request_id, started_at, ended_at, method, endpoint, stream, status, latency_ms,"
            " prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, total_tokens, usage_source,"
            " priced, cost_usd, tags) VALUES (?, 1.5, 2.5, 'POST', '/v1/x', 0, 200, 1, 1, 1, 0, 0, 2,"
            " 'upstream', 1, ?, ?)", (rid, cost, '{"team": "blue"}' if rid == "a" else "not json"))
    total = c.execute("SELECT decimal_sum(cost_usd) FROM calls").fetchone()[0]
    assert total == Decimal("0.00150") + Decimal("0.0000001") + Decimal("0.1")
    assert total.as_tuple().exponent == -7
    assert c.execute("SELECT meter_team(tags) FROM calls ORDER BY request_id").fetchall() == [
        ("blue",), (None,), (None,)]
    # A change to keys bumps the version (and notifies); a change to a call marks its hour dirty.
    c.execute("UPDATE api_keys SET name = 'n'")
    assert c.execute("SELECT version FROM keys_changes").fetchone()[0] == 1
    c.execute("UPDATE calls SET cost_usd = 2 WHERE request_id = 'a'")
    assert c.execute("SELECT hour FROM rollup_dirty").fetchall() == [(0,)]
    for conn in conns:
        conn.close()


def test_newer_schema_is_refused(pg_url: str) -> None:
    c = connect_postgres(parse_target(pg_url))
    migrations_postgres.migrate(c)
    c.execute("INSERT INTO meterproxy_schema (version, name) VALUES (999, 'from the future')")
    with pytest.raises(migrations_postgres.MigrationError, match="upgrade meterproxy"):
        migrations_postgres.migrate(c)
    c.close()
