"""Rollup views (rollup_views.py): rows per pair of dimensions and per configured zone, on both backends.

Every check compares the views' rows with sums computed in Python from every call, and reports through the
rollups with reports over `calls` alone, through Berlin's spring DST change, Kolkata's half hours, month
ends, late calls, a re-pricing, retention and a zone added later.
"""

from __future__ import annotations

import asyncio
import json
import random
from calendar import timegm
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from proxy.core.money import EXACT
from proxy.ledger import rollup_build, rollup_views, rollups
from proxy.ledger.retention import RetentionTask, prune
from proxy.ledger.rollup_build import in_transaction
from proxy.reports import queries as reports
from tests.support.ledger import DAY, connect, random_call, write_through_ledger

R0 = float(timegm((2026, 3, 16, 0, 0, 0)))  # 40 days: Berlin's DST change (Mar 29), two month ends
SPAN = 40 * DAY
UNTIL = R0 + 34 * DAY  # days rolled up (and views built) before it
PAIRS = [("key_id", "model"), ("model", "user"), ("operation", "team")]
ZONES = ["Europe/Berlin", "Asia/Kolkata"]
GROUPINGS = [
    [], ["model"], ["user", "model"], ["tag:team", "operation"], ["key", "model", "month"], ["day", "user", "model"],
    ["week", "tag:team", "operation"], ["day"], ["month"], ["status", "user"], ["key", "week"], ["hour", "model"],
]  # fmt: skip
FILTERS: list[dict[str, str]] = [{}, {"key": "k2"}, {"user": "bob", "model": "gpt-4o"}]


def build(where: str, n: int = 2500, seed: int = 5, zones: list[str] = ZONES) -> None:
    rng = random.Random(seed)
    asyncio.run(write_through_ledger(where, [random_call(rng, i, start=R0, span=SPAN) for i in range(n)], rng))
    conn = connect(where)
    try:
        in_transaction(conn, lambda: rollup_views.configure(conn, rollup_views.wanted(PAIRS, zones)))
        rollup_build.ensure(conn, until=UNTIL)
    finally:
        conn.close()


def expected_views(conn: Any) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    """Each view's rows, summed in Python from every call: (view id, grain, bucket, dims) -> counters, cost."""
    state = rollups.read_state(conn)
    calls = list(rollups.as_conn(conn).execute(
        'SELECT started_at, key_id, model, "user", operation, endpoint, status, tags, priced, usage_source, '
        "prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, total_tokens, cost_usd FROM calls"))
    sums: dict[tuple[Any, ...], list[Any]] = {}
    for view in state.views:
        if view.days_from is None or view.days_until is None:
            continue
        zone = ZoneInfo(view.zone) if view.zone else ZoneInfo("UTC")
        for started, *dims6, tags, priced, source, p, c, ca, r, t, cost in calls:
            if not view.days_from <= started < view.days_until:
                continue
            dims = (*dims6, json.loads(tags).get("team"))
            key: Any = dims if view.dims == rollups.FULL else tuple(
                dims[rollups.DIMS.index(n)] for n in view.names) if view.names else "*"
            day = rollup_views.local_day(zone, started)[0]
            month = rollup_views.local_month(zone, started)[0]
            counted = source == "counted"
            add = [1, not 200 <= dims6[5] <= 299, not priced, p, c, ca, r, t, counted, t if counted else 0]
            for grain, bucket in ((rollups.DAY, day), (rollups.MONTH, month)):
                acc = sums.setdefault((view.id, grain, bucket, key), [[0] * 10, Decimal(0)])
                acc[0] = [a + b for a, b in zip(acc[0], add)]
                acc[1] = EXACT.add(acc[1], Decimal(cost))
    return {k: (*map(int, v[0]), format(v[1], "f")) for k, v in sums.items()}


def actual_views(conn: Any) -> dict[tuple[Any, ...], tuple[Any, ...]]:
    views = {v.id: v for v in rollups.read_views(conn)}
    out = {}
    sql = (f"SELECT r.grain, r.bucket, d.key_id, d.model, d.\"user\", d.operation, d.endpoint, d.status, d.team, "
           f"{', '.join('r.' + c for c in rollups.INT_COUNTERS)}, r.cost_usd, r.cost_pico, r.cost_exp, r.dim_id "
           f"FROM rollups r LEFT JOIN rollup_dims d ON d.id = r.dim_id WHERE r.grain >= {rollups.VIEW_BASE}")
    for grain, bucket, *rest in rollups.as_conn(conn).execute(sql):
        dims, ints, (cost, pico, exp, dim_id) = tuple(rest[:7]), tuple(rest[7:17]), rest[17:]
        view = views[(grain - rollups.VIEW_BASE) // rollups.VIEW_STEP]
        if isinstance(cost, Decimal):
            cost = format(cost, "f")
        if pico is not None:
            assert format(rollups.from_pico(pico, exp), "f") == cost
        if view.dims == rollups.FULL:
            key: Any = dims
        elif view.names:
            assert all(v is None for d, v in zip(rollups.DIMS, dims) if d not in view.names)
            key = tuple(dims[rollups.DIMS.index(n)] for n in view.names)
        else:
            assert dim_id == rollups.SERIES
            key = "*"
        out[(view.id, (grain - rollups.VIEW_BASE) % rollups.VIEW_STEP, bucket, key)] = (*ints, cost)
    return out


def assert_views_exact(where: str, zone: str | None = None) -> None:
    """The views' rows (those of `zone` alone, if given) are what their calls add up to."""
    conn = connect(where)
    try:
        expected, actual = expected_views(conn), actual_views(conn)
        if zone is not None:
            ids = {v.id for v in rollups.read_views(conn) if v.zone == zone}
            expected = {k: v for k, v in expected.items() if k[0] in ids}
            actual = {k: v for k, v in actual.items() if k[0] in ids}
        stale = {k for k in actual if k not in expected and (k[1] == rollups.DAY or actual[k][0])}
        assert not stale, sorted(stale)[:3]
        wrong = {k: (actual.get(k), v) for k, v in expected.items() if actual.get(k) != v}
        assert not wrong, list(wrong.items())[:3]
    finally:
        conn.close()


def same_reports(where: str, tz: str | None, since: float | None = None, until: float | None = None,
                 groupings: list[list[str]] = GROUPINGS, filters_list: list[dict[str, str]] = FILTERS,
                 raw: dict[Any, Any] | None = None) -> set[str]:
    """Reports through the rollups equal reports over calls (or `raw`, answers kept from before a prune);
    returns the zones of the views they read ('' for UTC)."""
    conn = reports.connect_readonly(where)
    used: set[str] = set()
    try:
        for group_by in groupings:
            for filters in filters_list:
                args: dict[str, Any] = {"group_by": group_by, "tz": tz, "since": since, "until": until, **filters}
                fast = reports.usage_report(conn, **args)
                key = json.dumps(args, sort_keys=True)
                if raw is not None:
                    assert fast.pop("pruned_before", None) is not None
                slow = raw[key] if raw is not None else reports.usage_report(conn, use_rollups=False, **args)
                assert fast == slow, args
                names = [g for item in group_by for g in item.split(",")]
                filtered = frozenset(reports.report_sql.FILTER_DIMS[k] for k in filters)
                state = rollups.read_state(conn)
                zones = {v.id: v.zone for v in state.views}
                used |= {zones[s.view] for s in reports.plan_segments(
                    conn, names, since, until, reports.parse_tz(tz), state, filtered) if s.view is not None}
    finally:
        conn.close()
    return used


def raw_answers(where: str, tz: str | None, since: float | None, until: float | None,
                groupings: list[list[str]]) -> dict[str, Any]:
    conn = reports.connect_readonly(where)
    try:
        out = {}
        for group_by in groupings:
            for filters in FILTERS:
                args: dict[str, Any] = {"group_by": group_by, "tz": tz, "since": since, "until": until, **filters}
                out[json.dumps(args, sort_keys=True)] = reports.usage_report(conn, use_rollups=False, **args)
        return out
    finally:
        conn.close()


def local(text: str, tz: str) -> float:
    return reports.parse_time(text, "since", tz)


def test_views_hold_exactly_their_calls_and_reports_read_them(ledger_target: str) -> None:
    build(ledger_target)
    assert_views_exact(ledger_target)
    conn = connect(ledger_target)
    try:
        views = rollups.read_views(conn)
        assert len(views) == 3 + 2 * (2 + 7 + 3)
        assert all(v.days_until is not None for v in views)
        berlin = next(v for v in views if v.zone == "Europe/Berlin" and v.dims == rollups.FULL)
        assert berlin.days_until == local("2026-04-19", "Europe/Berlin")  # the last local day ending by UNTIL
    finally:
        conn.close()
    for tz in (None, *ZONES):
        assert (tz or "") in same_reports(ledger_target, tz)
        april = (local("2026-04-01", tz or "UTC"), local("2026-04-18", tz or "UTC"))
        assert (tz or "") in same_reports(ledger_target, tz, *april)
        cut = (local("2026-03-20T10:30", tz or "UTC"), local("2026-04-05T07:00", tz or "UTC"))
        same_reports(ledger_target, tz, *cut)
    conn = reports.connect_readonly(ledger_target)
    try:
        state = rollups.read_state(conn)
        march = (local("2026-03-17", "Europe/Berlin"), local("2026-04-01", "Europe/Berlin"))
        plan = reports.plan_segments(conn, ["user", "model"], *march, ZoneInfo("Europe/Berlin"), state)
        # 15 local days of Berlin (23 hours on the 29th), in two offsets
        assert [(s.source, s.offset) for s in plan] == [("day", 3600), ("day", 7200)]
        views = {v.id: v for v in state.views}
        assert {(views[s.view].zone, views[s.view].dims) for s in plan if s.view} == {("Europe/Berlin", "model,user")}
        april = (local("2026-04-01", "Asia/Kolkata"), local("2026-04-18", "Asia/Kolkata"))
        plan = reports.plan_segments(conn, ["month", "key"], *april, ZoneInfo("Asia/Kolkata"), state)
        assert {s.source for s in plan} == {"day"} and all(s.view is not None for s in plan)
        utc = (local("2026-03-17", "UTC"), local("2026-04-19", "UTC"))
        plan = reports.plan_segments(conn, ["operation", "tag:team"], *utc, None, state)
        assert [s.source for s in plan] == ["day"] and all(s.view is not None for s in plan)
        # Exactly a pair, or within it by a filter; a third dimension reads the full sets.
        assert all(s.view for s in reports.plan_segments(conn, ["model"], *utc, None, state, frozenset({"key_id"})))
        assert all(s.view is None for s in reports.plan_segments(conn, ["model", "status"], *utc, None, state))
    finally:
        conn.close()


def test_late_calls_and_a_repricing_keep_the_views_exact(ledger_target: str) -> None:
    build(ledger_target, n=1500, seed=6)
    rng = random.Random(7)
    late = [random_call(rng, n, start=R0 + 5 * DAY, span=20 * DAY) for n in range(9000, 9300)]
    asyncio.run(write_through_ledger(ledger_target, late, rng))
    conn = connect(ledger_target)
    try:
        assert conn.execute("SELECT count(*) FROM rollup_dirty").fetchone()[0] > 0  # the hook marked them
    finally:
        conn.close()
    same_reports(ledger_target, "Asia/Kolkata")  # dirty hours read from calls meanwhile
    conn = connect(ledger_target)
    try:
        while in_transaction(conn, lambda: rollup_build.rebuild_dirty(conn, max_hours=1)):
            pass
        # A re-pricing: its UPDATEs mark the hours dirty, and it rebuilds them in its own transaction.
        conn.execute("UPDATE calls SET cost_usd = '0.125' WHERE id % 11 = 0")
        in_transaction(conn, lambda: rollup_build.after_reprice(conn))
    finally:
        conn.close()
    assert_views_exact(ledger_target)
    for tz in (None, *ZONES):
        assert (tz or "") in same_reports(ledger_target, tz)


def test_a_zone_added_later_is_built_in_the_background(ledger_target: str) -> None:
    build(ledger_target, n=1500, seed=8, zones=["Europe/Berlin"])
    conn = connect(ledger_target)
    try:
        assert in_transaction(conn, lambda: rollup_views.configure(conn, rollup_views.wanted(PAIRS, ZONES))) == 12
    finally:
        conn.close()
    assert "Asia/Kolkata" not in same_reports(ledger_target, "Asia/Kolkata")  # not built yet: the existing path
    conn = connect(ledger_target)
    try:
        for _ in range(5):  # a few days of it, a day per transaction
            assert in_transaction(conn, lambda: rollup_views.advance(conn, rollup_views.wanted(PAIRS, ZONES)))
        kolkata = [v for v in rollups.read_views(conn) if v.zone == "Asia/Kolkata"]
        assert len({(v.days_from, v.days_until) for v in kolkata}) == 1  # its views go along with its FULL
        assert kolkata[0].days_until == local("2026-03-21", "Asia/Kolkata")
    finally:
        conn.close()
    assert_views_exact(ledger_target)
    assert "Asia/Kolkata" in same_reports(ledger_target, "Asia/Kolkata")
    conn = connect(ledger_target)
    try:
        while in_transaction(conn, lambda: rollup_views.advance(conn)):
            pass
    finally:
        conn.close()
    assert_views_exact(ledger_target)
    same_reports(ledger_target, "Asia/Kolkata")


def test_retention_keeps_the_views_and_a_zone_added_after_it_skips_pruned_cut_hours(ledger_target: str) -> None:
    build(ledger_target, n=1500, seed=9, zones=["Europe/Berlin"])
    span = (local("2026-03-18", "Europe/Berlin"), local("2026-04-12", "Europe/Berlin"))
    shapes = [["user", "model"], ["day", "tag:team", "operation"], ["month", "key"], ["model"], []]
    before = raw_answers(ledger_target, "Europe/Berlin", *span, shapes)
    cutoff = R0 + 12 * DAY + 5 * 3600
    conn = connect(ledger_target)
    try:
        assert prune(conn, cutoff) > 0
        in_transaction(conn, lambda: rollup_views.configure(conn, rollup_views.wanted(PAIRS, ZONES)))
        while in_transaction(conn, lambda: rollup_views.advance(conn)):
            pass
        kolkata = next(v for v in rollups.read_views(conn) if v.zone == "Asia/Kolkata" and v.dims == rollups.FULL)
        berlin = next(v for v in rollups.read_views(conn) if v.zone == "Europe/Berlin" and v.dims == rollups.FULL)
    finally:
        conn.close()
    # Berlin's days are made of whole hours, which the rollups keep: exact over the pruned period too.
    assert "Europe/Berlin" in same_reports(ledger_target, "Europe/Berlin", *span, groupings=shapes, raw=before)
    assert berlin.days_from is not None and berlin.days_from < cutoff
    # Kolkata's days need the calls of the hour its midnight cuts: none before the first such hour kept.
    assert kolkata.days_from == local("2026-03-29", "Asia/Kolkata")  # 18:30Z on the 28th: hour 18:00 kept
    assert_views_exact(ledger_target, "Asia/Kolkata")
    kept = (local("2026-03-29", "Asia/Kolkata"), local("2026-04-15", "Asia/Kolkata"))
    assert "Asia/Kolkata" in same_reports(ledger_target, "Asia/Kolkata", *kept)


def test_the_upkeep_configures_and_builds_the_views(ledger_target: str) -> None:
    rng = random.Random(10)
    asyncio.run(write_through_ledger(ledger_target, [random_call(rng, i, start=R0, span=SPAN) for i in range(800)],
                                     rng))
    task = RetentionTask(ledger_target, None, clock=lambda: UNTIL, gap=0.0,
                         views=rollup_views.wanted(PAIRS, ["Asia/Kolkata"]))
    result = asyncio.run(task.run_once())
    assert result["view_days"] == 34 * 3 + 34  # the UTC days for each pair; Kolkata's, its others along
    assert asyncio.run(task.run_once())["view_days"] == 0
    assert_views_exact(ledger_target)
    assert "Asia/Kolkata" in same_reports(ledger_target, "Asia/Kolkata", groupings=[["user", "model"], ["day"]],
                                             filters_list=[{}])
