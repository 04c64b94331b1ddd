"""Re-pricing history: recompute the cost of recorded calls from their stored token counts.

`reprice()` prices each call in range again with the given table (model, prompt, completion, cached,
reasoning and audio tokens, service tier, exactly as at record time) and, in one transaction, updates the
rows whose cost or priced flag changes: `cost_usd`, `priced`, `pricing_version`, `repriced_at`, and
`original_cost_usd` — set the first time only, so the cost first recorded survives any number of
re-pricings. Every run that writes leaves a `reprice_runs` row (the audit trail). The common case: a
model that had no price when its calls were made. In the same transaction the shared budgets' spend rows
(`budget_store.add_spend`) and, for calls in hours before `rollup_state.pruned_before` (never rebuilt:
their other calls are gone), the rollup rows holding them (`rollups.move_pruned`) move by the delta.

Both backends: `reprice` takes a Conn (or a sqlite3 connection), `reprice_file` a SQLite path or a
PostgreSQL URL; a write run holds the ledger's write lock (BEGIN IMMEDIATE; `db.lock_ledger` on PostgreSQL).

This module must never change a token count or anything but those five columns, never round a cost
(sums are exact decimals), and never write anything in a dry run.

    RepriceError (Exception)   the ledger cannot be re-priced (busy, not a ledger, bad option)
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from proxy.core.errors import MeterproxyError
from proxy.core.money import EXACT
from proxy.core.record import Usage
from proxy.core.times import iso
from proxy.ledger import budget_store, migrations_postgres, rollups
from proxy.ledger.db import lock_ledger
from proxy.ledger.migrations import MigrationError, migrate
from proxy.ledger.sqlconn import Conn, connect_postgres, wrap_sqlite
from proxy.ledger.target import Target, parse_target
from proxy.pricing.table import PriceTable

__all__ = ["AfterReprice", "ModelChange", "RepriceError", "RepriceReport", "render_report", "reprice", "reprice_file"]

_ZERO = Decimal(0)
_TRANSCRIPTIONS = "/v1/audio/transcriptions"
_PAGE = 5000  # rows read per query: memory stays flat over a ledger of any size
_GLOB_CHARS = frozenset("*?[")
_COLUMNS = ("id, started_at, model, prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, "
            "audio_prompt_tokens, audio_completion_tokens, total_tokens, service_tier, usage_source, "
            "cost_usd, priced, endpoint, key_id, \"user\", tags, operation, status")
_UPDATE = ("UPDATE calls SET cost_usd = ?, priced = ?, pricing_version = ?, repriced_at = ?, "
           "original_cost_usd = COALESCE(original_cost_usd, ?) WHERE id = ?")


class RepriceError(MeterproxyError):
    """The ledger cannot be re-priced; the message says why in one line."""


@dataclass(slots=True)
class ModelChange:
    """What changed for one model (the row's `model`; None when the call named none)."""

    model: str | None
    calls: int = 0  # calls whose cost or priced flag changed
    old_cost: Decimal = _ZERO  # their total cost before
    new_cost: Decimal = _ZERO  # and after
    newly_priced: int = 0  # of them, calls that were unpriced and now have a price
    newly_unpriced: int = 0  # calls whose model lost its price

    def as_json(self) -> dict[str, Any]:
        return {"model": self.model, "calls": self.calls, "old_cost_usd": format(self.old_cost, "f"),
                "new_cost_usd": format(self.new_cost, "f"), "newly_priced": self.newly_priced,
                "newly_unpriced": self.newly_unpriced}


@dataclass(slots=True)
class RepriceReport:
    pricing_version: str
    since: float | None
    until: float | None
    model: str | None
    dry_run: bool
    at: float  # when it ran (the rows' repriced_at)
    calls: int = 0  # calls in range (and of the model)
    changed: int = 0
    old_cost: Decimal = _ZERO  # over the changed calls
    new_cost: Decimal = _ZERO
    first_changed_at: float | None = None  # started_at range of the changed calls: rollups to rebuild
    last_changed_at: float | None = None
    run_id: int | None = None  # its reprice_runs row; None in a dry run
    by_model: dict[str | None, ModelChange] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"pricing_version": self.pricing_version, "since": iso(self.since), "until": iso(self.until),
                "model": self.model, "dry_run": self.dry_run, "at": iso(self.at), "calls": self.calls,
                "changed": self.changed, "old_cost_usd": format(self.old_cost, "f"),
                "new_cost_usd": format(self.new_cost, "f"), "first_changed_at": self.first_changed_at,
                "last_changed_at": self.last_changed_at, "run_id": self.run_id,
                "models": [c.as_json() for c in self.models()]}

    def models(self) -> list[ModelChange]:
        return sorted(self.by_model.values(), key=lambda c: (c.model is None, c.model or ""))


AfterReprice = Callable[[Conn, RepriceReport], None]
_Moved = dict[tuple[int, tuple[Any, ...]], tuple[int, Decimal]]


def reprice(conn: Conn | sqlite3.Connection, table: PriceTable, *, since: float | None = None,
            until: float | None = None, model: str | None = None, dry_run: bool = False,
            after: AfterReprice | None = None, now: float | None = None) -> RepriceReport:
    """Re-price the calls with `since` <= started_at < `until` (of `model`: a name, or a glob with * ? [).

    One transaction, taken with the write lock up front (BEGIN IMMEDIATE), so the rows read are the rows
    written. `after(conn, report)` runs inside it once the rows are updated (e.g. to rebuild rollups over
    the report's changed range; `first_changed_at` is None when nothing changed) and commits or fails
    with them. A run that writes is audited in
    `reprice_runs`, including one that found nothing to change; a dry run writes nothing.
    """
    if not isinstance(conn, Conn):
        conn = wrap_sqlite(conn)
    if conn.in_transaction:
        raise RepriceError("the connection is already in a transaction")
    report = RepriceReport(table.version, since, until, model, dry_run, time.time() if now is None else now)
    where, params = _filters(since, until, model, conn.dialect == "postgres")
    try:
        conn.begin(write=not dry_run)
        try:
            if not dry_run:
                lock_ledger(conn)
            state = rollups.read_state(conn)
            pruned = state.pruned_before if state.exists else None
            deltas, moved = _run(conn, table, report, where, params, pruned)
            if not dry_run:
                report.run_id = _audit(conn, report)
                budget_store.add_spend(conn, deltas)  # shared budgets' spend follows the rows' new costs
                rollups.move_pruned(conn, moved)  # pruned hours are never rebuilt: moved by their delta
                if after is not None:
                    after(conn, report)
            if dry_run:
                conn.rollback()
            else:
                conn.commit()
        except BaseException:
            try:
                conn.rollback()
            except conn.Error:
                pass
            raise
    except conn.Error as exc:
        raise RepriceError(f"cannot re-price the ledger: {exc}") from exc
    return report


def _filters(since: float | None, until: float | None, model: str | None,
             postgres: bool = False) -> tuple[str, list[Any]]:
    clauses: list[str] = ["id > ?"]
    params: list[Any] = []
    if since is not None:
        clauses.append("started_at >= ?")
        params.append(since)
    if until is not None:
        clauses.append("started_at < ?")
        params.append(until)
    if model is not None:
        if not _GLOB_CHARS & set(model):
            clauses.append("model = ?")
            params.append(model)
        elif postgres:  # no GLOB there: the same pattern as an anchored POSIX regular expression
            clauses.append("model ~ ?")
            params.append(glob_regex(model))
        else:
            clauses.append("model GLOB ?")
            params.append(model)
    return " AND ".join(clauses), params


def glob_regex(pattern: str) -> str:
    """SQLite's GLOB `pattern` (case-sensitive `*`, `?`, `[...]`, `[^...]`) as an anchored POSIX regex."""
    out, i = ["^"], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        elif ch == "[":
            end = pattern.find("]", i + 2 if pattern[i + 1:i + 2] in ("]", "^") else i + 1)
            if end < 0:  # GLOB matches nothing for an unclosed class; so does this
                return "$^"
            body = pattern[i + 1:end]
            negate = body.startswith("^")
            body = body[1:] if negate else body
            body = body.replace("\\", "\\\\")
            out.append(f"[{'^' if negate else ''}{body}]")
            i = end
        else:
            out.append("\\" + ch if not ch.isalnum() else ch)
        i += 1
    return "".join(out) + "$"


def _run(conn: Conn, table: PriceTable, report: RepriceReport, where: str, params: list[Any],
         pruned: int | None) -> tuple[dict[budget_store.SpendKey, Decimal], _Moved]:
    """Re-price page by page; returns the change of cost per budget spend row (`budget_store.spend_keys`),
    and the changes of calls in hours before `pruned` per (hour, dimension set), for `rollups.move_pruned`."""
    sql = f"SELECT {_COLUMNS} FROM calls WHERE {where} ORDER BY id LIMIT {_PAGE}"
    last = 0
    stamp = (table.version, report.at)
    deltas: dict[budget_store.SpendKey, Decimal] = {}
    moved: _Moved = {}
    while True:
        rows = conn.execute(sql, [last, *params]).fetchall()
        if not rows:
            return deltas, moved
        last = rows[-1][0]
        report.calls += len(rows)
        by_id = {row[0]: row for row in rows}
        updates = [u for u in (_reprice_row(row, table, report) for row in rows) if u is not None]
        for cost, priced, old, row_id in updates:
            row = by_id[row_id]
            delta = EXACT.subtract(Decimal(cost), Decimal(old))
            for key in budget_store.spend_keys(row[1], row[15], row[16], row[17]):
                deltas[key] = EXACT.add(deltas.get(key, _ZERO), delta)
            if pruned is not None and row[1] < pruned:
                at = (int(row[1]) // 3600 * 3600,
                      rollups.dims_of(conn, row[15], row[2], row[16], row[18], row[14], row[19], row[17]))
                unpriced, total = moved.get(at, (0, _ZERO))
                moved[at] = (unpriced + bool(row[13]) - priced, EXACT.add(total, delta))
        if updates and not report.dry_run:
            conn.executemany(_UPDATE, [(cost, priced, *stamp, old, row_id) for cost, priced, old, row_id in updates])


def _reprice_row(row: tuple[Any, ...], table: PriceTable,
                 report: RepriceReport) -> tuple[str, int, str, int] | None:
    (row_id, started_at, model, prompt, completion, cached, reasoning, audio_in, audio_out, total, tier,
     source, old_text, old_priced, endpoint) = row[:15]
    if source == "upstream" and endpoint == _TRANSCRIPTIONS and not (prompt or completion or total):
        # Usage in seconds of audio (whisper-1): the ledger does not keep the seconds, so it keeps its cost.
        return None
    if source == "none":
        # No usage was read: nothing to charge. Like the proxy, the row is unpriced only if its model is.
        cost, priced = _ZERO, model is None or table.resolve(model) is not None
    else:
        usage = Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached,
                      reasoning_tokens=reasoning, total_tokens=total, audio_prompt_tokens=audio_in or 0,
                      audio_completion_tokens=audio_out or 0)
        cost, priced = table.cost(model, usage, tier)
    old = Decimal(old_text)
    if cost == old and bool(old_priced) == priced:
        return None
    change = report.by_model.get(model)
    if change is None:
        change = report.by_model[model] = ModelChange(model)
    add = EXACT.add
    change.calls += 1
    change.old_cost, change.new_cost = add(change.old_cost, old), add(change.new_cost, cost)
    change.newly_priced += int(priced and not old_priced)
    change.newly_unpriced += int(bool(old_priced) and not priced)
    report.changed += 1
    report.old_cost, report.new_cost = add(report.old_cost, old), add(report.new_cost, cost)
    if report.first_changed_at is None or started_at < report.first_changed_at:
        report.first_changed_at = started_at
    if report.last_changed_at is None or started_at > report.last_changed_at:
        report.last_changed_at = started_at
    return format(cost, "f"), int(priced), old_text, row_id


def _audit(conn: Conn, report: RepriceReport) -> int:
    found = conn.execute(
        "INSERT INTO reprice_runs (at, since, until, model, pricing_version, calls, changed, old_cost_usd, "
        "new_cost_usd) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        (report.at, report.since, report.until, report.model, report.pricing_version, report.calls,
         report.changed, format(report.old_cost, "f"), format(report.new_cost, "f"))).fetchone()
    return int(found[0])


def reprice_file(db: str | Target, table: PriceTable, since: float | None, until: float | None,
                 model: str | None, dry_run: bool, after: AfterReprice | None) -> RepriceReport:
    """Re-price the ledger `db` (a SQLite path or a PostgreSQL URL) on a connection of its own."""
    target = db if isinstance(db, Target) else parse_target(db)
    if target.is_postgres:
        return _reprice_postgres(target, table, since, until, model, dry_run, after)
    db = target.where
    if not os.path.isfile(db):
        raise RepriceError(f"no ledger at {db}: file not found")
    try:
        conn = sqlite3.connect(db, timeout=30.0, isolation_level=None)
    except sqlite3.Error as exc:
        raise RepriceError(f"cannot open ledger {db}: {exc}") from exc
    try:
        if not dry_run:
            migrate(conn)  # a ledger from before migration 4 gains the columns re-pricing writes
        elif conn.execute("PRAGMA user_version").fetchone()[0] < 4:
            raise RepriceError(f"{db}: ledger schema is older than this meterproxy; run it once without --dry-run")
        return reprice(conn, table, since=since, until=until, model=model, dry_run=dry_run, after=after)
    except (MigrationError, sqlite3.Error) as exc:
        raise RepriceError(f"cannot re-price {db}: {exc}") from exc
    finally:
        conn.close()


def _reprice_postgres(target: Target, table: PriceTable, since: float | None, until: float | None,
                      model: str | None, dry_run: bool, after: AfterReprice | None) -> RepriceReport:
    import psycopg

    try:
        conn = connect_postgres(target, application_name="meterproxy-reprice")
    except psycopg.Error as exc:
        raise RepriceError(f"cannot open ledger {target}: {_first_line(exc)}") from exc
    try:
        if not dry_run:
            migrations_postgres.migrate(conn)
        elif migrations_postgres.schema_version(conn) < 1:
            raise RepriceError(f"{target}: no meterproxy ledger there; run it once without --dry-run")
        return reprice(conn, table, since=since, until=until, model=model, dry_run=dry_run, after=after)
    except (MigrationError, migrations_postgres.MigrationError, psycopg.Error) as exc:
        raise RepriceError(f"cannot re-price {target}: {_first_line(exc)}") from exc
    finally:
        conn.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def render_report(report: RepriceReport, source: str) -> str:
    """The command's table: one line per model whose calls changed, then the totals."""
    head = (f"pricing {source} (version {report.pricing_version})"
            f"{' — dry run: nothing written' if report.dry_run else ''}\n"
            f"calls in range: {report.calls}; changed: {report.changed}")
    if report.first_changed_at is not None:
        head += f" (started {iso(report.first_changed_at)} .. {iso(report.last_changed_at)})"
    lines = [head + "\n"]
    if report.changed:
        rows = [(c.model or "(none)", str(c.calls), format(c.old_cost, "f"), format(c.new_cost, "f"),
                 str(c.newly_priced)) for c in report.models()]
        rows.append(("total", str(report.changed), format(report.old_cost, "f"), format(report.new_cost, "f"),
                     str(sum(c.newly_priced for c in report.by_model.values()))))
        header = ("model", "calls", "old_cost_usd", "new_cost_usd", "newly_priced")
        widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
        for r in (header, *rows):
            cells = [r[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(r[1:], widths[1:]))]
            lines.append("  ".join(cells).rstrip() + "\n")
    lost = sum(c.newly_unpriced for c in report.by_model.values())
    if lost:
        lines.append(f"warning: {lost} calls lost their price: their models are not in this table\n")
    if report.run_id is not None:
        lines.append(f"recorded as re-pricing run {report.run_id}\n")
    return "".join(lines)
