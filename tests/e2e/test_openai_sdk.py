"""The official openai SDK, sync and async, stream and not, pointed at the proxy and nothing else."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from typing import Callable, Iterator

import openai
import pytest

from tests.support import FakeUpstream, ProxyServer
from tests.support.streams import KEY, KEY_ID, capture, chunk, sse

WEATHER = "e2aad469b71d1d4894ff833ea147020a9d875eb7ce644a0ff355581690a4cbfd.sse"  # 14 / 30 / 44
MESSAGES = [{"role": "user", "content": "What's the weather like in SF?"}]


_clients: list[openai.OpenAI] = []


def client(proxy: ProxyServer) -> openai.OpenAI:
    made = openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEY, max_retries=0)
    _clients.append(made)
    return made


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


@pytest.fixture
def any_proxy(start_proxy: Callable[..., ProxyServer], ledger_target: str) -> ProxyServer:
    """The proxy on each backend: its ledger a SQLite file, then a PostgreSQL schema."""
    return start_proxy(db=ledger_target)


def money(value: object) -> str:
    """A stored cost as the exact text SQLite keeps (PostgreSQL's NUMERIC comes back as a Decimal)."""
    return format(value, "f") if isinstance(value, Decimal) else str(value)


def test_sync_chat(upstream: FakeUpstream, any_proxy: ProxyServer) -> None:
    proxy = any_proxy
    upstream.json({"id": "chatcmpl-9", "object": "chat.completion", "created": 1, "model": "gpt-4o-2024-08-06",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": "Sunny."},
                                "finish_reason": "stop", "logprobs": None}],
                   "usage": {"prompt_tokens": 14, "completion_tokens": 2, "total_tokens": 16}})
    out = client(proxy).chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                                extra_headers={"X-Meter-User": "alice"})
    assert out.choices[0].message.content == "Sunny."
    assert out.usage is not None and out.usage.total_tokens == 16
    (row,) = proxy.rows()
    assert (row["user"], row["key_id"], row["total_tokens"], money(row["cost_usd"])) == ("alice", KEY_ID, 16, "0.000055")
    assert json.loads(upstream.seen[-1].body)["messages"] == MESSAGES


def test_sync_stream_real_capture(upstream: FakeUpstream, any_proxy: ProxyServer) -> None:
    proxy = any_proxy
    upstream.sse(capture(WEATHER), chunk_size=50)
    stream = client(proxy).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True,
                                                   stream_options={"include_usage": True})
    text, usage = "", None
    for part in stream:
        if part.choices:
            text += part.choices[0].delta.content or ""
        if part.usage:
            usage = part.usage
    # The SDK ends its loop at [DONE]; the row was committed before that reached it.
    assert proxy.rows()[-1]["total_tokens"] == 44
    assert text and usage is not None and usage.total_tokens == 44
    (row,) = proxy.rows()
    assert (row["prompt_tokens"], row["completion_tokens"], row["stream"]) == (14, 30, 1)
    assert row["model"] == "gpt-4o-2024-08-06" and money(row["cost_usd"]) == "0.000335"


def test_async_chat_stream_and_embeddings(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    async def run() -> tuple[str, int]:
        aclient = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=KEY, max_retries=0)
        upstream.sse(sse(chunk("gpt-4o-mini", "Hel"), chunk("gpt-4o-mini", "lo"),
                         chunk("gpt-4o-mini", None,
                               usage={"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11})))
        text = ""
        async with await aclient.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                         stream=True) as stream:
            async for part in stream:
                if part.choices:
                    text += part.choices[0].delta.content or ""
        upstream.json({"object": "list", "model": "text-embedding-3-small",
                       "data": [{"object": "embedding", "index": 0, "embedding": [0.5, 0.25]}],
                       "usage": {"prompt_tokens": 4, "total_tokens": 4}})
        emb = await aclient.embeddings.create(model="text-embedding-3-small", input="hello",
                                              encoding_format="float")
        await aclient.close()
        return text, len(emb.data[0].embedding)

    text, dims = asyncio.run(run())
    assert (text, dims) == ("Hello", 2)
    chat_row, emb_row = proxy.rows()[-2:]
    assert (chat_row["total_tokens"], chat_row["stream"], chat_row["model"]) == (11, 1, "gpt-4o-mini")
    assert (emb_row["endpoint"], emb_row["prompt_tokens"], emb_row["cost_usd"]) == ("/v1/embeddings", 4,
                                                                                    "0.00000008")


def test_responses_stream(upstream: FakeUpstream, proxy: ProxyServer) -> None:
    response = {"id": "resp_1", "object": "response", "created_at": 1, "model": "gpt-5-2025-08-07",
                "status": "in_progress", "output": [], "parallel_tool_calls": True, "tool_choice": "auto",
                "tools": [], "usage": None}
    done = {**response, "status": "completed", "usage": {
        "input_tokens": 37, "input_tokens_details": {"cached_tokens": 5}, "output_tokens": 11,
        "output_tokens_details": {"reasoning_tokens": 4}, "total_tokens": 48}}
    upstream.sse(sse({"type": "response.created", "sequence_number": 0, "response": response},
                     {"type": "response.output_text.delta", "sequence_number": 1, "item_id": "m", "output_index": 0,
                      "content_index": 0, "delta": "Hi", "logprobs": []},
                     {"type": "response.completed", "sequence_number": 2, "response": done},
                     done=False, event_names=True), chunk_size=31)
    events = [e.type for e in client(proxy).responses.create(model="gpt-5", input="hi", stream=True)]
    assert events == ["response.created", "response.output_text.delta", "response.completed"]
    row = proxy.rows()[-1]
    # (32 * 1.25 + 5 * 0.125 + 11 * 10) / 1e6
    assert (row["prompt_tokens"], row["cached_tokens"], row["reasoning_tokens"], row["cost_usd"]) == (
        37, 5, 4, "0.000150625")


def test_sdk_sees_upstream_error_and_proxy_errors(upstream: FakeUpstream, proxy: ProxyServer,
                                                  start_proxy: Callable[..., ProxyServer]) -> None:
    upstream.json({"error": {"message": "The model `nope` does not exist", "type": "invalid_request_error",
                             "param": None, "code": "model_not_found"}}, status=404)
    with pytest.raises(openai.NotFoundError) as err:
        client(proxy).chat.completions.create(model="nope", messages=MESSAGES)
    assert "does not exist" in str(err.value)
    assert proxy.rows()[-1]["error"] == "The model `nope` does not exist"
    dead = start_proxy(upstream="http://127.0.0.1:9")
    with pytest.raises(openai.InternalServerError) as err502:
        client(dead).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert err502.value.status_code == 502 and "Upstream unreachable" in str(err502.value)
