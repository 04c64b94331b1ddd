"""Which rows answer a usage report: hour/day/month rollups where they can, `calls` for the rest.

A report's range is cut into segments, each read from one source:
- rollups answer whole UTC hours, and whole UTC days and months (before `days_until`) that lie inside one
  local bucket of the report's time groups (a Berlin month: every UTC day of it but the two edge days,
  read by the hour), whose calls were not changed since (no `rollup_dirty` mark), for reports whose
  groups and filters are all rollup dimensions (key, model, user, operation, endpoint, status, tag:team)
  or time buckets, while the rollups are current; grouped by time alone, each bucket's totals rows; by
  one dimension alone, that dimension's own rows where the segment is `projected` (before
  `projected_until`);
- a view's rows (ledger/rollup_views.py) answer UTC days and months for a report on exactly a configured
  pair of dimensions (groups and filters), and, in a configured zone, whole local days and months that the
  zone's rows cover and that hold no dirty hour (its totals, one dimension's, a pair's, or its full sets);
- `calls` answers the rest: the cut hours at a range's edges, dirty hours, hours that a time zone's day
  boundary cuts in two (a zone whose offset is not a whole number of hours at that instant: India's
  +05:30 cuts one hour a day; the hour bucket in such a zone is read from calls throughout), and every
  report the rollups cannot answer (session, other tags, or rollups not current);
- before `pruned_before` (retention) there are no raw calls, so the rollups answer that period alone:
  groups they do not hold (session, tags other than team) read as null there ("lossy" segments); an hour
  a zone's local boundary cuts counts whole in the local bucket where it starts; and a range edge that
  cuts an hour there counts none of that hour (ranges are whole hours in effect).

A time bucket's label is computed by the same SQL expression (ledger/report_sql.py: label_sql) over
`started_at` or a rollup's bucket start, with the zone's offset at that instant: a segment never spans an offset change. So both sources
label a bucket identically; tests compare them report for report.

This module holds no SQL: ledger/report_sql.py reads each segment.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from proxy.ledger import rollups
from proxy.ledger.report_sql import ROLLUP_GROUPS, TIME_FIELDS
from proxy.ledger.rollup_views import local_day, local_month

__all__ = ["ROLLUP_GROUPS", "TIME_FIELDS", "Segment", "offset_spans", "plan"]  # the first two are report_sql's

_PROBE_STEP = 43200  # zones change offset at most a few times a year; never twice within 12 hours


@dataclass(frozen=True, slots=True)
class Segment:
    """[lo, hi) read from `source` ("raw", "hour", "day" or "month"); labels use UTC offset `offset`."""

    source: str
    lo: float | None
    hi: float | None
    offset: int = 0
    lossy: bool = False  # rollups answering groups they do not hold (pruned period): those read null
    projected: bool = False  # every bucket in it has each dimension's own rows (rollups.py, "Projections")
    view: int | None = None  # read from this rollup view's rows (ledger/rollup_views.py: a pair's, a zone's)


def _offset(zone: ZoneInfo, t: int) -> int:
    delta = datetime.fromtimestamp(t, zone).utcoffset()
    return int(delta.total_seconds()) if delta is not None else 0


def offset_spans(zone: ZoneInfo | None, lo: float, hi: float) -> list[tuple[float, float, int]]:
    """[lo, hi) cut where `zone`'s UTC offset changes: [(start, end, offset seconds)]."""
    if zone is None:
        return [(lo, hi, 0)]
    first, last = math.floor(lo), math.ceil(hi) - 1  # offsets apply to whole seconds, as labels do
    probes = list(range(first, last, _PROBE_STEP)) + [last]
    offsets = [_offset(zone, t) for t in probes]
    cuts: list[tuple[int, int]] = []
    for (p, a), (q, b) in zip(zip(probes, offsets), zip(probes[1:], offsets[1:])):
        if a != b:
            while q - p > 1:  # the first second with the new offset
                mid = (p + q) // 2
                p, q = (mid, q) if _offset(zone, mid) == a else (p, mid)
            cuts.append((q, b))
    spans, start, current = [], lo, offsets[0]
    for at, offset in cuts:
        spans.append((start, float(at), current))
        start, current = float(at), offset
    spans.append((start, hi, current))
    return [s for s in spans if s[0] < s[1]]


def plan(*, names: list[str], since: float | None, until: float | None, zone: ZoneInfo | None,
         state: rollups.State, extent: tuple[int, int] | None, dirty: list[int],
         filtered: frozenset[str] = frozenset()) -> list[Segment]:
    """The segments answering a report on groups `names` over [since, until); see the module docstring.

    `extent` is where any data lies (rollups.extent), `dirty` the dirty hours in it, sorted; `filtered` the
    rollup dimensions a filter is set on."""
    times = [n for n in names if n in TIME_FIELDS]
    dims_ok = all(n in ROLLUP_GROUPS or n in TIME_FIELDS for n in names)
    zoned = zone if times else None  # without time buckets the zone changes nothing
    if not state.exists:
        return _raw(since, until, zoned, extent)
    pruned = state.pruned_before
    after = dims_ok and state.current  # may the rollups answer the period with raw calls too?
    before = pruned is not None and (since is None or since < pruned)  # the pruned period: rollups only
    if not after and not before:
        return _raw(since, until, zoned, extent)
    if extent is None:
        return []
    lo = extent[0] if since is None else since
    hi = extent[1] if until is None else until
    out: list[Segment] = []
    used = frozenset(ROLLUP_GROUPS[n] for n in names if n in ROLLUP_GROUPS) | filtered
    if before:
        assert pruned is not None
        out += _zoned(lo, min(hi, pruned), zone, zoned, times, [], state, not dims_ok, False, used)
        lo = max(lo, pruned)
    if after:
        out += _zoned(lo, hi, zone, zoned, times, dirty, state, False, True, used)
    elif until is None or lo < until:
        out += _raw(lo, until, zoned, extent)
    return _merged(out)


def _zoned(lo: float, hi: float, zone: ZoneInfo | None, zoned: ZoneInfo | None, times: list[str],
           dirty: list[int], state: rollups.State, lossy: bool, exact: bool, used: frozenset[str]) -> list[Segment]:
    """[lo, hi): the whole local days and months of a configured `zone` that its views cover (and that hold
    no dirty hour) from the views' rows, the rest as `_region` cuts it. A report grouped by hour cannot use
    them (a local day is many hours)."""
    full = next((v for v in state.views if zone is not None and v.zone == zone.key and v.dims == rollups.FULL),
                None)
    if zone is None or full is None or full.days_from is None or full.days_until is None or "hour" in times:
        return _region(lo, hi, zoned, times, dirty, state, lossy, exact, used)
    out: list[Segment] = []
    cur, b = lo, min(hi, full.days_until)
    start = max(lo, full.days_from)
    t, end = local_day(zone, start)
    if t < start:
        t = end
    while t < b:
        m_start, m_end = local_month(zone, t)
        if t == m_start and set(times) <= {"month"} and m_end <= b and not _any(dirty, t - t % 3600, m_end):
            source, end = "month", m_end
        else:
            source, end = "day", local_day(zone, t)[1]
            if end > b:
                break
            if _any(dirty, t - t % 3600, end):  # read as its hours are
                t = end
                continue
        view = _zone_view(state, zone.key, used, t, end, full)
        if cur < t:
            out += _region(cur, t, zoned, times, dirty, state, lossy, exact, used)
        out.append(Segment(source, t, end, _offset(zone, t), lossy, view.dims != rollups.FULL, view.id))
        cur = t = end
    if cur < hi:
        out += _region(cur, hi, zoned, times, dirty, state, lossy, exact, used)
    return out


def _zone_view(state: rollups.State, zone: str, used: frozenset[str], lo: int, hi: int,
               full: rollups.View) -> rollups.View:
    """The zone's view with the fewest rows for a report on the dimensions `used` over [lo, hi): its totals,
    one dimension's, a pair's, else every dimension set's."""
    dims = rollups.view_dims(used)
    if len(used) <= 2:
        for v in state.views:
            if v.zone == zone and v.dims == dims and v.covers(lo, hi):
                return v
    return full


def _pair_view(state: rollups.State, used: frozenset[str]) -> rollups.View | None:
    """The UTC view of exactly the pair `used`, if one is configured."""
    if len(used) != 2:
        return None
    dims = rollups.view_dims(used)
    return next((v for v in state.views if not v.zone and v.dims == dims), None)


def _region(lo: float, hi: float, zone: ZoneInfo | None, times: list[str], dirty: list[int],
            state: rollups.State, lossy: bool, exact: bool, used: frozenset[str] = frozenset()) -> list[Segment]:
    out: list[Segment] = []
    for a, b, offset in offset_spans(zone, lo, hi) if lo < hi else []:
        out += _decompose(a, b, offset, times, dirty, state, lossy, exact, used)
    return out


def _raw(since: float | None, until: float | None, zone: ZoneInfo | None,
         extent: tuple[int, int] | None) -> list[Segment]:
    if zone is None:
        return [Segment("raw", since, until)]
    if extent is None:
        return []
    lo = extent[0] if since is None else since
    hi = extent[1] if until is None else until
    return [Segment("raw", a, b, off) for a, b, off in offset_spans(zone, lo, hi)] if lo < hi else []


def _decompose(a: float, b: float, offset: int, times: list[str], dirty: list[int], state: rollups.State,
               lossy: bool, exact: bool, used: frozenset[str]) -> list[Segment]:
    """[a, b) of one offset as rollup runs and raw parts. Not `exact` (the pruned period, no raw calls
    left): an hour a local boundary cuts counts whole in the local bucket where it starts."""
    ha, hb = math.ceil(a / 3600) * 3600, math.floor(b / 3600) * 3600
    if ha >= hb:
        return [Segment("raw", a, b, offset, lossy)]
    out = [Segment("raw", a, ha, offset, lossy)] if a < ha else []
    if exact and "hour" in times and offset % 3600:
        out.append(Segment("raw", ha, hb, offset, lossy))  # every UTC hour straddles two local hours
    else:
        bad = [h for h in dirty if ha <= h < hb]
        if exact and times and offset % 3600:
            bad = sorted({*bad, *_straddling(ha, hb, offset)})
        def whole(lo: int, hi: int) -> bool:  # [lo, hi) lies in one local bucket of every time field
            return all(_local(lo, offset, t) == _local(hi - 1, offset, t) for t in times)

        # Day and month rows exist before days_until, each dimension's own rows before projected_until.
        coarse_until = state.days_until if state.days_until is not None else ha
        own_until = state.projected_until if state.projected_until is not None else ha
        pair = _pair_view(state, used)
        for src, lo, hi in _walk(ha, hb, coarse_until, whole, bad):
            view = pair.id if pair is not None and src in ("day", "month") and pair.covers(lo, hi) else None
            out.append(Segment(src, lo, hi, offset, lossy, src != "raw" and (hi <= own_until or view is not None),
                               view))
    if hb < b:
        out.append(Segment("raw", hb, b, offset, lossy))
    return out


def _straddling(ha: int, hb: int, offset: int) -> list[int]:
    """Hours in [ha, hb) with a local midnight strictly inside them."""
    midnight = (math.floor((ha + offset) / 86400) + 1) * 86400 - offset
    hours = []
    while midnight < hb:
        if midnight % 3600:
            hours.append(midnight - midnight % 3600)
        midnight += 86400
    return hours


def _walk(ha: int, hb: int, coarse_until: int, whole: Callable[[int, int], bool],
          bad: list[int]) -> list[tuple[str, int, int]]:
    """UTC months, then UTC days, then hours, as coarse as allowed: a month or day row only before
    `coarse_until`, when clean, and when it lies in one local bucket (`whole`); bad hours raw."""
    out: list[tuple[str, int, int]] = []
    t = ha
    limit = min(hb, coarse_until)
    while t < hb:
        if t == rollups.month_start(t):
            end = rollups.next_month(t)
            if end <= limit and whole(t, end) and not _any(bad, t, end):
                out.append(("month", t, end))
                t = end
                continue
        if t % 86400 == 0 and t + 86400 <= limit and whole(t, t + 86400) and not _any(bad, t, t + 86400):
            out.append(("day", t, t + 86400))
            t += 86400
            continue
        stop = min(hb, t - t % 86400 + 86400) if t < limit else hb
        out += _hours(t, stop, bad)
        t = stop
    return out


def _local(ts: int, offset: int, field: str) -> tuple[int, ...]:
    """The local bucket of `field` holding unix second `ts` at UTC offset `offset` (as label_sql labels it)."""
    moment = datetime.fromtimestamp(ts + offset, UTC)
    if field == "hour":
        return moment.year, moment.month, moment.day, moment.hour
    if field == "day":
        return moment.year, moment.month, moment.day
    if field == "week":
        iso = moment.isocalendar()
        return iso.year, iso.week
    return moment.year, moment.month


def _any(bad: list[int], lo: int, hi: int) -> bool:
    i = bisect.bisect_left(bad, lo)
    return i < len(bad) and bad[i] < hi


def _hours(lo: int, hi: int, bad: list[int]) -> list[tuple[str, int, int]]:
    out: list[tuple[str, int, int]] = []
    start = lo
    for h in bad[bisect.bisect_left(bad, lo):bisect.bisect_left(bad, hi)]:
        if start < h:
            out.append(("hour", start, h))
        out.append(("raw", h, h + 3600))
        start = h + 3600
    if start < hi:
        out.append(("hour", start, hi))
    return out


def _merged(segments: list[Segment]) -> list[Segment]:
    """Adjacent segments of one source, offset and kind as one, so each is one query."""
    out: list[Segment] = []
    for s in segments:
        last = out[-1] if out else None
        if (last is not None and last.source == s.source and last.offset == s.offset and last.lossy == s.lossy
                and last.projected == s.projected and last.view == s.view and last.hi == s.lo):
            out[-1] = Segment(s.source, last.lo, s.hi, s.offset, s.lossy, s.projected, s.view)
        else:
            out.append(s)
    return out
