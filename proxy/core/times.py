"""Time formatting shared by every layer (ISO 8601, UTC, whole seconds, `Z`) and the bounds of a time."""

from __future__ import annotations

from datetime import datetime, timezone

__all__ = ["MAX_TIME", "MAX_TIME_TEXT", "iso"]

# The latest time accepted anywhere (9999-12-30T00:00:00Z): a day short of datetime's end, so a time zone's
# offset cannot carry a stored or reported time past the year 9999 (which cannot be rendered).
MAX_TIME = 253402128000
MAX_TIME_TEXT = 64  # characters of a time given as text; ISO 8601 needs at most 32


def iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
