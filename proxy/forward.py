"""The forwarding core: moves one request to the upstream and its response back, byte for byte.

It knows HTTP, not tokens. It tells a `MeteredCall` what happens (request, response headers, each chunk
of a decoded copy of the body, end, failure) and holds back the end of the response until the call's
ledger row is committed: the last chunk of a plain body, or, in a stream, everything from the offset the
meter names (the terminal event), which is committed as soon as it is complete. Errors of its own are answered in OpenAI's shape (errors.py); the
upstream's own statuses and bodies pass through untouched.
"""

from __future__ import annotations

import asyncio
import io
import logging
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from yarl import URL

from proxy.attribution import client_headers, upstream_headers
from proxy.decoding import STEP, Identity, decoder_for
from proxy.edits import StreamEditor
from proxy.errors import error_response
from proxy.gate import Gate, Refusal
from proxy.metering import MeteredCall

log = logging.getLogger("meterproxy")

# aiohttp adds these when absent; a transparent proxy sends only what the client sent.
_SKIP_AUTO = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})
_ONE_PIECE = 1 << 20  # aiohttp's TOO_LARGE_BYTES_BODY


def _has_dot_segment(raw_path: str) -> bool:
    # Such a path could leave the upstream's base path once the upstream (or a CDN) normalises it.
    if "." not in raw_path and "%" not in raw_path:
        return False
    return any(segment in (".", "..") for segment in unquote(raw_path).split("/"))


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return "no data within the configured timeout"
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
                  upstream: str, timeout: aiohttp.ClientTimeout, gate: Gate | None = None,
                  first_byte: float | None = None, idle: float | None = None) -> web.StreamResponse:
    if gate is not None and gate.managed:
        # A managed key is checked before the body is even read: an unknown caller costs no memory or parse.
        resolved = await gate.resolve(request.headers)
        if isinstance(resolved, Refusal):
            return await _refuse(call, resolved)
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        message = f"Request body too large: {exc.text}"
        call.on_failure(413, message)  # refused, not forwarded: recorded all the same
        await call.finish()
        return error_response(413, message, "invalid_request_error", "request_too_large")
    body = await call.read_request(body, request.headers.get("Content-Type", ""))
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
    headers = upstream_headers(request.headers)
    if gate is not None:
        # Managed keys, rate limits and budgets: decided before anything is forwarded.
        admission = await gate.admit(request.headers, call.meter.request, request.path, method=request.method,
                                     body_size=len(body), record=call.record)
        if isinstance(admission, Refusal):
            return await _refuse(call, admission)
        call.admitted(admission)
        admission.apply(headers)
    if call.edits_stream:
        # The proxy will edit the stream's bytes, so it asks for them uncompressed.
        headers["Accept-Encoding"] = "identity"
    try:
        async with asyncio.timeout(first_byte):
            upstream_resp = await session.request(
                request.method, target, headers=headers, data=_payload(body),
                allow_redirects=False, timeout=timeout, skip_auto_headers=_SKIP_AUTO,
            )
    except Exception as exc:  # noqa: BLE001 - every failure to reach the upstream becomes 502/504 + a row
        if _is_timeout(exc):
            what = "connecting" if isinstance(exc, aiohttp.ConnectionTimeoutError) else "waiting for its response"
            status, message, code = 504, f"Upstream timed out {what}: {_describe(exc)}", "upstream_timeout"
        elif isinstance(exc, (aiohttp.ClientError, OSError)):
            status, message, code = 502, f"Upstream unreachable: {_describe(exc)}", "upstream_unreachable"
        else:
            raise
        call.on_failure(status, message)
        await call.finish()
        return error_response(status, message, "upstream_error", code)
    async with upstream_resp:
        return await _relay(request, call, upstream_resp, idle)


def _payload(body: bytes) -> bytes | io.BytesIO | None:
    # aiohttp writes bytes over 1 MiB in one piece (and warns that it may hold the loop); a file-like body is
    # written in chunks, with the same Content-Length.
    if not body:
        return None
    return io.BytesIO(body) if len(body) > _ONE_PIECE else body


async def _refuse(call: MeteredCall, refusal: Refusal) -> web.Response:
    call.refused(refusal)
    await call.finish()
    return web.Response(status=refusal.status, body=refusal.body, headers=refusal.headers,
                        content_type="application/json")


async def _relay(request: web.Request, call: MeteredCall, upstream: aiohttp.ClientResponse,
                 idle: float | None) -> web.StreamResponse:
    content_type = upstream.headers.get("Content-Type", "")
    call.on_response_headers(upstream.status, content_type)
    relay = _Relay(request, call, upstream, "text/event-stream" in content_type)
    try:
        if relay.is_stream:
            # Stream headers go out at once; a plain body's wait for its first chunk (an empty body would
            # otherwise be complete, for the client, before its row is committed).
            await _prepare(relay.response, request)
        async with asyncio.timeout(None) as deadline:
            watch = _StallWatch(deadline, idle)
            try:
                async for chunk in upstream.content.iter_any():
                    await relay.chunk(chunk)
                    watch.last = watch.loop.time()
            finally:
                watch.cancel()
    except _ClientGone as exc:
        # Written to a client that went away: stop reading (closing drops the upstream call), record 499.
        upstream.close()
        if not relay.committed:
            call.on_end()
            call.on_failure(499, f"client disconnected: {exc}")
            await call.finish()
        return relay.response
    except Exception as exc:  # noqa: BLE001 - the upstream broke off or stalled mid-body
        if not (_is_timeout(exc) or isinstance(exc, (aiohttp.ClientError, OSError))):
            raise
        return await relay.broken(exc)
    return await relay.end()


class _StallWatch:
    """Ends the body (TimeoutError) after `idle` seconds without an upstream chunk.

    Each chunk only notes the time; one timer checks it every `idle` seconds and moves itself on, rather
    than a deadline rescheduled on every chunk. The time spent writing to a slow client counts as activity:
    a stall is the upstream's silence, not the client's."""

    def __init__(self, deadline: asyncio.Timeout, idle: float | None) -> None:
        self.loop = asyncio.get_running_loop()
        self.last = self.loop.time()
        self._deadline, self._idle = deadline, idle
        self._timer = self.loop.call_at(self.last + idle, self._check) if idle is not None else None

    def _check(self) -> None:
        assert self._idle is not None
        due = self.last + self._idle
        if self.loop.time() >= due:
            self._deadline.reschedule(self.loop.time())  # expire now: the body raises TimeoutError
        else:
            self._timer = self.loop.call_at(due, self._check)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class _Relay:
    """The state of one response on its way to the client.

    Three ways to pass a chunk: a plain body keeps its newest chunk back until the row is committed; a
    stream is written as it arrives, up to the terminal event the meter names; an edited stream (include_usage
    injected) is released event by event with the meter's edits applied. An edited stream the upstream
    compressed although it was asked for identity is decoded, edited and sent decoded (without the
    Content-Encoding it no longer has); an edited stream never keeps the upstream's Content-Length.
    The meter reads a decoded copy in steps, and no more of it than max_meter_bytes: the decoder is only
    read while the meter wants more.
    """

    def __init__(self, request: web.Request, call: MeteredCall, upstream: aiohttp.ClientResponse,
                 is_stream: bool) -> None:
        self.request, self.call, self.is_stream = request, call, is_stream
        self.decoder = decoder_for(upstream.headers.get("Content-Encoding"))
        self.identity = isinstance(self.decoder, Identity)
        headers = client_headers(upstream.headers)
        editing = is_stream and call.edits_stream and self.decoder.error is None
        # The decoded stream is what gets edited and sent (an unsupported encoding cannot be: it passes unedited).
        self.transcode = editing and not self.identity
        if editing:
            headers.popall("Content-Length", None)  # the edited stream is shorter: sent chunked
            if self.transcode:
                headers.popall("Content-Encoding", None)
        self.response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        self.editor = StreamEditor() if editing else None
        self.held: list[bytes] = []  # a plain body's newest chunk
        self.committed = False       # the row is committed (a stream's terminal event was complete)
        self.position = 0            # bytes of the decoded stream fed to the meter so far
        self.first = True

    def _meter(self, data: bytes) -> int | None:
        hold_from = self.call.on_chunk(data)
        self.position += len(data)
        return hold_from

    async def chunk(self, chunk: bytes) -> None:
        if self.first:
            self.call.on_first_byte()
            self.first = False
        if self.transcode:
            await self._transcoded(chunk)
            return
        if self.committed:
            await _send(self.response, chunk)
            return
        before, hold_from = self.position, None
        if self.call.metering:
            self.decoder.feed(chunk)
            stepped = False
            # One step at a time, and the loop gets a turn between steps: a bomb's copy is not one huge read.
            while self.call.metering and (data := self.decoder.read(self.call.meter_room + 1)):
                if stepped:
                    await asyncio.sleep(0)
                hold_from, stepped = self._meter(data), True
            if not self.call.metering:
                self.decoder = Identity()  # read no more of it: the rest only passes through
        size = self.position - before
        if not self.is_stream or not self.call.metering and self.editor is None:
            # A stream whose meter stopped can no longer name its terminal event: like a plain body, its newest
            # chunk waits for the next one (or for the commit), so the stream never ends before its row.
            if self.held:
                await _prepare(self.response, self.request)
                await _send(self.response, self.held.pop())
            self.held.append(chunk)
        elif self.editor is not None:
            await self._edited(chunk, hold_from)
        elif hold_from is None:
            await _send(self.response, chunk)
        else:
            # The terminal event is complete in this chunk: send what precedes it, commit, then the rest.
            start = hold_from - (self.position - size)
            cut = max(0, min(start, len(chunk))) if self.identity else 0
            if cut:
                await _send(self.response, chunk[:cut])
            await self._commit()
            await _send(self.response, chunk[cut:])

    async def _transcoded(self, chunk: bytes) -> None:
        """An edited stream that came compressed: the client gets its decoded, edited bytes."""
        self.decoder.feed(chunk)
        stepped = False
        while data := self.decoder.read(STEP):
            if stepped:
                await asyncio.sleep(0)
            stepped = True
            if self.committed:
                await _send(self.response, data)
                continue
            hold_from = self._meter(data) if self.call.metering else None
            await self._edited(data, hold_from)
        if self.decoder.error is not None:
            raise aiohttp.ClientPayloadError(f"the upstream's compressed stream is corrupt: {self.decoder.error}")

    async def _edited(self, chunk: bytes, hold_from: int | None) -> None:
        editor, meter = self.editor, self.call.meter
        assert editor is not None
        editor.feed(chunk)
        if not self.call.edits_stream:  # the meter failed or stopped: pass everything on unedited
            await _send(self.response, editor.take(editor.received, []))
            if not self.transcode:
                self.editor = None
            return
        settled = meter.settled if meter.settled is not None else editor.released
        if hold_from is not None:
            await _send(self.response, editor.take(hold_from, meter.edits))
            await self._commit()
        await _send(self.response, editor.take(editor.received if self.committed else settled, meter.edits))

    async def _commit(self) -> None:
        self.call.on_end()
        await self.call.finish()
        self.committed = True

    async def end(self) -> web.StreamResponse:
        if not self.committed:
            if self.decoder.error and self.call.meter.usage_error is None:
                self.call.meter.usage_error = self.decoder.error
            await self._commit()
            try:
                await _prepare(self.response, self.request)
                await self._release()
            except _ClientGone:
                return self.response
        try:
            await self.response.write_eof()
        except ConnectionError:
            pass
        return self.response

    async def _release(self) -> None:
        """After the commit: what was held back (a plain body's last chunk, an edited stream's tail)."""
        for chunk in self.held:
            await _send(self.response, chunk)
        if self.editor is not None:
            edits = self.call.meter.edits if self.call.edits_stream else []
            await _send(self.response, self.editor.take(self.editor.received, edits))

    async def broken(self, exc: BaseException) -> web.StreamResponse:
        if self.committed:
            _abort(self.request)
            return self.response
        self.call.on_end()
        what = "timed out" if _is_timeout(exc) else "broke off"
        message = f"Upstream {what} mid-response: {_describe(exc)}"
        if not self.response.prepared:
            # Nothing reached the client yet: it gets a clear error instead of a torn body.
            status, code = (504, "upstream_timeout") if _is_timeout(exc) else (502, "upstream_broken")
            self.call.on_failure(status, message)
            await self.call.finish()
            return error_response(status, message, "upstream_error", code)
        self.call.on_failure(None, message)
        await self.call.finish()
        try:
            await self._release()
        except _ClientGone:
            pass
        _abort(self.request)
        return self.response


async def _prepare(response: web.StreamResponse, request: web.Request) -> None:
    if not response.prepared:
        try:
            await response.prepare(request)
        except ConnectionError as exc:
            raise _ClientGone(_describe(exc)) from exc
