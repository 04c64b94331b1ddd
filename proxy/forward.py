"""The forwarding core: moves one request to the upstream and its response back, byte for byte.

It knows HTTP, not tokens. It tells a `MeteredCall` what happens (request, response headers, each chunk
of a decoded copy of the body, end, failure) and holds back the end of the response until the call's
ledger row is committed: the last chunk of a plain body, or, in a stream, everything from the offset the
meter names (the terminal event), which is committed as soon as it is complete. Errors of its own are answered in OpenAI's shape (errors.py); the
upstream's own statuses and bodies pass through untouched.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from yarl import URL

from proxy.attribution import client_headers, upstream_headers
from proxy.decoding import Identity, decoder_for
from proxy.errors import error_response
from proxy.metering import MeteredCall

log = logging.getLogger("meterproxy")

# aiohttp adds these when absent; a transparent proxy sends only what the client sent.
_SKIP_AUTO = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})


def _has_dot_segment(raw_path: str) -> bool:
    # Such a path could leave the upstream's base path once the upstream (or a CDN) normalises it.
    if "." not in raw_path and "%" not in raw_path:
        return False
    return any(segment in (".", "..") for segment in unquote(raw_path).split("/"))


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError))


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:500]


class _ClientGone(Exception):
    """Writing to the client failed: it disconnected."""


async def _send(response: web.StreamResponse, data: bytes) -> None:
    try:
        await response.write(data)
    except ConnectionError as exc:
        raise _ClientGone(_describe(exc)) from exc


def _abort(request: web.Request) -> None:
    """End the client's connection abruptly, as the upstream ended ours: never a clean end it did not send."""
    transport = request.transport
    if transport is not None:
        transport.abort()


async def forward(request: web.Request, call: MeteredCall, *, session: aiohttp.ClientSession,
                  upstream: str, timeout: aiohttp.ClientTimeout) -> web.StreamResponse:
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response(413, f"Request body too large: {exc.text}", "invalid_request_error",
                              "request_too_large")
    call.on_request(body, request.headers.get("Content-Type", ""))
    # The target is always the configured upstream plus the request's path and query, in the client's
    # encoding. rel_url, not raw_path: an absolute URL in the request line must not leak into the path.
    rel = request.rel_url
    if _has_dot_segment(rel.raw_path):
        message = "Paths with '.' or '..' segments are not forwarded"
        call.on_failure(400, message)
        await call.finish()
        return error_response(400, message, "invalid_request_error", "invalid_path")
    query = rel.raw_query_string
    target = URL(upstream + rel.raw_path + (f"?{query}" if query else ""), encoded=True)
    try:
        upstream_resp = await session.request(
            request.method, target, headers=upstream_headers(request.headers), data=body or None,
            allow_redirects=False, timeout=timeout, skip_auto_headers=_SKIP_AUTO,
        )
    except Exception as exc:  # noqa: BLE001 - every failure to reach the upstream becomes 502/504 + a row
        if _is_timeout(exc):
            status, message, code = 504, f"Upstream timed out: {_describe(exc)}", "upstream_timeout"
        elif isinstance(exc, (aiohttp.ClientError, OSError)):
            status, message, code = 502, f"Upstream unreachable: {_describe(exc)}", "upstream_unreachable"
        else:
            raise
        call.on_failure(status, message)
        await call.finish()
        return error_response(status, message, "upstream_error", code)
    async with upstream_resp:
        return await _relay(request, call, upstream_resp)


async def _relay(request: web.Request, call: MeteredCall,
                 upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    content_type = upstream.headers.get("Content-Type", "")
    call.on_response_headers(upstream.status, content_type)
    decoder = decoder_for(upstream.headers.get("Content-Encoding"))
    identity = isinstance(decoder, Identity)
    is_stream = "text/event-stream" in content_type
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                  headers=client_headers(upstream.headers))
    held: list[bytes] = []      # a plain body's newest chunk: the client gets it after the commit
    committed = False           # a stream's terminal event was seen and its row committed
    position = 0                # bytes of the decoded stream fed to the meter so far
    first = True
    try:
        if is_stream:
            # Stream headers go out at once; a plain body's wait for its first chunk (an empty body would
            # otherwise be complete, for the client, before its row is committed).
            await _prepare(response, request)
        async for chunk in upstream.content.iter_any():
            if committed:
                await _send(response, chunk)
                continue
            if first:
                call.on_first_byte()
                first = False
            data = decoder.feed(chunk)
            hold_from = call.on_chunk(data)
            position += len(data)
            if not is_stream:
                if held:
                    await _prepare(response, request)
                    await _send(response, held.pop())
                held.append(chunk)
            elif hold_from is None:
                await _send(response, chunk)
            else:
                # The terminal event is complete in this chunk: send what precedes it, commit, then the rest.
                start = hold_from - (position - len(data))
                cut = max(0, min(start, len(chunk))) if identity else 0
                if cut:
                    await _send(response, chunk[:cut])
                call.on_end()
                await call.finish()
                committed = True
                await _send(response, chunk[cut:])
    except _ClientGone as exc:
        # Written to a client that went away: stop reading (closing drops the upstream call), record 499.
        upstream.close()
        if not committed:
            call.on_end()
            call.on_failure(499, f"client disconnected: {exc}")
            await call.finish()
        return response
    except Exception as exc:  # noqa: BLE001 - the upstream broke off or stalled mid-body
        if not (_is_timeout(exc) or isinstance(exc, (aiohttp.ClientError, OSError))):
            raise
        if committed:
            _abort(request)
            return response
        call.on_end()
        what = "timed out" if _is_timeout(exc) else "broke off"
        message = f"Upstream {what} mid-response: {_describe(exc)}"
        if not response.prepared:
            # Nothing reached the client yet: it gets a clear error instead of a torn body.
            status, code = (504, "upstream_timeout") if _is_timeout(exc) else (502, "upstream_broken")
            call.on_failure(status, message)
            await call.finish()
            return error_response(status, message, "upstream_error", code)
        call.on_failure(None, message)
        await call.finish()
        await _write_held(response, held)
        _abort(request)
        return response
    if not committed:
        if decoder.error and call.meter.usage_error is None:
            call.meter.usage_error = decoder.error
        call.on_end()
        await call.finish()
        try:
            await _prepare(response, request)
        except _ClientGone:
            return response
        if not await _write_held(response, held):
            return response
    try:
        await response.write_eof()
    except ConnectionError:
        pass
    return response


async def _prepare(response: web.StreamResponse, request: web.Request) -> None:
    if not response.prepared:
        try:
            await response.prepare(request)
        except ConnectionError as exc:
            raise _ClientGone(_describe(exc)) from exc


async def _write_held(response: web.StreamResponse, held: list[bytes]) -> bool:
    try:
        for chunk in held:
            await _send(response, chunk)
    except _ClientGone:
        return False
    return True
