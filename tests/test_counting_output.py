"""Counting completion tokens from streamed chunks: real OpenAI streams with known usage, and synthetic ones.

The real streams are the openai-python SDK's recorded gpt-4o streams (kept in the shared reference folder,
read at test time); their final usage chunk is what the counts are checked against, never fed.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.counting import StreamOutput, count_text, get_encoding
from tests.conftest import CAPTURES as STREAMS

O200K = get_encoding("o200k_base")


def read_stream(prefix: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The parsed chunks of a captured stream, without its usage chunk, and that usage."""
    found = sorted(STREAMS.glob(f"{prefix}*.sse")) if STREAMS.is_dir() else []
    if not found:
        pytest.skip(f"captured stream {prefix}… not available under {STREAMS}")
    chunks, usage = [], None
    for event in found[0].read_text().split("\n\n"):
        if event.startswith("data: ") and event != "data: [DONE]":
            chunk = json.loads(event[len("data: "):])
            if chunk.get("usage"):
                usage = chunk["usage"]
            else:
                chunks.append(chunk)
    assert usage is not None
    return chunks, usage


def counted(chunks: list[dict[str, Any]], **options: Any) -> Any:
    output = StreamOutput()
    for chunk in chunks:
        output.feed(chunk)
    return output.count(O200K, **options)


# (capture, what it holds) -> how close the count must be to the API's completion_tokens
CAPTURES = [
    ("e2aad469b71d", "text", 0),
    ("7e5ea4d12e7c", "json text", 0),
    ("a491adda08c3", "n=3, summed", 0),
    ("4cc50a6135d2", "cut at max_tokens=1", 0),
    ("83b060bae42e", "text with logprobs", 0),
    ("d61558011839", "long json_object text", 0),
    ("173417d55340", "refusal", 0),
    ("569c877e6942", "refusal with logprobs", 0),
    ("2018feb66ae1", "one tool call", 0),
    ("a247c49c5fcd", "one strict tool call", 0),
    ("c6aa7e397b71", "one pydantic tool call", 0),
    ("f82268f2fefd", "two parallel tool calls", 2),
]


@pytest.mark.parametrize(("prefix", "holds", "tolerance"), CAPTURES, ids=[c[1] for c in CAPTURES])
def test_real_streams_count_like_the_api(prefix: str, holds: str, tolerance: int) -> None:
    chunks, usage = read_stream(prefix)
    count = counted(chunks)
    assert abs(count.tokens - usage["completion_tokens"]) <= tolerance, (holds, count)
    assert count.lower_bound is False


def test_text_and_single_calls_are_exact_parallel_calls_flagged() -> None:
    assert counted(read_stream("e2aad469b71d")[0]).approximate is False
    assert counted(read_stream("2018feb66ae1")[0]).approximate is False
    parallel = counted(read_stream("f82268f2fefd")[0])
    assert parallel.approximate and "parallel tool calls estimated" in parallel.notes


def test_a_reasoning_model_gives_a_lower_bound() -> None:
    count = counted(read_stream("e2aad469b71d")[0], reasoning_model=True)
    assert count.tokens == 30 and count.lower_bound and count.approximate


def test_a_stand_in_encoding_makes_the_count_approximate() -> None:
    count = counted(read_stream("83b060bae42e")[0], exact_encoding=False)
    assert count.tokens == 2 and count.approximate


# --- synthetic chunks ----------------------------------------------------------------------------------


def chat(index: int = 0, **delta: Any) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "choices": [{"index": index, "delta": delta, "finish_reason": None}]}


def n(text: str) -> int:
    return count_text(O200K, text)


def test_choices_are_counted_apart_then_summed() -> None:
    # Joined across choices, "Hel"+"lo" would merge into one token; per choice they don't.
    chunks = [chat(0, content="Hel"), chat(1, content="lo"), chat(0, content="lo world"), chat(1, content=" there")]
    assert counted(chunks).tokens == n("Hello world") + n("lo there")


def test_refusal_costs_its_text_plus_one_per_choice() -> None:
    chunks = [chat(0, refusal="I can't"), chat(1, refusal="No."), chat(0, refusal=" help with that.")]
    assert counted(chunks).tokens == n("I can't help with that.") + 1 + n("No.") + 1


def test_tool_calls_per_choice_and_index_with_their_overhead() -> None:
    chunks = [
        chat(0, tool_calls=[{"index": 0, "id": "call_a", "type": "function",
                             "function": {"name": "get_weather", "arguments": ""}}]),
        chat(1, tool_calls=[{"index": 0, "id": "call_b", "type": "function",
                             "function": {"name": "get_time", "arguments": "{\"tz\":"}}]),
        chat(0, tool_calls=[{"index": 0, "function": {"arguments": "{\"city\":\"Oslo\"}"}}]),
        chat(1, tool_calls=[{"index": 0, "function": {"arguments": "\"UTC\"}"}}]),
    ]
    count = counted(chunks)
    expected = n("get_weather") + n("{\"city\":\"Oslo\"}") + 7 + n("get_time") + n("{\"tz\":\"UTC\"}") + 7
    assert count.tokens == expected and not count.approximate  # one call per choice: not parallel


def test_tool_call_fragments_without_index_follow_their_id() -> None:
    chunks = [
        chat(tool_calls=[{"id": "call_1", "function": {"name": "a", "arguments": "{\"x\":"}}]),
        chat(tool_calls=[{"function": {"arguments": "1}"}}]),
        chat(tool_calls=[{"id": "call_2", "function": {"name": "b", "arguments": "{}"}}]),
    ]
    assert counted(chunks).tokens == n("a") + n("{\"x\":1}") + 7 + n("b") + n("{}") + 7 + 8


def test_legacy_function_call_is_counted_and_flagged() -> None:
    chunks = [chat(function_call={"name": "lookup", "arguments": ""}), chat(function_call={"arguments": "{\"q\":1}"})]
    count = counted(chunks)
    assert count.tokens == n("lookup") + n("{\"q\":1}") + 7
    assert "function_call estimated" in count.notes


def test_legacy_completion_chunks() -> None:
    chunks = [{"object": "text_completion", "choices": [{"index": i, "text": t}]}
              for i, t in [(0, "Once upon"), (1, "In a"), (0, " a time"), (1, " galaxy")]]
    assert counted(chunks).tokens == n("Once upon a time") + n("In a galaxy")


def test_visible_reasoning_is_counted_and_lifts_the_lower_bound() -> None:
    chunks = [chat(reasoning_content="Let me think."), chat(reasoning_content=" Done."), chat(content="42")]
    count = counted(chunks, reasoning_model=True)
    assert count.reasoning_tokens == n("Let me think. Done.")
    assert count.tokens == count.reasoning_tokens + n("42")
    assert count.lower_bound is False
    other_name = counted([chat(reasoning="Hmm."), chat(content="ok")])
    assert other_name.reasoning_tokens == n("Hmm.")


def test_a_whole_chat_completion_body_can_be_fed() -> None:
    body = {"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi!"}}]}
    assert counted([body]).tokens == n("Hi!")


def test_audio_output_is_noted_not_counted() -> None:
    count = counted([chat(audio={"id": "audio_1", "transcript": "hello"}), chat(content="hi")])
    assert count.tokens == n("hi") and "audio output not counted" in count.notes


@pytest.mark.parametrize("junk", [
    None, "text", 3, [], {"choices": "x"}, {"choices": [None, 1, {"delta": "x"}]},
    {"choices": [{"index": {"a": 1}, "delta": {"content": 5, "tool_calls": [None, {"function": "x"}]}}]},
    {"type": "response.output_text.delta", "item_id": ["x"], "delta": None},
    {"type": "response.output_item.added", "item": "x"},
])
def test_odd_chunks_are_ignored(junk: Any) -> None:
    count = counted([junk, chat(content="fine")])
    assert count.tokens == n("fine")


# --- Responses API events --------------------------------------------------------------------------------


def event(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "sequence_number": 1, **fields}


def test_responses_stream_text_refusal_calls_and_summaries() -> None:
    events = [
        event("response.created", response={"id": "resp_1", "usage": None}),
        event("response.reasoning_summary_text.delta", item_id="rs_1", output_index=0, summary_index=0, delta="Plan"),
        event("response.reasoning_summary_text.done", item_id="rs_1", output_index=0, summary_index=0, text="Plan"),
        event("response.output_text.delta", item_id="msg_1", output_index=1, content_index=0, delta="Hi"),
        event("response.output_text.delta", item_id="msg_1", output_index=1, content_index=0, delta=" there!"),
        event("response.output_text.done", item_id="msg_1", output_index=1, content_index=0, text="Hi there!"),
        event("response.refusal.delta", item_id="msg_1", output_index=1, content_index=1, delta="No."),
        event("response.output_item.added", output_index=2,
              item={"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
                    "arguments": ""}),
        event("response.function_call_arguments.delta", item_id="fc_1", output_index=2, delta="{\"city\":"),
        event("response.function_call_arguments.delta", item_id="fc_1", output_index=2, delta="\"Rome\"}"),
        event("response.function_call_arguments.done", item_id="fc_1", output_index=2, arguments="{\"city\":\"Rome\"}"),
    ]
    count = counted(events, reasoning_model=True)
    text = n("Hi there!") + n("No.") + 1 + n("get_weather") + n("{\"city\":\"Rome\"}") + 7
    assert count.reasoning_tokens == n("Plan")
    assert count.tokens == text + n("Plan")
    assert count.lower_bound  # a summary is not the reasoning
    assert count.approximate and "Responses API output framing assumed to be chat's" in count.notes


def test_non_streamed_response_body_counts_as_its_stream_does() -> None:
    # The same answer as test_responses_stream_text_refusal_calls_and_summaries, as one JSON Response.
    body = {
        "id": "resp_1", "object": "response", "status": "completed", "model": "o4-mini",
        "output": [
            {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Plan"}]},
            {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
             "content": [{"type": "output_text", "text": "Hi there!", "annotations": []},
                         {"type": "refusal", "refusal": "No."}]},
            {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
             "arguments": "{\"city\":\"Rome\"}"},
        ],
        "usage": {"input_tokens": 20, "output_tokens": 30, "total_tokens": 50},
    }  # fmt: skip
    count = counted([body], reasoning_model=True)
    text = n("Hi there!") + n("No.") + 1 + n("get_weather") + n("{\"city\":\"Rome\"}") + 7
    assert (count.tokens, count.reasoning_tokens) == (text + n("Plan"), n("Plan"))
    assert count.lower_bound and "Responses API output framing assumed to be chat's" in count.notes


def test_responses_done_events_fill_in_when_no_deltas_came() -> None:
    events = [
        event("response.output_text.done", item_id="msg_1", output_index=0, content_index=0, text="All at once."),
        event("response.output_item.added", output_index=1, item={"type": "function_call", "id": "fc_9", "name": "f"}),
        event("response.function_call_arguments.done", item_id="fc_9", output_index=1, arguments="{}"),
        event("response.reasoning_text.done", item_id="rs_1", output_index=2, content_index=0, text="Thinking."),
    ]
    count = counted(events, reasoning_model=True)
    assert count.tokens == n("All at once.") + n("f") + n("{}") + 7 + n("Thinking.")
    assert count.lower_bound is False  # full reasoning text was shown


def test_count_can_be_asked_twice() -> None:
    output = StreamOutput()
    output.feed(chat(content="Hello"))
    first = output.count(O200K)
    output.feed(chat(content=" world"))
    assert (first.tokens, output.count(O200K).tokens) == (n("Hello"), n("Hello world"))
