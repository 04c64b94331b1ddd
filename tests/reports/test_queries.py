"""Reports over the ledger: grouping, time ranges, filters, exact money, paging, CSV and table output."""

from __future__ import annotations

import csv
import io
import sqlite3
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from proxy.core.errors import ParameterError
from proxy.ledger import rollup_build, rollups
from proxy.ledger.sqlconn import Conn
from proxy.ledger.target import parse_target
from proxy.ledger.writer import Ledger
from proxy.reports import queries as reports
from proxy.reports import render
from proxy.reports.queries import COUNTERS, GROUP_FIELDS, ReportDatabaseError
from tests.reports.support import write_target
from tests.support.ledger import at, call

# Eight calls over three days and two months, two keys, two users, two models, one failure, one
# unpriced call, tags on some. Costs chosen so float addition would show (0.1 + 0.2).
CALLS = [
    call(1, "2026-11-23 09:15:00", key_id="k1", user="alice", model="gpt-4o", session="s1",
         operation="chat", prompt_tokens=100, completion_tokens=20, cached_tokens=50,
         reasoning_tokens=0, total_tokens=120, cost_usd=Decimal("0.1"), tags={"team": "search"}),
    call(2, "2026-11-23 09:45:00", key_id="k1", user="alice", model="gpt-4o", session="s1",
         operation="chat", prompt_tokens=200, completion_tokens=40, total_tokens=240,
         cost_usd=Decimal("0.2"), tags={"team": "search", "env": "prod"}),
    call(3, "2026-11-23 10:00:00", key_id="k2", user="bob", model="gpt-4o-mini",
         endpoint="/v1/embeddings", prompt_tokens=1000, total_tokens=1000,
         cost_usd=Decimal("0.00002")),
    call(4, "2026-11-24 00:00:00", key_id="k2", user="bob", model="gpt-4o-mini", status=429,
         error="rate limited", cost_usd=Decimal("0")),
    call(5, "2026-11-24 23:59:59", key_id="k1", user="bob", model="gpt-4o", completion_tokens=10,
         reasoning_tokens=8, total_tokens=10, cost_usd=Decimal("0.3"), tags={"team": "ads"}),
    call(6, "2026-11-30 23:59:59", key_id="k2", user=None, model="mystery-1", priced=False,
         prompt_tokens=5, completion_tokens=5, total_tokens=10, cost_usd=Decimal("0")),
    call(7, "2026-12-01 00:00:00", key_id="k1", user="alice", model="gpt-4o", status=500,
         error="upstream", cost_usd=Decimal("0")),
    call(8, "2026-12-01 12:30:00", key_id=None, user="alice", model="gpt-4o-mini", status=201,
         prompt_tokens=7, total_tokens=7, cost_usd=Decimal("1.00001")),
]  # fmt: skip


@pytest.fixture
def db(ledger_target: str):
    write_target(ledger_target, CALLS)
    conn = reports.connect_readonly(ledger_target)
    yield conn
    conn.close()


def by_group(report: dict[str, Any], field: str) -> dict[Any, tuple[int, str]]:
    return {row[field]: (row["calls"], row["cost_usd"]) for row in report["rows"]}


def test_totals_count_everything_exactly(db: sqlite3.Connection) -> None:
    report = reports.usage_report(db)
    assert report["totals"] == {
        "calls": 8, "errors": 2, "unpriced_calls": 1, "prompt_tokens": 1312,
        "completion_tokens": 75, "cached_tokens": 50, "reasoning_tokens": 8,
        "total_tokens": 1387, "cost_usd": "1.60003", "counted_calls": 0, "counted_tokens": 0,
    }  # fmt: skip
    assert report["rows"] == [report["totals"]]
    assert (report["since"], report["until"], report["group_by"]) == (None, None, [])


@pytest.mark.parametrize(
    ("field", "column", "expected"),
    [
        ("key", "key_id", {"k1": (4, "0.6"), "k2": (3, "0.00002"), None: (1, "1.00001")}),
        ("user", "user", {"alice": (4, "1.30001"), "bob": (3, "0.30002"), None: (1, "0")}),
        ("model", "model",
         {"gpt-4o": (4, "0.6"), "gpt-4o-mini": (3, "1.00003"), "mystery-1": (1, "0")}),
        ("session", "session", {"s1": (2, "0.3"), None: (6, "1.30003")}),
        ("operation", "operation", {"chat": (2, "0.3"), None: (6, "1.30003")}),
        ("endpoint", "endpoint",
         {"/v1/chat/completions": (7, "1.60001"), "/v1/embeddings": (1, "0.00002")}),
        ("status", "status", {200: (5, "0.60002"), 201: (1, "1.00001"), 429: (1, "0"), 500: (1, "0")}),
        ("hour", "hour",
         {"2026-11-23T09:00Z": (2, "0.3"), "2026-11-23T10:00Z": (1, "0.00002"),
          "2026-11-24T00:00Z": (1, "0"), "2026-11-24T23:00Z": (1, "0.3"),
          "2026-11-30T23:00Z": (1, "0"), "2026-12-01T00:00Z": (1, "0"),
          "2026-12-01T12:00Z": (1, "1.00001")}),
        ("day", "day",
         {"2026-11-23": (3, "0.30002"), "2026-11-24": (2, "0.3"), "2026-11-30": (1, "0"),
          "2026-12-01": (2, "1.00001")}),
        ("month", "month", {"2026-11": (6, "0.60002"), "2026-12": (2, "1.00001")}),
        ("tag:team", "tag:team", {"search": (2, "0.3"), "ads": (1, "0.3"), None: (5, "1.00003")}),
        ("tag:env", "tag:env", {"prod": (1, "0.2"), None: (7, "1.40003")}),
    ],
)  # fmt: skip
def test_every_group_field(
    db: sqlite3.Connection, field: str, column: str, expected: dict[Any, tuple[int, str]]
) -> None:
    report = reports.usage_report(db, group_by=[field])
    assert by_group(report, column) == expected
    assert report["group_by"] == [field]
    assert report["totals"]["calls"] == 8 and report["totals"]["cost_usd"] == "1.60003"
    assert set(report["rows"][0]) == {column, *COUNTERS}


def test_group_fields_are_all_covered() -> None:
    assert set(GROUP_FIELDS) == {
        "key", "model", "user", "session", "operation", "endpoint", "status", "hour", "day", "week",
        "month",
    }  # fmt: skip


def test_rows_are_ordered_by_cost_then_group_fields(db: sqlite3.Connection) -> None:
    rows = reports.usage_report(db, group_by=["key", "day"])["rows"]
    assert [(r["key_id"], r["day"], r["cost_usd"]) for r in rows] == [
        (None, "2026-12-01", "1.00001"),
        ("k1", "2026-11-23", "0.3"),
        ("k1", "2026-11-24", "0.3"),
        ("k2", "2026-11-23", "0.00002"),
        ("k1", "2026-12-01", "0"),
        ("k2", "2026-11-24", "0"),
        ("k2", "2026-11-30", "0"),
    ]


def test_error_and_unpriced_counts_per_group(db: sqlite3.Connection) -> None:
    rows = {r["model"]: r for r in reports.usage_report(db, group_by=["model"])["rows"]}
    assert (rows["gpt-4o"]["errors"], rows["gpt-4o"]["unpriced_calls"]) == (1, 0)  # the 500
    assert (rows["gpt-4o-mini"]["errors"], rows["gpt-4o-mini"]["unpriced_calls"]) == (1, 0)  # 429
    assert (rows["mystery-1"]["errors"], rows["mystery-1"]["unpriced_calls"]) == (0, 1)
    assert rows["gpt-4o"]["reasoning_tokens"] == 8 and rows["gpt-4o"]["cached_tokens"] == 50


@pytest.mark.parametrize(
    ("since", "until", "ids"),
    [
        ("2026-11-24", None, {4, 5, 6, 7, 8}),  # since is inclusive: r4 starts exactly then
        (None, "2026-11-24", {1, 2, 3}),  # until is exclusive: r4 is left out
        ("2026-11-24T00:00:00Z", "2026-12-01T00:00:00Z", {4, 5, 6}),
        ("2026-11-23T10:00:00+01:00", "2026-11-23T10:00:00", {1, 2}),  # 09:00Z .. 10:00Z
        (str(int(at("2026-11-30 23:59:59"))), "1796083200.5", {6, 7}),  # 12-01 00:00:00.5
        ("2027-01-01", None, set()),
    ],
)
def test_since_until_edges(db: sqlite3.Connection, since: str | None, until: str | None,
                           ids: set[int]) -> None:  # fmt: skip
    report = reports.usage_report(
        db,
        group_by=["hour"],
        since=None if since is None else reports.parse_time(since, "since"),
        until=None if until is None else reports.parse_time(until, "until"),
    )
    expected = [c for c in CALLS if int(c.request_id[1:]) in ids]
    assert report["totals"]["calls"] == len(expected)
    assert Decimal(report["totals"]["cost_usd"]) == sum(c.cost_usd for c in expected)
    assert len(report["rows"]) == len({int(c.started_at) // 3600 for c in expected})


def test_since_and_until_are_echoed_as_iso(db: sqlite3.Connection) -> None:
    report = reports.usage_report(db, since=at("2026-11-24 00:00:00"), until=at("2026-12-01 00:00:00"))
    assert report["since"] == "2026-11-24T00:00:00.000Z"
    assert report["until"] == "2026-12-01T00:00:00.000Z"


@pytest.mark.parametrize(
    ("filters", "ids"),
    [
        ({"key": "k1"}, {1, 2, 5, 7}),
        ({"user": "bob"}, {3, 4, 5}),
        ({"model": "gpt-4o-mini"}, {3, 4, 8}),
        ({"key": "k1", "user": "bob"}, {5}),
        ({"key": "nobody"}, set()),
    ],
)
def test_filters(db: sqlite3.Connection, filters: dict[str, str], ids: set[int]) -> None:
    totals = reports.usage_report(db, **filters)["totals"]  # type: ignore[arg-type]
    expected = [c for c in CALLS if int(c.request_id[1:]) in ids]
    assert totals["calls"] == len(expected)
    assert totals["cost_usd"] == format(sum((c.cost_usd for c in expected), Decimal(0)), "f")


def test_empty_ledger_reports_zeros(ledger_target: str) -> None:
    write_target(ledger_target, [])
    conn = reports.connect_readonly(ledger_target)
    try:
        report = reports.usage_report(conn, group_by=["model"])
        assert report["rows"] == []
        assert report["totals"] == {**dict.fromkeys(COUNTERS, 0), "cost_usd": "0"}
        assert reports.usage_report(conn)["rows"] == []
    finally:
        conn.close()


def test_money_sums_are_exact(ledger_target: str) -> None:
    tiny = [call(n, "2026-11-23 12:00:00", model="tiny", cost_usd=Decimal("0.000000001"))
            for n in range(10_000)]  # fmt: skip
    odd = [
        call(20_001, "2026-11-23 12:00:00", model="odd", cost_usd=Decimal("0.1")),
        call(20_002, "2026-11-23 12:00:00", model="odd", cost_usd=Decimal("0.2")),
        call(20_003, "2026-11-23 12:00:00", model="big", cost_usd=Decimal("123456789012.345678901")),
        call(20_004, "2026-11-23 12:00:00", model="big", cost_usd=Decimal("0.000000000000000001")),
    ]
    write_target(ledger_target, tiny + odd)
    conn = reports.connect_readonly(ledger_target)
    try:
        report = reports.usage_report(conn, group_by=["model"])
    finally:
        conn.close()
    costs = by_group(report, "model")
    assert costs["tiny"] == (10_000, "0.000010000")
    assert costs["odd"] == (2, "0.3")  # float addition gives 0.30000000000000004
    assert costs["big"] == (2, "123456789012.345678901000000001")  # beyond 28 digits
    assert report["totals"]["cost_usd"] == "123456789012.645688901000000001"


@pytest.mark.parametrize(
    ("group_by", "says"),
    [
        (["model", "colour"], "unknown field 'colour'"),
        (["key_id"], "valid: key, model"),
        (["tag:"], "bad tag name"),
        (["tag:a b"], "bad tag name"),
        (["tag:x')--"], "bad tag name"),
        (['tag:a"b'], "bad tag name"),
        (["model; DROP TABLE calls"], "unknown field"),
    ],
)
def test_bad_group_by(db: sqlite3.Connection, group_by: list[str], says: str) -> None:
    with pytest.raises(ParameterError, match="group_by") as caught:
        reports.usage_report(db, group_by=group_by)
    assert caught.value.param == "group_by"
    assert says in str(caught.value)


def test_group_by_accepts_commas_and_repeats_once(db: sqlite3.Connection) -> None:
    report = reports.usage_report(db, group_by=["model, day", "model"])
    assert report["group_by"] == ["model", "day"]


def test_tag_names_with_dots_and_dashes(ledger_target: str) -> None:
    write_target(ledger_target, [
        call(1, "2026-11-23 12:00:00", tags={"cost.centre": "R-1", "a": "x"}, cost_usd=Decimal("1")),
        call(2, "2026-11-23 12:00:00", tags={"cost": "flat"}, cost_usd=Decimal("2")),
    ])  # fmt: skip
    conn = reports.connect_readonly(ledger_target)
    try:
        report = reports.usage_report(conn, group_by=["tag:cost.centre"])
    finally:
        conn.close()
    assert by_group(report, "tag:cost.centre") == {"R-1": (1, "1"), None: (1, "2")}


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"since": 10.0, "until": 10.0}, "until"),
        ({"since": 20.0, "until": 10.0}, "until"),
        ({"since": float("nan")}, "since"),
        ({"until": "2026-11-23"}, "until"),
    ],
)
def test_bad_time_range(db: sqlite3.Connection, kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(ParameterError) as caught:
        reports.usage_report(db, **kwargs)
    assert caught.value.param == param


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-23", at("2026-11-23 00:00:00")),
        ("2026-11-23T14:05:09", at("2026-11-23 14:05:09")),
        ("2026-11-23T14:05:09Z", at("2026-11-23 14:05:09")),
        ("2026-11-23T14:05:09+02:00", at("2026-11-23 12:05:09")),
        ("2026-11-23 14:05:09.250-05:00", at("2026-11-23 19:05:09") + 0.25),
        ("1795000000", 1795000000.0),
        ("1795000000.75", 1795000000.75),
        (" 1795000000 ", 1795000000.0),
    ],
)
def test_parse_time(text: str, expected: float) -> None:
    assert reports.parse_time(text, "since") == expected


@pytest.mark.parametrize(
    "text", ["", "  ", "yesterday", "2026-13-01", "2026-11-23T25:00", "nan", "inf", "-5", "1e9",
             "9" * 400, "2026-11-23Z"],
)  # fmt: skip
def test_parse_time_rejects(text: str) -> None:
    with pytest.raises(ParameterError, match="^until: ") as caught:
        reports.parse_time(text, "until")
    assert caught.value.param == "until"


# -- list_calls --------------------------------------------------------------------------------


def test_list_calls_pages_newest_first_with_a_cursor(db: sqlite3.Connection) -> None:
    seen: list[str] = []
    pages = []
    before = None
    while True:
        page = reports.list_calls(db, limit=3, before=before)
        pages.append(len(page["calls"]))
        seen += [c["request_id"] for c in page["calls"]]
        before = page["next"]
        if before is None:
            break
    assert pages == [3, 3, 2]
    assert seen == [f"r{n}" for n in range(8, 0, -1)]


def test_list_calls_exact_page_has_no_next(db: sqlite3.Connection) -> None:
    assert reports.list_calls(db, limit=8)["next"] is None
    assert reports.list_calls(db, limit=7)["next"] is not None


def test_list_calls_filters_by_key_across_pages(db: sqlite3.Connection) -> None:
    first = reports.list_calls(db, key="k1", limit=2)
    second = reports.list_calls(db, key="k1", limit=2, before=first["next"])
    assert [c["request_id"] for c in first["calls"] + second["calls"]] == ["r7", "r5", "r2", "r1"]
    assert second["next"] is None


def test_list_calls_row_shape(db: sqlite3.Connection) -> None:
    row = reports.list_calls(db, limit=1000)["calls"][-1]  # r1
    assert row["request_id"] == "r1"
    assert row["ts"] == "2026-11-23T09:15:00.000Z"
    assert row["tags"] == {"team": "search"}
    assert row["stream"] is False and row["priced"] is True
    assert row["cost_usd"] == "0.1"
    assert (row["prompt_tokens"], row["cached_tokens"], row["total_tokens"]) == (100, 50, 120)
    assert set(row) == {
        "request_id", "ts", "key_id", "key_hint", "user", "session", "operation", "tags", "method",
        "endpoint", "model", "requested_model", "stream", "status", "error", "latency_ms",
        "ttfb_ms", "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens",
        "total_tokens", "usage_source", "priced", "cost_usd", "approximate", "lower_bound",
        "usage_note", "counted_prompt_tokens", "counted_completion_tokens",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": True}, "limit"),
        ({"before": "abc"}, "before"),
        ({"before": "-3"}, "before"),
        ({"before": ""}, "before"),
        ({"before": "0"}, "before"),
        ({"before": "1 OR 1=1"}, "before"),
    ],
)
def test_list_calls_bad_params(db: sqlite3.Connection, kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(ParameterError) as caught:
        reports.list_calls(db, **kwargs)
    assert caught.value.param == param
    assert param in str(caught.value)


# -- the read connection -----------------------------------------------------------------------


def _not_a_ledger(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind.replace(' ', '_')}.db"
    if kind == "text file":
        path.write_text("hello " * 1000)
    elif kind == "other sqlite":
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE things (x)")
        conn.commit()
        conn.close()
    return path  # "missing": never created


@pytest.mark.parametrize(
    ("kind", "says"),
    [("missing", "not found"), ("text file", "cannot read"), ("other sqlite", "not a meterproxy")],
)
def test_connect_readonly_refuses(tmp_path: Path, kind: str, says: str) -> None:
    path = _not_a_ledger(tmp_path, kind)
    with pytest.raises(ReportDatabaseError) as caught:
        reports.connect_readonly(path)
    assert str(path) in str(caught.value) and says in str(caught.value)
    assert kind != "missing" or not path.exists()  # and it did not create the file


def test_read_connection_cannot_write(db: Conn) -> None:
    with pytest.raises(db.Error, match="readonly|read-only"):
        db.execute("DELETE FROM calls")


def test_connect_readonly_refuses_a_postgres_database_without_the_schema(pg_url: str) -> None:
    with pytest.raises(ReportDatabaseError, match="not a meterproxy ledger") as caught:
        reports.connect_readonly(pg_url)
    assert parse_target(pg_url).shown in str(caught.value)


def test_connect_readonly_names_an_unreachable_server_without_its_password() -> None:
    url = "postgresql://meter:s3cret-pw@127.0.0.1:1/ledger"
    with pytest.raises(ReportDatabaseError, match="cannot reach ledger") as caught:
        reports.connect_readonly(url)
    message = str(caught.value)
    assert "s3cret-pw" not in message and "postgresql://meter:***@127.0.0.1:1/ledger" in message
    assert "\n" not in message


async def test_reports_read_what_the_ledger_wrote(tmp_path: Path) -> None:
    path = tmp_path / "live.db"
    ledger = Ledger(path)
    await ledger.open()
    try:
        for c in CALLS[:3]:
            await ledger.record(c)
        conn = reports.connect_readonly(path)  # while the writer is open
        try:
            assert reports.usage_report(conn)["totals"]["cost_usd"] == "0.30002"
        finally:
            conn.close()
    finally:
        await ledger.close()
    conn = reports.connect_readonly(path)  # after a clean close
    try:
        assert reports.list_calls(conn)["calls"][0]["request_id"] == "r3"
    finally:
        conn.close()


# -- rendering ---------------------------------------------------------------------------------


def test_csv_has_header_rows_and_total(db: sqlite3.Connection) -> None:
    text = render.to_csv(reports.usage_report(db, group_by=["key", "month"]))
    lines = list(csv.reader(io.StringIO(text)))
    assert lines[0] == ["key_id", "month", *COUNTERS]
    assert lines[1] == ["", "2026-12", "1", "0", "0", "7", "0", "0", "0", "7", "1.00001", "0", "0"]
    assert lines[-1] == ["TOTAL", "", "8", "2", "1", "1312", "75", "50", "8", "1387", "1.60003", "0", "0"]
    assert len(lines) == 1 + 4 + 1


def test_csv_without_group_fields(db: sqlite3.Connection) -> None:
    lines = list(csv.reader(io.StringIO(render.to_csv(reports.usage_report(db)))))
    assert [line[0] for line in lines] == ["group", "all", "TOTAL"]
    assert lines[1][1:] == lines[2][1:]


@pytest.mark.parametrize(
    ("user", "cell"),
    [
        ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"),
        ("+1+1", "'+1+1"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("  =1+1", "'  =1+1"),
        ("\t=1", "'\t=1"),
        ("alice", "alice"),
        ("a=b", "a=b"),
    ],
)
def test_csv_neutralises_formulas(ledger_target: str, user: str, cell: str) -> None:
    write_target(ledger_target, [call(1, "2026-11-23 12:00:00", user=user, cost_usd=Decimal("1"))])
    conn = reports.connect_readonly(ledger_target)
    try:
        text = render.to_csv(reports.usage_report(conn, group_by=["user"]))
    finally:
        conn.close()
    assert list(csv.reader(io.StringIO(text)))[1][0] == cell


def test_table_shows_the_figures(db: sqlite3.Connection) -> None:
    text = render.to_table(reports.usage_report(db, group_by=["model"]))
    lines = text.splitlines()
    assert lines[0].split() == ["model", "calls", "errors", "unpriced_calls", "counted_calls", "prompt",
                                "completion", "cached", "reasoning", "total", "cost_usd"]  # fmt: skip
    assert lines[2].split() == ["gpt-4o-mini", "3", "1", "0", "0", "1,007", "0", "0", "0", "1,007", "1.00003"]
    # The unpriced model's cost is marked (it is unknown, not free), and so is the total that includes it.
    assert lines[4].split()[:4] == ["mystery-1", "1", "0", "1"] and lines[4].endswith(" unpriced*")
    assert lines[-2].split() == ["TOTAL", "8", "2", "1", "0", "1,312", "75", "50", "8", "1,387", "1.60003*"]
    assert lines[-1].startswith("* includes 1 unpriced call(s)") and "not 0" in lines[-1]
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule line up
    assert lines[3].startswith("gpt-4o ") and lines[4].startswith("mystery-1")
    # One number of decimals per column: every cost ends at the same column, its point too.
    costs = [line for line in lines[2:-1] if not line.startswith(("-", "mystery"))]
    assert len({line.rindex(".") for line in costs}) == 1


def test_table_pads_costs_without_rounding(ledger_target: str) -> None:
    write_target(ledger_target, [call(1, "2026-11-23 12:00:00", user="a", cost_usd=Decimal("2")),
                                    call(2, "2026-11-23 12:00:00", user="b", cost_usd=Decimal("0.0000125"))])
    conn = reports.connect_readonly(ledger_target)
    try:
        lines = render.to_table(reports.usage_report(conn, group_by=["user"])).splitlines()
    finally:
        conn.close()
    assert [line.split()[-1] for line in lines[2:4]] == ["2.0000000", "0.0000125"]
    assert lines[-1].split()[-1] == "2.0000125"


def test_table_escapes_control_characters(ledger_target: str) -> None:
    write_target(ledger_target, [
        call(1, "2026-11-23 12:00:00", user="evil\x1b[2J\nname", cost_usd=Decimal("1")),
    ])  # fmt: skip
    conn = reports.connect_readonly(ledger_target)
    try:
        text = render.to_table(reports.usage_report(conn, group_by=["user"]))
    finally:
        conn.close()
    assert "\x1b" not in text and "evil\\x1b[2J\\nname" in text
    assert len(text.splitlines()) == 5


@pytest.mark.parametrize(
    ("status", "is_error"),
    [(0, True), (199, True), (200, False), (204, False), (299, False), (304, True), (400, True),
     (503, True)],
)  # fmt: skip
def test_errors_are_calls_without_a_2xx_status(ledger_target: str, status: int, is_error: bool) -> None:
    write_target(ledger_target, [call(1, "2026-11-23 12:00:00", status=status)])
    conn = reports.connect_readonly(ledger_target)
    try:
        assert reports.usage_report(conn)["totals"]["errors"] == int(is_error)
    finally:
        conn.close()


def test_time_buckets_agree_with_the_range_at_a_fraction_before_the_edge(ledger_target: str) -> None:
    edge = at("2026-12-01 00:00:00")
    write_target(ledger_target, [call(1, "2026-11-30 23:59:59", started_at=edge - 0.0001)])
    conn = reports.connect_readonly(ledger_target)
    try:
        report = reports.usage_report(conn, group_by=["hour", "day", "month"], until=edge)
    finally:
        conn.close()
    assert [(r["hour"], r["day"], r["month"]) for r in report["rows"]] == [
        ("2026-11-30T23:00Z", "2026-11-30", "2026-11")
    ]


# -- rollups and raw calls give the same report ------------------------------------------------

ZONES = [None, "Europe/Berlin", "Asia/Kolkata", "America/St_Johns", "Australia/Lord_Howe", "Pacific/Chatham"]
GROUPINGS = [
    [], ["key"], ["model", "user"], ["operation", "endpoint", "status"], ["tag:team"], ["hour"], ["day"],
    ["week"], ["month"], ["key", "day"], ["month", "model"], ["hour", "day", "week", "month"],
    ["session"], ["tag:env", "day"], ["week", "model"], ["hour", "tag:team"],
]  # fmt: skip
R0 = at("2026-01-27 00:00:00")  # 70 days over three month ends and Europe's and Australia's DST changes


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def big(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """4,000 random calls through the real ledger (SQLite, then PostgreSQL), 60 days rolled up, a few
    hours dirty after a re-pricing."""
    import asyncio
    import random

    from tests.support.ledger import connect, random_call, write_through_ledger

    schema = None
    if request.param == "sqlite":
        where = str(tmp_path_factory.mktemp("big") / "ledger.db")
    else:
        import psycopg

        from tests.support.pg import with_schema

        database = request.getfixturevalue("pg_database")
        schema = f"big_{random.randrange(10**6)}"
        with psycopg.connect(database, autocommit=True) as admin:
            admin.execute(f'CREATE SCHEMA "{schema}"')
        where = with_schema(database, schema)
    rng = random.Random(42)
    calls = [random_call(rng, n, start=R0, span=70 * 86400) for n in range(4000)]
    asyncio.run(write_through_ledger(where, calls, rng))
    conn = connect(where)
    try:
        rollup_build.ensure(conn, until=R0 + 60 * 86400)  # days and months for the first 60 days
        # A re-pricing changed a few calls after they were rolled up (in March): their hours are dirty.
        conn.execute("UPDATE calls SET cost_usd = '7.25' WHERE id % 37 = 0 AND started_at >= ? AND started_at < ?",
                     (R0 + 40 * 86400, R0 + 45 * 86400))
        assert conn.execute("SELECT count(*) FROM rollup_dirty").fetchone()[0] > 3
    finally:
        conn.close()
    yield where
    if schema is not None:
        import psycopg

        with psycopg.connect(request.getfixturevalue("pg_database"), autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')


def both_ways(conn: sqlite3.Connection, **kwargs: Any) -> dict[str, Any]:
    fast = reports.usage_report(conn, **kwargs)
    slow = reports.usage_report(conn, use_rollups=False, **kwargs)
    assert fast == slow, (kwargs, fast["totals"], slow["totals"])
    return fast


@pytest.mark.parametrize("tz", ZONES)
@pytest.mark.parametrize(
    "span",
    [(None, None), ("2026-02-01", "2026-03-01"), (R0 + 3.5 * 86400 + 1234.5, R0 + 25 * 86400 + 17)],
)  # fmt: skip
def test_rollups_and_calls_give_identical_reports(big: str, tz: str | None, span: tuple[Any, Any]) -> None:
    since, until = (reports.parse_time(v, "since", tz) if isinstance(v, str) else v for v in span)
    conn = reports.connect_readonly(big)
    try:
        for group_by in GROUPINGS:
            for filters in ({}, {"key": "k2", "model": "gpt-4o"}, {"user": ""}):
                report = both_ways(conn, group_by=group_by, since=since, until=until, tz=tz, **filters)
                assert report["totals"]["calls"] > 0
    finally:
        conn.close()


def sources(conn: sqlite3.Connection, group_by: list[str], since: float | None, until: float | None,
            tz: str | None = None) -> list[str]:
    state = rollups.read_state(conn)
    return [s.source for s in reports.plan_segments(conn, group_by, since, until, reports.parse_tz(tz), state)]


def test_reports_do_read_the_rollups(big: str) -> None:
    conn = reports.connect_readonly(big)
    try:
        feb = (at("2026-02-01 00:00:00"), at("2026-03-01 00:00:00"))
        assert sources(conn, ["key", "model"], *feb) == ["month"]
        assert sources(conn, ["month", "user"], *feb) == ["month"]
        assert sources(conn, ["day", "week"], *feb) == ["day"]
        assert sources(conn, ["hour"], *feb) == ["hour"]
        assert sources(conn, ["day"], *feb, tz="Europe/Berlin") == ["hour"]
        assert sources(conn, ["day"], *feb, tz="Asia/Kolkata") == ["hour", "raw"] * 28 + ["hour"]  # 18:00Z
        assert sources(conn, ["hour"], *feb, tz="Asia/Kolkata") == ["raw"]
        # A local month is whole UTC days but for its two edges: day rows inside, hours at the edges.
        berlin_feb = (reports.parse_time("2026-02-01", "since", "Europe/Berlin"),
                      reports.parse_time("2026-03-01", "until", "Europe/Berlin"))
        assert sources(conn, ["month", "key"], *berlin_feb, tz="Europe/Berlin") == ["hour", "day", "hour"]
        assert sources(conn, ["week"], *berlin_feb, tz="Europe/Berlin")[:3] == ["hour", "day", "hour"]
        assert sources(conn, ["session"], *feb) == ["raw"]
        # The cut first hour, the rest of Feb 1st, then whole days.
        assert sources(conn, ["key"], feb[0] + 0.5, feb[1]) == ["raw", "hour", "day"]
        march = (at("2026-03-01 00:00:00"), at("2026-04-01 00:00:00"))
        assert "raw" in sources(conn, ["key"], *march)  # the dirty hours
        assert "hour" in sources(conn, ["key"], *march)  # after R0 + 60 days, no day rows yet
        # Finished days have each dimension's own rows; hours after days_until have only full sets.
        state = rollups.read_state(conn)
        plan = reports.plan_segments(conn, ["week", "model"], feb[0], march[1], None, state)
        assert {(s.source, s.projected) for s in plan} >= {("day", True), ("hour", True), ("hour", False)}
        assert all(s.projected == (s.source != "raw" and s.hi <= (state.days_until or 0)) for s in plan)
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("when", "tz", "labels"),
    [
        ("2026-11-23 12:00:00", None, ("2026-11-23T12:00Z", "2026-11-23", "2026-W48", "2026-11")),
        ("2026-12-31 12:00:00", None, ("2026-12-31T12:00Z", "2026-12-31", "2026-W53", "2026-12")),
        ("2027-01-03 23:59:59", None, ("2027-01-03T23:00Z", "2027-01-03", "2026-W53", "2027-01")),
        ("2027-01-04 00:00:00", None, ("2027-01-04T00:00Z", "2027-01-04", "2027-W01", "2027-01")),
        ("2024-12-30 08:00:00", None, ("2024-12-30T08:00Z", "2024-12-30", "2025-W01", "2024-12")),
        ("2026-11-30 23:30:00", "Europe/Berlin",
         ("2026-12-01T00:00+01:00", "2026-12-01", "2026-W49", "2026-12")),
        ("2026-10-25 00:30:00", "Europe/Berlin",  # before the clocks go back: 02:30 summer time
         ("2026-10-25T02:00+02:00", "2026-10-25", "2026-W43", "2026-10")),
        ("2026-10-25 01:30:00", "Europe/Berlin",  # the same wall-clock hour again, in winter time
         ("2026-10-25T02:00+01:00", "2026-10-25", "2026-W43", "2026-10")),
        ("2026-11-22 18:45:00", "Asia/Kolkata", ("2026-11-23T00:00+05:30", "2026-11-23", "2026-W48", "2026-11")),
        ("2026-11-22 18:15:00", "Asia/Kolkata", ("2026-11-22T23:00+05:30", "2026-11-22", "2026-W47", "2026-11")),
        ("2026-11-23 03:00:00", "America/New_York",
         ("2026-11-22T22:00-05:00", "2026-11-22", "2026-W47", "2026-11")),
    ],
)  # fmt: skip
async def test_time_bucket_labels(tmp_path: Path, when: str, tz: str | None, labels: tuple[str, ...]) -> None:
    path = tmp_path / "l.db"
    ledger = Ledger(path)
    ledger.db.after_insert.append(rollups.apply)
    await ledger.open()
    await ledger.record(call(1, when, cost_usd=Decimal("1")))
    await ledger.close()
    conn = sqlite3.connect(path, isolation_level=None)
    rollup_build.ensure(conn, until=at(when) + 86400 * 40)
    conn.close()
    conn = reports.connect_readonly(path)
    try:
        report = both_ways(conn, group_by=["hour", "day", "week", "month"], tz=tz)
    finally:
        conn.close()
    assert [(r["hour"], r["day"], r["week"], r["month"]) for r in report["rows"]] == [labels]
    assert report["tz"] == (tz or "UTC")


def test_naive_times_are_read_in_the_report_zone() -> None:
    assert reports.parse_time("2026-11-23", "since", "Europe/Berlin") == at("2026-11-22 23:00:00")
    assert reports.parse_time("2026-07-01T00:00", "since", "Europe/Berlin") == at("2026-06-30 22:00:00")
    assert reports.parse_time("2026-11-23T00:00Z", "since", "Europe/Berlin") == at("2026-11-23 00:00:00")
    assert reports.parse_time("2026-11-23", "since", "UTC") == at("2026-11-23 00:00:00")


@pytest.mark.parametrize("tz", ["Mars/Olympus", "../etc/passwd", "/etc/localtime", "Europe/", "a" * 300])
def test_unknown_time_zone(db: sqlite3.Connection, tz: str) -> None:
    with pytest.raises(ParameterError) as caught:
        reports.usage_report(db, group_by=["day"], tz=tz)
    assert caught.value.param == "tz" and "unknown time zone" in str(caught.value)
    with pytest.raises(ParameterError):
        reports.parse_time("2026-11-23", "since", tz)


def test_a_report_reads_one_snapshot_and_leaves_a_callers_transaction_open(db: sqlite3.Connection) -> None:
    assert not db.in_transaction
    reports.usage_report(db, group_by=["key"])
    assert not db.in_transaction  # its own read transaction is over
    db.execute("BEGIN")
    try:
        reports.usage_report(db, group_by=["day"])
        assert db.in_transaction  # the caller's is not ended for it
    finally:
        db.execute("ROLLBACK")


def test_a_postgres_server_lost_mid_read_is_a_ledger_error(pg_url: str) -> None:
    import psycopg

    write_target(pg_url, CALLS)
    with pytest.raises(ReportDatabaseError, match="reading ledger .* failed") as caught:
        with reports.open_read(pg_url) as conn:
            assert reports.usage_report(conn)["totals"]["calls"] == 8
            pid = conn.raw.info.backend_pid
            with psycopg.connect(pg_url, autocommit=True) as admin:  # as a server restart would
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            reports.usage_report(conn, group_by=["model"])
    assert parse_target(pg_url).shown in str(caught.value) and "\n" not in str(caught.value)


def test_costs_beyond_a_64_bit_sum_add_exactly_across_segments(ledger_target: str) -> None:
    # Four calls of just over $4M each: each is whole picodollars (4e18 + 1, below 2**62), three hours of
    # them sum past SQLite's 64-bit integers. The range cuts the first hour, so the report has a raw part
    # and an hour part, read as one query (PostgreSQL adds in numeric) or, when SQLite's sum overflows, a
    # query per part added in Python: the same exact answer either way, and the same as the raw scan.
    import asyncio
    import random

    from tests.support.ledger import write_through_ledger

    calls = [call(n, when, model="gpt-4o", cost_usd=Decimal("4000000.000000000001"))
             for n, when in enumerate(["2026-11-23 00:45:00", "2026-11-23 01:15:00", "2026-11-23 02:15:00",
                                       "2026-11-23 03:15:00"], start=1)]  # fmt: skip
    asyncio.run(write_through_ledger(ledger_target, calls, random.Random(3)))
    conn = reports.connect_readonly(ledger_target)
    try:
        since = at("2026-11-23 00:30:00")
        plan = reports.plan_segments(conn, ["model"], since, None, None, rollups.read_state(conn))
        assert {s.source for s in plan} == {"raw", "hour"}
        for group_by in ([], ["model"], ["hour"], ["day", "model"]):
            fast = reports.usage_report(conn, group_by=group_by, since=since)
            assert fast == reports.usage_report(conn, group_by=group_by, since=since, use_rollups=False)
            assert fast["totals"]["cost_usd"] == "16000000.000000000004"
            assert fast["totals"]["calls"] == 4
    finally:
        conn.close()
