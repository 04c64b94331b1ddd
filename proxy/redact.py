"""Takes API keys out of what the upstream sends back: out of stored text, and out of the client's bytes.

`Secrets` redacts the keys one call holds (the client's, and in managed mode the real upstream key) out of
text bound for the ledger, the spool or a log — every occurrence, of any length, before anything cuts the
text short. `KeyMask` takes the real upstream key out of a byte stream on its way to the client: each
occurrence is overwritten with as many `*` as it has bytes, so a body's length, and so its Content-Length,
stays what the upstream said. It holds back only the tail of the stream that could be the start of the
key, until the next bytes (or the end) show that it is not.

Nothing here logs, and no key is ever part of an exception message or a repr.
"""

from __future__ import annotations

from typing import Iterable

__all__ = ["KeyMask", "Secrets"]

MASK = b"*"


class Secrets:
    """The keys of one call, each with the text that replaces it when it is stored."""

    __slots__ = ("_pairs",)

    def __init__(self, pairs: Iterable[tuple[str | None, str]] = ()) -> None:
        seen: dict[str, str] = {}
        for key, replacement in pairs:
            if key and key not in seen:
                seen[key] = replacement
        # Longest first: a key that contains another is replaced whole.
        self._pairs = sorted(seen.items(), key=lambda kv: -len(kv[0]))

    def add(self, key: str | None, replacement: str) -> None:
        if key and all(key != k for k, _ in self._pairs):
            self._pairs = sorted([*self._pairs, (key, replacement)], key=lambda kv: -len(kv[0]))

    def __bool__(self) -> bool:
        return bool(self._pairs)

    def __repr__(self) -> str:
        return f"Secrets({len(self._pairs)} key(s))"

    def redact(self, text: str | None, limit: int | None = None) -> str | None:
        """`text` without any of the keys, then cut to `limit` characters: redact first, never a cut key."""
        if text is None:
            return None
        for key, replacement in self._pairs:
            if key in text:
                text = text.replace(key, replacement)
        return text if limit is None else text[:limit]


class KeyMask:
    """Overwrites every occurrence of the keys in a byte stream fed in arbitrary chunks.

    `feed()` returns the bytes that are safe to send now; `flush()` at the end returns what was held
    back (a tail that turned out not to be a key). `found` says whether anything was masked.
    """

    __slots__ = ("_firsts", "_held", "_keys", "_longest", "found")

    def __init__(self, keys: Iterable[bytes]) -> None:
        self._keys = sorted({k for k in keys if k}, key=len, reverse=True)
        self._longest = len(self._keys[0]) if self._keys else 0
        self._firsts = frozenset(k[0] for k in self._keys)
        self._held = b""
        self.found = False

    @property
    def pending(self) -> int:
        """Bytes held back because they could be the start of a key."""
        return len(self._held)

    def feed(self, data: bytes) -> bytes:
        if not self._keys:
            return data
        buf = self._held + data if self._held else data
        if not buf:
            return b""
        masked = self._mask(buf)
        keep = self._partial(masked)
        self._held = bytes(masked[len(masked) - keep:]) if keep else b""
        return bytes(masked[:len(masked) - keep]) if keep else bytes(masked)

    def flush(self) -> bytes:
        held, self._held = self._held, b""
        return held

    def _mask(self, buf: bytes) -> bytes | bytearray:
        out: bytes | bytearray = buf
        for key in self._keys:
            at = out.find(key)
            if at < 0:
                continue
            if isinstance(out, bytes):
                out = bytearray(out)
            while at >= 0:
                out[at:at + len(key)] = MASK * len(key)
                at = out.find(key, at + len(key))
            self.found = True
        return out

    def _partial(self, buf: bytes | bytearray) -> int:
        """Length of the longest tail of `buf` that is a proper start of some key."""
        n = len(buf)
        window = max(0, n - self._longest + 1)
        starts = sorted(i for first in self._firsts for i in _positions(buf, first, window))
        for i in starts:  # the longest tail first
            tail = bytes(buf[i:])
            if any(len(k) > len(tail) and k.startswith(tail) for k in self._keys):
                return n - i
        return 0


def _positions(buf: bytes | bytearray, byte: int, start: int) -> list[int]:
    """Where `byte` occurs in buf[start:] (a search in C, not a loop over every byte)."""
    found = []
    at = buf.find(byte, start)
    while at >= 0:
        found.append(at)
        at = buf.find(byte, at + 1)
    return found


class BodyGuard:
    """Keeps the real upstream key out of one response body on its way to the client (managed mode).

    An uncompressed body is masked in place (`KeyMask`): same length, same headers. A compressed body
    cannot be masked in its compressed bytes, so the guard watches its decoded copy: the upstream's bytes
    pass untouched while no key is in sight, held back only while the decoded tail could start one. If the
    key turns up before anything was sent, the body goes out decoded and masked instead (`switched`: the
    caller drops Content-Encoding and Content-Length before the headers go); if it turns up later, nothing
    more is sent (`cut`: the caller breaks the connection off).

    An error body (`hold_all`), where upstreams echo what they were sent, is held whole when compressed (it is
    small, and the decoding budget bounds it), so whether the key turns up in it never depends on how its
    chunks happened to arrive: it always goes out either untouched or decoded and masked, never cut.

    For a compressed body every `out()` gets one whole upstream chunk, after `decoded()` got its copy.
    """

    __slots__ = ("_hold_all", "_mask", "_pieces", "_queue", "_seen", "compressed", "mode", "switched")

    def __init__(self, key: str, compressed: bool, hold_all: bool = False) -> None:
        secret = key.encode("utf-8", "surrogateescape")
        self.compressed = compressed
        self._hold_all = hold_all
        self._mask = KeyMask([secret])  # on the bytes sent: the upstream's, or the decoded ones after a switch
        self._seen = KeyMask([secret])  # compressed: on the decoded copy, as it is read
        self._pieces: list[bytes] = []  # decoded copies of chunks read and not yet out()
        self._queue: list[tuple[bytes, bytes]] = []  # compressed chunks (and copies) held while the decoded
        # tail could start a key
        self.mode = "pass"  # "pass", "decoded" (switched), "cut"
        self.switched = False

    def decoded(self, data: bytes) -> None:
        if self.compressed:
            self._seen.feed(data)
            self._pieces.append(data)

    def out(self, raw: bytes, nothing_sent: bool) -> bytes:
        """The bytes to send in place of `raw` (possibly none yet). `nothing_sent`: not even the headers."""
        if not self.compressed:
            return self._mask.feed(raw)
        piece = self._pieces.pop(0) if self._pieces else b""
        if self.mode == "decoded":
            return self._mask.feed(piece)
        if self.mode == "cut":
            return b""
        self._queue.append((raw, piece))
        if self._seen.found:
            queued, self._queue = self._queue, []
            if nothing_sent:
                self.mode, self.switched = "decoded", True
                return self._mask.feed(b"".join(p for _, p in queued))
            self.mode = "cut"
            return b""
        if self._seen.pending or self._hold_all:
            return b""
        out, self._queue = b"".join(r for r, _ in self._queue), []
        return out

    def flush(self) -> bytes:
        """At the end of the body: what was held back, now known to be no key."""
        if self.mode == "cut":
            return b""
        if self.compressed and self.mode == "pass":
            out, self._queue = b"".join(r for r, _ in self._queue), []
            return out
        return self._mask.flush()
