"""Usage extraction: every shape OpenAI and the OpenAI-compatible providers send, and malformed ones.

Fixtures are written for this project, modelled on the shapes described in the reference notes."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from proxy.core.record import Usage
from proxy.metering.usage import UnreadableUsage, chat_usage, parse_usage, responses_usage, served_model


def chunk(**fields: Any) -> dict[str, Any]:
    """A chat completion chunk around the given fields."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 1760000000,
        "model": "gpt-test-2026-01-01",
        "choices": [],
        **fields,
    }


def response_event(kind: str, usage: object, model: str = "gpt-resp-2026-02-02") -> dict[str, Any]:
    return {
        "type": kind,
        "sequence_number": 9,
        "response": {"id": "resp_test", "object": "response", "model": model, "usage": usage},
    }


GROQ_USAGE = {
    "queue_time": 0.0312,
    "prompt_tokens": 52,
    "prompt_time": 0.0041,
    "completion_tokens": 418,
    "completion_time": 1.7,
    "total_tokens": 470,
    "total_time": 1.7041,
}

Extractor = Callable[[object], "Usage | None"]

# Expected values read Usage(prompt, completion, cached, reasoning, total).
CASES: list[tuple[str, Extractor, object, Usage | None]] = [
    (
        "openai chat, all details",
        chat_usage,
        {
            "object": "chat.completion",
            "model": "gpt-test",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {
                "prompt_tokens": 2310,
                "completion_tokens": 95,
                "total_tokens": 2405,
                "prompt_tokens_details": {"cached_tokens": 2048, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": 64,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            },
        },
        Usage(2310, 95, 2048, 64, 2405),
    ),
    (
        "openai chat, no details",
        chat_usage,
        {"object": "chat.completion", "usage": {"prompt_tokens": 21, "completion_tokens": 9, "total_tokens": 30}},
        Usage(21, 9, 0, 0, 30),
    ),
    (
        "openai chat chunk, 2024 shape",
        chat_usage,
        chunk(usage={"prompt_tokens": 17, "completion_tokens": 33, "total_tokens": 50,
                     "completion_tokens_details": {"reasoning_tokens": 0}}),
        Usage(17, 33, 0, 0, 50),
    ),
    (
        "openai chat chunk, 2026 shape with text/image details",
        chat_usage,
        chunk(usage={"prompt_tokens": 40, "completion_tokens": 5, "total_tokens": 45,
                     "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0, "text_tokens": 40,
                                               "image_tokens": 0, "cache_write_tokens": 0},
                     "completion_tokens_details": {"reasoning_tokens": 0, "text_tokens": 5}}),
        Usage(40, 5, 0, 0, 45),
    ),
    ("chat chunk, usage null", chat_usage, chunk(usage=None), None),
    ("chat chunk, no usage key", chat_usage, chunk(), None),
    (
        "legacy completion",
        chat_usage,
        {"object": "text_completion", "choices": [{"text": "x", "index": 0}],
         "usage": {"prompt_tokens": 6, "completion_tokens": 8, "total_tokens": 14}},
        Usage(6, 8, 0, 0, 14),
    ),
    (
        "embeddings",
        chat_usage,
        {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2]}],
         "model": "text-embedding-test", "usage": {"prompt_tokens": 11, "total_tokens": 11}},
        Usage(11, 0, 0, 0, 11),
    ),
    (
        "responses, with cache_write_tokens",
        responses_usage,
        {"object": "response", "model": "gpt-resp", "usage": {
            "input_tokens": 3100, "input_tokens_details": {"cached_tokens": 2944, "cache_write_tokens": 128},
            "output_tokens": 700, "output_tokens_details": {"reasoning_tokens": 512}, "total_tokens": 3800}},
        Usage(3100, 700, 2944, 512, 3800),
    ),
    (
        "responses, without cache_write_tokens",
        responses_usage,
        {"object": "response", "usage": {
            "input_tokens": 120, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 31, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 151}},
        Usage(120, 31, 0, 0, 151),
    ),
    (
        "responses, without input_tokens_details",
        responses_usage,
        {"object": "response", "usage": {
            "input_tokens": 44, "output_tokens": 13, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 57}},
        Usage(44, 13, 0, 0, 57),
    ),
    (
        "responses stream, completed event",
        responses_usage,
        response_event("response.completed", {
            "input_tokens": 200, "input_tokens_details": {"cached_tokens": 128},
            "output_tokens": 90, "output_tokens_details": {"reasoning_tokens": 40}, "total_tokens": 290}),
        Usage(200, 90, 128, 40, 290),
    ),
    ("responses stream, created event", responses_usage, response_event("response.created", None), None),
    (
        "responses stream, delta event",
        responses_usage,
        {"type": "response.output_text.delta", "sequence_number": 4, "delta": "Hi"},
        None,
    ),
    ("responses stream, null response", responses_usage, {"type": "error", "response": None}, None),
    (
        "groq finish chunk, usage and x_groq.usage",
        chat_usage,
        chunk(choices=[{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
              x_groq={"id": "req_test", "usage": dict(GROQ_USAGE)}, usage=dict(GROQ_USAGE)),
        Usage(52, 418, 0, 0, 470),
    ),
    (
        "groq reasoning model",
        chat_usage,
        chunk(usage={**GROQ_USAGE, "completion_tokens_details": {"reasoning_tokens": 300}}),
        Usage(52, 418, 0, 300, 470),
    ),
    (
        "older groq, x_groq.usage only",
        chat_usage,
        chunk(choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}],
              x_groq={"id": "req_test",
                      "usage": {"prompt_tokens": 18, "completion_tokens": 7, "total_tokens": 25}}),
        Usage(18, 7, 0, 0, 25),
    ),
    ("groq first chunk, x_groq without usage", chat_usage, chunk(x_groq={"id": "req_test", "seed": 42}), None),
    (
        "vllm, prompt_tokens_details",
        chat_usage,
        chunk(usage={"prompt_tokens": 301, "total_tokens": 333, "completion_tokens": 32,
                     "prompt_tokens_details": {"cached_tokens": 256}}),
        Usage(301, 32, 256, 0, 333),
    ),
    (
        "vllm, prompt_tokens_details null",
        chat_usage,
        chunk(usage={"prompt_tokens": 301, "total_tokens": 301, "completion_tokens": 0,
                     "prompt_tokens_details": None}),
        Usage(301, 0, 0, 0, 301),
    ),
    (
        "deepseek, details and cache hit fields",
        chat_usage,
        chunk(usage={"prompt_tokens": 90, "completion_tokens": 250, "total_tokens": 340,
                     "prompt_tokens_details": {"cached_tokens": 64},
                     "prompt_cache_hit_tokens": 64, "prompt_cache_miss_tokens": 26}),
        Usage(90, 250, 64, 0, 340),
    ),
    (
        "deepseek, cache hit field only",
        chat_usage,
        chunk(usage={"prompt_tokens": 90, "completion_tokens": 250, "total_tokens": 340,
                     "prompt_cache_hit_tokens": 80, "prompt_cache_miss_tokens": 10}),
        Usage(90, 250, 80, 0, 340),
    ),
    (
        "xai, reasoning outside completion",
        chat_usage,
        chunk(usage={"prompt_tokens": 20, "completion_tokens": 4, "total_tokens": 524,
                     "prompt_tokens_details": {"text_tokens": 20, "audio_tokens": 0, "image_tokens": 0,
                                               "cached_tokens": 16},
                     "completion_tokens_details": {"reasoning_tokens": 500, "audio_tokens": 0,
                                                   "accepted_prediction_tokens": 0,
                                                   "rejected_prediction_tokens": 0},
                     "num_sources_used": 0, "cost_in_usd_ticks": 2000000}),
        Usage(20, 504, 16, 500, 524),
    ),
    (
        "openai reasoning inside completion is left alone",
        chat_usage,
        chunk(usage={"prompt_tokens": 20, "completion_tokens": 504, "total_tokens": 524,
                     "completion_tokens_details": {"reasoning_tokens": 500}}),
        Usage(20, 504, 0, 500, 524),
    ),
    (
        "azure deepseek, top-level reasoning, null details",
        chat_usage,
        chunk(usage={"prompt_tokens": 33, "completion_tokens": 150, "total_tokens": 183,
                     "prompt_tokens_details": None, "completion_tokens_details": None, "reasoning_tokens": 120}),
        Usage(33, 150, 0, 120, 183),
    ),
    (
        "azure deepseek, zero reasoning",
        chat_usage,
        chunk(usage={"prompt_tokens": 33, "completion_tokens": 150, "total_tokens": 183,
                     "prompt_tokens_details": None, "reasoning_tokens": 0}),
        Usage(33, 150, 0, 0, 183),
    ),
    (
        "ollama",
        chat_usage,
        chunk(usage={"prompt_tokens": 27, "completion_tokens": 61, "total_tokens": 88}),
        Usage(27, 61, 0, 0, 88),
    ),
    (
        "llama.cpp final chunk with timings",
        chat_usage,
        chunk(usage={"completion_tokens": 45, "prompt_tokens": 80, "total_tokens": 125},
              timings={"prompt_n": 80, "prompt_ms": 51.2, "predicted_n": 45, "predicted_ms": 700.5}),
        Usage(80, 45, 0, 0, 125),
    ),
    (
        "total missing",
        chat_usage,
        chunk(usage={"prompt_tokens": 12, "completion_tokens": 3}),
        Usage(12, 3, 0, 0, 15),
    ),
    (
        "integral floats",
        chat_usage,
        chunk(usage={"prompt_tokens": 12.0, "completion_tokens": 3.0, "total_tokens": 15.0}),
        Usage(12, 3, 0, 0, 15),
    ),
    ("not a dict", chat_usage, ["usage"], None),
    ("responses, not a dict", responses_usage, "response", None),
]


@pytest.mark.parametrize(("extract", "body", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_extracts_usage(extract: Extractor, body: object, expected: Usage | None) -> None:
    assert extract(body) == expected


def test_parse_usage_of_none_is_none() -> None:
    assert parse_usage(None) is None


MALFORMED: list[tuple[str, object]] = [
    ("usage is a string", "12"),
    ("usage is a list", [{"prompt_tokens": 1}]),
    ("usage is a number", 12),
    ("empty object", {}),
    ("neither prompt nor input tokens", {"completion_tokens": 3, "total_tokens": 3}),
    ("prompt tokens null", {"prompt_tokens": None, "completion_tokens": 3}),
    ("count is a string", {"prompt_tokens": "12", "completion_tokens": 3}),
    ("completion is a string", {"prompt_tokens": 12, "completion_tokens": "3"}),
    ("count is a bool", {"prompt_tokens": True, "completion_tokens": 3}),
    ("completion is a bool", {"prompt_tokens": 12, "completion_tokens": False}),
    ("count is a list", {"prompt_tokens": [12], "completion_tokens": 3}),
    ("count is a dict", {"input_tokens": {"n": 1}, "output_tokens": 3}),
    ("count is fractional", {"prompt_tokens": 12.5, "completion_tokens": 3}),
    ("count is infinite", {"prompt_tokens": float("inf"), "completion_tokens": 3}),
    ("count is nan", {"prompt_tokens": float("nan"), "completion_tokens": 3}),
    ("negative prompt", {"prompt_tokens": -1, "completion_tokens": 3}),
    ("negative completion", {"prompt_tokens": 1, "completion_tokens": -3}),
    ("negative total", {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": -4}),
    ("negative output", {"input_tokens": 1, "output_tokens": -3}),
    ("negative cached", {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": -1}}),
    ("bool cached", {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": True}}),
    ("string reasoning", {"input_tokens": 10, "output_tokens": 5,
                          "output_tokens_details": {"reasoning_tokens": "2"}}),
    ("details is a list", {"prompt_tokens": 10, "prompt_tokens_details": [{"cached_tokens": 1}]}),
    ("details is a string", {"input_tokens": 10, "input_tokens_details": "none"}),
    ("cached > prompt", {"prompt_tokens": 10, "completion_tokens": 1,
                         "prompt_tokens_details": {"cached_tokens": 11}}),
    ("cache hit > prompt", {"prompt_tokens": 10, "completion_tokens": 1, "prompt_cache_hit_tokens": 11}),
    ("responses cached > input", {"input_tokens": 10, "output_tokens": 1,
                                  "input_tokens_details": {"cached_tokens": 99}}),
    (
        "reasoning > completion and not xAI-shaped",
        {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11,
         "completion_tokens_details": {"reasoning_tokens": 5}},
    ),
]


@pytest.mark.parametrize("raw", [m[1] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_usage_raises_unreadable(raw: object) -> None:
    with pytest.raises(UnreadableUsage):
        parse_usage(raw)


@pytest.mark.parametrize(
    ("extract", "body"),
    [
        (chat_usage, chunk(usage="lots")),
        (chat_usage, chunk(usage=[1, 2])),
        (chat_usage, {"x_groq": {"usage": {"prompt_tokens": -5}}}),
        (responses_usage, response_event("response.completed", {"input_tokens": "3"})),
        (responses_usage, {"object": "response", "usage": 7}),
    ],
    ids=["chat string", "chat list", "groq negative", "responses event string", "responses number"],
)
def test_extractors_raise_unreadable_on_malformed_usage(extract: Extractor, body: object) -> None:
    with pytest.raises(UnreadableUsage):
        extract(body)


def test_unreadable_usage_is_a_value_error() -> None:
    assert issubclass(UnreadableUsage, ValueError)


@pytest.mark.parametrize("seed", range(5))
def test_random_usage_objects_raise_nothing_but_unreadable(seed: int) -> None:
    rng = random.Random(seed)
    keys = ["prompt_tokens", "completion_tokens", "total_tokens", "input_tokens", "output_tokens",
            "prompt_tokens_details", "completion_tokens_details", "input_tokens_details", "output_tokens_details",
            "cached_tokens", "reasoning_tokens", "prompt_cache_hit_tokens"]
    values: list[object] = [None, 0, 1, 7, 1000, -1, 2.0, 2.5, True, "3", [], {}, float("nan"), 10**30]
    read = 0
    for _ in range(2000):
        raw: dict[str, object] = {}
        for key in rng.sample(keys, rng.randint(0, 6)):
            raw[key] = {"cached_tokens": rng.choice(values), "reasoning_tokens": rng.choice(values)} if (
                key.endswith("_details") and rng.random() < 0.7) else rng.choice(values)
        try:
            usage = parse_usage(raw)
        except UnreadableUsage:
            continue
        assert usage is not None
        read += 1
        assert min(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, usage.reasoning_tokens) >= 0
        assert usage.cached_tokens <= usage.prompt_tokens
        assert usage.reasoning_tokens <= usage.completion_tokens
    assert read > 50  # the generator must produce readable objects too, or this proves little


SERVED: list[tuple[str, object, str | None]] = [
    ("chat chunk", chunk(), "gpt-test-2026-01-01"),
    ("azure first chunk, empty model", {"choices": [], "created": 0, "id": "", "model": "", "object": ""}, None),
    ("no model", {"object": "list"}, None),
    ("model not a string", {"model": 4}, None),
    ("responses event", response_event("response.completed", None), "gpt-resp-2026-02-02"),
    ("responses event, empty model", response_event("response.created", None, model=""), None),
    ("response object", {"object": "response", "model": "gpt-resp"}, "gpt-resp"),
    ("not a dict", "gpt-test", None),
    ("responses envelope not a dict", {"type": "error", "response": "x"}, None),
]


@pytest.mark.parametrize(("body", "expected"), [s[1:] for s in SERVED], ids=[s[0] for s in SERVED])
def test_served_model(body: object, expected: str | None) -> None:
    assert served_model(body) == expected
