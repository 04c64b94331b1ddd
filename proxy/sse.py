"""Incremental Server-Sent Events decoder for a copy of a streamed response body.

The proxy forwards upstream bytes untouched and feeds the same chunks here, so the decoder has to
accept any chunking: an event, a field name, a UTF-8 character or a CRLF pair may be cut anywhere.
It must never raise on input bytes, never re-scan bytes it has already searched (it sees every chunk
of every stream), and never hold more than `max_event` bytes: a line, or an event's data, longer than
that ends decoding (`error` says why, every later feed returns nothing) instead of growing a buffer.

Framing (the WHATWG rules, as openai-python applies them):
- lines end with LF, CR or CRLF; a blank line dispatches the event being built;
- a line starting with ``:`` is a comment; otherwise ``field: value`` with one optional space after
  the colon removed, and a line without a colon is a field with an empty value;
- ``data`` lines are joined with "\\n"; ``event`` and ``id`` are kept; ``retry`` and unknown fields
  are ignored; an ``id`` containing NUL is ignored;
- a block without any ``data`` line (only comments, only ``event:``) is not dispatched;
- one UTF-8 byte order mark at the very start of the stream is skipped;
- values are decoded per complete line as UTF-8 with errors="replace" (CR and LF never occur inside
  a multi-byte character, so a complete line never ends mid-character).

Offsets (absolute, counted over every byte fed):
- ``start`` is where the first line of the event's block begins. Comment lines that come before the
  first field in the same block (no blank line in between) belong to the event; blank lines between
  events belong to no event.
- ``end`` is just after the blank line that dispatched it, including the LF of a CRLF.
Because of that last point a line ending in CR that is the very last byte fed is held back until the
next byte (or ``close()``) shows whether an LF follows. With CRLF framing this only happens when a
chunk splits a CRLF pair; with bare-CR framing every event is reported one feed late.

Deliberate differences from a browser's EventSource: ``id`` is the event's own ``id:`` field (None
when it has none; it is not carried over from earlier events), so every event is a self-contained
byte range; and ``close()`` still returns a final event whose blank line never came.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["SSEDecoder", "SSEEvent"]

_EOL = re.compile(rb"[\r\n]")
_CR = 0x0D
_LF = 0x0A
_COLON = 0x3A
_SPACE = 0x20
_BOM = b"\xef\xbb\xbf"


@dataclass(slots=True)
class SSEEvent:
    """One dispatched event and the exact byte range it occupied in the stream."""

    data: str  # data lines joined with "\n"
    event: str | None  # the `event:` field, None when absent
    id: str | None  # the `id:` field of this event, None when absent
    start: int  # absolute offset where the event's first line (comments included) starts
    end: int  # absolute offset just after the blank line that dispatched it


class SSEDecoder:
    """Turns arbitrarily chunked bytes into `SSEEvent`s; see the module docstring for the rules."""

    __slots__ = ("_buf", "_base", "_scan", "_start", "_data", "_data_size", "_event", "_id", "_max", "error")

    def __init__(self, max_event: int | None = None) -> None:
        self._max = max_event  # None: unbounded (callers that bound their input themselves)
        self.error: str | None = None  # set once an event outgrew max_event; decoding has stopped
        self._data_size = 0
        self._buf = bytearray()  # bytes of the line being received (never a complete line)
        self._base = 0  # absolute offset of _buf[0]
        self._scan = 0  # index in _buf before which no line end remains to be found
        self._start: int | None = None  # absolute offset of the current block's first line
        self._data: list[str] = []
        self._event: str | None = None
        self._id: str | None = None

    @property
    def position(self) -> int:
        """Total number of bytes fed so far."""
        return self._base + len(self._buf)

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Take the next chunk; return the events it completed, in stream order."""
        events: list[SSEEvent] = []
        if not chunk or self.error is not None:
            return events
        buf = self._buf
        buf += chunk
        size = len(buf)
        pos = 0  # start of the line being looked at
        scan = self._scan
        search = _EOL.search
        while (match := search(buf, scan)) is not None:
            eol = match.start()
            if buf[eol] == _CR:
                if eol + 1 == size:
                    scan = eol  # CR or CRLF: the next byte decides, so look at it again then
                    break
                nxt = eol + 2 if buf[eol + 1] == _LF else eol + 1
            else:
                nxt = eol + 1
            event = self._line(buf, pos, eol, nxt)
            if event is not None:
                events.append(event)
            pos = scan = nxt
        else:
            scan = size
        if pos:
            # bytearray drops a prefix without moving the rest, so this stays cheap.
            del buf[:pos]
            self._base += pos
        self._scan = scan - pos
        if self._max is not None and (len(buf) > self._max or self._data_size > self._max):
            self._overflow()
        return events

    def _overflow(self) -> None:
        self.error = f"a stream event is longer than {self._max} bytes; it was not read"
        self._base += len(self._buf)
        self._buf = bytearray()
        self._scan = 0
        self._data = []
        self._data_size = 0

    def close(self) -> list[SSEEvent]:
        """End of stream: finish the last line, and return an event left without its blank line.

        The decoder may be fed again afterwards; it then starts a new block at `position`.
        """
        events: list[SSEEvent] = []
        if self.error is not None:
            return events
        buf = self._buf
        size = len(buf)
        if size:
            # Whatever is left holds no line end, except possibly one CR held back as its last byte.
            eol = size - 1 if buf[-1] == _CR else size
            event = self._line(buf, 0, eol, size)
            if event is not None:
                events.append(event)
            self._base += size
            buf.clear()
            self._scan = 0
        # Lenient where the spec is strict: some servers omit the final blank line.
        event = self._dispatch(self._base)
        if event is not None:
            events.append(event)
        return events

    def _line(self, buf: bytearray, begin: int, eol: int, nxt: int) -> SSEEvent | None:
        """Apply the line buf[begin:eol] (its terminator ends at nxt); return an event it dispatched."""
        line_start = self._base + begin
        if line_start == 0 and buf.startswith(_BOM):
            begin += len(_BOM)
        if begin == eol:
            return self._dispatch(self._base + nxt)
        if self._start is None:
            self._start = line_start
        if buf[begin] == _COLON:
            return None
        colon = buf.find(b":", begin, eol)
        if colon < 0:
            name_end = value_start = eol
        else:
            name_end = colon
            value_start = colon + 1
            if value_start < eol and buf[value_start] == _SPACE:
                value_start += 1
        name_len = name_end - begin
        # Compare names in place: a slice per line would copy for nothing.
        if name_len == 4 and buf.startswith(b"data", begin):
            self._data.append(_text(buf, value_start, eol))
            self._data_size += eol - value_start
        elif name_len == 5 and buf.startswith(b"event", begin):
            self._event = _text(buf, value_start, eol)
        elif name_len == 2 and buf.startswith(b"id", begin):
            value = _text(buf, value_start, eol)
            if "\0" not in value:
                self._id = value
        return None

    def _dispatch(self, end: int) -> SSEEvent | None:
        """Close the current block at `end`; return it as an event if it carried data."""
        event = None
        if self._data and self._start is not None:
            event = SSEEvent("\n".join(self._data), self._event, self._id, self._start, end)
            self._data = []
        self._data_size = 0
        self._start = None
        self._event = None
        self._id = None
        return event


def _text(buf: bytearray, begin: int, end: int) -> str:
    return buf[begin:end].decode("utf-8", "replace")
