"""stream_usage: inject — exact usage from the upstream, and the client still gets the bytes it would have got."""

from __future__ import annotations

import json
from typing import Any, Callable

import pytest

from tests.support import FakeUpstream, ProxyServer, Reply, split
from tests.support.http import request
from tests.support.streams import CHAT, openai_like

LEGACY = {"model": "gpt-4o-mini", "stream": True, "prompt": "hi"}


@pytest.mark.parametrize("path,req", [
    ("/v1/chat/completions", CHAT),
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_obfuscation": True}}),
    ("/v1/completions", LEGACY),
    ("/v1/chat/completions", {"stream": True, "model": "gpt-4o-mini"}),
])
def test_inject_gives_exact_usage_and_the_clients_own_bytes(openai_upstream: FakeUpstream,
                                                             start_proxy: Callable[..., ProxyServer],
                                                             path: str, req: dict[str, Any]) -> None:
    proxy = start_proxy(stream_usage="inject")
    sent = json.dumps(req, indent=1).encode()
    status, _, got = request(proxy.url, path=path, body=sent, headers={"Accept-Encoding": "gzip"})
    assert status == 200
    assert got == openai_like(sent)  # exactly what the upstream sends when usage was not asked for
    forwarded = openai_upstream.seen[-1]
    assert json.loads(forwarded.body)["stream_options"]["include_usage"] is True
    assert {k: v for k, v in json.loads(forwarded.body).items() if k != "stream_options"} == {
        k: v for k, v in req.items() if k != "stream_options"}
    assert forwarded.headers["Accept-Encoding"] == "identity"
    row = proxy.rows()[-1]
    assert (row["usage_source"], row["prompt_tokens"], row["completion_tokens"]) == ("upstream", 21, 3)
    assert row["cost_usd"] == "0.00000495"  # 21 * 0.15 + 3 * 0.6 per 1M


@pytest.mark.parametrize("mode", ["count", "inject"])
def test_client_that_asked_for_usage_gets_the_upstream_bytes(openai_upstream: FakeUpstream,
                                                            start_proxy: Callable[..., ProxyServer],
                                                            mode: str) -> None:
    proxy = start_proxy(stream_usage=mode)
    sent = json.dumps({**CHAT, "stream_options": {"include_usage": True}}).encode()
    status, _, got = request(proxy.url, body=sent)
    assert status == 200 and got == openai_like(sent)
    assert openai_upstream.seen[-1].body == sent
    row = proxy.rows()[-1]
    assert (row["usage_source"], row["total_tokens"]) == ("upstream", 24)


def test_count_mode_never_changes_the_request(openai_upstream: FakeUpstream, proxy: ProxyServer) -> None:
    sent = json.dumps(CHAT).encode()
    status, _, got = request(proxy.url, body=sent, headers={"Accept-Encoding": "gzip, br"})
    assert status == 200 and got == openai_like(sent)
    assert openai_upstream.seen[-1].body == sent
    assert openai_upstream.seen[-1].headers["Accept-Encoding"] == "gzip, br"


def test_inject_holds_done_until_the_row_is_committed(openai_upstream: FakeUpstream,
                                                      start_proxy: Callable[..., ProxyServer]) -> None:
    import http.client

    proxy = start_proxy(stream_usage="inject")
    openai_upstream.handler = lambda body: Reply(headers={"Content-Type": "text/event-stream"},
                                                 chunks=split(openai_like(body), 5), pause_after=1.5)
    host, port = proxy.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(CHAT).encode())
        resp = conn.getresponse()
        seen = b""
        while b"[DONE]" not in seen:
            part = resp.read1(65536)
            assert part
            seen += part
        assert proxy.rows()[-1]["total_tokens"] == 24
        assert seen + resp.read() == openai_like(json.dumps(CHAT).encode())
    finally:
        conn.close()
