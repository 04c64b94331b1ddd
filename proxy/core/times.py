"""Times as every layer shows and reads them: one format (`iso`: ISO 8601, UTC, milliseconds, `Z`), one
parser (`parse_time`: ISO 8601 or unix seconds), one zone reader (`parse_tz`), and the bounds of a time.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, tzinfo
from decimal import Decimal
from typing import overload
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from proxy.core.errors import ParameterError

__all__ = ["MAX_TIME", "MAX_TIME_TEXT", "iso", "parse_time", "parse_tz", "utc_day"]

# The latest time accepted anywhere (9999-12-30T00:00:00Z): a day short of datetime's end, so a time zone's
# offset cannot carry a stored or reported time past the year 9999 (which cannot be rendered).
MAX_TIME = 253402128000
MAX_TIME_TEXT = 64  # characters of a time given as text; ISO 8601 needs at most 32
_SECONDS = re.compile(r"\d+(\.\d+)?")


@overload
def iso(seconds: float) -> str: ...
@overload
def iso(seconds: None) -> None: ...
@overload
def iso(seconds: float | None) -> str | None: ...


def iso(seconds: float | None) -> str | None:
    """Unix seconds as ISO 8601 in UTC to the millisecond (`2026-11-23T14:00:00.250Z`); None stays None.

    Milliseconds, everywhere: a call's times are stored to the microsecond and two calls of one second must
    not look simultaneous; a time stored in whole seconds shows `.000`."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_day(seconds: float) -> str:
    """The UTC date of unix seconds, `2026-11-23`: the label of a day in charts and reports."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d")


def parse_tz(name: str | None) -> ZoneInfo | None:
    """The IANA zone `name`; None (meaning UTC, labels ending in Z) for no name or "UTC"."""
    if name is None or name.strip().upper() in ("", "UTC", "Z"):
        return None
    try:
        return ZoneInfo(name.strip())
    except (ValueError, ZoneInfoNotFoundError, OSError):
        raise ParameterError(f"tz: unknown time zone {name!r}; use an IANA name such as Europe/Berlin",
                             "tz") from None


def parse_time(value: object, param: str, tz: str | tzinfo | None = None) -> float:
    """Unix seconds (0 to MAX_TIME) from ISO 8601 (a date, or a datetime; naive means in `tz`, default UTC),
    from unix seconds as text, or from a number (a JSON body's field). A `ParameterError` naming `param`
    otherwise."""
    zone = (parse_tz(tz) if tz is None or isinstance(tz, str) else tz) or UTC  # a bad zone is its own error
    if isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.nan
    elif not isinstance(value, str) or not value.strip():
        raise ParameterError(f"{param}: a time is required (ISO 8601 or unix seconds)", param)
    elif len(value) > MAX_TIME_TEXT:
        raise ParameterError(f"{param}: at most {MAX_TIME_TEXT} characters (ISO 8601 or unix seconds)", param)
    else:
        text = value.strip()
        try:
            if _SECONDS.fullmatch(text):
                seconds = float(text)  # all digits: unix seconds, even where ISO "basic" would fit
            else:
                moment = datetime.fromisoformat(text)
                if moment.tzinfo is None:
                    moment = moment.replace(tzinfo=zone)
                seconds = moment.timestamp()
        except (ValueError, OverflowError):
            seconds = math.nan
    if not math.isfinite(seconds):
        raise ParameterError(f"{param}: {str(value)[:64]!r} is not a time; use ISO 8601 (2026-11-23, "
                             "2026-11-23T14:00:00Z) or unix seconds", param)
    if not 0 <= seconds <= MAX_TIME:  # beyond, a time cannot be rendered (nor bucketed in a zone)
        raise ParameterError(f"{param}: must be between 1970-01-01 and 9999-12-30 (unix seconds 0 to {MAX_TIME})",
                             param)
    return seconds
