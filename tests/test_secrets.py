"""The real upstream key never leaves the proxy, and no key is stored, whatever the upstream echoes back.

A fake upstream that echoes the key it was sent — in a JSON error, in an SSE error event split across
chunks, in a header, gzip-compressed — against the real proxy in managed mode; the client reads raw HTTP
(http.client: no decompression, no normalising), and the database, its WAL, the spool and every log record
are searched for the key.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import stat
import zlib
from pathlib import Path
from typing import Any, Callable

import pytest

from proxy.redact import BodyGuard, KeyMask, Secrets
from tests.support import ADMIN_TOKEN, FakeUpstream, ProxyServer, Reply, gzipped, split
from tests.test_forwarding import request
from tests.test_hostile import exchange, log_text

REAL = "sk-real-upstream-0123456789abcdefghijklmnopqrstuv"
ECHO = {"error": {"message": f"Incorrect API key provided: {REAL}. Find your key at ...",
                  "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
CHAT = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


def managed(start_proxy: Callable[..., ProxyServer], **kw: Any) -> tuple[ProxyServer, str]:
    proxy = start_proxy(keys="managed", upstream_api_key=REAL, **kw)
    status, _, raw = request(proxy.url, method="POST", path="/admin/keys", body=json.dumps({"user": "ann"}).encode(),
                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert status == 201, raw
    return proxy, json.loads(raw)["key"]


def call(proxy: ProxyServer, key: str, body: bytes = CHAT) -> tuple[int, dict[str, str], bytes]:
    return exchange(proxy.url, b"Authorization: Bearer " + key.encode() + b"\r\n", body)


def at_rest(proxy: ProxyServer) -> bytes:
    db = Path(proxy.settings.db)
    return b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal"), Path(f"{db}.spool.jsonl")) if p.exists())


def assert_nowhere(proxy: ProxyServer, logs: pytest.LogCaptureFixture, *received: bytes) -> None:
    secret = REAL.encode()
    for got in received:
        assert secret not in got
        assert secret[-12:] not in got  # not even its tail
    assert secret not in at_rest(proxy)
    assert all(REAL not in text and REAL[-12:] not in text for text in log_text(logs.records))


def test_json_error_echoing_the_real_key(start_proxy: Callable[..., ProxyServer], upstream: FakeUpstream,
                                         all_logs: pytest.LogCaptureFixture) -> None:
    proxy, key = managed(start_proxy)
    body = upstream.json(ECHO, status=401, headers={"X-Echo": f"Bearer {REAL}", "X-Other": "fine"})
    status, headers, got = call(proxy, key)
    assert upstream.seen[-1].headers["Authorization"] == f"Bearer {REAL}"  # the real key did go upstream
    assert status == 401
    # Only the key's bytes change: same length (so the upstream's Content-Length holds), same JSON.
    assert got == body.replace(REAL.encode(), b"*" * len(REAL))
    assert headers["Content-Length"] == str(len(body))
    assert json.loads(got)["error"]["code"] == "invalid_api_key"
    assert headers["X-Echo"] == "Bearer " + "*" * len(REAL) and headers["X-Other"] == "fine"
    row = proxy.rows()[-1]
    assert row["status"] == 401 and "[upstream key]" in row["error"]
    assert_nowhere(proxy, all_logs, got, json.dumps(headers).encode())


def test_sse_error_event_split_inside_the_key(start_proxy: Callable[..., ProxyServer], upstream: FakeUpstream,
                                              all_logs: pytest.LogCaptureFixture) -> None:
    proxy, key = managed(start_proxy)
    event = b"data: " + json.dumps(ECHO).encode() + b"\n\n"
    stream = b'data: {"model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n' + event
    at = stream.index(REAL.encode())
    # Cut inside the key, twice: no chunk the client gets may carry even part of it.
    upstream.sse(stream, splits=[at + 3, at + 20], pause=0.05)
    status, _, got = call(proxy, key, json.dumps({"model": "gpt-4o", "stream": True, "messages": []}).encode())
    assert status == 200
    assert got == stream.replace(REAL.encode(), b"*" * len(REAL))
    assert "[upstream key]" in proxy.rows()[-1]["error"]
    assert_nowhere(proxy, all_logs, got)


def test_plain_body_split_inside_the_key(start_proxy: Callable[..., ProxyServer], upstream: FakeUpstream,
                                         all_logs: pytest.LogCaptureFixture) -> None:
    proxy, key = managed(start_proxy)
    body = json.dumps({"model": "gpt-4o", "usage": USAGE, "echo": f"sent with {REAL}"}).encode()
    at = body.index(REAL.encode())
    upstream.reply(Reply(headers={"Content-Type": "application/json"}, chunks=split(body, at=[at + 5, at + 30]),
                         content_length=True, pause=0.05))
    status, headers, got = call(proxy, key)
    assert status == 200 and headers["Content-Length"] == str(len(body))
    assert got == body.replace(REAL.encode(), b"*" * len(REAL))
    assert proxy.rows()[-1]["total_tokens"] == 15
    assert_nowhere(proxy, all_logs, got)


@pytest.mark.parametrize("kind", ["json", "sse"])
def test_gzip_body_echoing_the_real_key_goes_out_decoded(kind: str, start_proxy: Callable[..., ProxyServer],
                                                        upstream: FakeUpstream,
                                                        all_logs: pytest.LogCaptureFixture) -> None:
    proxy, key = managed(start_proxy)
    if kind == "json":
        plain = json.dumps(ECHO).encode()
        upstream.reply(Reply(status=401, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
                             chunks=[gzipped(plain)], content_length=True))
    else:
        plain = b"event: error\ndata: " + json.dumps(ECHO).encode() + b"\n\n"
        packed = gzipped(plain)
        # Its chunks arrive apart, so the first ones are read before the key is in sight.
        upstream.reply(Reply(status=400, headers={"Content-Type": "text/event-stream", "Content-Encoding": "gzip"},
                             chunks=split(packed, 7), pause=0.05))
    status, headers, got = call(proxy, key)
    assert status in (400, 401)
    # Its compressed bytes cannot be masked: the client gets the body decoded, masked, and headers that say so.
    assert "Content-Encoding" not in headers
    assert got == plain.replace(REAL.encode(), b"*" * len(REAL))
    assert "Content-Length" not in headers or headers["Content-Length"] == str(len(got))
    assert_nowhere(proxy, all_logs, got)


@pytest.mark.parametrize("encoding", ["identity", "gzip"])
def test_a_body_without_the_key_is_untouched(encoding: str, start_proxy: Callable[..., ProxyServer],
                                             upstream: FakeUpstream) -> None:
    proxy, key = managed(start_proxy)
    plain = json.dumps({"model": "gpt-4o", "usage": USAGE, "note": REAL[:10] + " is a prefix, not the key"}).encode()
    headers = {"Content-Type": "application/json"}
    chunks = [plain[:20], plain[20:]]
    if encoding == "gzip":
        headers["Content-Encoding"] = "gzip"
        packed = gzipped(plain)
        chunks = [packed[:15], packed[15:]]
    upstream.reply(Reply(headers=headers, chunks=chunks, content_length=True))
    status, got_headers, got = call(proxy, key)
    assert status == 200 and got == b"".join(chunks)
    assert got_headers.get("Content-Encoding") == headers.get("Content-Encoding")
    assert proxy.rows()[-1]["total_tokens"] == 15


def test_gzip_stream_echoing_the_key_after_bytes_were_sent_is_broken_off(
        start_proxy: Callable[..., ProxyServer], upstream: FakeUpstream, all_logs: pytest.LogCaptureFixture) -> None:
    proxy, key = managed(start_proxy)
    first = b'data: {"model":"gpt-4o","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
    later = b"data: " + json.dumps(ECHO).encode() + b"\n\n"
    comp = zlib.compressobj(wbits=31)
    one = comp.compress(first) + comp.flush(zlib.Z_SYNC_FLUSH)
    two = comp.compress(later) + comp.flush()
    upstream.reply(Reply(headers={"Content-Type": "text/event-stream", "Content-Encoding": "gzip"},
                         chunks=[one, two], pause=0.1))
    with pytest.raises(http.client.IncompleteRead) as torn:
        call(proxy, key, json.dumps({"model": "gpt-4o", "stream": True, "messages": []}).encode())
    sent = torn.value.partial
    assert sent == one  # the first chunk, as the upstream sent it; nothing of the second
    assert "broken off" in proxy.rows()[-1]["error"]
    assert_nowhere(proxy, all_logs, sent)


def test_passthrough_client_key_of_any_length_is_stored_redacted(start_proxy: Callable[..., ProxyServer],
                                                                  upstream: FakeUpstream) -> None:
    proxy = start_proxy()
    short, long = "sk-12", "sk-" + "k" * 60
    cases = [
        (short, f"Incorrect API key provided: {short}, check it"),  # a short key: redacted all the same
        # A key right across the 1,000-character cut of a stored message: redact first, then cut.
        (long, "x" * (1000 - len(long) // 2) + long + " trailing"),
    ]
    for key, message in cases:
        upstream.json({"error": {"message": message, "type": "invalid_request_error"}}, status=401)
        status, _, got = exchange(proxy.url, b"Authorization: Bearer " + key.encode() + b"\r\n", CHAT)
        assert status == 401 and key.encode() in got  # the client's own key: its bytes are the upstream's
        error = proxy.rows()[-1]["error"]
        assert key not in error and len(error) <= 1000
    stored = at_rest(proxy)
    assert short.encode() not in stored
    assert long[: len(long) // 2].encode() not in stored  # not even the part before the cut


# --- the pieces, directly ------------------------------------------------------------------------

def test_key_mask_in_any_chunking() -> None:
    secret = b"sk-abc"
    text = b"sk-ab sk-abc sk-sk-abcsk-abc end sk-a"
    want = text.replace(secret, b"******")
    for size in range(1, len(text) + 1):
        mask = KeyMask([secret])
        out = b"".join(mask.feed(part) for part in split(text, size)) + mask.flush()
        assert out == want, size
    assert Secrets([("ab", "<a>"), ("abcd", "<b>")]).redact("abcd ab", 6) == "<b> <a"


def test_body_guard_holds_compressed_bytes_only_while_the_tail_could_start_the_key() -> None:
    guard = BodyGuard("sk-abc", compressed=True)
    guard.decoded(b"hello sk-")
    assert guard.out(b"RAW1", nothing_sent=True) == b""  # "sk-" may begin the key
    guard.decoded(b"xyz")
    assert guard.out(b"RAW2", nothing_sent=True) == b"RAW1RAW2"  # it did not: the upstream's bytes, untouched
    guard.decoded(b" sk-abc!")
    assert guard.out(b"RAW3", nothing_sent=False) == b"" and guard.mode == "cut"


def test_ledger_files_are_owner_only_whatever_the_umask(start_proxy: Callable[..., ProxyServer],
                                                        upstream: FakeUpstream, tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        proxy = start_proxy(db=str(tmp_path / "open.db"))
        upstream.json({"model": "gpt-4o", "usage": USAGE})
        assert exchange(proxy.url, b"Authorization: Bearer sk-x1234567\r\n", CHAT)[0] == 200
        files = [Path(proxy.settings.db + suffix) for suffix in ("", "-wal", "-shm")]
        assert all(f.exists() for f in files)
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    finally:
        os.umask(old)
