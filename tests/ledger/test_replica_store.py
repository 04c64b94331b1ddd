"""The replicas table's SQL on both engines: upsert, list, forget the long dead, delete on stop."""

from __future__ import annotations

import sqlite3
import time

from proxy.ledger import migrations, migrations_postgres, replica_store
from proxy.ledger.replica_store import Replica
from proxy.ledger.sqlconn import connect_postgres
from proxy.ledger.target import parse_target


def migrated(db: str) -> None:
    target = parse_target(db)
    if target.is_postgres:
        conn = connect_postgres(target)
        try:
            migrations_postgres.migrate(conn)
        finally:
            conn.close()
    else:
        raw = sqlite3.connect(db)
        try:
            migrations.migrate(raw)
        finally:
            raw.close()


def test_beat_list_forget_and_remove(ledger_target: str) -> None:
    migrated(ledger_target)
    conn = replica_store.open_conn(ledger_target)
    try:
        now = time.time()
        replica_store.beat(conn, Replica("old", "h", 1, "1", None, now - 3 * 86400, now - 2 * 86400, 5.0))
        replica_store.beat(conn, Replica("a", "h1", 11, "1.0", "p1", now - 10, now - 5, 5.0))
        replica_store.beat(conn, Replica("b", "h2", 12, "1.0", None, now - 1, now, 2.5))
        # "old" was not seen for a day: the next beat forgot it
        assert [r.id for r in replica_store.list_replicas(conn)] == ["b", "a"]
        replica_store.beat(conn, Replica("a", "h1", 11, "1.0", "p2", now - 10, now, 5.0))  # a refresh
        rows = {r.id: r for r in replica_store.list_replicas(conn)}
        assert rows["a"] == Replica("a", "h1", 11, "1.0", "p2", now - 10, now, 5.0)
        assert rows["b"].pricing_version is None and rows["b"].interval_s == 2.5
        replica_store.remove(conn, "a")
        assert [r.id for r in replica_store.list_replicas(conn)] == ["b"]
    finally:
        conn.close()
    reader = replica_store.open_conn(ledger_target, read_only=True)
    try:
        assert [r.id for r in replica_store.list_replicas(reader)] == ["b"]
    finally:
        reader.close()
