"""The report planner, called directly: which segments read rollups and which read calls.

Whole hours, days and months in UTC and in a half-hour zone (India, +05:30, which cuts one UTC hour a
day), ranges that cut them, dirty hours, and rollups that cannot answer."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from proxy.ledger.rollups import State
from proxy.reports.plan import Segment, plan

INDIA = ZoneInfo("Asia/Kolkata")
IST = 19800  # +05:30


def ts(*parts: int) -> int:
    return int(datetime(*parts, tzinfo=UTC).timestamp())  # type: ignore[arg-type]


CURRENT = State(True, True, days_until=ts(2026, 6, 1))
EXTENT = (ts(2026, 1, 1), ts(2026, 6, 1))


def segments(names: list[str], since: int | None, until: int | None, zone: ZoneInfo | None = None,
             state: State = CURRENT, dirty: list[int] | None = None) -> list[tuple[str, int, int, int]]:
    out = plan(names=names, since=since, until=until, zone=zone, state=state, extent=EXTENT, dirty=dirty or [])
    for s in out:
        assert isinstance(s, Segment) and not s.lossy
    # Whatever the sources, the segments tile the range: no gap, no overlap.
    lo = since if since is not None else EXTENT[0]
    hi = until if until is not None else EXTENT[1]
    assert [s.lo for s in out[1:]] == [s.hi for s in out[:-1]]
    assert (out[0].lo, out[-1].hi) == (lo, hi) if out else lo >= hi
    return [(s.source, int(s.lo or 0), int(s.hi or 0), s.offset) for s in out]


# --- UTC -------------------------------------------------------------------------------------------

def test_whole_hours_read_the_hour_rollups() -> None:
    assert segments(["hour"], ts(2026, 3, 1, 5), ts(2026, 3, 1, 9)) == [
        ("hour", ts(2026, 3, 1, 5), ts(2026, 3, 1, 9), 0)]


def test_whole_days_and_months_read_day_and_month_rollups() -> None:
    assert segments(["day"], ts(2026, 3, 2), ts(2026, 3, 5)) == [
        ("day", ts(2026, 3, 2), ts(2026, 3, 5), 0)]
    assert segments(["month"], ts(2026, 2, 1), ts(2026, 4, 1)) == [
        ("month", ts(2026, 2, 1), ts(2026, 4, 1), 0)]
    # A range of whole days that also covers a whole month: days, the month, days.
    assert segments(["model"], ts(2026, 2, 27), ts(2026, 4, 2)) == [
        ("day", ts(2026, 2, 27), ts(2026, 3, 1), 0),
        ("month", ts(2026, 3, 1), ts(2026, 4, 1), 0),
        ("day", ts(2026, 4, 1), ts(2026, 4, 2), 0)]


def test_a_range_cutting_hours_reads_its_edges_from_calls() -> None:
    since, until = ts(2026, 3, 1, 5) + 1800, ts(2026, 3, 3, 2) + 600
    assert segments(["day"], since, until) == [
        ("raw", since, ts(2026, 3, 1, 6), 0),  # the cut hour at the start
        ("hour", ts(2026, 3, 1, 6), ts(2026, 3, 2), 0),  # the rest of a cut day, by the hour
        ("day", ts(2026, 3, 2), ts(2026, 3, 3), 0),
        ("hour", ts(2026, 3, 3), ts(2026, 3, 3, 2), 0),
        ("raw", ts(2026, 3, 3, 2), until, 0)]  # the cut hour at the end
    # Inside one hour: calls alone.
    assert segments(["model"], ts(2026, 3, 1, 5) + 60, ts(2026, 3, 1, 5) + 120) == [
        ("raw", ts(2026, 3, 1, 5) + 60, ts(2026, 3, 1, 5) + 120, 0)]


def test_a_dirty_hour_reads_calls_and_breaks_its_day_and_month() -> None:
    dirty = ts(2026, 3, 2, 7)
    assert segments(["month"], ts(2026, 3, 1), ts(2026, 5, 1), dirty=[dirty]) == [
        ("day", ts(2026, 3, 1), ts(2026, 3, 2), 0),
        ("hour", ts(2026, 3, 2), dirty, 0),
        ("raw", dirty, dirty + 3600, 0),
        ("hour", dirty + 3600, ts(2026, 3, 3), 0),
        ("day", ts(2026, 3, 3), ts(2026, 4, 1), 0),
        ("month", ts(2026, 4, 1), ts(2026, 5, 1), 0)]


def test_days_and_months_only_before_days_until() -> None:
    state = State(True, True, days_until=ts(2026, 3, 3))
    assert segments(["day"], ts(2026, 3, 1), ts(2026, 3, 5), state=state) == [
        ("day", ts(2026, 3, 1), ts(2026, 3, 3), 0),
        ("hour", ts(2026, 3, 3), ts(2026, 3, 5), 0)]


def test_what_rollups_cannot_answer_reads_calls() -> None:
    since, until = ts(2026, 3, 1), ts(2026, 5, 1)
    raw = [("raw", since, until, 0)]
    assert segments(["session"], since, until) == raw  # not a rollup dimension
    assert segments(["tag:env"], since, until) == raw  # only tag:team is
    assert segments(["model"], since, until, state=State(True, False, days_until=ts(2026, 6, 1))) == raw  # stale
    assert segments(["model"], since, until, state=State(False, False)) == raw  # no rollups at all


# --- a half-hour zone ------------------------------------------------------------------------------

def test_india_days_read_calls_for_the_hour_its_midnight_cuts() -> None:
    # Local midnight is 18:30 UTC: the UTC hour 18:00-19:00 lies in two local days, read from calls;
    # no UTC day lies in one local day, so the rest is hours.
    since, until = ts(2026, 3, 1, 18, 30), ts(2026, 3, 3, 18, 30)  # two whole local days
    assert segments(["day"], since, until, INDIA) == [
        ("raw", since, ts(2026, 3, 1, 19), IST),
        ("hour", ts(2026, 3, 1, 19), ts(2026, 3, 2, 18), IST),
        ("raw", ts(2026, 3, 2, 18), ts(2026, 3, 2, 19), IST),
        ("hour", ts(2026, 3, 2, 19), ts(2026, 3, 3, 18), IST),
        ("raw", ts(2026, 3, 3, 18), until, IST)]


def test_india_hours_read_calls_throughout() -> None:
    # Every UTC hour straddles two local (half-past) hours: the hour bucket cannot come from rollups.
    assert segments(["hour"], ts(2026, 3, 1), ts(2026, 3, 2), INDIA) == [
        ("raw", ts(2026, 3, 1), ts(2026, 3, 2), IST)]
    assert segments(["hour", "model"], ts(2026, 3, 1, 6), ts(2026, 3, 1, 8), INDIA) == [
        ("raw", ts(2026, 3, 1, 6), ts(2026, 3, 1, 8), IST)]


def test_india_months_read_calls_at_every_local_midnight() -> None:
    # The local March: 28 Feb 18:30 UTC to 31 Mar 18:30 UTC. Every day's 18:00 UTC hour holds a local
    # midnight, so it is read from calls for any time bucket, and no UTC day row is used: hours between.
    since, until = ts(2026, 2, 28, 18, 30), ts(2026, 3, 31, 18, 30)
    expected = [("raw", since, ts(2026, 2, 28, 19), IST)]
    for day in range(1, 31):
        expected += [("hour", ts(2026, 3, day, 19) - 86400, ts(2026, 3, day, 18), IST),
                     ("raw", ts(2026, 3, day, 18), ts(2026, 3, day, 19), IST)]
    expected += [("hour", ts(2026, 3, 30, 19), ts(2026, 3, 31, 18), IST), ("raw", ts(2026, 3, 31, 18), until, IST)]
    assert segments(["month"], since, until, INDIA) == expected


def test_a_whole_hour_zone_month_reads_days_inside_and_hours_at_the_edges() -> None:
    # Berlin's February (+01:00): 31 Jan 23:00 UTC to 28 Feb 23:00 UTC; the UTC days 1..27 Feb lie in it.
    berlin = ZoneInfo("Europe/Berlin")
    since, until = ts(2026, 1, 31, 23), ts(2026, 2, 28, 23)
    assert segments(["month"], since, until, berlin) == [
        ("hour", since, ts(2026, 2, 1), 3600),
        ("day", ts(2026, 2, 1), ts(2026, 2, 28), 3600),
        ("hour", ts(2026, 2, 28), until, 3600)]


def test_without_time_buckets_the_zone_changes_nothing() -> None:
    since, until = ts(2026, 3, 1), ts(2026, 5, 1)
    assert segments(["model"], since, until, INDIA) == segments(["model"], since, until) == [
        ("month", since, until, 0)]


def test_a_whole_hour_zone_reads_no_utc_day_that_two_local_days_share() -> None:
    # In Berlin (+01:00) every UTC day runs 01:00 to 01:00 local: no day row fits a local day.
    berlin = ZoneInfo("Europe/Berlin")
    assert segments(["day"], ts(2026, 2, 2), ts(2026, 2, 5), berlin) == [
        ("hour", ts(2026, 2, 2), ts(2026, 2, 5), 3600)]
    # A local month: the UTC days inside it, by the hour the day that two local months share.
    assert segments(["month"], ts(2026, 1, 15), ts(2026, 3, 15), berlin) == [
        ("day", ts(2026, 1, 15), ts(2026, 1, 31), 3600),
        ("hour", ts(2026, 1, 31), ts(2026, 2, 1), 3600),
        ("day", ts(2026, 2, 1), ts(2026, 2, 28), 3600),
        ("hour", ts(2026, 2, 28), ts(2026, 3, 1), 3600),
        ("day", ts(2026, 3, 1), ts(2026, 3, 15), 3600)]
