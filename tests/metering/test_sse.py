"""SSE decoder: identical events and exact byte offsets under every chunking, on real captures and
on hand-made streams (CRLF, bare CR, comments, multi-line data, Responses framing, bad bytes)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.metering.sse import SSEDecoder, SSEEvent
from proxy.metering.usage import chat_usage, responses_usage, served_model
from tests.support.paths import CAPTURES

needs_captures = pytest.mark.skipif(
    not CAPTURES.is_dir(), reason=f"real openai-python captures not found at {CAPTURES}"
)

# Final usage of each capture, as recorded in the captures' INDEX.md: prompt, completion, total.
CAPTURE_USAGE = {
    "e2aad469b71d": (14, 30, 44),
    "7e5ea4d12e7c": (79, 14, 93),
    "a491adda08c3": (79, 42, 121),
    "4cc50a6135d2": (79, 1, 80),
    "173417d55340": (79, 11, 90),
    "83b060bae42e": (9, 2, 11),
    "569c877e6942": (79, 12, 91),
    "c6aa7e397b71": (76, 24, 100),
    "f82268f2fefd": (149, 60, 209),
    "a247c49c5fcd": (48, 19, 67),
    "d61558011839": (19, 177, 196),
    "2018feb66ae1": (44, 16, 60),
}


def capture_paths() -> list[Path]:
    return sorted(CAPTURES.glob("*.sse")) if CAPTURES.is_dir() else []


def pieces(stream: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(stream), size):
        yield stream[i : i + size]


def random_pieces(stream: bytes, seed: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    i = 0
    while i < len(stream):
        step = rng.choice((1, 1, 2, 3, 5, 17, 100, 999))
        yield stream[i : i + step]
        i += step


def chunkings(stream: bytes) -> Iterator[tuple[str, list[bytes]]]:
    yield "whole", [stream]
    for size in (1, 2, 3, 7, 64):
        yield f"{size}-byte", list(pieces(stream, size))
    for seed in (0, 1, 2):
        yield f"random-{seed}", list(random_pieces(stream, seed))


def decode(chunks: list[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    fed = 0
    for chunk in chunks:
        events += decoder.feed(chunk)
        fed += len(chunk)
        assert decoder.position == fed
    return events + decoder.close()


def assert_self_contained(stream: bytes, events: list[SSEEvent]) -> None:
    """Each event's byte range, decoded alone, is exactly that one event."""
    previous_end = 0
    for ev in events:
        assert previous_end <= ev.start < ev.end <= len(stream)
        alone = decode([stream[ev.start : ev.end]])
        assert alone == [SSEEvent(ev.data, ev.event, ev.id, 0, ev.end - ev.start)]
        previous_end = ev.end


def assert_chunking_invariant(stream: bytes, expected: list[SSEEvent]) -> None:
    for name, chunks in chunkings(stream):
        assert decode(chunks) == expected, name
    assert_self_contained(stream, expected)


def every_two_way_split(stream: bytes) -> Iterator[list[bytes]]:
    for cut in range(len(stream) + 1):
        yield [stream[:cut], stream[cut:]]


# --- real captures ---------------------------------------------------------------------------


@needs_captures
@pytest.mark.parametrize("path", capture_paths(), ids=lambda p: p.name[:12])
def test_capture_decodes_identically_under_every_chunking(path: Path) -> None:
    stream = path.read_bytes()
    # Independent oracle: these captures frame every event as b"data: <json>\n\n".
    expected = []
    offset = 0
    for block in stream.split(b"\n\n")[:-1]:
        assert block.startswith(b"data: ")
        end = offset + len(block) + 2
        expected.append(SSEEvent(block[6:].decode(), None, None, offset, end))
        offset = end
    assert offset == len(stream)
    assert expected[-1].data == "[DONE]"
    assert_chunking_invariant(stream, expected)


@needs_captures
def test_every_listed_capture_is_present_and_every_capture_is_listed() -> None:
    assert {p.name[:12] for p in capture_paths()} == set(CAPTURE_USAGE)


@needs_captures
@pytest.mark.parametrize("path", capture_paths(), ids=lambda p: p.name[:12])
def test_capture_last_usage_matches_index(path: Path) -> None:
    stream = path.read_bytes()
    for name, chunks in chunkings(stream):
        last = None
        models = set()
        for ev in decode(chunks):
            if ev.data == "[DONE]":
                continue
            body = json.loads(ev.data)
            models.add(served_model(body))
            usage = chat_usage(body)
            if usage is not None:
                last = usage
        assert last is not None, name
        assert (last.prompt_tokens, last.completion_tokens, last.total_tokens) == CAPTURE_USAGE[path.name[:12]]
        assert last.cached_tokens == 0 and last.reasoning_tokens == 0
        assert models == {"gpt-4o-2024-08-06"}


def test_done_start_lets_the_proxy_hold_back_the_terminal_event() -> None:
    stream = b'data: {"choices":[]}\n\ndata: [DONE]\n\n'
    done_at = stream.index(b"data: [DONE]")
    for chunks in every_two_way_split(stream):
        decoder = SSEDecoder()
        events = [ev for chunk in chunks for ev in decoder.feed(chunk)]
        assert events[-1] == SSEEvent("[DONE]", None, None, done_at, len(stream))


# --- hand-made streams -----------------------------------------------------------------------

UTF8_STREAM = (
    'data: {"content":"café"}\n\n'
    'data: {"content":"日本語のテキスト"}\n\n'
    'data: {"content":"emoji 🎉 end"}\n\n'
    "data: [DONE]\n\n"
).encode()


def test_split_inside_multibyte_characters() -> None:
    cut_inside = UTF8_STREAM.index("é".encode()) + 1
    assert UTF8_STREAM[cut_inside - 1 : cut_inside + 1] == "é".encode()
    expected = decode([UTF8_STREAM])
    assert [ev.data for ev in expected] == [
        '{"content":"café"}',
        '{"content":"日本語のテキスト"}',
        '{"content":"emoji 🎉 end"}',
        "[DONE]",
    ]
    assert decode([UTF8_STREAM[:cut_inside], UTF8_STREAM[cut_inside:]]) == expected
    for chunks in every_two_way_split(UTF8_STREAM):
        assert decode(chunks) == expected
    assert_chunking_invariant(UTF8_STREAM, expected)


def framed(lines: list[str], eol: str) -> bytes:
    return "".join(line + eol for line in lines).encode()


EVENT_LINES = [
    ": keep-alive",
    "",
    "data: first",
    "",
    "",
    ": a comment inside the block",
    "event: response.output_text.delta",
    "id: 7",
    "data: line one",
    "data:line two",
    "data:  two spaces keep one",
    "retry: 3000",
    "unknown: ignored",
    "",
    "data",
    "",
    "data: last",
    "",
]


@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"], ids=["LF", "CRLF", "CR"])
def test_line_endings_fields_and_offsets(eol: str) -> None:
    stream = framed(EVENT_LINES, eol)
    n = len(eol)

    def at(line_index: int) -> int:
        return sum(len(line) + n for line in EVENT_LINES[:line_index])

    expected = [
        SSEEvent("first", None, None, at(2), at(4)),
        SSEEvent(
            "line one\nline two\n two spaces keep one",
            "response.output_text.delta",
            "7",
            at(5),  # the comment opening the block belongs to the event
            at(14),
        ),
        SSEEvent("", None, None, at(14), at(16)),
        SSEEvent("last", None, None, at(16), at(18)),
    ]
    assert decode([stream]) == expected
    for chunks in every_two_way_split(stream):
        assert decode(chunks) == expected
    assert_chunking_invariant(stream, expected)


def test_mixed_line_endings_in_one_stream() -> None:
    stream = b"data: a\r\n\r\ndata: b\r\rdata: c\n\ndata: d\r\n\n"
    b, c, d = (stream.index(b"data: " + x) for x in (b"b", b"c", b"d"))
    assert (b, c, d) == (11, 20, 29)
    expected = [
        SSEEvent("a", None, None, 0, b),
        SSEEvent("b", None, None, b, c),
        SSEEvent("c", None, None, c, d),
        SSEEvent("d", None, None, d, len(stream)),
    ]
    assert_chunking_invariant(stream, expected)


def test_crlf_split_between_cr_and_lf_waits_for_the_lf() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\r\n\r") == []
    assert decoder.feed(b"\n") == [SSEEvent("x", None, None, 0, 11)]
    assert decoder.feed(b"data: y\r\n\r") == []
    # A different byte after the CR settles it as a bare CR.
    assert decoder.feed(b"data: z\n\n") == [
        SSEEvent("y", None, None, 11, 21),
        SSEEvent("z", None, None, 21, 30),
    ]


def test_blocks_without_data_are_not_dispatched() -> None:
    stream = b": ping\n\nevent: only-a-type\nid: 3\n\n: ping\n\ndata: real\n\n"
    start = stream.index(b"data: real")
    assert decode([stream]) == [SSEEvent("real", None, None, start, len(stream))]
    assert_chunking_invariant(stream, decode([stream]))


def test_id_and_event_do_not_leak_into_the_next_event() -> None:
    stream = b"event: a\nid: 1\ndata: x\n\ndata: y\n\nid: bad\x00id\ndata: z\n\n"
    events = decode([stream])
    assert [(ev.data, ev.event, ev.id) for ev in events] == [("x", "a", "1"), ("y", None, None), ("z", None, None)]


def test_responses_framing_with_event_lines() -> None:
    bodies = [
        {"type": "response.created", "sequence_number": 0, "response": {"model": "gpt-x", "usage": None}},
        {"type": "response.output_text.delta", "sequence_number": 1, "delta": "Bonjour à tous"},
        {
            "type": "response.completed",
            "sequence_number": 2,
            "response": {
                "model": "gpt-x-2026-01-01",
                "usage": {
                    "input_tokens": 31,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": 6,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": 37,
                },
            },
        },
    ]
    stream = "".join(
        f"event: {b['type']}\ndata: {json.dumps(b, ensure_ascii=False)}\n\n" for b in bodies
    ).encode()
    events = decode([stream])
    assert [ev.event for ev in events] == [b["type"] for b in bodies]
    assert [json.loads(ev.data) for ev in events] == bodies
    assert_chunking_invariant(stream, events)
    usages = [responses_usage(json.loads(ev.data)) for ev in events]
    assert usages[:2] == [None, None]
    assert usages[2] is not None and (usages[2].prompt_tokens, usages[2].completion_tokens) == (31, 6)
    assert served_model(json.loads(events[-1].data)) == "gpt-x-2026-01-01"


@pytest.mark.parametrize(
    ("tail", "data"),
    [
        (b"data: end", "end"),  # not even a line end
        (b"data: end\n", "end"),
        (b"data: end\r", "end"),
        (b"data: a\ndata: b\r\n", "a\nb"),
    ],
)
def test_close_returns_an_event_missing_its_blank_line(tail: bytes, data: str) -> None:
    stream = b"data: first\n\n" + tail
    for chunks in every_two_way_split(stream):
        decoder = SSEDecoder()
        events = [ev for chunk in chunks for ev in decoder.feed(chunk)]
        assert events == [SSEEvent("first", None, None, 0, 13)]
        assert decoder.close() == [SSEEvent(data, None, None, 13, len(stream))]
        assert decoder.close() == []


def test_close_without_pending_data_returns_nothing() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\n\n: trailing comment") == [SSEEvent("x", None, None, 0, 9)]
    assert decoder.close() == []
    assert decoder.position == 27


def test_leading_byte_order_mark_is_skipped() -> None:
    stream = b"\xef\xbb\xbfdata: x\n\n"
    expected = [SSEEvent("x", None, None, 0, len(stream))]
    for chunks in every_two_way_split(stream):
        assert decode(chunks) == expected


def test_invalid_utf8_is_replaced_never_raised() -> None:
    stream = b"data: \xff\xfe ok \xc3\n\ndata: \xe6\x97\n\n"
    assert [ev.data for ev in decode([stream])] == ["\ufffd\ufffd ok \ufffd", "\ufffd"]
    assert_chunking_invariant(stream, decode([stream]))


@pytest.mark.parametrize("seed", range(30))
def test_random_byte_soup_is_chunking_invariant(seed: int) -> None:
    rng = random.Random(seed)
    atoms = [b"data", b"data: ", b"event", b"id", b":", b" ", b"x", b"\x00"]
    atoms += [b"\r", b"\n", b"\r\n", b"\n\n", b"\xc3", b"\xa9", b"\xef\xbb"]
    # A byte order mark only means something as the stream's first bytes.
    bom = b"\xef\xbb\xbf" if seed % 2 else b""
    stream = bom + b"".join(rng.choice(atoms) for _ in range(400))
    expected = decode([stream])
    assert_chunking_invariant(stream, expected)


def test_empty_feeds_are_harmless() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"") == []
    assert decoder.feed(b"data: x\n") == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\n") == [SSEEvent("x", None, None, 0, 9)]


# --- size: linear, not quadratic --------------------------------------------------------------


def test_long_line_fed_byte_by_byte_is_linear() -> None:
    # 200 KB one byte at a time: a decoder that re-scans or copies its buffer per feed would do
    # ~20 GB of work here and never finish; a linear one takes a fraction of a second.
    payload = b"x" * 200_000
    stream = b"data: " + payload + b"\n\n"
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for i in range(len(stream)):
        events += decoder.feed(stream[i : i + 1])
    assert events == [SSEEvent(payload.decode(), None, None, 0, len(stream))]


def test_many_events_in_one_chunk_is_linear() -> None:
    stream = b"".join(b"data: %d\n\n" % i for i in range(100_000))
    events = SSEDecoder().feed(stream)
    assert len(events) == 100_000
    assert events[-1].data == "99999" and events[-1].end == len(stream)
    big = b"data: " + b"y" * 1_000_000 + b"\n\n"
    assert SSEDecoder().feed(big)[0].data == "y" * 1_000_000


# --- no unbounded line (moved from tests/e2e/test_bounds.py) -------------------------------------
def test_an_sse_line_longer_than_the_bound_stops_the_decoder_and_frees_it() -> None:
    decoder = SSEDecoder(max_event=1000)
    assert [e.data for e in decoder.feed(b"data: small\n\n")] == ["small"]
    for _ in range(50):  # a line that never ends
        assert decoder.feed(b"data: " + b"x" * 300) == []
    assert decoder.error is not None and "1000 bytes" in decoder.error
    assert len(decoder._buf) <= 1000  # what it holds stays bounded: the line was dropped, not kept
    assert decoder.feed(b"\n\ndata: later\n\n") == [] and decoder.close() == []


def test_many_data_lines_of_one_event_are_bounded_too() -> None:
    decoder = SSEDecoder(max_event=1000)
    for _ in range(20):
        decoder.feed(b"data: " + b"y" * 100 + b"\n")
    assert decoder.error is not None
    unbounded = SSEDecoder()
    for _ in range(20):
        unbounded.feed(b"data: " + b"y" * 100 + b"\n")
    assert unbounded.error is None and len(unbounded.feed(b"\n")) == 1
