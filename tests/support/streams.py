"""Building upstream SSE streams and reading the captured real ones."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

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
