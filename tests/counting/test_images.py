"""Image sizes from file headers (PNG, JPEG, GIF, WebP; data URLs) and the token price of an image.

The image bytes are built here, field by field, from the formats' specifications.
"""

from __future__ import annotations

import base64
import struct
import zlib

import pytest

from proxy.counting import (
    count_chat_prompt,
    data_url_image_size,
    get_encoding,
    image_size,
    image_tokens,
)


def png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"".join(b"\x00" + b"\x00\x00\x00" * width for _ in range(height)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def jpeg(width: int, height: int, *, sof: int = 0xC0, exif: int = 0) -> bytes:
    """SOI, APP0, an optional APP1 of `exif` bytes, a DHT (0xC4: in the SOF range, not a SOF), fill, the frame."""
    app0 = segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
    app1 = segment(0xE1, b"Exif\x00\x00" + bytes(exif)) if exif else b""
    dht = segment(0xC4, bytes(20))
    frame = segment(sof, struct.pack(">BHHB", 8, height, width, 3) + bytes(9))
    return b"\xff\xd8" + app0 + app1 + dht + b"\xff" + frame + segment(0xDA, bytes(10)) + b"\xff\xd9"


def gif(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0) + b";"


def webp(kind: bytes, width: int, height: int) -> bytes:
    if kind == b"VP8X":
        body = bytes(4) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    elif kind == b"VP8L":
        body = b"\x2f" + ((width - 1) | (height - 1) << 14).to_bytes(4, "little") + bytes(4)
    else:
        body = b"\x10\x02\x00" + b"\x9d\x01\x2a" + struct.pack("<HH", width, height) + bytes(4)
    chunk = kind + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


@pytest.mark.parametrize(("data", "size"), [
    (png(3, 2), (3, 2)),
    (jpeg(640, 480), (640, 480)),
    (jpeg(1920, 1080, sof=0xC2), (1920, 1080)),  # progressive
    (jpeg(50, 60, exif=30_000), (50, 60)),
    (gif(300, 200), (300, 200)),
    (webp(b"VP8X", 1000, 700), (1000, 700)),
    (webp(b"VP8L", 16383, 2), (16383, 2)),
    (webp(b"VP8 ", 800, 600), (800, 600)),
])
def test_sizes_from_headers(data: bytes, size: tuple[int, int]) -> None:
    assert image_size(data) == size


@pytest.mark.parametrize("data", [
    b"", b"not an image", png(3, 2)[:20], jpeg(640, 480)[:30], b"\xff\xd8\xff\xd9", gif(0, 5),
    b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"\xff\xd8" + b"\x00" * 20,
])
def test_unknown_or_cut_short_is_none(data: bytes) -> None:
    assert image_size(data) is None


def data_url(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def test_data_urls_decode_as_far_as_the_header() -> None:
    assert data_url_image_size(data_url(png(40, 30), "image/png")) == (40, 30)
    # The frame header comes after 60 kB of metadata: found by decoding longer prefixes.
    assert data_url_image_size(data_url(jpeg(123, 45, exif=60_000) + bytes(500_000))) == (123, 45)
    assert data_url_image_size("data:image/png;base64,!!!!") is None
    assert data_url_image_size("https://example.com/cat.png") is None


@pytest.mark.parametrize(("model", "size", "detail", "tokens"), [
    ("gpt-4o", (1024, 1024), "high", 765),  # OpenAI's worked examples
    ("gpt-4o", (2048, 4096), "high", 1105),
    ("gpt-4o", (4096, 8192), "low", 85),
    ("gpt-4o", (512, 512), None, 255),
    ("gpt-4.1-2025-04-14", (1024, 1024), "auto", 765),
    ("gpt-4o-mini", (1024, 1024), "high", 2833 + 4 * 5667),
    ("gpt-5", (1024, 1024), "high", 70 + 4 * 140),
    ("o3", (1024, 1024), "low", 75),
    ("gpt-4.1-mini", (1024, 1024), "low", 1659),  # 1024 patches x 1.62; detail does not matter
    ("gpt-4.1-mini", (1800, 2400), "high", 2353),  # 1452 patches (the guide's example) x 1.62
    ("o4-mini", (10, 10), "high", 2),
    ("llama-3.2-vision", (1024, 1024), "high", 765),
])
def test_image_tokens(model: str, size: tuple[int, int], detail: str | None, tokens: int) -> None:
    assert image_tokens(model, size, detail) == tokens


def test_images_in_a_chat_prompt_are_priced_and_flagged() -> None:
    encoding = get_encoding("o200k_base")

    def body(url: str, detail: str = "high") -> dict[str, object]:
        return {"model": "gpt-4o", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url, "detail": detail}}]}]}

    inline = count_chat_prompt(body(data_url(png(512, 512), "image/png")), encoding)
    remote = count_chat_prompt(body("https://example.com/cat.jpg"), encoding)
    low = count_chat_prompt(body("https://example.com/cat.jpg", "low"), encoding)
    assert inline.tokens == 3 + 1 + 255 + 3
    assert remote.tokens == 3 + 1 + 765 + 3
    assert low.tokens == 3 + 1 + 85 + 3
    assert inline.approximate and "images estimated" in inline.notes
    assert any("1024x1024" in note for note in remote.notes)
