"""The SQL of `meterproxy copy-ledger`: read a SQLite ledger, write what the PostgreSQL one lacks, compare.

Everything is copied by its natural key, so a run that was interrupted is resumed by running it again: calls
by `request_id`, keys by `key_id`, limits by (kind, name), sent alerts by (kind, name, period, threshold),
re-pricing runs by their whole content. Calls go in batches,
each batch one transaction on the target written as the proxy's ledger writes one: under the ledger's
write lock, with the rollups (and the shared budgets' spend) updated in it, so the target's rollups stay exact and
current. The source is read in one read transaction: one snapshot, even if a proxy still writes to it.

The comparison sums, per model, calls and tokens and the exact cost (`decimal_sum`) on both sides; on the
target only over the calls whose request_id the source holds (a target already in use has calls of its own).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from proxy.ledger import migrations, migrations_postgres
from proxy.ledger.db import COLUMNS, lock_ledger
from proxy.ledger.hooks import after_insert_hooks
from proxy.ledger.read import ReportDatabaseError, connect_readonly
from proxy.ledger.sqlconn import Conn, connect_postgres
from proxy.ledger.target import Target

__all__ = ["MIN_SOURCE_VERSION", "Totals", "copy_calls", "copy_keys", "copy_reprice_runs", "open_source",
           "open_target", "totals"]

MIN_SOURCE_VERSION = 7  # api_keys' routes, organization and project
_MONEY = {"cost_usd", "original_cost_usd", "budget_usd", "old_cost_usd", "new_cost_usd"}

# Tables copied whole, by primary key (what ON CONFLICT names): keys, limits, sent budget alerts.
KEYED_TABLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "api_keys": (("key_id",), (
        "key_id", "key_hash", "key_hint", "user", "team", "name", "budget_usd", "budget_period", "expires_at",
        "models", "rpm", "tpm", "created_at", "updated_at", "revoked_at", "routes", "organization", "project")),
    "subject_limits": (("kind", "name"), (
        "kind", "name", "budget_usd", "budget_period", "rpm", "tpm", "updated_at")),
    "budget_alerts": (("kind", "name", "period", "threshold"), (
        "kind", "name", "period", "threshold", "created_at", "outcome", "attempts", "finished_at")),
}  # fmt: skip
_REPRICE_COLUMNS = ("at", "since", "until", "model", "pricing_version", "calls", "changed", "old_cost_usd",
                    "new_cost_usd")


def _names(columns: Sequence[str]) -> str:
    return ", ".join(f'"{c}"' for c in columns)


def _pg_text(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """PostgreSQL text holds no NUL: it becomes U+FFFD, as the ledger writer does on PostgreSQL."""
    if any(isinstance(v, str) and "\x00" in v for v in row):
        return tuple(v.replace("\x00", "\ufffd") if isinstance(v, str) else v for v in row)
    return row


def _money(columns: Sequence[str], row: Sequence[Any]) -> tuple[Any, ...]:
    """The row with its money text as Decimal (exact: NUMERIC keeps every digit and the scale)."""
    return tuple(Decimal(v) if c in _MONEY and v is not None else v for c, v in zip(columns, row))


def open_source(path: str) -> Conn:
    """The SQLite ledger at `path`, read-only, in one read transaction (one snapshot for the whole copy)."""
    conn = connect_readonly(path)
    version = migrations.schema_version(conn.raw)
    if version < MIN_SOURCE_VERSION:
        conn.close()
        raise ReportDatabaseError(
            f"{path} is at schema version {version}, older than copy-ledger reads ({MIN_SOURCE_VERSION}): "
            f"start this meterproxy on it once (meterproxy serve --db {path}) to migrate it, then copy")
    conn.begin(write=False)
    conn.execute("SELECT count(*) FROM calls").fetchone()  # the snapshot starts at the first read
    return conn


def open_target(target: Target) -> Conn:
    """The PostgreSQL ledger, migrated to this meterproxy's schema (created if empty)."""
    conn = connect_postgres(target, application_name="meterproxy-copy-ledger")
    try:
        migrations_postgres.migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


@dataclass
class Copied:
    copied: int = 0
    present: int = 0  # already on the target (an earlier run, or the same row)


def copy_calls(src: Conn, dst: Conn, batch: int, on_batch: Callable[[Copied], None] | None = None) -> Copied:
    """Every call of `src` that `dst` lacks, `batch` rows per target transaction; `on_batch` after each commit.

    Each batch is written as the proxy's ledger writes one: under the ledger's write lock, with the same
    after_insert hooks (`hooks.after_insert_hooks`: rollups, shared spend) in its transaction."""
    done = Copied()
    select = f"SELECT id, {_names(COLUMNS)} FROM calls WHERE id > ? ORDER BY id LIMIT ?"
    insert = (f"INSERT INTO calls ({_names(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
              "ON CONFLICT (request_id) DO NOTHING")
    rid = COLUMNS.index("request_id")
    after = 0
    while True:
        rows = src.execute(select, (after, batch)).fetchall()
        if not rows:
            return done
        after = rows[-1][0]
        values = [_pg_text(tuple(row[1:])) for row in rows]  # as the writer hands them over: money as text
        with dst.transaction():
            lock_ledger(dst)  # the replicas' batches and this one commit one at a time (rollups' covered_id)
            there = {r[0] for r in dst.execute("SELECT request_id FROM calls WHERE request_id = ANY(?)",
                                               ([v[rid] for v in values],))}
            missing = [v for v in values if v[rid] not in there]
            if missing:
                dst.executemany(insert, missing)
                for hook in after_insert_hooks(dst):
                    hook(dst, missing)
        done.copied += len(missing)
        done.present += len(values) - len(missing)
        if on_batch is not None:
            on_batch(done)


def copy_keys(src: Conn, dst: Conn) -> dict[str, Copied]:
    """Managed keys, limits and sent budget alerts that `dst` lacks (by primary key), per table."""
    out: dict[str, Copied] = {}
    for table, (key, columns) in KEYED_TABLES.items():
        rows = [_money(columns, r) for r in src.execute(f"SELECT {_names(columns)} FROM {table}").fetchall()]
        done = Copied()
        with dst.transaction():
            before = dst.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            if rows:
                dst.executemany(f"INSERT INTO {table} ({_names(columns)}) VALUES ({', '.join('?' * len(columns))}) "
                                f"ON CONFLICT ({_names(key)}) DO NOTHING", rows)
            after = dst.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        done.copied = int(after - before)
        done.present = len(rows) - done.copied
        out[table] = done
    return out


def copy_reprice_runs(src: Conn, dst: Conn) -> Copied:
    """The re-pricing audit: each run `dst` does not hold (the same values in every column)."""
    cols = _names(_REPRICE_COLUMNS)
    rows = [_money(_REPRICE_COLUMNS, r) for r in src.execute(f"SELECT {cols} FROM reprice_runs ORDER BY id")]
    done = Copied()
    with dst.transaction():
        have: dict[tuple[Any, ...], int] = {}
        for r in dst.execute(f"SELECT {cols} FROM reprice_runs"):
            have[tuple(r)] = have.get(tuple(r), 0) + 1
        missing = []
        for row in rows:
            if have.get(row, 0) > 0:
                have[row] -= 1  # one source run matches one target run: two equal runs are both copied
                done.present += 1
            else:
                missing.append(row)
        if missing:
            dst.executemany(f"INSERT INTO reprice_runs ({cols}) VALUES ({', '.join('?' * len(_REPRICE_COLUMNS))})",
                            missing)
    done.copied = len(missing)
    return done


@dataclass(frozen=True)
class Totals:
    calls: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: Decimal


_TOTALS_SQL = ("SELECT model, count(*), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0), "
               "coalesce(sum(total_tokens), 0), decimal_sum(cost_usd) FROM calls {where} GROUP BY model")


def totals(conn: Conn, only_of: Conn | None = None) -> dict[str | None, Totals]:
    """Per model: calls, tokens, exact cost. With `only_of` (the source), on `conn` (the PostgreSQL target)
    only the calls whose request_id `only_of` holds."""
    where = ""
    if only_of is not None:
        conn.execute("CREATE TEMPORARY TABLE IF NOT EXISTS copy_source_ids (request_id TEXT PRIMARY KEY)")
        conn.execute("TRUNCATE copy_source_ids")
        with conn.raw.cursor() as cur, cur.copy("COPY copy_source_ids (request_id) FROM STDIN") as copy:
            for (rid,) in only_of.execute("SELECT request_id FROM calls"):
                copy.write_row((rid,))
        where = "WHERE request_id IN (SELECT request_id FROM copy_source_ids)"
    out: dict[str | None, Totals] = {}
    for model, calls, prompt, completion, total, cost in conn.execute(_TOTALS_SQL.format(where=where)):
        if model is not None:
            model = model.replace("\x00", "\ufffd")  # as copied
        out[model] = Totals(int(calls), int(prompt), int(completion), int(total), Decimal(cost or 0))
    return out
