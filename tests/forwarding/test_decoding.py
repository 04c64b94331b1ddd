"""Content decoding, called directly: every chunking equals the one-shot decode, corrupt input, the limit."""

from __future__ import annotations

import gzip
import random
import zlib

import brotli
import pytest

from proxy.forwarding.decoding import STEP, BodyDecoder, decoder_for
from tests.support import split

PLAIN = b"".join(b'data: {"id":"c-%d","choices":[{"delta":{"content":"word %d "}}]}\n\n' % (i, i * i)
                 for i in range(3000)) + random.Random(7).randbytes(5000)


def decode_all(decoder: BodyDecoder, data: bytes, limit: int = 1 << 62) -> bytes:
    """Feed `data` and read everything it decodes to, up to `limit` bytes."""
    decoder.feed(data)
    out = bytearray()
    while len(out) < limit and (piece := decoder.read(limit - len(out))):
        out += piece
    return bytes(out)


def _raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


ENCODED = {
    "gzip": gzip.compress(PLAIN),
    "x-gzip": gzip.compress(PLAIN),
    "deflate": zlib.compress(PLAIN),  # RFC 9110's deflate: the zlib format
    "br": brotli.compress(PLAIN),
    "identity": PLAIN,
    None: PLAIN,
}


def chunked(data: bytes, rng: random.Random) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        n = rng.choice([1, 2, 7, 100, 1000, 4096, 65536])
        out.append(data[i:i + n])
        i += n
    return out


def decode_chunks(encoding: str | None, chunks: list[bytes], rng: random.Random) -> bytes:
    decoder = decoder_for(encoding)
    out = bytearray()
    for chunk in chunks:
        decoder.feed(chunk)
        while piece := decoder.read(rng.choice([1, 13, 512, 1 << 20])):  # and arbitrary read sizes
            out += piece
    while piece := decoder.read(1 << 20):
        out += piece
    assert decoder.error is None
    return bytes(out)


@pytest.mark.parametrize("encoding", list(ENCODED), ids=str)
def test_every_chunking_equals_the_one_shot_decode(encoding: str | None) -> None:
    whole = decode_all(decoder_for(encoding), ENCODED[encoding])
    assert whole == PLAIN
    for seed in range(12):
        rng = random.Random(seed)
        assert decode_chunks(encoding, chunked(ENCODED[encoding], rng), rng) == whole, seed


def test_raw_deflate_without_the_zlib_header_is_decoded_too() -> None:
    data = _raw_deflate(PLAIN)
    assert decode_all(decoder_for("deflate"), data) == PLAIN
    rng = random.Random(3)
    assert decode_chunks("deflate", chunked(data, rng), rng) == PLAIN


def test_encoding_names_are_read_case_and_space_insensitively() -> None:
    assert decode_all(decoder_for(" GZip "), ENCODED["gzip"]) == PLAIN
    assert decode_all(decoder_for("BR"), ENCODED["br"]) == PLAIN


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
def test_a_corrupt_stream_sets_its_error_and_stops(encoding: str) -> None:
    good = ENCODED[encoding]
    bad = good[:40] + bytes(b ^ 0x5A for b in good[40:200]) + good[200:]
    decoder = decoder_for(encoding)
    got = decode_all(decoder, bad)
    assert decoder.error is not None and f"cannot decode {encoding} body" in decoder.error
    assert got != PLAIN
    decoder.feed(good)  # nothing more once broken: it never raises, and produces nothing
    assert decoder.read(1 << 20) == b""


def test_garbage_that_is_not_compressed_at_all_sets_the_error() -> None:
    for encoding in ("gzip", "deflate", "br"):
        decoder = decoder_for(encoding)
        assert decode_all(decoder, b'{"not": "compressed"}' * 10) == b""
        assert decoder.error is not None, encoding


def test_an_unknown_encoding_decodes_nothing_and_says_so() -> None:
    decoder = decoder_for("zstd")
    assert decode_all(decoder, b"\x28\xb5\x2f\xfd anything") == b""
    assert decoder.error == "content-encoding 'zstd' is not decoded by the proxy; usage not read"


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "identity"])
def test_a_read_never_returns_more_than_its_limit_nor_a_step(encoding: str) -> None:
    bomb_plain = b"\0" * (8 * STEP)  # inflates ~1000x: a small body, a large output
    body = {"gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress,
            "identity": lambda b: b}[encoding](bomb_plain)
    decoder = decoder_for(encoding)
    decoder.feed(body)
    for limit in (1, 1000, STEP - 1):
        assert 0 < len(decoder.read(limit)) <= limit  # a read may be short (brotli's often are)
    if encoding != "identity":  # a compressed body: at most one STEP per read, whatever the limit
        assert 0 < len(decoder.read(10 * STEP)) <= STEP
    assert decoder.read(0) == b""
    assert len(decode_all(decoder_for(encoding), body, limit=12345)) == 12345


# --- never more than asked (moved from tests/e2e/test_bounds.py) ----------------------------------
MiB = 1 << 20
COMPRESS = {
    "gzip": lambda b: gzip.compress(b, compresslevel=9, mtime=0),
    "deflate": lambda b: zlib.compress(b, 9),
    "br": lambda b: brotli.compress(b, quality=5),
}


@pytest.mark.parametrize("encoding", sorted(COMPRESS))
def test_a_decoder_read_never_returns_more_than_its_limit(encoding: str) -> None:
    raw = bytes(range(256)) * 2000 + b"\0" * (8 * MiB)
    compressed = COMPRESS[encoding](raw)
    decoder = decoder_for(encoding)
    out = bytearray()
    for piece in split(compressed, 5000):
        decoder.feed(piece)
        while data := decoder.read(70_000):
            assert len(data) <= 70_000
            out += data
    assert bytes(out) == raw and decoder.error is None


@pytest.mark.parametrize("encoding", sorted(COMPRESS))
def test_a_bomb_is_decoded_one_step_at_a_time(encoding: str) -> None:
    bomb = COMPRESS[encoding](b"\0" * (64 * MiB))
    assert len(bomb) < MiB // 4
    decoder = decoder_for(encoding)
    decoder.feed(bomb)  # the whole bomb in one feed: still no read returns more than one step
    first = decoder.read(1 << 40)
    assert 0 < len(first) <= STEP
    assert len(decode_all(decoder, b"", limit=3 * STEP)) == 3 * STEP  # and reading stops where asked


def test_raw_deflate_is_still_read() -> None:
    raw = b'{"a": 1}' * 1000
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    assert decode_all(decoder_for("deflate"), compressor.compress(raw) + compressor.flush()) == raw
