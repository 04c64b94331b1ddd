"""The durations of the last few operations of one kind, to tell a slow database from a normal one
(/healthz): the median of the last `size`, and how long the one under way has been running."""

from __future__ import annotations

import statistics
import time
from collections import deque

__all__ = ["Recent"]

_AT_LEAST = 3  # a median of fewer is one cold start (the first batch: plans, caches) rather than a trend


class Recent:
    def __init__(self, size: int = 20) -> None:
        self._times: deque[float] = deque(maxlen=size)
        self._since: float | None = None  # perf_counter() at the start of the operation under way

    def start(self) -> None:
        self._since = time.perf_counter()

    def end(self) -> None:
        if self._since is not None:
            self._times.append(time.perf_counter() - self._since)
            self._since = None

    def add(self, seconds: float) -> None:
        self._times.append(seconds)

    def median(self) -> float | None:
        return statistics.median(self._times) if self._times else None

    def running(self) -> float:
        """Seconds the operation under way has taken so far; 0 when none is."""
        return 0.0 if self._since is None else time.perf_counter() - self._since

    def slow(self, threshold: float, what: str) -> str | None:
        """Why `what` is slow (the median of the last ones, or the one under way, above `threshold`), or None."""
        running = self.running()
        if running > threshold:
            return f"a {what} has been waiting {running:.3g} s (slow above {threshold:.3g} s)"
        median = self.median() if len(self._times) >= _AT_LEAST else None
        if median is not None and median > threshold:
            return (f"{what}s take {median:.3g} s (median of the last {len(self._times)}; slow above "
                    f"{threshold:.3g} s)")
        return None
