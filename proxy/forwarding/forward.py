"""The forwarding core: moves one request to the upstream and its response back, byte for byte.

It knows HTTP, not tokens. It tells the call's observer (`CallObserver`, proxy.forwarding.observer) what
happens (request, admission, response headers, each chunk of a decoded copy of the body, end, failure) and
holds back the end of the response until the call's ledger row is committed: the last chunk of a plain
body, or, in a stream, everything from the offset the observer names (the terminal event), which is
committed as soon as it is complete. Errors of its own are answered in OpenAI's shape (core/errors.py); the
upstream's own statuses and bodies pass through untouched.
"""

from __future__ import annotations

import asyncio
import io
import logging

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.core.credentials import identity_problem
from proxy.core.errors import MeterproxyError
from proxy.forwarding.decoding import STEP, Identity, decoder_for
from proxy.forwarding.edits import StreamEditor
from proxy.forwarding.headers import client_headers, upstream_headers
from proxy.forwarding.observer import CallObserver, Refused
from proxy.forwarding.redact import BodyGuard
from proxy.forwarding.responses import error_response
from proxy.forwarding.routes import canonical_problem, method_problem

log = logging.getLogger("meterproxy")

# aiohttp adds these when absent; a transparent proxy sends only what the client sent.
_SKIP_AUTO = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})
_ONE_PIECE = 1 << 20  # aiohttp's TOO_LARGE_BYTES_BODY


def _request_problem(request: web.Request, body_size: int) -> tuple[int, str, str] | None:
    """(status, message, code) when the request must not be forwarded as sent; None when it may.

    The route metered must be the route served: a path the upstream (or a CDN) could normalise into
    another route, a method the route does not take, or credentials that could bill another key than the
    one attributed are refused before anything is forwarded."""
    problem = canonical_problem(request.rel_url.raw_path)
    if problem is not None:
        return 400, f"The path is not canonical: {problem}; it was not forwarded", "invalid_path"
    wrong = method_problem(request.method, request.path, body_size)
    if wrong is not None:
        status, why = wrong
        return status, f"Method not allowed: {why}", "method_not_allowed"
    ambiguous = identity_problem(request.headers)
    if ambiguous is not None:
        return 400, f"Ambiguous credentials: {ambiguous}", "ambiguous_credentials"
    return None


_DECODABLE = frozenset({"gzip", "x-gzip", "deflate", "br", "identity"})


def _decodable_encodings(headers: CIMultiDict[str]) -> None:
    """Ask the upstream only for codings the meter can decode (proxy.decoding): a body in any other
    (zstd, say) would pass unread and unmetered. The client still gets the upstream's bytes as sent."""
    values = headers.popall("Accept-Encoding", [])
    if not values:
        return
    kept, wildcard = [], False
    for value in values:
        for item in value.split(","):
            coding = item.split(";", 1)[0].strip().lower()
            if coding in _DECODABLE:
                kept.append(item.strip())
            elif coding == "*" and not item.replace(" ", "").lower().endswith(";q=0"):
                wildcard = True
    if wildcard:
        named = {item.split(";", 1)[0].strip().lower() for item in kept}
        kept += [c for c in ("gzip", "deflate", "br") if c not in named]
    headers["Accept-Encoding"] = ", ".join(kept) if kept else "identity"


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return "no data within the configured timeout"
    text = str(exc) or type(exc).__name__
    return text[:500]


class _ClientGone(MeterproxyError):
    """Writing to the client failed: it disconnected."""


class _Unrecorded(MeterproxyError):
    """The call's row could be neither committed nor spooled: the response must not complete."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__(response)
        self.response = response  # the prepared response, whose end is held back


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


async def forward(request: web.Request, call: CallObserver, *, session: aiohttp.ClientSession,
                  upstream: str, timeout: aiohttp.ClientTimeout,
                  first_byte: float | None = None, idle: float | None = None) -> web.StreamResponse:
    # A managed key is checked before the body is even read: an unknown caller costs no memory or parse.
    refused = await call.check_caller(request.headers)
    if refused is not None:
        return await _refuse(call, refused)
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
    problem = _request_problem(request, len(body))
    if problem is not None:
        status, message, code = problem
        call.on_unchecked_caller()  # no key was checked: the client's X-Meter-* name no one
        call.on_failure(status, message)
        await call.finish()
        return error_response(status, message, "invalid_request_error", code)
    query = rel.raw_query_string
    target = URL(upstream + rel.raw_path + (f"?{query}" if query else ""), encoded=True)
    headers = upstream_headers(request.headers)
    _decodable_encodings(headers)
    # Managed keys, rate limits and budgets: decided before anything is forwarded.
    refused = await call.admit(request.headers, request.path, request.method, body, headers)
    if refused is not None:
        return await _refuse(call, refused)
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
        try:
            return await _relay(request, call, upstream_resp, idle)
        except _Unrecorded as exc:
            # Never a success the ledger did not see: the held end is not sent, the connection is broken off.
            upstream_resp.close()
            _abort(request)
            return exc.response


def _payload(body: bytes) -> bytes | io.BytesIO | None:
    # aiohttp writes bytes over 1 MiB in one piece (and warns that it may hold the loop); a file-like body is
    # written in chunks, with the same Content-Length.
    if not body:
        return None
    return io.BytesIO(body) if len(body) > _ONE_PIECE else body


async def _refuse(call: CallObserver, refusal: Refused) -> web.Response:
    await call.finish()  # the observer recorded the refusal
    return web.Response(status=refusal.status, body=refusal.body, headers=refusal.headers,
                        content_type="application/json")


async def _relay(request: web.Request, call: CallObserver, upstream: aiohttp.ClientResponse,
                 idle: float | None) -> web.StreamResponse:
    content_type = upstream.headers.get("Content-Type", "")
    call.on_response_headers(upstream.status, content_type)
    relay = _Relay(request, call, upstream, "text/event-stream" in content_type)
    try:
        if relay.is_stream and (relay.guard is None or not relay.guard.compressed):
            # Stream headers go out at once; a plain body's wait for its first chunk (an empty body would
            # otherwise be complete, for the client, before its row is committed), and so does a compressed
            # stream's in managed mode (it may have to go out decoded, if it echoes the real key).
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
    injected) is sent event by event with the meter's edits applied. An edited stream the upstream
    compressed although it was asked for identity is decoded, edited and sent decoded (without the
    Content-Encoding it no longer has); an edited stream never keeps the upstream's Content-Length.
    The meter reads a decoded copy in steps, and no more of it than max_meter_bytes: the decoder is only
    read while the meter wants more.
    """

    def __init__(self, request: web.Request, call: CallObserver, upstream: aiohttp.ClientResponse,
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
        key = call.upstream_key
        # Managed mode: the upstream got the real key; should it echo it, the client must not receive it.
        # (A transcoded stream is sent decoded: its bytes are masked in place like an uncompressed body's.)
        self.guard = BodyGuard(key, not self.identity and not self.transcode,
                               hold_all=upstream.status >= 400) if key else None
        if key:
            headers = _masked(headers, key)
        self.response = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        self.editor = StreamEditor() if editing else None
        self.budget = call.max_meter_bytes  # most bytes decoded from a body the client gets compressed
        self.decoded = 0
        self.held: list[bytes] = []  # a plain body's newest chunk
        self.committed = False       # the row is committed (a stream's terminal event was complete)
        self.position = 0            # bytes of the decoded stream fed to the meter so far
        self.first = True
        self.cut = False             # the guard stopped the body: the key turned up after bytes were sent

    async def _out(self, data: bytes) -> None:
        """Send upstream bytes to the client; in managed mode through the guard that keeps the key out."""
        guard = self.guard
        if guard is not None:
            data = guard.out(data, nothing_sent=not self.response.prepared)
            if guard.mode == "cut" and not self.cut:
                self.cut = True
                log.warning("call %s: the upstream echoed the upstream key in a compressed body after bytes "
                            "were sent; the client's connection is broken off", self.call.request_id)
                self.call.on_failure(None, "the upstream echoed the upstream key mid-body; the client's "
                                           "connection was broken off")
            if guard.switched:
                guard.switched = False
                # The body goes out decoded: it no longer has the upstream's encoding or length.
                self.response.headers.popall("Content-Encoding", None)
                self.response.headers.popall("Content-Length", None)
            if not data:
                return
        if not self.response.prepared:
            await _prepare(self.response, self.request)
        await _send(self.response, data)

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
        guard = self.guard
        watch = guard is not None and guard.compressed and guard.mode != "cut"
        if self.committed and not watch:
            await self._out(chunk)
            return
        before, hold_from = self.position, None
        if self.call.metering or watch:
            self.decoder.feed(chunk)
            pieces: list[bytes] = []
            stepped = over = False
            # One step at a time, and the loop gets a turn between steps: a bomb's copy is not one huge read.
            while (self.call.metering or watch) and (data := self.decoder.read(self.budget - self.decoded + 1)):
                if stepped:
                    await asyncio.sleep(0)
                stepped = True
                self.decoded += len(data)
                over = self.decoded > self.budget
                if self.call.metering and not self.committed:
                    hold_from = self._meter(data)  # past the budget, this stops the meter
                if over:
                    break
                if watch:
                    pieces.append(data)
            if watch:
                if over:
                    self._unwatchable()
                else:
                    assert guard is not None
                    guard.decoded(b"".join(pieces) if len(pieces) != 1 else pieces[0])
            if not self.call.metering and (self.guard is None or self.guard.mode == "cut" or
                                           not self.guard.compressed):
                self.decoder = Identity()  # read no more of it: the rest only passes through
        if self.committed:
            await self._out(chunk)
            return
        size = self.position - before
        if not self.is_stream or not self.call.metering and self.editor is None:
            # A stream whose meter stopped can no longer name its terminal event: like a plain body, its newest
            # chunk waits for the next one (or for the commit), so the stream never ends before its row.
            if self.held:
                await self._out(self.held.pop())
            self.held.append(chunk)
        elif self.editor is not None:
            await self._edited(chunk, hold_from)
        elif hold_from is None:
            await self._out(chunk)
        else:
            # The terminal event is complete in this chunk: send what precedes it, commit, then the rest.
            start = hold_from - (self.position - size)
            cut = max(0, min(start, len(chunk))) if self.identity else 0
            if cut:
                await self._out(chunk[:cut])
            await self._commit()
            await self._out(chunk[cut:])

    def _unwatchable(self) -> None:
        """Managed mode, a compressed body past the decoding budget: the guard can no longer see whether the
        upstream key is in it, so nothing more is sent and the client's connection is broken off."""
        assert self.guard is not None
        self.guard.mode = "cut"
        self.cut = True
        log.warning("call %s: a compressed body passed max_meter_bytes (%d bytes) decoded, past which the upstream "
                    "key cannot be watched for; the client's connection is broken off", self.call.request_id,
                    self.budget)
        self.call.on_failure(None, f"the compressed body passed max_meter_bytes ({self.budget} bytes) decoded: "
                                   "the upstream key could not be watched for; the client's connection was broken off")

    async def _transcoded(self, chunk: bytes) -> None:
        """An edited stream that came compressed: the client gets its decoded, edited bytes."""
        self.decoder.feed(chunk)
        stepped = False
        while data := self.decoder.read(STEP):
            if stepped:
                await asyncio.sleep(0)
            stepped = True
            if self.committed:
                await self._out(data)
                continue
            hold_from = self._meter(data) if self.call.metering else None
            await self._edited(data, hold_from)
        if self.decoder.error is not None:
            raise aiohttp.ClientPayloadError(f"the upstream's compressed stream is corrupt: {self.decoder.error}")

    async def _edited(self, chunk: bytes, hold_from: int | None) -> None:
        editor = self.editor
        assert editor is not None
        editor.feed(chunk)
        if not self.call.edits_stream:  # the meter failed or stopped: pass everything on unedited
            await self._out(editor.take(editor.received, []))
            if not self.transcode:
                self.editor = None
            return
        event_end = self.call.last_event_end()
        if event_end is None:
            event_end = editor.sent
        if hold_from is not None:
            await self._out(editor.take(hold_from, self.call.stream_edits()))
            await self._commit()
        await self._out(editor.take(editor.received if self.committed else event_end, self.call.stream_edits()))

    async def _commit(self) -> None:
        self.call.on_end()
        await self.call.finish()
        if self.call.recorded is False:
            raise _Unrecorded(self.response)
        self.committed = True

    async def end(self) -> web.StreamResponse:
        if not self.committed:
            if self.decoder.error:
                self.call.on_decode_error(self.decoder.error)
            await self._commit()
        try:
            await self._send_held(last=True)
            await _prepare(self.response, self.request)
        except _ClientGone:
            return self.response
        if self.guard is not None and self.guard.mode == "cut":
            _abort(self.request)  # the rest would have carried the real key
            return self.response
        try:
            await self.response.write_eof()
        except ConnectionError:
            pass
        return self.response

    async def _send_held(self, last: bool = False) -> None:
        """After the commit: what was held back (a plain body's last chunk, an edited stream's tail), and at
        the body's `last` end what the key guard held back. A torn body keeps the guard's tail: it could be
        the start of the key."""
        for chunk in self.held:
            await self._out(chunk)
        self.held = []
        if self.editor is not None:
            edits = self.call.stream_edits() if self.call.edits_stream else []
            await self._out(self.editor.take(self.editor.received, edits))
        if last and self.guard is not None:
            tail = self.guard.flush()
            if tail:
                await _prepare(self.response, self.request)
                await _send(self.response, tail)

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
            await self._send_held()
        except _ClientGone:
            pass
        _abort(self.request)
        return self.response


def _masked(headers: CIMultiDict[str], key: str) -> CIMultiDict[str]:
    """The headers with the key overwritten wherever a value carries it (same length, same order)."""
    if not any(key in value for value in headers.values()):
        return headers
    return CIMultiDict((name, value.replace(key, "*" * len(key))) for name, value in headers.items())


async def _prepare(response: web.StreamResponse, request: web.Request) -> None:
    if not response.prepared:
        try:
            await response.prepare(request)
        except ConnectionError as exc:
            raise _ClientGone(_describe(exc)) from exc
