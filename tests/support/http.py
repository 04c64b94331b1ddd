"""HTTP helpers for the socket-level tests: requests and raw exchanges against a running proxy."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import traceback
from collections.abc import Iterator

CHAT_REQUEST = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode()


def request(url: str, method: str = "POST", path: str = "/v1/chat/completions", body: bytes | None = CHAT_REQUEST,
            headers: dict[str, str] | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
    """A raw HTTP exchange: the body exactly as sent on the wire (de-chunked, never decompressed)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        hdrs = {"Authorization": "Bearer sk-test-key-0001", "Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def exchange(url: str, headers: bytes = b"", body: bytes = b"{}", target: bytes = b"/v1/chat/completions",
             method: bytes = b"POST") -> tuple[int, dict[str, str], bytes]:
    """Send the request head exactly as given (http.client would refuse or normalise it); read the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(method + b" " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                     + b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body) + headers
                     + b"\r\n" + body)
        resp = http.client.HTTPResponse(sock, method=method.decode())
        resp.begin()
        return resp.status, dict(resp.getheaders()), resp.read()


def log_text(records: list[logging.LogRecord]) -> Iterator[str]:
    for record in records:
        yield record.getMessage()
        yield repr(record.args)
        if record.exc_info:
            yield "".join(traceback.format_exception(*record.exc_info))
        if record.exc_text:
            yield record.exc_text
        if record.stack_info:
            yield record.stack_info


def raw_exchange(url: str, target: bytes, headers: bytes = b"", body: bytes = b"{}",
                 method: bytes = b"POST") -> tuple[int, bytes]:
    """The request line exactly as given (http.client would normalise it)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(method + b" " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                     + b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body) + headers
                     + b"\r\n" + body)
        resp = http.client.HTTPResponse(sock, method=method.decode())
        resp.begin()
        return resp.status, resp.read()
