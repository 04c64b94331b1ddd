"""Requests and tokens per minute per subject, over an exact sliding window of the last 60 seconds.

Each subject with a limit has a log of its admitted requests (time, tokens): a deque pruned from the left,
with a running token sum. It is exact, not the two-bucket approximation: a subject never gets more than
its limit in any 60-second span. Memory is one small entry per request admitted in the last minute
(at most `rpm` per subject when an rpm is set); idle subjects are swept once a minute.

A request's tokens are estimated at admission (prompt + max output, as OpenAI does) and corrected to the
real figure when the call ends (`Ticket.adjust`). A refusal says when to retry and carries OpenAI's
`x-ratelimit-*` header values.

This module must never await (a check and the hold that follows are one step on the event loop) and
never count a refused request.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

from proxy.control.limits import Subject

__all__ = ["WINDOW", "Figures", "RateLimiter", "RateRefusal", "Ticket", "format_duration", "headers_of",
           "refusal_of"]

WINDOW = 60.0
Demand = tuple[Subject, "int | None", "int | None"]  # (subject, rpm, tpm)
_Checked = tuple[Subject, "int | None", "int | None", "_Window"]
_Shown = tuple[Subject, "int | None", "int | None", "_Window | Figures"]


class _Entry:
    __slots__ = ("at", "tokens")

    def __init__(self, at: float, tokens: int) -> None:
        self.at = at
        self.tokens = tokens


class _Window:
    __slots__ = ("entries", "tokens")

    def __init__(self) -> None:
        self.entries: deque[_Entry] = deque()
        self.tokens = 0

    @property
    def count(self) -> int:
        return len(self.entries)

    def prune(self, now: float) -> None:
        cutoff = now - WINDOW
        entries = self.entries
        while entries and entries[0].at <= cutoff:
            self.tokens -= entries.popleft().tokens

    def wait_for_requests(self, rpm: int, now: float) -> float:
        """Seconds until one more request fits under `rpm`."""
        excess = len(self.entries) - rpm  # entries that must leave before one more fits, minus one
        return 0.0 if excess < 0 else self.entries[excess].at + WINDOW - now

    def wait_for_tokens(self, tpm: int, tokens: int, now: float) -> float:
        """Seconds until `tokens` more fit under `tpm` (the caller checked tokens <= tpm)."""
        used = self.tokens
        for entry in self.entries:
            if used + tokens <= tpm:
                break
            used -= entry.tokens
            wait = entry.at + WINDOW - now
            if used + tokens <= tpm:
                return wait
        return 0.0

    def reset(self, now: float) -> float:
        """Seconds until everything counted now has left the window (OpenAI's 'reset')."""
        return self.entries[-1].at + WINDOW - now if self.entries else 0.0


class Figures:
    """A window as counted elsewhere (the shared windows in the database): what the headers need."""

    __slots__ = ("count", "latest", "tokens")

    def __init__(self, count: int, tokens: int, latest: float | None) -> None:
        self.count, self.tokens, self.latest = count, tokens, latest

    def reset(self, now: float) -> float:
        return self.latest + WINDOW - now if self.latest is not None and self.count else 0.0


def refusal_of(subject: Subject, entries: Sequence[tuple[float, int]], rpm: int | None, tpm: int | None,
               tokens: int, now: float) -> RateRefusal | None:
    """The refusal of one more request of `tokens` against a window of (time, tokens) entries, oldest first
    (all within the last minute), or None if it fits: the same answer the in-process limiter gives."""
    window = _Window()
    for at, used in entries:
        window.entries.append(_Entry(at, used))
        window.tokens += used
    return _check(subject, window, rpm, tpm, tokens, now)


def headers_of(checked: Sequence[tuple[int | None, int | None, Figures]], now: float) -> dict[str, str]:
    """x-ratelimit-* of the tightest of (rpm, tpm, figures) windows, as `Ticket.headers` gives them."""
    return _headers([(Subject("key", ""), rpm, tpm, figures) for rpm, tpm, figures in checked], now)


def format_duration(seconds: float) -> str:
    """OpenAI's form of a reset time: '20ms', '1s', '7.66s', '6m0s' (rounded up, never early)."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    centis = math.ceil(seconds * 100)  # rounded up first, so 59.999 s is "1m0s", not "60s"
    if centis < 6000:
        return f"{centis / 100:.2f}".rstrip("0").rstrip(".") + "s"
    whole = math.ceil(seconds)
    return f"{whole // 60}m{whole % 60}s"


@dataclass(frozen=True, slots=True)
class RateRefusal:
    subject: Subject
    kind: str  # "requests" or "tokens" (OpenAI's error type for rate limits)
    limit: int
    used: int
    requested: int
    retry_after: float | None  # None: the request alone needs more tokens than the limit allows
    headers: dict[str, str] = field(default_factory=dict)  # x-ratelimit-*, and Retry-After when it can fit

    @property
    def message(self) -> str:
        unit = "requests per min (RPM)" if self.kind == "requests" else "tokens per min (TPM)"
        text = (f"Rate limit reached for {self.subject.kind} {self.subject.name!r} on {unit}: Limit "
                f"{self.limit}, Used {self.used}, Requested {self.requested}.")
        if self.retry_after is None:
            return f"{text} The request alone is larger than the limit; make it smaller (max_tokens)."
        return f"{text} Please try again in {format_duration(self.retry_after)}."


class Ticket:
    """A request's place in its subjects' windows: correct its tokens when the call ends, or take it back."""

    __slots__ = ("_checked", "_clock", "_headers", "_parts")

    def __init__(self, parts: list[tuple[_Window, _Entry]], checked: list[_Checked],
                 clock: Callable[[], float]) -> None:
        self._parts = parts
        self._checked = checked
        self._clock = clock
        self._headers: dict[str, str] | None = None

    @property
    def headers(self) -> dict[str, str]:
        """x-ratelimit-* as of the first time they are asked for (most callers never ask)."""
        if self._headers is None:
            now = self._clock()
            for _, _, _, window in self._checked:
                window.prune(now)
            self._headers = _headers(self._checked, now)
        return self._headers

    def adjust(self, tokens: int) -> None:
        """Replace the estimate with the real token count (while the request is still in the window)."""
        now = self._clock()
        for window, entry in self._parts:
            window.prune(now)
            if entry.at > now - WINDOW:
                window.tokens += tokens - entry.tokens
                entry.tokens = tokens

    def release(self) -> None:
        """Take the request back out (it was not forwarded after all)."""
        for window, entry in self._parts:
            entries = window.entries
            if entries and entries[-1] is entry:
                entries.pop()
            elif entry in entries:
                entries.remove(entry)
            else:
                continue
            window.tokens -= entry.tokens
        self._parts = []


class RateLimiter:
    """The windows of one proxy process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: dict[Subject, _Window] = {}
        self._next_sweep = clock() + WINDOW

    def try_acquire(self, demands: Sequence[Demand], tokens: int) -> Ticket | RateRefusal:
        """Admit a request against every (subject, rpm, tpm) at once, or refuse it and count nothing."""
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        checked: list[_Checked] = []
        for subject, rpm, tpm in demands:
            if rpm is None and tpm is None:
                continue
            window = self._windows.get(subject)
            if window is None:
                window = self._windows[subject] = _Window()
            window.prune(now)
            refusal = _check(subject, window, rpm, tpm, tokens, now)
            if refusal is not None:
                return refusal
            checked.append((subject, rpm, tpm, window))
        parts = []
        for _, _, _, window in checked:
            entry = _Entry(now, tokens)
            window.entries.append(entry)
            window.tokens += tokens
            parts.append((window, entry))
        return Ticket(parts, checked, self._clock)

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + WINDOW
        for subject, window in list(self._windows.items()):
            window.prune(now)
            if not window.entries:
                del self._windows[subject]


def _check(subject: Subject, window: _Window, rpm: int | None, tpm: int | None, tokens: int,
           now: float) -> RateRefusal | None:
    checked = [(subject, rpm, tpm, window)]
    if rpm is not None and len(window.entries) + 1 > rpm:
        wait = window.wait_for_requests(rpm, now)
        return RateRefusal(subject, "requests", rpm, len(window.entries), 1, wait,
                           {**_headers(checked, now), "Retry-After": str(max(1, math.ceil(wait)))})
    if tpm is not None and window.tokens + tokens > tpm:
        headers = _headers(checked, now)
        if tokens > tpm:
            return RateRefusal(subject, "tokens", tpm, window.tokens, tokens, None, headers)
        wait = window.wait_for_tokens(tpm, tokens, now)
        return RateRefusal(subject, "tokens", tpm, window.tokens, tokens, wait,
                           {**headers, "Retry-After": str(max(1, math.ceil(wait)))})
    return None


def _headers(checked: Sequence[_Shown], now: float) -> dict[str, str]:
    """x-ratelimit-* of the tightest limit among the subjects (the one with the least remaining)."""
    out: dict[str, str] = {}
    requests = [(rpm - w.count, rpm, w) for _, rpm, _, w in checked if rpm is not None]
    if requests:
        remaining, limit, window = min(requests, key=lambda r: r[0])
        out["x-ratelimit-limit-requests"] = str(limit)
        out["x-ratelimit-remaining-requests"] = str(max(remaining, 0))
        out["x-ratelimit-reset-requests"] = format_duration(window.reset(now))
    tokens = [(tpm - w.tokens, tpm, w) for _, _, tpm, w in checked if tpm is not None]
    if tokens:
        remaining, limit, window = min(tokens, key=lambda t: t[0])
        out["x-ratelimit-limit-tokens"] = str(limit)
        out["x-ratelimit-remaining-tokens"] = str(max(remaining, 0))
        out["x-ratelimit-reset-tokens"] = format_duration(window.reset(now))
    return out
