"""Building ledgers for tests: random and dated calls, written through the real writer, on either backend.

Every helper takes a ledger by its `--db` value (a SQLite path or a PostgreSQL URL, as `ledger_target`
gives) or an open `Conn`; `connect(where)` opens a plain autocommit Conn on either.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sqlite3
import time
from calendar import timegm
from decimal import Decimal
from pathlib import Path
from typing import Any

from proxy.core.money import EXACT
from proxy.core.record import CallRecord
from proxy.ledger import migrations_postgres, rollup_build, rollups
from proxy.ledger.migrations import migrate
from proxy.ledger.sqlconn import Conn, connect_postgres, wrap_sqlite
from proxy.ledger.target import parse_target
from proxy.ledger.writer import INSERT_SQL, Ledger, record_row

Where = str | os.PathLike[str]


def connect(where: Where, functions: bool = True) -> Conn:
    """A plain autocommit connection to the ledger (SQLite: with the decimal functions registered unless
    `functions` is False; PostgreSQL: migrated, as the proxy would find it)."""
    target = parse_target(where)
    if target.is_postgres:
        conn = connect_postgres(target, application_name="meterproxy-tests")
        migrations_postgres.migrate(conn)
        return conn
    raw = sqlite3.connect(target.where, isolation_level=None)
    if functions:
        rollups.register_functions(raw)
    return wrap_sqlite(raw, target.shown)


def is_postgres(where: Where | Conn) -> bool:
    return where.dialect == "postgres" if isinstance(where, Conn) else parse_target(where).is_postgres

T0 = float(timegm((2026, 1, 27, 0, 0, 0)))  # a span over two month ends


SPAN = 40 * 86400


DAY = 86400




def random_call(rng: random.Random, n: int, start: float = T0, span: float = SPAN) -> CallRecord:
    """A call with every dimension varied, None and "" included, and costs of every shape."""
    status = rng.choice([200, 200, 200, 201, 429, 500, 499, 0])
    prompt, completion = rng.randrange(0, 5000), rng.randrange(0, 800)
    cost = rng.choice([
        Decimal(0), Decimal(rng.randrange(10**6)).scaleb(-rng.randrange(0, 11)),
        Decimal(rng.randrange(1, 10**9)).scaleb(-rng.randrange(13, 20)),  # beyond picodollars
        Decimal("123456789012.5"), Decimal("0.10"),
    ])  # fmt: skip
    tags = rng.choice([{}, {"team": "search"}, {"team": "ads", "env": "prod"}, {"team": ""}, {"env": "x"}])
    return CallRecord(
        request_id=f"r{n}", started_at=start + rng.random() * span, method="POST",
        endpoint=rng.choice(["/v1/chat/completions", "/v1/embeddings", "/v1/responses"]),
        key_id=rng.choice(["k1", "k2", "k3", None]), user=rng.choice(["alice", "bob", "", None]),
        operation=rng.choice(["chat", "summarise", None]), model=rng.choice(["gpt-4o", "gpt-4o-mini", "x", None]),
        tags=tags, status=status, prompt_tokens=prompt, completion_tokens=completion,
        cached_tokens=prompt // 3, reasoning_tokens=completion // 4, total_tokens=prompt + completion,
        usage_source=rng.choice(["upstream", "counted", "none"]), priced=rng.random() > 0.1, cost_usd=cost,
    )  # fmt: skip


async def write_through_ledger(path: Where, calls: list[CallRecord], rng: random.Random) -> None:
    """Through a real Ledger with the hook, in waves of random size, so batches vary."""
    ledger = Ledger(path, max_batch=rng.choice([7, 64, 500]))
    ledger.db.after_insert.append(rollups.apply)
    await ledger.open()
    try:
        i = 0
        while i < len(calls):
            wave = calls[i:i + rng.randrange(1, 300)]
            await asyncio.gather(*(ledger.record(c) for c in wave))
            i += len(wave)
    finally:
        await ledger.close()


def expected_rollups(conn: Conn | sqlite3.Connection, days_until: int | None,
                     projected_until: int | None = None) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    """Rollups computed in Python from every call row, independently of rollups.py: day and month rows
    before `days_until`, each dimension's own rows for hours before `projected_until` (default: the same)
    and for those days and months."""
    own_until = days_until if projected_until is None else projected_until
    sums: dict[tuple[Any, ...], list[Any]] = {}
    sql = ('SELECT started_at, key_id, model, "user", operation, endpoint, status, tags, priced, usage_source, '
           "prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, total_tokens, cost_usd FROM calls")
    conn = rollups.as_conn(conn)
    for row in conn.execute(sql):
        started, *dims6, tags, priced, source, p, c, ca, r, t, cost = row
        dims = (*dims6, json.loads(tags).get("team"))
        hour = int(started) // 3600 * 3600
        day = hour - hour % DAY
        month = timegm((*time.gmtime(day)[:2], 1, 0, 0, 0))
        keys = [("hour", hour)]
        if days_until is not None and day < days_until:
            keys += [("day", day), ("month", month)]
        counted = source == "counted"
        add = [1, not 200 <= row[6] <= 299, not priced, p, c, ca, r, t, counted, t if counted else 0]
        for grain, bucket in keys:
            # "*": the bucket's totals over every dimension set; ("own", dim, value): a dimension's own
            # rows, for hours before own_until and the days and months before days_until.
            has_own = own_until is not None and (hour < own_until if grain == "hour" else True)
            own = [("own", name, value) for name, value in zip(rollups.DIMS, dims)] if has_own else []
            for of in (dims, "*", *own):
                acc = sums.setdefault((grain, bucket, of), [[0] * 10, Decimal(0)])
                acc[0] = [a + b for a, b in zip(acc[0], add)]
                acc[1] = EXACT.add(acc[1], Decimal(cost))
    return {k: (*map(int, v[0]), format(v[1], "f")) for k, v in sums.items()}


def actual_rollups(conn: Conn | sqlite3.Connection) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    names = {0: "hour", 1: "day", 2: "month", 3: "hour", 4: "day", 5: "month"}
    out = {}
    sql = (f"SELECT r.grain, r.bucket, d.key_id, d.model, d.\"user\", d.operation, d.endpoint, d.status, d.team, "
           f"{', '.join('r.' + c for c in rollups.INT_COUNTERS)}, r.cost_usd, r.cost_pico, r.cost_exp, "
           "r.dim_id FROM rollups r LEFT JOIN rollup_dims d ON d.id = r.dim_id")
    for row in rollups.as_conn(conn).execute(sql):
        grain, bucket, *rest = row
        dims, ints, (cost, pico, exp, dim_id) = tuple(rest[:7]), tuple(rest[7:17]), rest[17:]
        if isinstance(cost, Decimal):  # PostgreSQL's NUMERIC, compared as the text SQLite holds
            cost = format(cost, "f")
        if grain >= rollups.PROJECTED:
            index = grain // rollups.PROJECTED - 1
            assert dims == rollups.projection_dims(index, dims[index])  # the others are NULL
            dims = ("own", rollups.DIMS[index], dims[index])
            grain %= rollups.PROJECTED
            assert grain in (rollups.HOUR, rollups.DAY, rollups.MONTH)
        elif grain >= rollups.TOTALS:
            assert dim_id == rollups.SERIES
            dims = "*"
        if pico is not None:  # the integer form, when present, says exactly what the text says
            assert format(rollups.from_pico(pico, exp), "f") == cost
        assert (names[grain], bucket, dims) not in out
        out[(names[grain], bucket, dims)] = (*ints, cost)
    return out


def assert_exact(path: Where | Conn) -> None:
    """The rollups are current and equal, to the last digit, what the raw rows add up to."""
    conn = path if isinstance(path, Conn) else connect(path, functions=False)
    try:
        state = rollups.read_state(conn)
        assert state.current
        expected = expected_rollups(conn, state.days_until, state.projected_until)
        actual = actual_rollups(conn)
        assert actual.keys() == expected.keys()
        wrong = {k: (actual[k], expected[k]) for k in expected if actual[k] != expected[k]}
        assert not wrong, repr(list(wrong.items())[:3])
    finally:
        if conn is not path:
            conn.close()


def writer(path: Where) -> Conn:
    """An autocommit Conn to write with (SQLite: the decimal functions registered)."""
    return connect(path)


async def build(tmp_path: Path, n: int = 2500, seed: int = 11, days: int = 35, db: Where | None = None) -> Where:
    """`n` random calls through a ledger (`db`, default a SQLite file in tmp_path), and their first `days`
    days rolled up."""
    rng = random.Random(seed)
    path = tmp_path / "ledger.db" if db is None else db
    await write_through_ledger(path, [random_call(rng, i) for i in range(n)], rng)
    conn = plain_writer(path)
    try:
        rollup_build.ensure(conn, until=T0 + days * DAY)
    finally:
        conn.close()
    return path


def plain_writer(path: Where) -> Conn:
    """An autocommit Conn without SQLite's decimal functions (as a tool that knows nothing of them)."""
    return connect(path, functions=False)


def at(text: str) -> float:
    """Unix seconds of a UTC 'YYYY-MM-DD HH:MM:SS'."""
    date, time = text.split(" ")
    return float(timegm((*map(int, date.split("-")), *map(int, time.split(":")), 0, 0, 0)))


def call(n: int, when: str, **fields: Any) -> CallRecord:
    values: dict[str, Any] = {
        "request_id": f"r{n}", "started_at": at(when), "method": "POST",
        "endpoint": "/v1/chat/completions", "status": 200, "priced": True,
    }  # fmt: skip
    values.update(fields)
    return CallRecord(**values)


def write_calls(path: Where, calls: list[CallRecord]) -> None:
    """Rows written straight into calls, without the rollups' hook (as another tool would)."""
    if is_postgres(path):
        conn = connect(path)
        try:
            with conn.transaction():
                conn.executemany(INSERT_SQL, [record_row(c) for c in calls])
        finally:
            conn.close()
        return
    raw = sqlite3.connect(path)
    try:
        migrate(raw)
        raw.executemany(INSERT_SQL, [record_row(c) for c in calls])
        raw.commit()
    finally:
        raw.close()
