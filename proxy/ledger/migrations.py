"""The ledger's schema, as an ordered list of numbered migrations.

The database's `PRAGMA user_version` is the number of migrations applied. `migrate()` applies the
missing ones in order, each in its own transaction together with the version bump, so a crash leaves
the database at a whole version. To change the schema, append a `Migration` to `MIGRATIONS`.

This module must never edit or reorder a migration that has shipped (databases in the field already
ran it), never touch a database newer than it knows, and never adopt a database that holds someone
else's tables.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from typing import NamedTuple

from proxy.core.errors import MeterproxyError

__all__ = ["MIGRATIONS", "Migration", "MigrationError", "create_private", "migrate", "schema_version"]

log = logging.getLogger("meterproxy")


class MigrationError(MeterproxyError):
    """The database cannot be brought to this code's schema."""


class Migration(NamedTuple):
    name: str
    sql: str  # a script of one or more statements; no BEGIN/COMMIT, migrate() wraps it


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "create calls",
        """
        CREATE TABLE calls (
            id INTEGER PRIMARY KEY,
            request_id TEXT NOT NULL UNIQUE,
            started_at REAL NOT NULL,
            ended_at REAL NOT NULL,
            key_id TEXT,
            key_hint TEXT,
            "user" TEXT,
            session TEXT,
            operation TEXT,
            tags TEXT NOT NULL DEFAULT '{}',
            method TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            requested_model TEXT,
            model TEXT,
            stream INTEGER NOT NULL,
            status INTEGER NOT NULL,
            error TEXT,
            latency_ms REAL NOT NULL,
            ttfb_ms REAL,
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            cached_tokens INTEGER NOT NULL,
            reasoning_tokens INTEGER NOT NULL,
            total_tokens INTEGER NOT NULL,
            usage_source TEXT NOT NULL,
            priced INTEGER NOT NULL,
            cost_usd TEXT NOT NULL
        );
        CREATE INDEX calls_started_at ON calls (started_at);
        CREATE INDEX calls_key_started_at ON calls (key_id, started_at);
        CREATE INDEX calls_user_started_at ON calls ("user", started_at);
        """,
    ),
    Migration(
        "counted usage: how exact a count is, and sampled counts beside the provider's",
        """
        ALTER TABLE calls ADD COLUMN approximate INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE calls ADD COLUMN lower_bound INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE calls ADD COLUMN usage_note TEXT;
        ALTER TABLE calls ADD COLUMN counted_prompt_tokens INTEGER;
        ALTER TABLE calls ADD COLUMN counted_completion_tokens INTEGER;
        CREATE INDEX calls_sampled ON calls (model) WHERE counted_prompt_tokens IS NOT NULL
            AND usage_source = 'upstream';
        """,
    ),
    Migration(
        "control: managed keys, limits per subject, sent budget alerts, a change counter; team spend index",
        # IF NOT EXISTS throughout: a repair that replays every migration's script must not trip on these.
        # keys_changes.version is bumped by triggers on every change to api_keys or subject_limits, by any
        # process (the CLI writes the file directly), so a running proxy can tell its caches are stale.
        # The calls index is on the very expression proxy.ledger.rollups.TEAM_SQL queries (the team is the
        # "team" tag); json_valid keeps a malformed tags value from failing a ledger insert.
        """
        CREATE TABLE IF NOT EXISTS api_keys (
            key_id TEXT PRIMARY KEY,
            key_hash TEXT NOT NULL UNIQUE,
            key_hint TEXT NOT NULL,
            "user" TEXT NOT NULL,
            team TEXT,
            name TEXT,
            budget_usd TEXT,
            budget_period TEXT NOT NULL DEFAULT 'month' CHECK (budget_period IN ('day', 'month', 'total')),
            expires_at REAL,
            models TEXT,
            rpm INTEGER,
            tpm INTEGER,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            revoked_at REAL
        );
        CREATE INDEX IF NOT EXISTS api_keys_user ON api_keys ("user");
        CREATE INDEX IF NOT EXISTS api_keys_team ON api_keys (team);
        CREATE TABLE IF NOT EXISTS subject_limits (
            kind TEXT NOT NULL CHECK (kind IN ('key', 'user', 'team')),
            name TEXT NOT NULL,
            budget_usd TEXT,
            budget_period TEXT NOT NULL DEFAULT 'month' CHECK (budget_period IN ('day', 'month', 'total')),
            rpm INTEGER,
            tpm INTEGER,
            updated_at REAL NOT NULL,
            PRIMARY KEY (kind, name)
        );
        CREATE TABLE IF NOT EXISTS budget_alerts (
            kind TEXT NOT NULL,
            name TEXT NOT NULL,
            period TEXT NOT NULL,
            threshold TEXT NOT NULL,
            created_at REAL NOT NULL,
            outcome TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            finished_at REAL,
            PRIMARY KEY (kind, name, period, threshold)
        );
        CREATE TABLE IF NOT EXISTS keys_changes (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            version INTEGER NOT NULL
        );
        INSERT OR IGNORE INTO keys_changes (id, version) VALUES (1, 0);
        CREATE TRIGGER IF NOT EXISTS api_keys_inserted AFTER INSERT ON api_keys
            BEGIN UPDATE keys_changes SET version = version + 1; END;
        CREATE TRIGGER IF NOT EXISTS api_keys_updated AFTER UPDATE ON api_keys
            BEGIN UPDATE keys_changes SET version = version + 1; END;
        CREATE TRIGGER IF NOT EXISTS api_keys_deleted AFTER DELETE ON api_keys
            BEGIN UPDATE keys_changes SET version = version + 1; END;
        CREATE TRIGGER IF NOT EXISTS subject_limits_inserted AFTER INSERT ON subject_limits
            BEGIN UPDATE keys_changes SET version = version + 1; END;
        CREATE TRIGGER IF NOT EXISTS subject_limits_updated AFTER UPDATE ON subject_limits
            BEGIN UPDATE keys_changes SET version = version + 1; END;
        CREATE TRIGGER IF NOT EXISTS subject_limits_deleted AFTER DELETE ON subject_limits
            BEGIN UPDATE keys_changes SET version = version + 1; END;
        CREATE INDEX IF NOT EXISTS calls_team_started_at ON calls (
            (CASE WHEN json_valid(tags) THEN json_extract(tags, '$.team') END), started_at);
        """,
    ),
    Migration(
        "pricing: the table version that priced a row, the service tier, audio tokens, re-pricing audit",
        """
        ALTER TABLE calls ADD COLUMN pricing_version TEXT;
        ALTER TABLE calls ADD COLUMN service_tier TEXT;
        ALTER TABLE calls ADD COLUMN audio_prompt_tokens INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE calls ADD COLUMN audio_completion_tokens INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE calls ADD COLUMN original_cost_usd TEXT;
        ALTER TABLE calls ADD COLUMN repriced_at REAL;
        CREATE TABLE IF NOT EXISTS reprice_runs (
            id INTEGER PRIMARY KEY,
            at REAL NOT NULL,
            since REAL,
            until REAL,
            model TEXT,
            pricing_version TEXT NOT NULL,
            calls INTEGER NOT NULL,
            changed INTEGER NOT NULL,
            old_cost_usd TEXT NOT NULL,
            new_cost_usd TEXT NOT NULL
        );
        """,
    ),
    Migration(
        "rollups: counters per hour, day and month bucket and dimension set, kept in step with calls",
        # rollups.py maintains these (the ledger's after_insert hook) and reports read them; see there.
        # rollup_dims gives each (key, model, user, operation, endpoint, status, team) an integer id, so
        # the rollups' primary key is all integers and NOT NULL (a NULL user is a value, not "unknown").
        # grain: 0 hour, 1 day, 2 month per dimension set; 3, 4, 5 the same buckets' totals (dim_id 0).
        # rollup_state.covered_id is the calls.id up to which the rollups hold every row: -1 (rebuild
        # needed) when calls already has rows, as here on an existing ledger; day and month rows are
        # complete for the days before days_until; raw calls before pruned_before were deleted by
        # retention (their rollups stay). rollup_dirty lists hours
        # whose calls were changed after insertion (a re-pricing): the trigger needs no Python function,
        # so any writer keeps the mark right, and reports read those hours from calls until rebuilt.
        """
        CREATE TABLE IF NOT EXISTS rollup_dims (
            id INTEGER PRIMARY KEY,
            key_id TEXT,
            model TEXT,
            "user" TEXT,
            operation TEXT,
            endpoint TEXT,
            status INTEGER,
            team  -- no type: kept exactly as json_extract gives it, as reports over calls see it
        );
        CREATE INDEX IF NOT EXISTS rollup_dims_all
            ON rollup_dims (key_id, model, "user", operation, endpoint, status, team);
        CREATE TABLE IF NOT EXISTS rollups (
            grain INTEGER NOT NULL,
            bucket INTEGER NOT NULL,
            dim_id INTEGER NOT NULL,
            calls INTEGER NOT NULL,
            errors INTEGER NOT NULL,
            unpriced_calls INTEGER NOT NULL,
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            cached_tokens INTEGER NOT NULL,
            reasoning_tokens INTEGER NOT NULL,
            total_tokens INTEGER NOT NULL,
            counted_calls INTEGER NOT NULL,
            counted_tokens INTEGER NOT NULL,
            cost_usd TEXT NOT NULL,
            cost_pico INTEGER,
            cost_exp INTEGER,
            PRIMARY KEY (grain, bucket, dim_id)
        ) WITHOUT ROWID;
        CREATE TABLE IF NOT EXISTS rollup_dirty (hour INTEGER PRIMARY KEY);
        CREATE TABLE IF NOT EXISTS rollup_state (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            covered_id INTEGER NOT NULL,
            days_until INTEGER,
            pruned_before INTEGER
        );
        INSERT OR IGNORE INTO rollup_state (id, covered_id, days_until, pruned_before)
            VALUES (1, CASE WHEN EXISTS (SELECT 1 FROM calls) THEN -1 ELSE 0 END, NULL, NULL);
        CREATE TRIGGER IF NOT EXISTS calls_rollup_dirty AFTER UPDATE ON calls
            WHEN OLD.started_at IS NOT NEW.started_at OR OLD.key_id IS NOT NEW.key_id
              OR OLD."user" IS NOT NEW."user" OR OLD.operation IS NOT NEW.operation
              OR OLD.tags IS NOT NEW.tags OR OLD.endpoint IS NOT NEW.endpoint OR OLD.model IS NOT NEW.model
              OR OLD.status IS NOT NEW.status OR OLD.prompt_tokens IS NOT NEW.prompt_tokens
              OR OLD.completion_tokens IS NOT NEW.completion_tokens
              OR OLD.cached_tokens IS NOT NEW.cached_tokens OR OLD.reasoning_tokens IS NOT NEW.reasoning_tokens
              OR OLD.total_tokens IS NOT NEW.total_tokens OR OLD.usage_source IS NOT NEW.usage_source
              OR OLD.priced IS NOT NEW.priced OR OLD.cost_usd IS NOT NEW.cost_usd
            BEGIN
                INSERT OR IGNORE INTO rollup_dirty (hour) VALUES (CAST(OLD.started_at AS INTEGER) / 3600 * 3600);
                INSERT OR IGNORE INTO rollup_dirty (hour) VALUES (CAST(NEW.started_at AS INTEGER) / 3600 * 3600);
            END;
        """,
    ),
    Migration(
        "rollup projections",
        # Finished days get each dimension's own rows too (rollups.py, "Projections"). Rolling every
        # day up again makes them: days_until goes back to NULL and the day and month rows go, so
        # reports read hours until the proxy's upkeep (RetentionTask) has rolled the days up anew, a
        # day per transaction (roll_days adds each day to its month: no month row may hold a day
        # that is not rolled up).
        # projected_until: the hours before it have their own rows (made a few hours per transaction
        # ahead of rolling their day up, so that no transaction holds the write lock for long).
        """
        ALTER TABLE rollup_state ADD COLUMN projected_until INTEGER;
        UPDATE rollup_state SET days_until = NULL WHERE id = 1;
        DELETE FROM rollups WHERE grain IN (1, 2, 4, 5);
        """,
    ),
    Migration(
        "managed keys: the routes a key may call, and its own OpenAI-Organization and OpenAI-Project",
        # routes: a JSON list of route specs (proxy.routes); NULL: the default inference routes.
        """
        ALTER TABLE api_keys ADD COLUMN routes TEXT;
        ALTER TABLE api_keys ADD COLUMN organization TEXT;
        ALTER TABLE api_keys ADD COLUMN project TEXT;
        """,
    ),
    Migration(
        "replicas: one row per running proxy, its heartbeat (replica_store.py)",
        """
        CREATE TABLE IF NOT EXISTS replicas (
            id TEXT PRIMARY KEY,
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            version TEXT NOT NULL,
            pricing_version TEXT,
            started_at REAL NOT NULL,
            seen_at REAL NOT NULL,
            interval_s REAL NOT NULL
        );
        """,
    ),
    Migration(
        "rollup views: rows per pair of dimensions and per configured time zone (rollup_views.py)",
        # A view's rows live at grains VIEW_BASE + 10 * id + DAY/MONTH. zone '' is UTC; dims names what its
        # rows are summed by ('*': every dimension set, '': totals, else DIMS names joined by ','). Rows
        # exist for the days (local days in a zone) starting in [days_from, days_until). rollup_state.views
        # counts them: the hook marks a late call's hour dirty only when there are some.
        """
        CREATE TABLE IF NOT EXISTS rollup_views (
            id INTEGER PRIMARY KEY,
            zone TEXT NOT NULL,
            dims TEXT NOT NULL,
            days_from INTEGER,
            days_until INTEGER,
            UNIQUE (zone, dims)
        );
        ALTER TABLE rollup_state ADD COLUMN views INTEGER NOT NULL DEFAULT 0;
        """,
    ),
)


def create_private(path: str) -> None:
    """Create the database file empty and readable by its owner only (0600, whatever the umask), unless it
    exists; an existing one that others may read is named in a warning, and left as its owner made it.

    Before SQLite creates it: SQLite gives the -wal and -shm files it makes the database file's mode, so
    this one mode covers all three. A path it cannot create is left to SQLite, whose error names it."""
    if path == ":memory:" or path.startswith("file:"):
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        try:
            st = os.stat(path)
        except OSError:
            return
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISREG(st.st_mode) and mode & 0o077:
            log.warning("ledger %s is readable by others (mode %o): its -wal and -shm files will be too; "
                        "chmod 600 it", path, mode)
        return
    except OSError:
        return
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, upto: int | None = None) -> int:
    """Bring the database to the newest schema (or to version `upto`: an older ledger, for tests); return
    the resulting version. Safe to call again."""
    current = schema_version(conn)
    known = len(MIGRATIONS)
    if current > known:
        raise MigrationError(
            f"database schema version {current} is newer than this meterproxy knows ({known}); "
            "upgrade meterproxy"
        )
    if current == 0 and _has_foreign_objects(conn):
        raise MigrationError("database already holds tables but is not a meterproxy ledger")
    for number, migration in enumerate(MIGRATIONS[current:upto], start=current + 1):
        _apply(conn, number, migration)
    return schema_version(conn)


def _has_foreign_objects(conn: sqlite3.Connection) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE name NOT LIKE 'sqlite!_%' ESCAPE '!' LIMIT 1"
    ).fetchone()
    return row is not None


def _apply(conn: sqlite3.Connection, number: int, migration: Migration) -> None:
    # IMMEDIATE takes the write lock up front, so processes starting at once serialise here, and the version
    # is read again under the lock: a process that waited while another applied this migration skips it
    # (running it again would fail, e.g. on a column that now exists). The statements run one by one inside
    # that transaction (executescript would commit it first). The version is an int we produce, never user
    # input, so formatting it into PRAGMA is safe (PRAGMA takes no bound parameters).
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if schema_version(conn) >= number:
                conn.execute("COMMIT")
                return  # another process applied it while we waited for the lock
            for statement in _statements(migration.sql):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise
    except sqlite3.Error as exc:
        raise MigrationError(f"migration {number} ({migration.name}) failed: {exc}") from exc


def _statements(script: str) -> list[str]:
    """The statements of `script`, whole (a trigger's body with its own semicolons is one statement)."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip().strip(";").strip():
                statements.append(buffer)
            buffer = ""
    if buffer.strip():
        statements.append(buffer)
    return statements
