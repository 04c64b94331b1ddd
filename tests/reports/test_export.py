"""`meterproxy export`: every column, exact money, tags as objects, spreadsheet-safe CSV, filters, files."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest

from proxy.cli import export as export_cli
from proxy.ledger.sqlconn import wrap_sqlite
from proxy.reports import export
from tests.support.ledger import at, call, write_calls

CALLS = [
    call(1, "2026-11-23 09:15:00", key_id="k1", user="=HYPERLINK(\"http://evil\")", model="gpt-4o",
         tags={"team": "search", "note": "+1"}, cost_usd=Decimal("123456789012.345678901000000001"),
         prompt_tokens=10, completion_tokens=2, total_tokens=12, stream=True, usage_source="upstream"),
    call(2, "2026-11-23 08:00:00", key_id="k2", user="bob", model="gpt-4o-mini", status=500,
         error="-upstream said no", cost_usd=Decimal("0")),
    call(3, "2026-11-24 00:00:00", key_id="k1", user="@alice", model="gpt-4o", cost_usd=Decimal("0.10"),
         original_cost_usd=Decimal("0.2"), repriced_at=at("2026-11-25 00:00:00")),
]  # fmt: skip


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.db"
    write_calls(path, CALLS)
    return path


def run(path: Path, *argv: str) -> int:
    parser = argparse.ArgumentParser()
    export_cli.add_export_parser(parser.add_subparsers(dest="command"))
    return export_cli.run_export(parser.parse_args(["export", "--db", str(path), *argv]))


def table_columns(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [row[1] for row in conn.execute("PRAGMA table_info(calls)")]
    finally:
        conn.close()


def test_jsonl_has_every_column_exact_money_and_tags_as_objects(ledger: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(ledger) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["request_id"] for r in rows] == ["r2", "r1", "r3"]  # oldest first
    assert all(list(r) == [*table_columns(ledger), "ts"] for r in rows)
    first = rows[1]
    assert first["cost_usd"] == "123456789012.345678901000000001"  # a string, to the last digit
    assert first["tags"] == {"team": "search", "note": "+1"}
    assert first["stream"] is True and first["priced"] is True and first["approximate"] is False
    assert first["ts"] == "2026-11-23T09:15:00.000Z" and first["started_at"] == at("2026-11-23 09:15:00")
    assert rows[2]["cost_usd"] == "0.10" and rows[2]["original_cost_usd"] == "0.2"
    assert rows[0]["tags"] == {} and rows[0]["error"] == "-upstream said no"


def test_csv_neutralises_formulas_and_keeps_numbers(ledger: Path, tmp_path: Path) -> None:
    out = tmp_path / "calls.csv"
    assert run(ledger, "--format", "csv", "--output", str(out)) == 0
    lines = list(csv.reader(io.StringIO(out.read_text(encoding="utf-8"))))
    header = lines[0]
    body = {line[header.index("request_id")]: dict(zip(header, line)) for line in lines[1:]}
    assert header == [*table_columns(ledger), "ts"]
    assert body["r1"]["user"] == "'=HYPERLINK(\"http://evil\")"
    assert body["r3"]["user"] == "'@alice"
    assert body["r2"]["error"] == "'-upstream said no"
    assert json.loads(body["r1"]["tags"]) == {"note": "+1", "team": "search"}  # JSON text starts with {
    assert body["r1"]["cost_usd"] == "123456789012.345678901000000001"
    assert body["r2"]["status"] == "500" and body["r1"]["prompt_tokens"] == "10"
    assert body["r2"]["ttfb_ms"] == ""  # NULL is an empty cell
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".export-")]  # no temporary file left


@pytest.mark.parametrize(
    ("argv", "ids"),
    [
        (["--since", "2026-11-23T09:00:00Z"], ["r1", "r3"]),
        (["--until", "2026-11-24"], ["r2", "r1"]),
        (["--key", "k1"], ["r1", "r3"]),
        (["--since", "2026-11-23T10:00", "--tz", "Europe/Berlin", "--key", "k1"], ["r1", "r3"]),  # 09:00Z
        (["--since", "2026-11-23T10:30", "--tz", "Europe/Berlin"], ["r3"]),
        (["--key", "nobody"], []),
    ],
)
def test_filters(ledger: Path, capsys: pytest.CaptureFixture[str], argv: list[str], ids: list[str]) -> None:
    assert run(ledger, *argv) == 0
    assert [json.loads(line)["request_id"] for line in capsys.readouterr().out.splitlines()] == ids


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--since", "yesterday"], "since"),
        (["--since", "2026-11-24", "--until", "2026-11-23"], "until"),
        (["--tz", "Mars/Base", "--since", "2026-11-23"], "tz"),
    ],
)
def test_bad_options_end_with_one_line(ledger: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                       says: str) -> None:
    assert run(ledger, *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("meterproxy: ") and says in err and err.count("\n") == 1


def test_missing_ledger(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(tmp_path / "nope.db") == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "nope.db").exists()


def test_an_unwritable_output_leaves_no_file(ledger: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "missing-dir" / "calls.jsonl"
    assert run(ledger, "--output", str(target)) == 2
    assert "export failed" in capsys.readouterr().err
    assert not target.exists()


def test_rows_are_streamed(tmp_path: Path) -> None:
    path = tmp_path / "many.db"
    write_calls(path, [call(n, "2026-11-23 09:00:00", started_at=at("2026-11-23 09:00:00") + n)
                       for n in range(5000)])  # fmt: skip
    conn = sqlite3.connect(path)
    statements: list[str] = []
    conn.set_trace_callback(statements.append)
    try:
        rows = export.iter_calls(wrap_sqlite(conn))
        first = next(rows)  # one row out, the rest still in the cursor
        assert first["request_id"] == "r0"
        assert sum(1 for _ in rows) == 4999
    finally:
        conn.close()
    assert sum(s.startswith("SELECT") and "FROM calls" in s for s in statements) == 1
