"""The SQL of budgets and rate limits: a subject's spend in the ledger, and the shared state of replicas.

`spend_since` reads either backend. The rest is PostgreSQL's (migration 2), used by
`control/shared.py`: settled spend per subject-period (`budget_spend`), leased reservations of calls in
flight (`reservations`), and the sliding log of admitted requests (`rate_events`, locked through
`rate_subjects`). Locks are always taken in one order (budget_spend rows, then rate_subjects rows, each
sorted by key in SQL), so no two transactions wait on each other in a cycle. `settle_rows` is the ledger's
`after_insert` hook on PostgreSQL: inside the batch's transaction every row's cost joins the spend rows of
its subjects and its reservation goes, so the spend and the row commit together, or neither.
Design notes: docs/budgets.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from proxy.core.attribution import TEAM_TAG
from proxy.core.money import EXACT
from proxy.ledger import rollups
from proxy.ledger.db import COLUMNS, TwoPhase
from proxy.ledger.sqlconn import Conn

__all__ = [
    "SpendKey", "add_spend", "adjust_tokens", "in_calls", "begin_reservation", "commit_reservation", "create_spend", "holds_now", "create_rate_subjects", "db_now", "insert_holds",
    "insert_rate_events", "keep_holds", "live_holds", "lock_rate_subjects", "lock_spend", "period_labels", "prune",
    "rate_entries", "rate_windows", "release", "renew", "settle_rows", "spend_keys", "spend_since", "spooled_holds",
]

SpendKey = tuple[str, str, str, str]  # (kind, name, period, label)
RateKey = tuple[str, str]  # (kind, name)
_ZERO = Decimal(0)
_SUBJECT = {"key": "key_id = ?", "user": '"user" = ?'}
_I = {name: i for i, name in enumerate(COLUMNS)}
_ID, _STARTED, _KEY, _USER, _TAGS, _COST = (_I[c] for c in ("request_id", "started_at", "key_id", "user",
                                                              "tags", "cost_usd"))


def _subject_sql(conn: Conn, kind: str) -> str:
    return f"{rollups.team_sql(conn)} = ?" if kind == "team" else _SUBJECT[kind]


_DIM = {"key": "d.key_id", "user": 'd."user"', "team": "d.team"}


def spend_since(conn: Conn, kind: str, name: str, since: float, until: float | None = None) -> Decimal:
    """Exact spend of a subject in calls started at or after `since` (and before `until`, if given).

    Pruned calls count (retention deletes rows, not spend): hours before `rollup_state.pruned_before` are
    read from the hour rollups, which hold every pruned row, and the rest from `calls`. So a `total`
    budget has spent what it spent on either backend, however many rows were pruned."""
    total = _ZERO
    state = rollups.read_state(conn)
    pruned = state.pruned_before if state.exists else None
    if pruned is not None and pruned > since:
        hi = pruned if until is None else min(pruned, until)
        (rolled,) = conn.execute(
            f"SELECT decimal_sum(r.cost_usd) FROM rollups r JOIN rollup_dims d ON d.id = r.dim_id WHERE r.grain = ?"
            f" AND r.bucket >= ? AND r.bucket < ? AND {_DIM[kind]} = ?",
            (rollups.HOUR, int(since) // 3600 * 3600, hi, name)).fetchone()
        total = Decimal(rolled) if rolled is not None else _ZERO
        if until is not None and until <= pruned:
            return total
        since = float(pruned)
    sql = f"SELECT decimal_sum(cost_usd) FROM calls WHERE {_subject_sql(conn, kind)} AND started_at >= ?"
    params: list[Any] = [name, since]
    if until is not None:
        sql += " AND started_at < ?"
        params.append(until)
    (raw,) = conn.execute(sql, params).fetchone()
    return EXACT.add(total, Decimal(raw)) if raw is not None else total


def period_labels(started_at: float) -> tuple[tuple[str, str], ...]:
    """(period, label) of every budget period holding `started_at`, spelled as `control.limits.period_of`."""
    moment = datetime.fromtimestamp(started_at, timezone.utc)
    return ("day", moment.strftime("%Y-%m-%d")), ("month", moment.strftime("%Y-%m")), ("total", "total")


def db_now(conn: Conn) -> float:
    """The database's clock (unix seconds): one clock for every replica's windows and leases."""
    return float(conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()[0])


def _in(columns: str, width: int, count: int) -> str:
    one = "(" + ", ".join("?" * width) + ")"
    return f"({columns}) IN ({', '.join([one] * count)})"


def _flat(keys: Iterable[Sequence[Any]]) -> list[Any]:
    return [part for key in keys for part in key]


# --- reservations ------------------------------------------------------------------------------------
def lock_spend(conn: Conn, keys: Sequence[SpendKey]) -> dict[SpendKey, Decimal]:
    """Lock the spend rows of `keys` (in the transaction) and read them; a key without a row is absent."""
    if not keys:
        return {}
    rows = conn.execute(
        f"SELECT kind, name, period, label, spent FROM budget_spend WHERE {_in('kind, name, period, label', 4, len(keys))}"
        " ORDER BY kind, name, period, label FOR UPDATE", _flat(keys)).fetchall()
    return {(r[0], r[1], r[2], r[3]): Decimal(r[4]) for r in rows}


def create_spend(conn: Conn, key: SpendKey, since: float, until: float | None) -> None:
    """Make the spend row of `key` from the exact ledger sum of its period (its own transaction, not in
    another). Ledger writes wait meanwhile (a SHARE lock on calls): a row committed before it is in the sum,
    a row committed after finds the spend row and adds itself (`settle_rows`); none is counted twice."""
    kind, name, period, label = key
    with conn.transaction():
        conn.execute("LOCK TABLE calls IN SHARE MODE")
        if conn.execute("SELECT 1 FROM budget_spend WHERE kind = ? AND name = ? AND period = ? AND label = ?",
                        key).fetchone() is None:
            spent = spend_since(conn, kind, name, since, until)
            conn.execute("INSERT INTO budget_spend (kind, name, period, label, spent) VALUES (?, ?, ?, ?, ?)"
                         " ON CONFLICT DO NOTHING", (kind, name, period, label, spent))


def live_holds(conn: Conn, keys: Sequence[SpendKey], now: float) -> dict[SpendKey, Decimal]:
    """What unexpired reservations hold against each key (keys without any are absent)."""
    if not keys:
        return {}
    rows = conn.execute(
        "SELECT kind, name, period, label, decimal_sum(worst_usd) FROM reservations WHERE "
        f"{_in('kind, name, period, label', 4, len(keys))} AND expires_at > ? GROUP BY kind, name, period, label",
        [*_flat(keys), now]).fetchall()
    return {(r[0], r[1], r[2], r[3]): Decimal(r[4]) for r in rows}


def begin_reservation(conn: Conn) -> None:
    """Open a reservation's transaction: not waited for on disk (a lost reservation costs a lease at most;
    rows are what must be durable). One round trip."""
    conn.execute("BEGIN; SET LOCAL synchronous_commit = off")


def holds_now(conn: Conn, keys: Sequence[SpendKey]) -> tuple[float, dict[SpendKey, Decimal]]:
    """The database's clock and what unexpired reservations hold against each key, in one round trip."""
    if not keys:
        return db_now(conn), {}
    rows = conn.execute(
        "WITH t AS (SELECT extract(epoch FROM clock_timestamp())::float8 AS now) "
        "SELECT t.now, r.kind, r.name, r.period, r.label, decimal_sum(r.worst_usd) FROM t LEFT JOIN reservations r"
        f" ON {_in('r.kind, r.name, r.period, r.label', 4, len(keys))} AND r.expires_at > t.now"
        " GROUP BY t.now, r.kind, r.name, r.period, r.label", _flat(keys)).fetchall()
    return float(rows[0][0]), {(r[1], r[2], r[3], r[4]): Decimal(r[5]) for r in rows if r[1] is not None}


def commit_reservation(conn: Conn, reservation: str, replica: str, keys: Sequence[SpendKey], worst_usd: Decimal,
                       expires_at: float, subjects: Sequence[RateKey], at: float, tokens: int) -> None:
    """Insert the holds and the rate events and commit, pipelined: one round trip."""
    with conn.raw.pipeline():
        if keys:
            insert_holds(conn, reservation, replica, keys, worst_usd, expires_at)
        if subjects:
            insert_rate_events(conn, reservation, subjects, at, tokens)
        conn.commit()


def insert_holds(conn: Conn, reservation: str, replica: str, keys: Sequence[SpendKey], worst_usd: Decimal,
                 expires_at: float) -> None:
    conn.executemany(
        "INSERT INTO reservations (id, kind, name, period, label, replica, worst_usd, expires_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [(reservation, *key, replica, worst_usd, expires_at) for key in keys])


def renew(conn: Conn, reservations: Sequence[str], expires_at: float) -> int:
    """Extend the lease of these reservations (the calls in flight of a live replica); how many rows."""
    if not reservations:
        return 0
    return conn.execute("UPDATE reservations SET expires_at = ? WHERE id = ANY(?)",
                        (expires_at, list(reservations))).rowcount


def keep_holds(conn: Conn, kept: dict[str, tuple[list[SpendKey], Decimal]], replica: str,
               expires_at: float) -> set[str]:
    """Hold the cost of calls whose rows wait in a spool (`kept`: request id -> spend keys, cost) until their
    rows are in `calls`: those already there are returned (their holds go: the replay's hook settled them);
    the others' holds are renewed, or made again if their lease ran out and a prune took them — on the keys
    that have a spend row (a budget's; see below). Own
    transaction. A replay committing meanwhile may leave a hold of its own id until the next call (counted
    twice for that moment: more refused, never more admitted)."""
    if not kept:
        return set()
    ids = list(kept)
    with conn.transaction():
        done = {r[0] for r in conn.execute("SELECT request_id FROM calls WHERE request_id = ANY(?)", (ids,))}
        if done:
            conn.execute("DELETE FROM reservations WHERE id = ANY(?)", (list(done),))
        rows = [(rid, *key, cost) for rid, (keys, cost) in sorted(kept.items()) if rid not in done for key in keys]
        if rows:
            # One statement over arrays, not one per hold (a restart may bring back every call of a long
            # outage, `spooled_holds`: nine spend keys each), and only where a spend row exists: a budget
            # is checked against its spend row, which its first admission makes, so a key without one has
            # no budget to hold against yet (should it get one, the next renewal holds it).
            conn.execute(
                "INSERT INTO reservations (id, kind, name, period, label, replica, worst_usd, expires_at)"
                " SELECT u.id, u.kind, u.name, u.period, u.label, ?, u.worst_usd, ? FROM unnest(?::text[],"
                " ?::text[], ?::text[], ?::text[], ?::text[], ?::numeric[]) AS u(id, kind, name, period, label,"
                " worst_usd) JOIN budget_spend b ON (b.kind, b.name, b.period, b.label) = (u.kind, u.name,"
                " u.period, u.label) ON CONFLICT (id, kind, name, period, label) DO UPDATE"
                " SET worst_usd = excluded.worst_usd, expires_at = excluded.expires_at",
                [replica, expires_at, *([r[i] for r in rows] for i in range(6))])
    return done


def spooled_holds(rows: Iterable[Sequence[Any]]) -> dict[str, tuple[list[SpendKey], Decimal]]:
    """What `keep_holds` takes, for rows read from a spool (COLUMNS order): each row's request id, the spend
    rows its replay's `settle_rows` will charge, and its cost (rows that cost nothing hold nothing)."""
    kept: dict[str, tuple[list[SpendKey], Decimal]] = {}
    for row in rows:
        cost = Decimal(row[_COST])
        keys = spend_keys(row[_STARTED], row[_KEY], row[_USER], row[_TAGS]) if cost else []
        if keys:
            kept[str(row[_ID])] = (keys, cost)
    return kept


def in_calls(conn: Conn, ids: Sequence[str]) -> set[str]:
    """Which of these request ids have their row in `calls` (either backend; a few hundred per query)."""
    found: set[str] = set()
    for i in range(0, len(ids), 500):
        part = list(ids[i:i + 500])
        found.update(r[0] for r in conn.execute(
            f"SELECT request_id FROM calls WHERE request_id IN ({', '.join('?' * len(part))})", part))
    return found


def release(conn: Conn, reservation: str) -> None:
    """Take back a call's holds and rate events (it was not forwarded, or its row could not be stored)."""
    with conn.transaction():
        conn.execute("SET LOCAL synchronous_commit = off")
        conn.execute("DELETE FROM reservations WHERE id = ?", (reservation,))
        conn.execute("DELETE FROM rate_events WHERE id = ?", (reservation,))


def prune(conn: Conn, now: float, window: float, day_label: str, month_label: str) -> None:
    """Drop expired reservations, rate events out of the window, spend rows of periods before these labels."""
    conn.execute("DELETE FROM reservations WHERE expires_at <= ?", (now,))
    conn.execute("DELETE FROM rate_events WHERE at <= ?", (now - window,))
    conn.execute("DELETE FROM budget_spend WHERE (period = 'day' AND label < ?) OR (period = 'month' AND label < ?)",
                 (day_label, month_label))


# --- rate windows ------------------------------------------------------------------------------------
def lock_rate_subjects(conn: Conn, subjects: Sequence[RateKey]) -> set[RateKey]:
    """Lock the rate rows of `subjects` (in the transaction); the ones that exist."""
    if not subjects:
        return set()
    rows = conn.execute(f"SELECT kind, name FROM rate_subjects WHERE {_in('kind, name', 2, len(subjects))}"
                        " ORDER BY kind, name FOR UPDATE", _flat(subjects)).fetchall()
    return {(r[0], r[1]) for r in rows}


def create_rate_subjects(conn: Conn, subjects: Sequence[RateKey]) -> None:
    """Make missing rate rows (outside any transaction: each commits on its own)."""
    for subject in sorted(subjects):
        conn.execute("INSERT INTO rate_subjects (kind, name) VALUES (?, ?) ON CONFLICT DO NOTHING", subject)


def rate_windows(conn: Conn, subjects: Sequence[RateKey], since: float) -> dict[RateKey, tuple[int, int, float]]:
    """(requests, tokens, latest time) in each subject's window of events after `since`."""
    if not subjects:
        return {}
    rows = conn.execute(
        f"SELECT kind, name, count(*), COALESCE(sum(tokens), 0), max(at) FROM rate_events WHERE "
        f"{_in('kind, name', 2, len(subjects))} AND at > ? GROUP BY kind, name",
        [*_flat(subjects), since]).fetchall()
    return {(r[0], r[1]): (int(r[2]), int(r[3]), float(r[4])) for r in rows}


def rate_entries(conn: Conn, subject: RateKey, since: float) -> list[tuple[float, int]]:
    """The (time, tokens) of a subject's window, oldest first (read only to say when to retry)."""
    rows = conn.execute("SELECT at, tokens FROM rate_events WHERE kind = ? AND name = ? AND at > ? ORDER BY at, id",
                        (*subject, since)).fetchall()
    return [(float(r[0]), int(r[1])) for r in rows]


def insert_rate_events(conn: Conn, request: str, subjects: Sequence[RateKey], at: float, tokens: int) -> None:
    conn.executemany("INSERT INTO rate_events (id, kind, name, at, tokens) VALUES (?, ?, ?, ?, ?)",
                     [(request, *subject, at, tokens) for subject in subjects])


def adjust_tokens(conn: Conn, request: str, tokens: int) -> None:
    """Replace a request's estimated tokens with the real count."""
    conn.execute("UPDATE rate_events SET tokens = ? WHERE id = ?", (tokens, request))


# --- settlement, in the ledger's transaction ---------------------------------------------------------
def _team(tags: object) -> str | None:
    if not isinstance(tags, str) or TEAM_TAG not in tags:
        return None
    try:
        parsed = json.loads(tags)
    except ValueError:
        return None
    team = parsed.get(TEAM_TAG) if isinstance(parsed, dict) else None
    return team if isinstance(team, str) and team else None


def spend_keys(started_at: float, key_id: Any, user: Any, tags: Any) -> list[SpendKey]:
    """The spend rows a call counts in: its key, user and team, each in its day, month and total."""
    labels = period_labels(float(started_at))
    return [(kind, name, period, label)
            for kind, name in (("key", key_id), ("user", user), ("team", _team(tags))) if name
            for period, label in labels]


# Whether there is any spend row, any reservation: asked with the batch's BEGIN, after the write lock.
# Under that lock no spend row can be made (`_make_spend_row` takes SHARE on calls, which waits for the batch)
# and every reservation of the batch's calls is committed already (taken before the call was forwarded);
# so when there are none, settling has nothing to change, and neither its Python nor its statements run.
_ANY_SQL = "SELECT EXISTS (SELECT 1 FROM budget_spend), EXISTS (SELECT 1 FROM reservations)"


def _settle_rows(conn: Conn, rows: list[tuple[Any, ...]], found: Sequence[Any] | None) -> None:
    """The ledger's `after_insert` hook (PostgreSQL): add each row's cost to the spend rows of its key, user
    and team in its day, month and total, and delete its reservation, in the batch's own transaction.
    `found` is _ANY_SQL's answer when the caller asked it in this transaction, under the write lock."""
    if conn.dialect != "postgres" or not rows:
        return
    spend, held = found if found else (True, True)
    if held:
        conn.execute("DELETE FROM reservations WHERE id = ANY(?)", ([row[_ID] for row in rows],))
    if not spend:
        return
    amounts: dict[SpendKey, Decimal] = {}
    for row in rows:
        cost = Decimal(row[_COST])
        if not cost:
            continue
        for key in spend_keys(row[_STARTED], row[_KEY], row[_USER], row[_TAGS]):
            amounts[key] = EXACT.add(amounts.get(key, _ZERO), cost)
    add_spend(conn, amounts)


settle_rows = TwoPhase("any_spend", _ANY_SQL, _settle_rows)


def add_spend(conn: Conn, amounts: dict[SpendKey, Decimal]) -> None:
    """Add `amounts` to the spend rows that exist (PostgreSQL; in the caller's transaction, which holds the
    ledger's write lock). A missing row is made later from the exact ledger sum, which has them already."""
    if conn.dialect != "postgres":
        return
    amounts = {k: v for k, v in amounts.items() if v}
    if not amounts:
        return
    keys = sorted(amounts)
    columns = [[k[i] for k in keys] for i in range(4)]
    # Lock the spend rows there are in key order first (admissions lock them in the same order, so the two
    # cannot deadlock), then add to them in one statement: every row it changes is already locked, and no
    # spend row can be created meanwhile (that takes a SHARE lock on calls, which this batch's lock
    # excludes). Neither needs an answer, so on the ledger's pipeline both ride with the COMMIT.
    conn.execute("SELECT 1 FROM budget_spend WHERE (kind, name, period, label) IN "
                 "(SELECT * FROM unnest(?::text[], ?::text[], ?::text[], ?::text[])) ORDER BY kind, name, period,"
                 " label FOR UPDATE", columns)
    conn.execute("UPDATE budget_spend AS b SET spent = b.spent + u.amount FROM unnest(?::text[], ?::text[], "
                 "?::text[], ?::text[], ?::numeric[]) AS u(kind, name, period, label, amount) WHERE b.kind = u.kind"
                 " AND b.name = u.name AND b.period = u.period AND b.label = u.label",
                 [*columns, [amounts[k] for k in keys]])
