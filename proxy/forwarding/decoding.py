"""Incremental decoders for a compressed response body, so meters can read a copy.

The client always gets the upstream's compressed bytes untouched; only the meter's copy is decoded (the
one exception: an edited stream, see forward.py). A decoder is fed input with `feed` and drained with
`read(limit)`, which never returns more than `limit` bytes (nor more than `STEP` at a time for a
compressed body): a 1 MiB gzip bomb that inflates to 1 GiB costs at most one step of memory per read, and
the caller decides when to stop reading. Input not yet decoded stays inside the decoder, compressed.
A decoder never raises: on corrupt input it stops producing and says why in `error`.
"""

from __future__ import annotations

import zlib
from typing import Protocol

import brotli

STEP = 256 * 1024  # most decoded bytes one read produces (about a millisecond of zlib)


class BodyDecoder(Protocol):
    error: str | None

    def feed(self, data: bytes) -> None: ...

    def read(self, limit: int) -> bytes: ...


class Identity:
    error: str | None = None

    def __init__(self) -> None:
        self._data = b""

    def feed(self, data: bytes) -> None:
        self._data = self._data + data if self._data else data

    def read(self, limit: int) -> bytes:
        data = self._data
        if len(data) <= limit:  # the common case: the chunk as it came, no copy
            self._data = b""
            return data
        self._data = data[limit:]
        return data[:limit]


class _Zlib:
    def __init__(self, wbits: int, name: str) -> None:
        self._d = zlib.decompressobj(wbits)
        self._name = name
        self._first = True  # no read yet: "deflate" may turn out to be raw
        self._tail = b""  # input not decoded yet
        self.error: str | None = None

    def feed(self, data: bytes) -> None:
        if self.error is None and data:
            self._tail = self._tail + data if self._tail else data

    def read(self, limit: int) -> bytes:
        if self.error is not None or limit <= 0:
            return b""
        first, self._first = self._first, False
        try:
            # zlib keeps output it could not return inside: ask again even with no input left.
            out = self._d.decompress(self._tail, min(limit, STEP))
        except zlib.error as exc:
            if first and self._name == "deflate":
                # "deflate" in the wild is often a raw stream without the zlib header (RFC 9110 says zlib).
                self._d = zlib.decompressobj(-zlib.MAX_WBITS)
                return self.read(limit)
            self.error = f"cannot decode {self._name} body: {exc}"
            self._tail = b""
            return b""
        self._tail = self._d.unconsumed_tail
        return out


class _Brotli:
    def __init__(self) -> None:
        self._d = brotli.Decompressor()
        self._input = b""
        self._over = b""  # output past the last read's limit (brotli's limit is a floor, not a ceiling)
        self.error: str | None = None

    def feed(self, data: bytes) -> None:
        if self.error is None and data:
            self._input = self._input + data if self._input else data

    def read(self, limit: int) -> bytes:
        if self.error is not None or limit <= 0:
            return b""
        limit = min(limit, STEP)
        if not self._over:
            try:
                if self._d.can_accept_more_data():
                    data, self._input = self._input, b""
                    if not data and self._d.is_finished():
                        return b""
                    self._over = self._d.process(data, output_buffer_limit=limit)
                else:  # output of earlier input is still waiting: it must be drained with empty input
                    self._over = self._d.process(b"", output_buffer_limit=limit)
            except brotli.error as exc:
                self.error = f"cannot decode br body: {exc}"
                self._input = self._over = b""
                return b""
        out, self._over = self._over[:limit], self._over[limit:]
        return out


class _Unsupported:
    def __init__(self, encoding: str) -> None:
        self.error: str | None = f"content-encoding {encoding!r} is not decoded by the proxy; usage not read"

    def feed(self, data: bytes) -> None:
        pass

    def read(self, limit: int) -> bytes:
        return b""


def decoder_for(content_encoding: str | None) -> BodyDecoder:
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        return Identity()
    if encoding in ("gzip", "x-gzip"):
        return _Zlib(16 + zlib.MAX_WBITS, "gzip")
    if encoding == "deflate":
        return _Zlib(zlib.MAX_WBITS, "deflate")
    if encoding == "br":
        return _Brotli()
    return _Unsupported(encoding)

