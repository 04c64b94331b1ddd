"""Small statistics helpers shared by the load client and the report: percentiles in milliseconds.

Pure functions over lists of seconds; they must never sort the caller's list in place.
"""

from __future__ import annotations

import math


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100); NaN for an empty list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summary(seconds: list[float]) -> dict[str, float | int]:
    """count, mean, p50, p90, p99, max of durations given in seconds, reported in milliseconds."""
    values = sorted(seconds)
    if not values:
        return {"count": 0}
    ms = 1000.0
    return {
        "count": len(values),
        "mean": round(sum(values) / len(values) * ms, 3),
        "p50": round(percentile(values, 50) * ms, 3),
        "p90": round(percentile(values, 90) * ms, 3),
        "p99": round(percentile(values, 99) * ms, 3),
        "max": round(values[-1] * ms, 3),
    }
