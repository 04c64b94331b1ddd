"""Reading call rows: pages of calls, one call, the export's stream, accuracy sums and a subject's spend.

Read functions over a `Conn` (SQLite or PostgreSQL) taking plain values and returning rows as the
reports want them on both backends: money as decimal text exactly as stored (PostgreSQL's NUMERIC comes
back as text formatted like SQLite's), flags and times as stored. The logic around them (parameters,
rendering) is `proxy.reports`; this module never writes and binds every value.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from decimal import Decimal
from typing import Any

from proxy.ledger.sqlconn import Conn, pg_sql

__all__ = [
    "CALL_FIELDS", "accuracy_rows", "call_by_request_id", "call_columns", "calls_page", "iter_call_rows",
    "where_sql",
]  # fmt: skip

_TOKENS = ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens", "total_tokens")
# calls_page output after the id, in SELECT order; "ts" is started_at (rendered by the caller).
CALL_FIELDS = (
    "request_id", "ts", "key_id", "key_hint", "user", "session", "operation", "tags", "method",
    "endpoint", "model", "requested_model", "stream", "status", "error", "latency_ms", "ttfb_ms",
    *_TOKENS, "usage_source", "priced", "cost_usd", "approximate", "lower_bound", "usage_note",
    "counted_prompt_tokens", "counted_completion_tokens",
)  # fmt: skip
_CALL_SQL = ", ".join({"ts": "started_at", "user": '"user"'}.get(name, name) for name in ("id", *CALL_FIELDS))
_FETCH = 2000


def where_sql(*conditions: tuple[str, Any]) -> tuple[str, list[Any]]:
    """" WHERE a AND b" of the conditions whose value is not None, and those values."""
    used = [(sql, value) for sql, value in conditions if value is not None]
    if not used:
        return "", []
    return " WHERE " + " AND ".join(sql for sql, _ in used), [value for _, value in used]


def _plain(row: Sequence[Any]) -> tuple[Any, ...]:
    """A row as SQLite gives it: PostgreSQL's NUMERIC money (a Decimal) as the decimal text stored."""
    return tuple(format(v, "f") if isinstance(v, Decimal) else v for v in row)


def calls_page(conn: Conn, *, key: str | None, user: str | None, model: str | None, status: int | None,
               usage_source: str | None, before_id: int | None, limit: int) -> list[tuple[Any, ...]]:
    """Up to `limit` calls, newest (highest id) first: (id, *CALL_FIELDS) each."""
    where, params = where_sql(("key_id = ?", key), ('"user" = ?', user), ("model = ?", model),
                              ("status = ?", status), ("usage_source = ?", usage_source), ("id < ?", before_id))
    sql = f"SELECT {_CALL_SQL} FROM calls{where} ORDER BY id DESC LIMIT ?"
    return [_plain(row) for row in conn.execute(sql, [*params, limit])]


def call_by_request_id(conn: Conn, request_id: str) -> dict[str, Any] | None:
    """Every column of the call with `request_id`, by name; None when there is none."""
    cursor: Any = conn.execute("SELECT * FROM calls WHERE request_id = ?", (request_id,))
    found = cursor.fetchone()
    if found is None:
        return None
    return dict(zip((d[0] for d in cursor.description), _plain(found)))


def call_columns(conn: Conn) -> list[str]:
    """The calls table's columns, in the table's order."""
    if conn.is_postgres:
        found = conn.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 'calls' "
                             "AND table_schema = current_schema() ORDER BY ordinal_position")
        return [str(name) for (name,) in found]
    return [row[1] for row in conn.execute("PRAGMA table_info(calls)")]


def iter_call_rows(conn: Conn, names: list[str], *, since: float | None, until: float | None,
                   key: str | None) -> Generator[tuple[Any, ...], None, None]:
    """The columns `names` (from call_columns) of calls started in [since, until) (and of `key`), in
    (started_at, id) order, streamed: SQLite steps its cursor, PostgreSQL reads a server-side cursor in
    batches inside a read-only snapshot of its own."""
    select = ", ".join(f'"{n}"' for n in names)  # names come from the schema, not the caller
    where, params = where_sql(("started_at >= ?", since), ("started_at < ?", until), ("key_id = ?", key))
    sql = f"SELECT {select} FROM calls{where} ORDER BY started_at, id"
    if not conn.is_postgres:
        cursor: Any = conn.execute(sql, params)
        try:
            while batch := cursor.fetchmany(_FETCH):
                for row in batch:
                    yield row
        finally:
            cursor.close()
        return
    own = not conn.in_transaction
    if own:  # a named cursor lives in a transaction
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    try:
        with conn.raw.cursor(name="meterproxy_export") as named:
            named.itersize = _FETCH
            named.execute(pg_sql(sql), params)
            while batch := named.fetchmany(_FETCH):
                for row in batch:
                    yield _plain(row)
    finally:
        if own:
            conn.rollback()


def _side_sql(counted: str, actual: str) -> list[str]:
    diff = f"({counted} - {actual})"
    present = f"{counted} IS NOT NULL"
    return [
        f"COALESCE(SUM(CASE WHEN {present} THEN 1 ELSE 0 END), 0)",
        f"AVG(CASE WHEN {present} THEN CAST({diff} AS DOUBLE PRECISION) END)",
        f"AVG(CASE WHEN {present} THEN CAST(ABS({diff}) AS DOUBLE PRECISION) END)",
        f"MAX(CASE WHEN {present} THEN ABS({diff}) END)",
        f"AVG(CASE WHEN {present} AND {actual} > 0 THEN 100.0 * ABS({diff}) / CAST({actual} AS DOUBLE PRECISION) END)",
    ]


_SIDES = (("counted_prompt_tokens", "prompt_tokens"), ("counted_completion_tokens", "completion_tokens"))
_SAMPLED = "(counted_prompt_tokens IS NOT NULL OR counted_completion_tokens IS NOT NULL)"


def accuracy_rows(conn: Conn, *, since: float | None, until: float | None,
                  model: str | None) -> list[tuple[Any, ...]]:
    """Per model of the sampled calls (both figures kept), most sampled first: (model, calls, then per side
    prompt and completion: calls with a count, mean error, mean absolute error, worst absolute error, mean
    absolute error in percent of the provider's figure). Means are floats on both backends."""
    where, params = where_sql(("usage_source = ?", "upstream"), ("started_at >= ?", since),
                              ("started_at < ?", until), ("model = ?", model))
    select = ["model", "COUNT(*)"] + [sql for counted, actual in _SIDES for sql in _side_sql(counted, actual)]
    sql = (f"SELECT {', '.join(select)} FROM calls{where}{' AND' if where else ' WHERE'} {_SAMPLED} "
           "GROUP BY model ORDER BY COUNT(*) DESC, model")
    return [tuple(row) for row in conn.execute(sql, params)]


