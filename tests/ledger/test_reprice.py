"""Tests for proxy.reprice: real ledger files, re-priced with a later table; the audit trail; the command."""

from __future__ import annotations

import argparse
import json
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from proxy.cli.reprice import add_reprice_parser, run_reprice
from proxy.core.record import CallRecord, Usage
from proxy.ledger.migrations import migrate
from proxy.ledger.reprice import RepriceError, reprice
from proxy.ledger.writer import INSERT_SQL, Ledger, record_row
from proxy.pricing.table import PriceTable
from tests.support.ledger import connect, is_postgres, write_calls

T0 = 1_780_000_000.0  # 2026-05-28T20:26:40Z
HOUR = 3600.0

OLD = PriceTable.from_mapping({"models": {"gpt-4o": {"input": "2.50", "cached_input": "1.25", "output": "10"},
                                          "gpt-5": {"input": "1.25", "output": "10",
                                                    "tiers": {"flex": {"input": "0.625", "output": "5"}}}}})
# The later table: a price for the local model, a changed gpt-4o output price, audio prices for gpt-5.
NEW_YAML = """\
models:
  gpt-4o: {input: 2.50, cached_input: 1.25, output: 12}
  gpt-5:
    input: 1.25
    output: 10
    audio_input: 40
    tiers: {flex: {input: 0.5, output: 5}}
  llama-local:
    input: 0.10
    output: 0.20
    match: ["llama-*"]
"""


def call(n: int, model: str | None, prompt: int = 0, completion: int = 0, *, cached: int = 0, audio_in: int = 0,
         tier: str | None = None, hours: float = 0, source: str = "upstream", table: PriceTable = OLD) -> CallRecord:
    started = T0 + hours * HOUR
    rec = CallRecord(request_id=f"call-{n}", started_at=started, ended_at=started + 1, method="POST",
                     endpoint="/v1/chat/completions", model=model, status=200)
    if source == "none":  # no usage read (a refused or failed call): priced unless its model has no price
        rec.status, rec.priced = 429, model is None or table.resolve(model) is not None
    else:
        usage = Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached,
                      total_tokens=prompt + completion, audio_prompt_tokens=audio_in)
        rec.set_usage(usage, "upstream")
        rec.cost_usd, rec.priced = table.cost(model, usage, tier)
    rec.service_tier, rec.pricing_version = tier, table.version
    return rec


CALLS = [
    call(1, "llama-local", 1000, 500, hours=0),  # unpriced when made
    call(2, "llama-local", 2000, 100, hours=1),
    call(3, "llama-3-8b", 10, 10, hours=2),  # priced by the new table's glob
    call(4, "llama-local", hours=3, source="none"),  # refused: unpriced flag only
    call(5, "gpt-4o", 1000, 1000, cached=200, hours=1),  # 800x2.5 + 200x1.25 + 1000x10 = 12250
    call(6, "gpt-4o", 0, 500, hours=5),  # 5000
    call(7, "gpt-5", 1000, 100, audio_in=100, hours=2),  # 1250 + 1000 = 2250; audio at 40 later
    call(8, "gpt-5", 1000, 100, tier="flex", hours=3),  # 625 + 500 = 1125; flex input 0.5 later
    call(9, "gpt-5", 1000, 100, tier="priority", hours=4),  # no priority price: standard, unchanged
    call(10, None, hours=4, source="none"),  # no model, no usage: unchanged
]


def make_ledger(path: Path, calls: list[CallRecord]) -> Path:
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn)
    conn.execute("BEGIN")
    conn.executemany(INSERT_SQL, [record_row(rec) for rec in calls])
    conn.execute("COMMIT")
    conn.close()
    return path


@pytest.fixture
def db(ledger_target: str) -> Any:
    """The ledger of CALLS on each backend: a SQLite file, then a PostgreSQL schema."""
    if is_postgres(ledger_target):
        write_calls(ledger_target, CALLS)
        return ledger_target
    return make_ledger(Path(ledger_target), CALLS)


@pytest.fixture
def new(tmp_path: Path) -> PriceTable:
    path = tmp_path / "new.yaml"
    path.write_text(NEW_YAML, encoding="utf-8")
    return PriceTable.load(path)


def _select(db: Path | str, sql: str) -> list[dict[str, Any]]:
    """Rows of `sql` on either backend as dicts, money as the exact text SQLite keeps."""
    conn = connect(db, functions=False)
    try:
        cur: Any = conn.execute(sql)
        names = [d[0] for d in cur.description]
        return [{k: format(v, "f") if isinstance(v, Decimal) else v for k, v in zip(names, r)}
                for r in cur.fetchall()]
    finally:
        conn.close()


def rows(db: Path | str) -> dict[str, dict[str, Any]]:
    return {r["request_id"]: r for r in _select(db, "SELECT * FROM calls")}


def runs(db: Path | str) -> list[dict[str, Any]]:
    return _select(db, "SELECT * FROM reprice_runs ORDER BY id")


def run(db: Path | str, table: PriceTable, **kwargs: Any) -> Any:
    conn = connect(db, functions=False)
    try:
        return reprice(conn, table, now=T0 + 100 * HOUR, **kwargs)
    finally:
        conn.close()


# Expected new costs, by hand (USD): llama at 0.10 / 0.20 per 1M; gpt-4o output 12; gpt-5 audio 40, flex 0.5.
NEW_COSTS = {
    "call-1": "0.0002",  # 1000x0.1 + 500x0.2 = 200
    "call-2": "0.00022",  # 200 + 20
    "call-3": "0.000003",  # 1 + 2
    "call-4": "0",
    "call-5": "0.01425",  # 2000 + 250 + 12000
    "call-6": "0.006",  # 500 x 12
    "call-7": "0.006125",  # 900x1.25 + 100x40 + 100x10 = 1125 + 4000 + 1000
    "call-8": "0.001",  # 1000x0.5 + 100x5
}


def test_reprice_prices_the_unpriced_and_applies_changed_prices(db: Path, new: PriceTable) -> None:
    before = rows(db)
    report = run(db, new)
    after = rows(db)
    changed = set(NEW_COSTS)
    assert report.calls == 10 and report.changed == len(changed)
    for rid, row in after.items():
        old = before[rid]
        if rid in changed:
            assert Decimal(row["cost_usd"]) == Decimal(NEW_COSTS[rid]), rid
            assert row["cost_usd"] == format(Decimal(row["cost_usd"]), "f")  # stored as a plain decimal
            assert row["priced"] == 1 and row["pricing_version"] == new.version
            assert row["original_cost_usd"] == old["cost_usd"] and row["repriced_at"] == T0 + 100 * HOUR
        else:
            assert row == old, rid  # untouched: no audit columns either
        # Only the five re-pricing columns ever change.
        assert {k for k in row if row[k] != old[k]} <= {"cost_usd", "priced", "pricing_version", "repriced_at",
                                                         "original_cost_usd"}
    llama = report.by_model["llama-local"]
    assert (llama.calls, llama.old_cost, llama.new_cost, llama.newly_priced) == (3, 0, Decimal("0.00042"), 3)
    assert report.by_model["llama-3-8b"].newly_priced == 1
    gpt4o = report.by_model["gpt-4o"]
    assert (gpt4o.calls, gpt4o.old_cost, gpt4o.new_cost, gpt4o.newly_priced) == (
        2, Decimal("0.01725"), Decimal("0.02025"), 0)
    assert report.old_cost == Decimal("0.020625")  # 0.01725 + 0.00225 + 0.001125
    assert report.new_cost == Decimal("0.027798")  # 0.00042 + 0.000003 + 0.02025 + 0.006125 + 0.001
    assert (report.first_changed_at, report.last_changed_at) == (T0, T0 + 5 * HOUR)
    assert [c.model for c in report.models()] == ["gpt-4o", "gpt-5", "llama-3-8b", "llama-local"]


def test_audit_row(db: Path, new: PriceTable) -> None:
    report = run(db, new, since=T0 + HOUR, model="gpt-4o")
    (audit,) = runs(db)
    assert audit == {"id": report.run_id, "at": T0 + 100 * HOUR, "since": T0 + HOUR, "until": None,
                     "model": "gpt-4o", "pricing_version": new.version, "calls": 2, "changed": 2,
                     "old_cost_usd": "0.01725", "new_cost_usd": "0.02025"}


def test_repeated_reprice_keeps_the_first_original_cost(db: Path, new: PriceTable) -> None:
    first_cost = rows(db)["call-6"]["cost_usd"]
    run(db, new)
    dearer = PriceTable.from_mapping({"models": {"gpt-4o": {"input": "2.5", "output": "15"}}})
    report = run(db, dearer, model="gpt-4o")
    row = rows(db)["call-6"]
    assert Decimal(row["cost_usd"]) == Decimal("0.0075") and row["original_cost_usd"] == first_cost == "0.005"
    assert row["pricing_version"] == dearer.version
    assert report.by_model["gpt-4o"].old_cost == Decimal("0.02025")  # the previous re-pricing's costs
    again = run(db, dearer, model="gpt-4o")  # nothing left to change: still audited
    assert again.changed == 0 and again.by_model == {} and again.first_changed_at is None
    assert [r["changed"] for r in runs(db)] == [8, 2, 0]


def test_a_model_that_loses_its_price_is_counted(db: Path) -> None:
    report = run(db, PriceTable.from_mapping({"models": {"gpt-5": {"input": "1.25", "output": "10"}}}),
                 model="gpt-4o")
    gpt4o = report.by_model["gpt-4o"]
    assert (gpt4o.calls, gpt4o.newly_unpriced, gpt4o.new_cost) == (2, 2, 0)
    assert all(r["priced"] == 0 for r in rows(db).values() if r["model"] == "gpt-4o")


def test_command_warns_of_calls_that_lose_their_price(db: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    only = tmp_path / "only-gpt-5.yaml"
    only.write_text("models:\n  gpt-5: {input: 1.25, output: 10}\n")
    assert main(["reprice", "--db", str(db), "--pricing", str(only), "--model", "gpt-4o"]) == 0
    assert "warning: 2 calls lost their price" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("kwargs", "changed"),
    [
        ({"since": T0 + HOUR}, {"call-2", "call-3", "call-4", "call-5", "call-6", "call-7", "call-8"}),
        ({"until": T0 + HOUR}, {"call-1"}),  # until is exclusive
        ({"since": T0 + HOUR, "until": T0 + 3 * HOUR}, {"call-2", "call-3", "call-5", "call-7"}),
        ({"model": "llama-local"}, {"call-1", "call-2", "call-4"}),
        ({"model": "llama-*"}, {"call-1", "call-2", "call-3", "call-4"}),
        ({"model": "gpt-?"}, {"call-7", "call-8"}),
        ({"model": "GPT-4o"}, set()),  # names are case-sensitive, as in the price table
        ({"model": "llama-local", "since": T0 + 2 * HOUR}, {"call-4"}),
    ],
)
def test_filters(db: Path, new: PriceTable, kwargs: dict[str, Any], changed: set[str]) -> None:
    before = rows(db)
    report = run(db, new, **kwargs)
    after = rows(db)
    assert {rid for rid in after if after[rid] != before[rid]} == changed
    assert report.changed == len(changed)


def test_dry_run_changes_nothing(db: Path, new: PriceTable) -> None:
    before = rows(db)
    report = run(db, new, dry_run=True)
    assert rows(db) == before and runs(db) == []
    assert report.dry_run and report.run_id is None and report.changed == 8
    assert report.by_model["llama-local"].new_cost == Decimal("0.00042")


def test_after_hook_runs_inside_the_transaction(db: Path, new: PriceTable) -> None:
    seen: list[tuple[int, float | None, float | None]] = []

    def rebuild(conn: sqlite3.Connection, report: Any) -> None:
        assert conn.in_transaction
        seen.append((report.changed, report.first_changed_at, report.last_changed_at))
        raise RuntimeError("rollup rebuild failed")

    before = rows(db)
    with pytest.raises(RuntimeError):
        run(db, new, after=rebuild)
    assert seen == [(8, T0, T0 + 5 * HOUR)]
    assert rows(db) == before and runs(db) == []  # all or nothing


def test_connection_in_a_transaction_is_refused(db: Path, new: PriceTable) -> None:
    conn = connect(db)
    conn.begin()
    with pytest.raises(RepriceError, match="already in a transaction"):
        reprice(conn, new)
    conn.close()


def test_many_rows_across_pages_sum_exactly(tmp_path: Path) -> None:
    # 12,001 calls of one token at 0.1 per 1M: 0.0000001 each; a float sum would not land on 0.0012001.
    calls = [call(n, "tiny", 1, hours=n / 1000) for n in range(12_001)]
    db = make_ledger(tmp_path / "many.db", calls)
    report = run(db, PriceTable.from_mapping({"models": {"tiny": {"input": "0.1"}}}))
    assert report.changed == 12_001 and report.new_cost == Decimal("0.0012001")
    assert report.by_model["tiny"].newly_priced == 12_001
    assert {r["cost_usd"] for r in rows(db).values()} == {"0.0000001"}


async def test_rows_written_by_the_ledger_writer(tmp_path: Path, new: PriceTable) -> None:
    ledger = Ledger(tmp_path / "written.db")
    await ledger.open()
    try:
        for rec in CALLS[:3]:
            await ledger.record(rec)
    finally:
        await ledger.close()
    report = run(tmp_path / "written.db", new)
    assert report.changed == 3 and report.new_cost == Decimal("0.000423")


# --- the command -------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="meterproxy")
    add_reprice_parser(parser.add_subparsers(dest="command", required=True))
    return run_reprice(parser.parse_args(argv))


def test_command_prints_what_changed(db: Path, new: PriceTable, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reprice", "--db", str(db), "--pricing", new.source, "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "dry run: nothing written" in dry and runs(db) == []
    assert main(["reprice", "--db", str(db), "--pricing", new.source, "--since", "2026-05-28T21:00:00Z"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert f"pricing {new.source} (version {new.version})" in lines[0]
    assert "calls in range: 9; changed: 7 (started 2026-05-28T21:26:40.000Z .. 2026-05-29T01:26:40.000Z)" in lines[1]
    table = {line.split()[0]: line.split()[1:] for line in lines[2:] if line and not line.startswith("recorded")}
    assert table["model"] == ["calls", "old_cost_usd", "new_cost_usd", "newly_priced"]
    assert table["llama-local"] == ["2", "0", "0.00022", "2"]
    assert table["gpt-4o"] == ["2", "0.01725", "0.02025", "0"]
    assert table["total"][0] == "7" and table["total"][3] == "3"
    assert lines[-1] == f"recorded as re-pricing run {runs(db)[0]['id']}"


def test_command_json(db: Path, new: PriceTable, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["reprice", "--db", str(db), "--pricing", new.source, "--model", "llama-*", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["changed"] == 4 and out["new_cost_usd"] == "0.000423" and out["model"] == "llama-*"
    assert out["models"][0] == {"model": "llama-3-8b", "calls": 1, "old_cost_usd": "0", "new_cost_usd": "0.000003",
                                "newly_priced": 1, "newly_unpriced": 0}


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--db", "{tmp}/missing.db"], "no ledger at"),
        (["--since", "yesterday"], "since: 'yesterday' is not a time"),
        (["--pricing", "{tmp}/nope.yaml"], "cannot read price table"),
        (["--pricing", "{tmp}/bad.yaml"], "line 2: model 'm': 'input' price -1 is negative"),
    ],
)
def test_command_errors_are_one_line(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                     words: str) -> None:
    (tmp_path / "bad.yaml").write_text("models:\n  m: {input: -1}\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--db" not in args:
        args += ["--db", str(db)]
    if "--pricing" not in args:
        args += ["--pricing", fine_table(tmp_path)]
    assert main(["reprice", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meterproxy: ") and words in err and err.count("\n") == 1


def fine_table(tmp_path: Path) -> str:
    path = tmp_path / "fine.yaml"
    path.write_text(NEW_YAML, encoding="utf-8")
    return str(path)
