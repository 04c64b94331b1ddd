"""Property tests (hypothesis) for the parts that read hostile bytes on the hot path.

The SSE decoder, the usage extractors, the meters and the stream editor see whatever an upstream or a
client sends. Whatever that is, they must not raise (the extractors: nothing but UnreadableUsage), must
not depend on how the bytes were chunked, and must never alter the bytes the client gets.
"""

from __future__ import annotations

import json
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.core.record import Usage
from proxy.counting import StreamOutput
from proxy.counting.counter import CountPolicy, count_call
from proxy.forwarding.edits import Edit, StreamEditor, drop, strip_usage_null
from proxy.metering.meters import meter_for
from proxy.metering.sse import SSEDecoder, SSEEvent
from proxy.metering.usage import (
    UnreadableUsage,
    chat_usage,
    parse_usage,
    responses_usage,
    served_model,
)

# No example database: nothing is written to the work tree; a failure prints its example and seed.
FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
SQLITE_MAX = 2**63 - 1

# --- strategies --------------------------------------------------------------------------------

_numbers = st.one_of(
    st.integers(min_value=-(2**80), max_value=2**80), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 2**63, 2**70, 1e300, -0.0, 3.0, 2.5]),
)
# Lone surrogates included: JSON's "\\ud800" escapes make them, and SQLite cannot store them.
_text = st.text(st.characters(exclude_categories=()), max_size=20)
_scalars = st.one_of(st.none(), st.booleans(), _numbers, _text)
DEEP = b"[" * 2500 + b"]" * 2500  # past the recursion limit: json raises RecursionError, not ValueError
json_like = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)),
    max_leaves=30,
)

_USAGE_KEYS = [
    "prompt_tokens", "completion_tokens", "total_tokens", "input_tokens", "output_tokens",
    "prompt_tokens_details", "completion_tokens_details", "input_tokens_details", "output_tokens_details",
    "cached_tokens", "reasoning_tokens", "prompt_cache_hit_tokens",
]
_DETAIL_KEYS = ["cached_tokens", "reasoning_tokens", "audio_tokens"]
_counts = st.one_of(st.integers(min_value=0, max_value=10_000), st.integers(min_value=0, max_value=2**70), _scalars)
_details = st.one_of(_scalars, st.dictionaries(st.sampled_from(_DETAIL_KEYS), _counts, max_size=3))
usage_shaped = st.dictionaries(st.sampled_from(_USAGE_KEYS), st.one_of(_counts, _details), max_size=8)


def _envelopes(usage: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Bodies and events that carry a usage where the extractors look for one."""
    return st.one_of(
        st.builds(lambda u, m: {"model": m, "choices": [], "usage": u}, usage, _scalars),
        st.builds(lambda u: {"x_groq": {"usage": u}}, usage),
        st.builds(lambda u, m: {"type": "response.completed", "response": {"model": m, "usage": u}}, usage,
                  _scalars),
        st.builds(lambda u: {"object": "response", "usage": u}, usage),
    )


extractor_inputs = st.one_of(json_like, _envelopes(usage_shaped), _envelopes(json_like))


def _sse_event(value: Any) -> bytes:
    return b"data: " + json.dumps(value).encode() + b"\n\n"


_event_bytes = st.one_of(
    st.builds(_sse_event, _envelopes(usage_shaped)),
    st.builds(_sse_event, json_like),
    st.just(b"data: [DONE]\n\n"),
    st.builds(lambda kind, v: b"event: " + kind.encode() + b"\n" + _sse_event({"type": kind, "response": v}),
              st.sampled_from(["response.completed", "response.failed", "response.incomplete", "error"]),
              json_like),
    st.binary(max_size=40),
    st.just(b"data: " + DEEP + b"\n\n"),
    st.sampled_from([b"\r\n", b"\r", b"\n", b": comment\n", b"data:", b"data: {", b"\x00", b"\xff\xfe"]),
)
stream_bytes = st.one_of(st.binary(max_size=400), st.lists(_event_bytes, max_size=12).map(b"".join),
                         st.just(DEEP))


@st.composite
def chunked(draw: st.DrawFn, data: st.SearchStrategy[bytes] = stream_bytes) -> tuple[bytes, list[bytes]]:
    """Some bytes and an arbitrary split of them into chunks (empty chunks included)."""
    whole = draw(data)
    cuts = sorted(draw(st.lists(st.integers(min_value=0, max_value=len(whole)), max_size=12)))
    points = [0, *cuts, len(whole)]
    return whole, [whole[a:b] for a, b in pairwise(points)]


# --- SSE decoder -------------------------------------------------------------------------------

def _decode(chunks: list[bytes]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.close())
    return events


@FUZZ
@given(chunked())
def test_sse_decoder_is_chunking_invariant_with_ordered_offsets(case: tuple[bytes, list[bytes]]) -> None:
    whole, chunks = case
    expected = _decode([whole])
    assert _decode(chunks) == expected
    previous_end = 0
    for event in expected:
        assert 0 <= event.start < event.end <= len(whole)
        assert event.start >= previous_end  # increasing, never overlapping
        previous_end = event.end


@FUZZ
@given(st.binary(max_size=600))
def test_sse_decoder_byte_by_byte_matches_whole(whole: bytes) -> None:
    assert _decode([whole[i:i + 1] for i in range(len(whole))]) == _decode([whole])


# --- usage extractors --------------------------------------------------------------------------

def _check_usage(usage: Usage | None) -> None:
    if usage is None:
        return
    fields = (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, usage.reasoning_tokens,
              usage.total_tokens)
    assert all(type(f) is int and 0 <= f <= SQLITE_MAX for f in fields), usage
    assert usage.cached_tokens <= usage.prompt_tokens
    assert usage.reasoning_tokens <= usage.completion_tokens


@FUZZ
@given(st.one_of(usage_shaped, json_like))
def test_parse_usage_raises_only_unreadable_usage(raw: Any) -> None:
    try:
        _check_usage(parse_usage(raw))
    except UnreadableUsage:
        pass


@FUZZ
@given(extractor_inputs)
def test_chat_and_responses_usage_raise_only_unreadable_usage(obj: Any) -> None:
    for extract in (chat_usage, responses_usage):
        try:
            _check_usage(extract(obj))
        except UnreadableUsage:
            pass


@FUZZ
@given(extractor_inputs)
def test_served_model_is_none_or_a_name(obj: Any) -> None:
    model = served_model(obj)
    assert model is None or (isinstance(model, str) and model)


# --- meters ------------------------------------------------------------------------------------

_streaming_requests = st.builds(
    lambda m, s, opts, msgs: json.dumps({"model": m, "stream": s, **opts, "messages": msgs}),
    _scalars, st.one_of(st.just(True), _scalars),
    st.one_of(st.just({}), st.builds(lambda o: {"stream_options": o}, json_like)), json_like)
request_bodies = st.one_of(
    st.binary(max_size=200),
    st.just(DEEP),
    st.builds(lambda v: json.dumps(v).encode(), json_like),
    _streaming_requests.map(str.encode),
    # Encodings json.loads accepts, where bytes put in front of the body would corrupt it.
    _streaming_requests.map(lambda text: b"\xef\xbb\xbf" + text.encode()),
    _streaming_requests.map(lambda text: text.encode("utf-16")),
)


@FUZZ
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/responses", "/v1/completions", "/v1/embeddings"]),
       inject=st.booleans(), body=request_bodies,
       content_type=st.sampled_from(["text/event-stream", "application/json", "text/event-stream; charset=utf-8"]),
       response=chunked())
def test_meter_hooks_never_raise(path: str, inject: bool, body: bytes, content_type: str,
                                 response: tuple[bytes, list[bytes]]) -> None:
    whole, chunks = response
    meter = meter_for("POST", path, inject_usage=inject)
    replaced = meter.on_request(body, "application/json")
    if replaced is not None:
        # Only ever the client's request plus include_usage: nothing else changed, nothing corrupted.
        sent, asked = json.loads(replaced), json.loads(body)
        assert sent.pop("stream_options")["include_usage"] is True
        options = asked.pop("stream_options", None) or {}
        assert json.dumps(sent, sort_keys=True) == json.dumps(asked, sort_keys=True)  # NaN != NaN
        assert isinstance(options, dict)
    meter.on_response_headers(200, content_type)
    fed = 0
    for chunk in chunks:
        meter.on_chunk(chunk)
        fed += len(chunk)
        if meter.hold_from is not None:
            assert 0 <= meter.hold_from < fed  # the held-back event has been fed, so it lies within
    meter.on_end()
    if meter.hold_from is not None:
        assert 0 <= meter.hold_from < len(whole)
    _check_usage(meter.usage)
    for text in (meter.model, meter.requested_model, meter.error, meter.usage_error, meter.body_user):
        # Everything a meter hands to the ledger must be encodable as UTF-8 (SQLite, the spool).
        assert text is None or text.encode("utf-8")


@settings(max_examples=60, deadline=None, database=None)
@given(request=st.one_of(st.none(), st.dictionaries(st.sampled_from(["model", "messages", "tools", "input", "n",
                                                                        "prompt", "response_format", "functions"]),
                                                       json_like, max_size=5)),
       events=st.lists(_envelopes(json_like) | json_like, max_size=5),
       path=st.sampled_from(["/v1/chat/completions", "/v1/responses", "/v1/completions", "/v1/embeddings"]))
def test_counting_arbitrary_requests_and_outputs_never_raises(request: dict[str, Any] | None, events: list[Any],
                                                              path: str) -> None:
    output = StreamOutput()
    for event in events:
        output.feed(event)
    counted = count_call(CountPolicy(), path, "gpt-4o", request, output)
    usage = counted.usage()
    assert usage.prompt_tokens >= 0 and usage.completion_tokens >= 0


# --- stream editor -----------------------------------------------------------------------------

@FUZZ
@given(chunked(st.binary(max_size=300)), st.lists(st.integers(min_value=-5, max_value=400), max_size=20))
def test_editor_without_edits_sends_exactly_what_was_fed(case: tuple[bytes, list[bytes]],
                                                            untils: list[int]) -> None:
    whole, chunks = case
    editor = StreamEditor()
    out = bytearray()
    fed = 0
    for i, chunk in enumerate(chunks):
        editor.feed(chunk)
        fed += len(chunk)
        until = untils[i % len(untils)] if untils else fed
        out += editor.take(until, [])
        assert editor.sent == len(out) <= fed
    out += editor.take(len(whole), [])
    assert bytes(out) == whole


_chunk_objects = st.dictionaries(st.sampled_from(["id", "object", "model", "choices", "x"]), json_like,
                                 min_size=1, max_size=4)


@st.composite
def injected_stream(draw: st.DrawFn) -> tuple[bytes, bytes, list[Edit], list[int]]:
    """What the client must get, what the upstream sent given include_usage, the meter's edits, and the
    event boundaries (the only offsets the forwarder sends up to: `last_event_end`, `hold_from`)."""
    plain, sent, edits, ends = bytearray(), bytearray(), [], [0]
    for obj in draw(st.lists(_chunk_objects, max_size=6)):
        text = json.dumps(obj, separators=draw(st.sampled_from([(",", ":"), (", ", ": ")]))).encode()
        member = draw(st.sampled_from([b',"usage":null', b', "usage": null', b',"usage" :null']))
        start = len(sent)
        sent += b"data: " + text[:-1] + member + b"}\n\n"
        edits.append((start, len(sent), strip_usage_null))
        ends.append(len(sent))
        plain += b"data: " + text + b"\n\n"
    usage_only = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
    edits.append((len(sent), len(sent) + len(usage_only), drop))
    sent += usage_only
    ends.append(len(sent))
    sent += b"data: [DONE]\n\n"
    plain += b"data: [DONE]\n\n"
    ends.append(len(sent))
    return bytes(plain), bytes(sent), edits, ends


@FUZZ
@given(injected_stream(), st.data())
def test_editor_takes_out_exactly_what_injection_added(
        stream: tuple[bytes, bytes, list[Edit], list[int]], data: st.DataObject) -> None:
    plain, sent, edits, ends = stream
    cuts = sorted(data.draw(st.lists(st.integers(min_value=0, max_value=len(sent)), max_size=8)))
    points = [0, *cuts, len(sent)]
    editor = StreamEditor()
    out = bytearray()
    for a, b in pairwise(points):
        editor.feed(sent[a:b])
        event_end = data.draw(st.sampled_from([end for end in ends if end <= b]))
        out += editor.take(event_end, edits)
    out += editor.take(len(sent), edits)
    assert bytes(out) == plain
    assert edits == []  # every edit was applied, none left waiting


@FUZZ
@given(st.binary(max_size=200))
def test_strip_usage_null_leaves_other_bytes_alone(event: bytes) -> None:
    stripped = strip_usage_null(event)
    if b"null" not in event:
        assert stripped == event
    else:
        assert len(stripped) <= len(event)


@pytest.mark.parametrize("event", [b'data: {"a":1,"usage":null}\n\n', b'data: {"usage" : null , "a":1}\n\n'])
def test_strip_usage_null_examples(event: bytes) -> None:
    assert b"usage" not in strip_usage_null(event) and b'"a":1' in strip_usage_null(event)
