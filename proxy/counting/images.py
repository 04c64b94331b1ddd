"""What an image in a prompt costs in tokens: its size from its file header, and the model's pricing rule.

Only the first bytes of an image are read (a data URL's base64 is decoded in growing prefixes until the
header is found); nothing is fetched. Every figure here is an estimate: OpenAI's published rules have
changed per model family and do not always match what it bills.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from dataclasses import dataclass

__all__ = ["REMOTE_IMAGE_SIZE", "data_url_image_size", "image_size", "image_tokens"]

# A remote image is not fetched: it is priced as a 1024x1024 picture (765 tokens at high detail on gpt-4o).
REMOTE_IMAGE_SIZE = (1024, 1024)

_PNG = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers carry the size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but don't.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG, GIF or WebP header; None when unknown or cut short."""
    if data.startswith(_PNG):
        if len(data) >= 24 and data[12:16] == b"IHDR":
            return _positive(int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"))
        return None
    if data.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return _positive(int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little"))
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_size(data)
    return None


def _positive(width: int, height: int) -> tuple[int, int] | None:
    return (width, height) if width > 0 and height > 0 else None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i, end = 2, len(data)
    while i + 4 <= end:
        if data[i] != 0xFF:
            return None  # not at a marker: corrupt
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or scan data before any frame header
            return None
        if marker in _JPEG_SOF:
            if i + 9 > end:
                return None
            height = int.from_bytes(data[i + 5:i + 7], "big")
            width = int.from_bytes(data[i + 7:i + 9], "big")
            return _positive(width, height)
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width = int.from_bytes(data[26:28], "little") & 0x3FFF
        height = int.from_bytes(data[28:30], "little") & 0x3FFF
        return _positive(width, height)
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return _positive((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X" and len(data) >= 30:
        return _positive(int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1)
    return None


_DATA_URL = re.compile(r"data:image/[\w.+-]+(?:;[\w=.+-]+)*;base64,", re.IGNORECASE)
_PREFIXES = (1 << 12, 1 << 16, 1 << 20)  # base64 characters decoded per attempt, before the whole


def data_url_image_size(url: str) -> tuple[int, int] | None:
    """The size of the image in a base64 `data:` URL, decoding only as much as its header needs."""
    head = _DATA_URL.match(url)
    if head is None:
        return None
    payload = url[head.end():]
    for length in (*(n for n in _PREFIXES if n < len(payload)), len(payload)):
        length -= length % 4  # whole base64 quanta only
        try:
            data = base64.b64decode(payload[:length])
        except (binascii.Error, ValueError):
            continue  # e.g. line breaks shifted the quanta; a longer prefix may still decode
        size = image_size(data)
        if size is not None:
            return size
    return None


# --- pricing ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Tiles:
    """Scale to fit 2048x2048, then the short side to 768; `base` + `per_tile` per 512px tile (low: `base`)."""

    base: int
    per_tile: int

    def tokens(self, width: int, height: int, detail: str) -> int:
        if detail == "low":
            return self.base
        w, h = float(width), float(height)
        if max(w, h) > 2048:
            w, h = _scaled(w, h, 2048 / max(w, h))
        if min(w, h) > 768:
            w, h = _scaled(w, h, 768 / min(w, h))
        return self.base + self.per_tile * math.ceil(w / 512) * math.ceil(h / 512)


@dataclass(frozen=True, slots=True)
class _Patches:
    """32px patches, at most `cap` (shrunk to fit whole patches), times a model multiplier; detail ignored."""

    multiplier: float
    cap: int = 1536

    def tokens(self, width: int, height: int, detail: str) -> int:
        patches = math.ceil(width / 32) * math.ceil(height / 32)
        if patches > self.cap:
            w, h = _scaled(width, height, math.sqrt(self.cap * 32 * 32 / (width * height)))
            fit = min(math.floor(w / 32) / (w / 32), math.floor(h / 32) / (h / 32))
            patches = min(self.cap, _ceil(w * fit / 32) * _ceil(h * fit / 32))
        return math.ceil(patches * self.multiplier)


def _scaled(w: float, h: float, factor: float) -> tuple[float, float]:
    return w * factor, h * factor


def _ceil(x: float) -> int:
    return math.ceil(x - 1e-9)  # 33.000000001 patches, after float scaling, are 33


# First match wins; from OpenAI's vision guide and the multipliers its API was seen to bill.
_RULES: tuple[tuple[re.Pattern[str], _Tiles | _Patches], ...] = tuple((re.compile(p), rule) for p, rule in (
    (r"gpt-4o-mini", _Tiles(2833, 5667)),
    (r"gpt-4\.1-mini", _Patches(1.62)),
    (r"gpt-4\.1-nano", _Patches(2.46)),
    (r"o4-mini|codex-mini", _Patches(1.72)),
    (r"gpt-5-nano", _Patches(1.5)),
    (r"gpt-5(\.\d+)?-(mini|nano)", _Patches(1.2)),
    (r"gpt-5", _Tiles(70, 140)),
    (r"o1|o3", _Tiles(75, 150)),
    (r"computer-use", _Tiles(65, 129)),
))
_DEFAULT_RULE = _Tiles(85, 170)  # gpt-4o, gpt-4.1, gpt-4.5, gpt-4-turbo, and unknown models


def image_tokens(model: str | None, size: tuple[int, int], detail: str | None = None) -> int:
    """Estimated prompt tokens of one image of `size` for `model` (`detail` "low", "high" or "auto")."""
    name = (model or "").lower()
    name = name.removeprefix("ft:")
    rule = next((r for pattern, r in _RULES if pattern.match(name)), _DEFAULT_RULE)
    # "auto" lets the model choose; priced as high, the more common choice for a picture worth sending.
    return rule.tokens(size[0], size[1], "low" if detail == "low" else "high")
