"""The bytes the benchmark exchanges: request bodies the load sends and responses the fake upstream serves.

Shaped like OpenAI's chat completions (JSON with usage; SSE chunks, an optional usage chunk, `[DONE]`), so
the proxy does the work it does in production. Everything is built once per process; nothing here does
I/O, and nothing here may depend on the proxy's code.
"""

from __future__ import annotations

import json

MODEL = "gpt-4o-mini"
SERVED_MODEL = "gpt-4o-mini-2024-07-18"
API_KEY = "sk-bench-0123456789abcdef0123456789abcdef"
CHAT_PATH = "/v1/chat/completions"
# Per-request knobs of the fake upstream; proxies forward them like any other header.
CHUNKS_HEADER = "X-Bench-Chunks"
INTERVAL_HEADER = "X-Bench-Interval-Ms"
STATUS_HEADER = "X-Bench-Status"  # the fake upstream answers this 4xx/5xx instead (an OpenAI error body)
DEFAULT_CHUNKS = 100

# Common English words: each is about one token with its leading space, so N words ~ N tokens.
_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had "
    "by word but not what all were we when your can said there use an each which she do how their if will "
    "up other about out many then them these so some her would make like him into time has look two more "
    "write go see number no way could people my than first water been call who oil its now find long down "
    "day did get come made may part over new sound take only little work know place year live me back give "
    "most very after thing our just name good sentence man think say great where help through much before "
    "line right too mean old any same tell boy follow came want show also around form three small set put "
    "end does another well large must big even such because turn here why ask went men read need land"
).split()


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def prompt_text(words: int) -> str:
    """A deterministic prompt of `words` words (~ the same number of tokens)."""
    n = len(_WORDS)
    return " ".join(_WORDS[(i * 7 + i // n) % n] for i in range(words))


def chat_request(*, stream: bool, include_usage: bool = False, prompt_words: int = 8) -> bytes:
    body: dict[str, object] = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": prompt_text(prompt_words)},
        ],
    }
    if stream:
        body["stream"] = True
        if include_usage:
            body["stream_options"] = {"include_usage": True}
    return _dumps(body)


def request_headers(extra: dict[str, str] | None = None) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}",
               "X-Meter-User": "bench"}
    headers.update(extra or {})
    return headers


def chat_response() -> bytes:
    """A non-streamed chat completion with usage (about 600 bytes, like a short real answer)."""
    return _dumps({
        "id": "chatcmpl-bench0000000000000000000001", "object": "chat.completion", "created": 1763800000,
        "model": SERVED_MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! How can I help you today?",
                                             "refusal": None, "annotations": []},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 19, "completion_tokens": 9, "total_tokens": 28,
                  "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                                "accepted_prediction_tokens": 0,
                                                "rejected_prediction_tokens": 0}},
        "service_tier": "default", "system_fingerprint": "fp_bench00001",
    })


def error_response(status: int) -> bytes:
    """An OpenAI-shaped error body, as the upstream sends with a 4xx/5xx."""
    return _dumps({"error": {"message": f"bench: the upstream was asked to answer {status}",
                             "type": "invalid_request_error", "param": None, "code": f"bench_{status}"}})


def _chunk(delta: dict[str, object], finish: str | None, with_usage_field: bool) -> bytes:
    obj: dict[str, object] = {
        "id": "chatcmpl-bench0000000000000000000002", "object": "chat.completion.chunk", "created": 1763800000,
        "model": SERVED_MODEL, "service_tier": "default", "system_fingerprint": "fp_bench00001",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if with_usage_field:
        obj["usage"] = None  # OpenAI sends "usage": null in every chunk once include_usage is asked for
    return b"data: " + _dumps(obj) + b"\n\n"


def stream_chunks(count: int, include_usage: bool) -> list[bytes]:
    """`count` SSE chunks (role, content tokens, finish), then a usage chunk if asked, then [DONE]."""
    count = max(count, 2)
    chunks = [_chunk({"role": "assistant", "content": "", "refusal": None}, None, include_usage)]
    words = _WORDS
    for i in range(count - 2):
        chunks.append(_chunk({"content": " " + words[i % len(words)]}, None, include_usage))
    chunks.append(_chunk({}, "stop", include_usage))
    if include_usage:
        usage = {"prompt_tokens": 19, "completion_tokens": count - 2, "total_tokens": 17 + count,
                 "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                 "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                               "accepted_prediction_tokens": 0,
                                               "rejected_prediction_tokens": 0}}
        obj = {"id": "chatcmpl-bench0000000000000000000002", "object": "chat.completion.chunk",
               "created": 1763800000, "model": SERVED_MODEL, "service_tier": "default",
               "system_fingerprint": "fp_bench00001", "choices": [], "usage": usage}
        chunks.append(b"data: " + _dumps(obj) + b"\n\n")
    chunks.append(b"data: [DONE]\n\n")
    return chunks


DONE = b"data: [DONE]\n\n"
