"""Time formatting shared by every layer (ISO 8601, UTC, whole seconds, `Z`)."""

from __future__ import annotations

from datetime import datetime, timezone

__all__ = ["iso"]


def iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
