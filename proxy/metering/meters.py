"""Per-endpoint meters: watch one call's events and work out its model, usage and error.

A meter sees the request body, the response status and content type, every chunk of the (decoded copy of
the) response body, and the end. It never touches the bytes the client gets and never does I/O. It may
name a point in the body stream (`hold_from`) from which the forwarder holds bytes back until the call's
ledger row is committed: the terminal event of a stream.

Meters must not raise into the forwarder; the caller wraps each hook (see metering.py), and a meter that
fails leaves `usage` None and says why in `usage_error`.
"""

from __future__ import annotations

import json
from typing import Callable

from proxy.core.attribution import storable
from proxy.core.record import Usage
from proxy.counting import StreamOutput
from proxy.forwarding.edits import Edit, drop, strip_usage_null
from proxy.forwarding.forms import form_fields
from proxy.metering.sse import SSEDecoder, SSEEvent
from proxy.metering.usage import (
    UnreadableUsage,
    chat_usage,
    image_usage,
    responses_usage,
    served_model,
    transcription_usage,
)

# A stored error message is cut to this, after the keys are taken out of it (metering.py): a meter keeps the
# whole message (at most MAX_ERROR_BODY) so that a key across the cut is never stored in part.
MAX_ERROR_CHARS = 1000
# Error bodies are read for their message; a huge one is cut rather than held whole.
MAX_ERROR_BODY = 64 * 1024
# JSON nested deeper than the interpreter's recursion limit is still JSON the upstream may accept: the
# proxy forwards it, and only gives up reading it.
_UNPARSABLE = (ValueError, RecursionError)


def _error_message(obj: object) -> str | None:
    """The message of an OpenAI-shaped error body or stream event, else None."""
    if not isinstance(obj, dict):
        return None
    err = obj.get("error")
    if isinstance(err, dict):
        msg = err.get("message")
        return storable(str(msg), MAX_ERROR_BODY) if msg else json.dumps(err)[:MAX_ERROR_BODY]
    if isinstance(err, str) and err:
        return storable(err, MAX_ERROR_BODY)
    return None


_MAX_TIER_CHARS = 32


def _service_tier(obj: object) -> str | None:
    """The `service_tier` a body, chunk or Responses event (under `response`) names; None if it names none."""
    if not isinstance(obj, dict):
        return None
    tier = obj.get("service_tier")
    if tier is None:
        inner = obj.get("response")
        tier = inner.get("service_tier") if isinstance(inner, dict) else None
    return tier if isinstance(tier, str) and tier else None


class Meter:
    """Base meter: no usage of its own; reads the model from the request and the message of error bodies."""

    extract: Callable[[object], Usage | None] | None = None
    can_inject = False  # whether this endpoint's streams take stream_options.include_usage
    countable = False   # whether the proxy can count this endpoint's tokens itself
    # A 2xx answer whose usage cannot be read is unpriced (flagged), not free: the endpoint bills by usage.
    unpriced_without_usage = False

    def __init__(self, inject_usage: bool = False, max_event: int | None = None) -> None:
        self.want_inject = inject_usage and self.can_inject
        self._max_event = max_event  # the longest stream event read (a longer one stops the meter)
        self.inject = False         # this call's request was given include_usage by the proxy
        self.edits: list[Edit] = []  # byte edits that take out what the injection added
        self.last_event_end: int | None = None  # end of the last complete stream event
        self.request: dict[str, object] | None = None  # the parsed request body, kept for counting
        self.output: StreamOutput | None = StreamOutput() if self.countable else None
        self.requested_model: str | None = None
        self.stream = False
        self.body_user: str | None = None
        self.model: str | None = None
        self.service_tier: str | None = None  # the tier the response says served the call (prices differ)
        self.usage: Usage | None = None
        self.usage_error: str | None = None
        self.error: str | None = None
        self.hold_from: int | None = None
        self._status = 0
        self._sse: SSEDecoder | None = None
        self._parts: list[bytes] | None = None
        self._size = 0

    # --- request ---------------------------------------------------------------------------
    def on_request(self, body: bytes, content_type: str) -> bytes | None:
        """Read the request; returns a replacement body only when injecting include_usage."""
        if not body or "json" not in content_type and body[:1] != b"{":
            return None
        try:
            obj = json.loads(body)
        except _UNPARSABLE:
            return None  # forwarded as is; the upstream will say what is wrong with it
        if not isinstance(obj, dict):
            return None
        self.request = obj
        model = obj.get("model")
        if isinstance(model, str) and model:
            self.requested_model = storable(model)
        self.stream = obj.get("stream") is True
        user = obj.get("user")
        if isinstance(user, str) and user:
            self.body_user = storable(user)
        if self.want_inject and self.stream:
            return self._inject(body, obj)
        return None

    def _inject(self, body: bytes, obj: dict[str, object]) -> bytes | None:
        options = obj.get("stream_options")
        if options is None and "stream_options" not in obj:
            body = body.lstrip()
            if body[:1] != b"{":
                # A byte order mark or UTF-16/32 (json.loads reads them): ASCII put in front would corrupt
                # the body, so leave it alone; the stream is counted instead.
                return None
            # Add the member in front: the rest of the client's bytes go upstream untouched.
            self.inject = True
            rest = body[1:]
            sep = b"" if rest.lstrip().startswith(b"}") else b","
            return b'{"stream_options":{"include_usage":true}' + sep + rest
        if isinstance(options, dict) and options.get("include_usage") is not True:
            obj["stream_options"] = {**options, "include_usage": True}
            text = json.dumps(obj, ensure_ascii=False)
            try:
                replaced = text.encode()
            except UnicodeEncodeError:  # a lone surrogate (a "\ud800" escape): keep it escaped
                replaced = json.dumps(obj).encode()
            self.inject = True
            return replaced
        return None  # the client asked for usage itself: nothing to add, nothing to take out

    # --- response --------------------------------------------------------------------------
    def on_response_headers(self, status: int, content_type: str) -> None:
        self._status = status
        if "text/event-stream" in content_type:
            self._sse = SSEDecoder(self._max_event)
            self.stream = True
        elif self._wants_body(status, content_type):
            self._parts = []

    def _wants_body(self, status: int, content_type: str) -> bool:
        if status >= 400:
            return True
        return self.extract is not None and "json" in content_type

    def on_chunk(self, data: bytes) -> None:
        if self._sse is not None:
            for event in self._sse.feed(data):
                self._on_event(event)
        elif self._parts is not None:
            if self._status >= 400 and self._size >= MAX_ERROR_BODY:
                return
            self._parts.append(data)
            self._size += len(data)

    @property
    def stopped(self) -> str | None:
        """Why the meter stopped reading the body (a stream event past its bound), else None."""
        return self._sse.error if self._sse is not None else None

    def discard(self) -> None:
        """Metering stops here: drop what was buffered; later chunks and the end are not read."""
        self._parts = None
        self._sse = None

    def on_end(self) -> None:
        if self._sse is not None:
            for event in self._sse.close():
                self._on_event(event)
            if self.last_event_end is None and self.succeeded and self.extract is not None:
                self.usage_error = "the stream carried no events; usage not read"
        elif self._parts:
            self._on_body(b"".join(self._parts))
        self._parts = None

    # --- reading ---------------------------------------------------------------------------
    def _on_body(self, body: bytes) -> None:
        try:
            obj = json.loads(body)
        except _UNPARSABLE:
            obj = None
        if self._status >= 400:
            self.error = _error_message(obj) or body[:MAX_ERROR_BODY].decode("utf-8", "replace")
            return
        if obj is None:
            self.usage_error = "response body is not JSON; usage not read"
            return
        if not isinstance(obj, dict):
            self.usage_error = "response body is not a JSON object; usage not read"
            return
        self._served(obj)
        self._take(obj)
        if self.output is not None:
            self.output.feed(obj)

    def _served(self, obj: object) -> None:
        model = served_model(obj)
        if model is not None:
            self.model = storable(model)
        tier = _service_tier(obj)
        if tier is not None and tier != self.service_tier:
            # The last said wins: a Responses stream opens with the requested tier, ends with the one used.
            self.service_tier = storable(tier, _MAX_TIER_CHARS)

    def _take(self, obj: object) -> None:
        if self.extract is None:
            return
        try:
            usage = self.extract(obj)
        except UnreadableUsage as exc:
            self.usage_error = f"unreadable usage: {exc}"
            return
        if usage is not None:
            self.usage = usage  # the last usage seen wins; never summed (cumulative chunks)
            self.usage_error = None

    def _on_event(self, event: SSEEvent) -> None:
        self.last_event_end = event.end
        if event.data == "[DONE]":
            self._hold(event)
            return
        try:
            obj = json.loads(event.data)
        except _UNPARSABLE:
            self.usage_error = "a stream event is not JSON"
            return
        if self.inject and isinstance(obj, dict) and "usage" in obj:
            if obj["usage"] is None:
                self.edits.append((event.start, event.end, strip_usage_null))
            elif obj.get("choices") == []:
                self.edits.append((event.start, event.end, drop))
        message = _error_message(obj)
        if message is not None:
            self.error = message
        self._served(obj)
        self._take(obj)
        if self.output is not None:
            self.output.feed(obj)
        self._after_event(event, obj)

    def _after_event(self, event: SSEEvent, obj: object) -> None:
        pass

    @property
    def succeeded(self) -> bool:
        """The upstream answered 2xx: its tokens were spent (even if the call ended early)."""
        return 200 <= self._status < 300

    def _hold(self, event: SSEEvent) -> None:
        if self.hold_from is None:
            self.hold_from = event.start


class ChatMeter(Meter):
    """/v1/chat/completions and /v1/completions: usage in the JSON body or any stream chunk (last wins)."""

    extract = staticmethod(chat_usage)
    can_inject = True
    countable = True


class EmbeddingsMeter(Meter):
    """/v1/embeddings: usage in the JSON body (prompt tokens only)."""

    extract = staticmethod(chat_usage)
    countable = True

    def __init__(self, inject_usage: bool = False, max_event: int | None = None) -> None:
        super().__init__(inject_usage, max_event)
        self.output = None  # embeddings produce no tokens to count


RESPONSES_TERMINAL = frozenset({
    "response.completed", "response.incomplete", "response.failed", "response.done", "error",
})


class ResponsesMeter(Meter):
    """/v1/responses: usage in the Response body, or in the terminal event of its `event:`-framed stream."""

    extract = staticmethod(responses_usage)
    countable = True

    def _after_event(self, event: SSEEvent, obj: object) -> None:
        kind = obj.get("type") if isinstance(obj, dict) else None
        if kind not in RESPONSES_TERMINAL and event.event not in RESPONSES_TERMINAL:
            return
        if kind == "response.failed" or kind == "response.incomplete":
            response = obj.get("response") if isinstance(obj, dict) else None
            message = _error_message(response)
            if message is None and isinstance(response, dict) and kind == "response.incomplete":
                details = response.get("incomplete_details")
                if isinstance(details, dict) and details.get("reason"):
                    message = storable(f"incomplete: {details['reason']}", MAX_ERROR_CHARS)
            if message is not None:
                self.error = message
        self._hold(event)


class ImagesMeter(Meter):
    """/v1/images/generations: gpt-image-1's usage (input text and image tokens, output image tokens) in
    the JSON body or the stream's `image_generation.completed` event. dall-e models report none."""

    extract = staticmethod(image_usage)
    unpriced_without_usage = True


class TranscriptionMeter(Meter):
    """/v1/audio/transcriptions: usage in tokens (gpt-4o-transcribe) in the JSON body or the stream's
    `transcript.text.done` event. The request is multipart: its `model` and `stream` fields are read."""

    extract = staticmethod(transcription_usage)
    unpriced_without_usage = True

    def on_request(self, body: bytes, content_type: str) -> bytes | None:
        if "multipart/form-data" not in content_type.lower():
            return super().on_request(body, content_type)
        fields, _ = form_fields(body)
        self.request = dict(fields)
        model = fields.get("model")
        if model:
            self.requested_model = storable(model)
        self.stream = fields.get("stream", "").strip().lower() == "true"
        return None


_BY_PATH: dict[str, type[Meter]] = {
    "/v1/chat/completions": ChatMeter,
    "/v1/completions": ChatMeter,
    "/v1/embeddings": EmbeddingsMeter,
    "/v1/responses": ResponsesMeter,
    "/v1/images/generations": ImagesMeter,
    "/v1/audio/transcriptions": TranscriptionMeter,
}


def meter_for(method: str, path: str, inject_usage: bool = False, max_event: int | None = None) -> Meter:
    """The meter of an endpoint; other endpoints get the base meter (model, status, error only)."""
    cls = _BY_PATH.get(path.rstrip("/")) if method == "POST" else None
    return (cls or Meter)(inject_usage, max_event)
