"""Building upstream SSE streams and reading the captured real ones."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from tests.support import Reply
from tests.support.paths import CAPTURES

KEY = "sk-test-key-0001"


KEY_ID = hashlib.sha256(KEY.encode()).hexdigest()[:16]


def sse(*events: Any, done: bool = True, event_names: bool = False) -> bytes:
    out = b""
    for e in events:
        if event_names:
            out += b"event: " + e["type"].encode() + b"\n"
        out += b"data: " + json.dumps(e).encode() + b"\n\n"
    return out + (b"data: [DONE]\n\n" if done else b"")


def chunk(model: str = "gpt-4o-2024-08-06", content: str | None = "x", **extra: Any) -> dict[str, Any]:
    choices = [] if content is None else [{"index": 0, "delta": {"content": content}, "finish_reason": None}]
    return {"id": "c1", "object": "chat.completion.chunk", "model": model, "choices": choices, **extra}


def capture(name: str) -> bytes:
    path = CAPTURES / name
    if not path.exists():
        pytest.skip(f"real captures not found at {CAPTURES}")
    return path.read_bytes()


USAGE = {"prompt_tokens": 21, "completion_tokens": 3, "total_tokens": 24,
         "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
         "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                       "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}


def openai_like(body: bytes) -> bytes:
    """The stream OpenAI sends for this request: usage members and chunk only when include_usage is asked."""
    req = json.loads(body)
    asked = (req.get("stream_options") or {}).get("include_usage") is True
    legacy = "prompt" in req
    out = b""
    pieces = ["Hé", "llo", " 日本"]
    for i, text in enumerate(pieces):
        choice: dict[str, Any] = ({"text": text, "index": 0, "logprobs": None, "finish_reason": None} if legacy
                                  else {"index": 0, "delta": {"content": text}, "logprobs": None,
                                        "finish_reason": None})
        chunk: dict[str, Any] = {"id": "x1", "object": "text_completion" if legacy else "chat.completion.chunk",
                                 "created": 1, "model": "gpt-4o-mini-2024-07-18", "service_tier": "default",
                                 "system_fingerprint": "fp_1", "choices": [choice]}
        if asked:
            chunk["usage"] = None
        chunk["obfuscation"] = "pad" * (i + 1)
        out += b"data: " + json.dumps(chunk, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"
    if asked:
        last = {"id": "x1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini-2024-07-18",
                "choices": [], "usage": USAGE, "obfuscation": "zz"}
        out += b"data: " + json.dumps(last, separators=(",", ":")).encode() + b"\n\n"
    return out + b"data: [DONE]\n\n"


CHAT = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


# --- a scripted upstream for process tests (crash, replicas): slow streams, plain answers after a pause ----
SMALL_USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


def stream_body(parts: int = 8) -> bytes:
    chunks = [b'data: {"model":"gpt-4o","choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'] * parts
    tail = b'data: {"model":"gpt-4o","choices":[],"usage":' + json.dumps(SMALL_USAGE).encode() + b"}\n\n"
    return b"".join(chunks) + tail + b"data: [DONE]\n\n"


def scripted(body: bytes, *, parts: int = 8, plain_pause: float = 0.1) -> Reply:
    """Streams in slow chunks (many calls in flight at a kill), plain answers after `plain_pause`."""
    if json.loads(body).get("stream"):
        whole = stream_body(parts)
        return Reply(headers={"Content-Type": "text/event-stream"}, pause=0.03,
                     chunks=[whole[i:i + 90] for i in range(0, len(whole), 90)])
    return Reply(headers={"Content-Type": "application/json"}, pause_before=plain_pause, content_length=True,
                 chunks=[json.dumps({"id": "c", "object": "chat.completion", "created": 1, "model": "gpt-4o",
                                     "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                         "role": "assistant", "content": "hi"}}], "usage": SMALL_USAGE}).encode()])
