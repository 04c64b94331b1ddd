"""Byte edits applied to a response stream as it passes, for the one case where the proxy changes bytes.

With `stream_usage: inject` the proxy asks the upstream for usage the client did not ask for, and must
take out exactly what that added, so the client gets the bytes the upstream would have sent without it.
A meter names the edits (byte ranges of whole events, each with a function from the range's bytes to
its replacement); this applies them and hands out bytes only up to an offset the meter gives (the end of
the last complete event). It knows nothing about what the bytes mean.
"""

from __future__ import annotations

import re
from typing import Callable

Edit = tuple[int, int, Callable[[bytes], bytes]]  # absolute [start, end) and the replacement function


class StreamEditor:
    """Holds stream bytes not yet sent; hands them out with edits applied."""

    def __init__(self) -> None:
        self._pending = bytearray()
        self._base = 0  # absolute offset of _pending[0]

    @property
    def sent(self) -> int:
        """Absolute offset just after the last byte taken (sent to the client)."""
        return self._base

    @property
    def received(self) -> int:
        """Absolute offset just after the last byte fed."""
        return self._base + len(self._pending)

    def feed(self, chunk: bytes) -> None:
        self._pending += chunk

    def take(self, until: int, edits: list[Edit]) -> bytes:
        """Take bytes [sent, until) with every edit inside that range applied, and consume those edits.

        Edits must be in stream order and not overlap; an edit reaching past `until` waits for a later take.
        """
        until = min(until, self._base + len(self._pending))
        if until <= self._base:
            return b""
        out = bytearray()
        cursor = self._base
        while edits and edits[0][1] <= until:
            start, end, replace = edits.pop(0)
            start = max(start, cursor)
            out += self._pending[cursor - self._base:start - self._base]
            out += replace(bytes(self._pending[start - self._base:end - self._base]))
            cursor = end
        out += self._pending[cursor - self._base:until - self._base]
        del self._pending[:until - self._base]
        self._base = until
        return bytes(out)


def drop(_: bytes) -> bytes:
    return b""


_USAGE_NULL_AFTER = re.compile(rb',\s*"usage"\s*:\s*null')
_USAGE_NULL_BEFORE = re.compile(rb'"usage"\s*:\s*null\s*,')


def strip_usage_null(event: bytes) -> bytes:
    """Remove the chunk's top-level `"usage":null` member (the last one in the event) and its comma."""
    for pattern in (_USAGE_NULL_AFTER, _USAGE_NULL_BEFORE):
        matches = list(pattern.finditer(event))
        if matches:
            last = matches[-1]
            return event[:last.start()] + event[last.end():]
    return event
