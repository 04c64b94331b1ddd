"""Incremental decoders for a compressed response body, so meters can read a copy.

The client always gets the upstream's compressed bytes untouched; only the meter's copy is decoded.
A decoder never raises: on corrupt input it stops producing and says why in `error`.
"""

from __future__ import annotations

import zlib
from typing import Protocol

import brotli


class BodyDecoder(Protocol):
    error: str | None

    def feed(self, data: bytes) -> bytes: ...


class Identity:
    error: str | None = None

    def feed(self, data: bytes) -> bytes:
        return data


class _Zlib:
    def __init__(self, wbits: int, name: str) -> None:
        self._d = zlib.decompressobj(wbits)
        self._name = name
        self._first = True
        self.error: str | None = None

    def feed(self, data: bytes) -> bytes:
        if self.error is not None:
            return b""
        try:
            return self._d.decompress(data)
        except zlib.error as exc:
            if self._first and self._name == "deflate":
                # "deflate" in the wild is often a raw stream without the zlib header (RFC 9110 says zlib).
                self._d = zlib.decompressobj(-zlib.MAX_WBITS)
                self._first = False
                return self.feed(data)
            self.error = f"cannot decode {self._name} body: {exc}"
            return b""
        finally:
            self._first = False


class _Brotli:
    def __init__(self) -> None:
        self._d = brotli.Decompressor()
        self.error: str | None = None

    def feed(self, data: bytes) -> bytes:
        if self.error is not None:
            return b""
        try:
            return self._d.process(data)
        except brotli.error as exc:
            self.error = f"cannot decode br body: {exc}"
            return b""


class _Unsupported:
    def __init__(self, encoding: str) -> None:
        self.error: str | None = f"content-encoding {encoding!r} is not decoded by the proxy; usage not read"

    def feed(self, data: bytes) -> bytes:
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
