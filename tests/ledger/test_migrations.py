"""SQLite migrations: processes starting together on one file each see every migration applied once."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from proxy.ledger.migrations import MIGRATIONS, _apply, migrate, schema_version


def test_concurrent_first_starts_apply_each_migration_once(tmp_path: Path) -> None:
    for attempt in range(5):
        path = tmp_path / f"race{attempt}.db"
        first = sqlite3.connect(path, isolation_level=None)
        first.execute("PRAGMA journal_mode = WAL")
        for number, migration in enumerate(MIGRATIONS[:5], start=1):  # up to rollups: the ALTERs race
            _apply(first, number, migration)
        first.close()
        conns = [sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
                 for _ in range(6)]
        start = threading.Barrier(len(conns))
        outcomes: list[object] = []

        def run(conn: sqlite3.Connection) -> None:
            start.wait()
            try:
                outcomes.append(migrate(conn))
            except Exception as exc:  # noqa: BLE001 - asserted below
                outcomes.append(exc)

        threads = [threading.Thread(target=run, args=(c,)) for c in conns]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert outcomes == [len(MIGRATIONS)] * len(conns)
        assert schema_version(conns[0]) == len(MIGRATIONS)
        for conn in conns:
            conn.close()


def test_a_trigger_body_is_one_statement(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    assert migrate(conn) == len(MIGRATIONS)
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    assert {"api_keys_inserted", "calls_rollup_dirty"} <= names
