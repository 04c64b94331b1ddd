"""Each upstream timeout, configurable: connect, first byte, idle gap, total. 504 when nothing was sent yet."""

from __future__ import annotations

import json
import socket
import time
from typing import Callable, Iterator

import pytest

from tests.support import FakeUpstream, ProxyServer, Reply
from tests.support.http import CHAT_REQUEST, request


@pytest.fixture
def unaccepting() -> Iterator[str]:
    """A port whose accept queue is full: a further connect hangs (loopback only)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(8):  # fill the backlog; later SYNs are dropped and connect() waits
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    for s in fillers:
        s.close()
    server.close()


def assert_504(proxy: ProxyServer, needle: str, started: float, limit: float) -> None:
    status, _, body = request(proxy.url)
    assert status == 504, body
    err = json.loads(body)["error"]
    assert err["code"] == "upstream_timeout" and needle in err["message"]
    assert time.monotonic() - started < limit
    row = proxy.rows()[-1]
    assert row["status"] == 504 and needle in row["error"]


def test_connect_timeout(unaccepting: str, start_proxy: Callable[..., ProxyServer]) -> None:
    proxy = start_proxy(upstream=unaccepting, connect_timeout=0.5)
    probe = socket.socket()
    probe.settimeout(0.3)
    if probe.connect_ex(("127.0.0.1", int(unaccepting.rsplit(":", 1)[1]))) == 0:
        probe.close()
        pytest.skip("this kernel accepted past a full backlog; a connect timeout cannot be provoked on loopback")
    probe.close()
    assert_504(proxy, "connecting", time.monotonic(), 5)


def test_first_byte_timeout(upstream: FakeUpstream, start_proxy: Callable[..., ProxyServer]) -> None:
    proxy = start_proxy(first_byte_timeout=0.4, idle_timeout=30)
    upstream.reply(Reply(pause_before=3, chunks=[b"{}"], headers={"Content-Type": "application/json"}))
    assert_504(proxy, "waiting for its response", time.monotonic(), 2.5)


def test_idle_timeout_before_anything_was_sent_is_504(upstream: FakeUpstream,
                                                      start_proxy: Callable[..., ProxyServer]) -> None:
    proxy = start_proxy(first_byte_timeout=30, idle_timeout=0.4)
    # Headers at once, then a stall in the middle of a JSON body: nothing reached the client yet.
    upstream.reply(Reply(chunks=[b'{"model": "gpt-4o",', b'"usage": null}'], pause=3,
                         headers={"Content-Type": "application/json"}))
    assert_504(proxy, "timed out mid-response", time.monotonic(), 2.5)


def test_idle_timeout_mid_stream_ends_it_as_broken(upstream: FakeUpstream,
                                                   start_proxy: Callable[..., ProxyServer]) -> None:
    import http.client

    proxy = start_proxy(first_byte_timeout=30, idle_timeout=0.4)
    first = b'data: {"model":"gpt-4o","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
    upstream.reply(Reply(headers={"Content-Type": "text/event-stream"}, pause=3,
                         chunks=[first, b"data: [DONE]\n\n"]))
    t0 = time.monotonic()
    with pytest.raises(http.client.IncompleteRead) as broken:
        request(proxy.url, body=CHAT_REQUEST)
    assert broken.value.partial == first and time.monotonic() - t0 < 2.5
    row = proxy.rows()[-1]
    assert row["status"] == 200 and "timed out mid-response" in row["error"]
    assert row["usage_source"] == "counted" and row["completion_tokens"] == 1


def test_long_stream_with_short_gaps_is_not_cut_by_idle(upstream: FakeUpstream,
                                                        start_proxy: Callable[..., ProxyServer]) -> None:
    proxy = start_proxy(idle_timeout=0.5)
    parts = [b'data: {"model":"gpt-4o","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'] * 12
    upstream.reply(Reply(headers={"Content-Type": "text/event-stream"}, pause=0.15,
                         chunks=[*parts, b"data: [DONE]\n\n"]))
    status, _, body = request(proxy.url)  # 1.8 s in all, never 0.5 s without a chunk
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")
    assert proxy.rows()[-1]["error"] is None


def test_total_timeout(upstream: FakeUpstream, start_proxy: Callable[..., ProxyServer]) -> None:
    proxy = start_proxy(total_timeout=0.6, idle_timeout=30, first_byte_timeout=30)
    upstream.reply(Reply(pause_before=3, chunks=[b"{}"], headers={"Content-Type": "application/json"}))
    assert_504(proxy, "Upstream timed out", time.monotonic(), 2.5)
