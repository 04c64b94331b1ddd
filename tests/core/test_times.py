"""proxy/core/times.py: the one time format (ISO 8601 UTC, milliseconds) and the one parser."""

from __future__ import annotations

from decimal import Decimal

import pytest

from proxy.core.errors import ParameterError
from proxy.core.times import MAX_TIME, iso, parse_time, parse_tz, utc_day

T = 1_795_426_500.25  # 2026-11-23T09:35:00.250Z


def test_iso_is_utc_to_the_millisecond() -> None:
    assert iso(T) == "2026-11-23T09:35:00.250Z"
    assert iso(1_795_426_500) == "2026-11-23T09:35:00.000Z"
    assert iso(0) == "1970-01-01T00:00:00.000Z" and iso(None) is None
    assert iso(MAX_TIME) == "9999-12-30T00:00:00.000Z"
    assert utc_day(T) == "2026-11-23"


@pytest.mark.parametrize("given", [
    "2026-11-23T09:35:00.250Z", "2026-11-23T10:35:00.250+01:00", "2026-11-23 09:35:00.250", "1795426500.25",
    1_795_426_500.25, Decimal("1795426500.25"), iso(T),
])
def test_parse_time_reads_iso_8601_and_unix_seconds(given: object) -> None:
    assert parse_time(given, "since") == T


def test_a_naive_time_is_in_the_zone_given() -> None:
    assert parse_time("2026-11-23", "since", "Europe/Berlin") == parse_time("2026-11-22T23:00:00Z", "since")
    assert parse_time("2026-11-23", "since", parse_tz("Europe/Berlin")) == parse_time("2026-11-22T23:00Z", "x")
    assert parse_tz("UTC") is None and parse_tz(None) is None


@pytest.mark.parametrize(("given", "says"), [
    ("", "a time is required"), (None, "a time is required"), (True, "a time is required"),
    ("x" * 65, "at most 64 characters"), ("2026-13-01", "is not a time"), ("nan", "is not a time"),
    (10**400, "is not a time"), (float("inf"), "is not a time"), (Decimal("NaN"), "is not a time"),
    (-1, "between 1970-01-01 and 9999-12-30"), ("9999-12-31", "between 1970-01-01 and 9999-12-30"),
])
def test_parse_time_refuses_with_the_parameter_named(given: object, says: str) -> None:
    with pytest.raises(ParameterError) as caught:
        parse_time(given, "until")
    assert caught.value.param == "until" and says in str(caught.value) and str(caught.value).startswith("until:")


def test_a_bad_zone_is_its_own_error() -> None:
    with pytest.raises(ParameterError) as caught:
        parse_time("2026-11-23", "since", "Mars/Olympus")
    assert caught.value.param == "tz"
