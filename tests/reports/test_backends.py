"""The same calls give the same reports on SQLite and PostgreSQL, equal to a plain sum of the rows.

Random calls (every dimension varied, None and "" included, costs of every shape) are written through the
real ledger (rollups and all, 25 days rolled up into days and months) into a SQLite ledger and into a
PostgreSQL one; every report shape of docs/reports.md (group_bys, ranges, zones,
filters), a page of calls, one call, the export and the accuracy report are compared as JSON. Tag values are
what JSON holds on both: text stays text, a JSON number is an integer (or a real), true is 1, and tags that
are not JSON read as no tag (null) on both instead of failing the report.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import random
import sqlite3
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from proxy.core.record import CallRecord
from proxy.ledger import rollup_build, rollups
from proxy.ledger.sqlconn import Conn
from proxy.reports import accuracy, export
from proxy.reports import queries as reports
from tests.support.ledger import EXACT, T0, call, connect, random_call, write_through_ledger

GROUPINGS = [
    [], ["key"], ["model"], ["user"], ["session"], ["operation"], ["endpoint"], ["status"], ["tag:team"],
    ["tag:env"], ["user", "model"], ["tag:team", "operation"], ["hour"], ["day"], ["week"], ["month"],
    ["month", "key"], ["week", "model"], ["day", "model"], ["hour", "model"], ["hour", "day", "week", "month"],
    ["tag:n"], ["tag:b", "day"],
]  # fmt: skip
ZONES = [None, "Europe/Berlin", "Asia/Kolkata", "America/St_Johns"]
BAD_TAGS_AT = "2026-03-20 00:00:00"  # after every other call: RANGES[1] reads tags in SQL, the whole range in Python
RANGES = [(None, None), (T0 + 3 * 86400 + 1234.5, T0 + 33 * 86400 - 17.25)]
FILTERS: list[dict[str, str]] = [{}, {"key": "k1"}, {"user": ""}, {"model": "gpt-4o"}]


def odd_calls() -> list[CallRecord]:
    """Tags stored as other writers might: numbers, booleans, nested values; counted usage for accuracy."""
    return [
        call(90_001, "2026-02-03 10:00:00", tags={"n": 5, "b": True, "team": "ads"}, cost_usd=Decimal("0.5")),  # type: ignore[dict-item]
        call(90_002, "2026-02-03 11:00:00", tags={"n": 5, "b": False}, cost_usd=Decimal("0.25")),  # type: ignore[dict-item]
        call(90_003, "2026-02-03 12:00:00", tags={"n": "5", "b": {"x": [1, 2]}}, cost_usd=Decimal("0.125")),  # type: ignore[dict-item]
        call(90_004, "2026-02-04 12:00:00", model="gpt-4o", usage_source="upstream", prompt_tokens=100,
             completion_tokens=10, total_tokens=110, counted_prompt_tokens=97, counted_completion_tokens=12),
        call(90_005, "2026-02-04 13:00:00", model="gpt-4o", usage_source="upstream", prompt_tokens=0,
             completion_tokens=3, total_tokens=3, counted_prompt_tokens=1, counted_completion_tokens=3),
        call(90_007, "2026-02-05 09:00:00", model="free-model", cost_usd=Decimal("0.000")),  # a zero of 3 places
        call(90_006, BAD_TAGS_AT, tags={"team": "ads"}, cost_usd=Decimal("0.0625")),  # its tags are spoilt below
    ]  # fmt: skip


def all_calls() -> list[CallRecord]:
    rng = random.Random(20261202)
    return [random_call(rng, n) for n in range(1500)] + odd_calls()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, pg_database: str) -> Iterator[tuple[Conn, Conn]]:
    """(SQLite, PostgreSQL) read connections to ledgers holding the same calls, one with tags not JSON."""
    from tests.support.pg import with_schema

    calls = all_calls()
    path = str(tmp_path_factory.mktemp("backends") / "ledger.db")
    schema = "backends_" + str(random.randrange(10**6))
    with psycopg.connect(pg_database, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    url = with_schema(pg_database, schema)
    for where in (path, url):  # through the real ledger and its rollups; 25 days rolled up into days
        asyncio.run(write_through_ledger(where, calls, random.Random(7)))
        conn = connect(where)
        try:
            rollup_build.ensure(conn, until=T0 + 25 * 86400)
            assert rollups.read_state(conn).current
        finally:
            conn.close()
    # A row whose tags are not JSON (written by some other tool): both must still report.
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE calls SET tags = 'not json {' WHERE request_id = 'r90006'")
    with psycopg.connect(url, autocommit=True) as raw_pg:
        raw_pg.execute("UPDATE calls SET tags = 'not json {' WHERE request_id = 'r90006'")
    lite, pg = reports.connect_readonly(path), reports.connect_readonly(url)
    _URLS[id(pg)] = url
    try:
        yield lite, pg
    finally:
        lite.close()
        pg.close()
        with psycopg.connect(pg_database, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


def as_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


@pytest.mark.parametrize("group_by", GROUPINGS, ids=lambda g: ",".join(g) or "totals")
def test_every_report_shape_is_the_same_on_both_backends(pair: tuple[Conn, Conn], group_by: list[str]) -> None:
    lite, pg = pair
    for tz in ZONES:
        for since, until in RANGES:
            for filters in FILTERS if len(group_by) < 2 else FILTERS[:2]:
                kwargs: dict[str, Any] = {"group_by": group_by, "since": since, "until": until, "tz": tz, **filters}
                a, b = reports.usage_report(lite, **kwargs), reports.usage_report(pg, **kwargs)
                assert as_json(a) == as_json(b), kwargs
                assert a["rows"] or filters, kwargs


def test_totals_equal_the_raw_rows_sum_to_the_last_digit(pair: tuple[Conn, Conn]) -> None:
    calls = all_calls()
    since, until = RANGES[1]
    inside = [c for c in calls if since <= c.started_at < until]
    cost = Decimal(0)
    for c in inside:
        cost = EXACT.add(cost, c.cost_usd)
    for conn in pair:
        state = rollups.read_state(conn)
        plan = reports.plan_segments(conn, ["model"], since, until, None, state)
        assert {s.source for s in plan} >= {"day", "hour"}  # the rollups answer, on both
        totals = reports.usage_report(conn, since=since, until=until)["totals"]
        assert totals["calls"] == len(inside)
        assert totals["total_tokens"] == sum(c.total_tokens for c in inside)
        assert totals["cost_usd"] == format(cost, "f")
        assert len(totals["cost_usd"].split(".")[1]) > 12  # beyond picodollars: an exact sum, not a float


@pytest.mark.parametrize("span", RANGES, ids=["with bad tags (read in Python)", "tags read in SQL"])
def test_tag_values_keep_their_json_type_and_bad_tags_read_as_none(pair: tuple[Conn, Conn],
                                                                   span: tuple[Any, Any]) -> None:
    since, until = span
    for conn in pair:
        rows = reports.usage_report(conn, group_by=["tag:n"], since=since, until=until)["rows"]
        by_n = {(type(r["tag:n"]), r["tag:n"]): r["calls"] for r in rows}
        assert by_n[int, 5] == 2 and by_n[str, "5"] == 1  # a JSON number and a JSON string stay apart
        rows = reports.usage_report(conn, group_by=["tag:b"], since=since, until=until)["rows"]
        by_b = {(type(r["tag:b"]), r["tag:b"]): r["calls"] for r in rows}
        assert by_b[int, 1] == 1 and by_b[int, 0] == 1 and by_b[str, '{"x":[1,2]}'] == 1
        teams = reports.usage_report(conn, group_by=["tag:team"], since=since, until=until)
        assert sum(r["calls"] for r in teams["rows"]) == teams["totals"]["calls"]
        ads = next(r for r in teams["rows"] if r["tag:team"] == "ads")
        bad = next(r for r in teams["rows"] if r["tag:team"] is None)
        assert since is not None or (ads["calls"], bad["calls"]) > (0, 0)


def test_calls_pages_one_call_export_and_accuracy_are_the_same(pair: tuple[Conn, Conn]) -> None:
    lite, pg = pair
    for kwargs in ({}, {"key": "k2", "limit": 7}, {"status": "500"}, {"usage_source": "counted", "user": "bob"}):
        a, b = reports.list_calls(lite, **kwargs), reports.list_calls(pg, **kwargs)
        assert as_json(a) == as_json(b) and a["calls"]
        if a["next"]:
            more = {**kwargs, "before": a["next"]}
            assert as_json(reports.list_calls(lite, **more)) == as_json(reports.list_calls(pg, **more))
    for request_id in ("r1", "r90006", "r90001", "r1499"):
        a1, b1 = reports.get_call(lite, request_id), reports.get_call(pg, request_id)
        assert a1 is not None and b1 is not None
        assert as_json({k: v for k, v in a1.items() if k != "id"}) == as_json({k: v for k, v in b1.items() if k != "id"})
    assert set(export.columns(lite)) == set(export.columns(pg))
    since, until = RANGES[1]
    rows_a = [export._json_ready(c) for c in export.iter_calls(lite, since=since, until=until, key="k1")]
    rows_b = [export._json_ready(c) for c in export.iter_calls(pg, since=since, until=until, key="k1")]
    assert len(rows_a) > 100
    drop = ("id",)
    assert [as_json({k: v for k, v in r.items() if k not in drop}) for r in rows_a] == \
        [as_json({k: v for k, v in r.items() if k not in drop}) for r in rows_b]
    acc_a, acc_b = accuracy.accuracy_report(lite), accuracy.accuracy_report(pg)
    assert as_json(acc_a) == as_json(acc_b) and acc_a["models"][0]["prompt"]["worst_abs_error"] == 3


def test_export_streams_from_postgres(pair: tuple[Conn, Conn]) -> None:
    _, pg = pair
    rows = export.iter_calls(pg)
    first = next(rows)  # one row out: a server-side cursor holds the rest, in a snapshot of its own
    assert pg.in_transaction
    assert first["started_at"] <= next(rows)["started_at"]
    assert sum(1 for _ in rows) == len(all_calls()) - 2
    assert not pg.in_transaction


@pytest.mark.parametrize("argv", [
    ["report", "--group-by", "model,day", "--format", "json"],
    ["report", "--group-by", "tag:team", "--since", "2026-02-01", "--until", "2026-03-01", "--tz", "Europe/Berlin",
     "--format", "csv"],
    ["report", "--group-by", "user", "--key", "k1"],
    ["accuracy", "--format", "json"],
    ["export", "--format", "csv", "--key", "k3"],
])  # fmt: skip
def test_the_cli_prints_the_same_bytes_from_both_backends(pair: tuple[Conn, Conn], argv: list[str],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.cli.main import main

    outputs = []
    for conn in pair:
        assert main([argv[0], "--db", _URLS.get(id(conn), conn.shown), *argv[1:]]) == 0
        outputs.append(capsys.readouterr().out)
    if argv[0] == "export":  # each table's own column order; the same values
        rows = [sorted(json.dumps(r, sort_keys=True) for r in csv.DictReader(io.StringIO(out))) for out in outputs]
        assert rows[0] == rows[1] and len(rows[0]) > 100
    else:
        assert outputs[0] == outputs[1] and len(outputs[0]) > 100


_URLS: dict[int, str] = {}


def test_budget_spend_is_the_same_exact_sum_on_both(pair: tuple[Conn, Conn]) -> None:
    from proxy.control.budgets import spend_since
    from proxy.control.limits import Subject

    calls = all_calls()
    since = T0 + 10 * 86400 + 0.5
    for subject, match in ((Subject("key", "k1"), lambda c: c.key_id == "k1"),
                           (Subject("user", ""), lambda c: c.user == ""),
                           (Subject("team", "ads"), lambda c: c.tags.get("team") == "ads" and c.request_id != "r90006")):
        expected = Decimal(0)
        for c in calls:
            if c.started_at >= since and match(c):
                expected = EXACT.add(expected, c.cost_usd)
        spent = [spend_since(conn, subject, since) for conn in pair]
        assert spent[0] == spent[1] == expected and format(spent[0], "f") == format(spent[1], "f"), subject
