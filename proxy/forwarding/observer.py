"""What forwarding tells about one call, and what it asks of it: the `CallObserver` Protocol.

`forward()` knows HTTP, not tokens, keys or money. It reports each step of a call to its observer (the
request, the caller's admission, the response headers, each chunk of a decoded copy of the body, the end, a
failure) and asks it what to hold back (the offset of a stream's terminal event, the edits of an injected
stream). Metering's `MeteredCall` implements it; admission (the gate) is reached through it, never from
forwarding.
"""

from __future__ import annotations

from typing import Mapping, Protocol

from multidict import CIMultiDict

from proxy.forwarding.edits import Edit

__all__ = ["CallObserver", "Refused"]


class Refused(Protocol):
    """A call answered instead of forwarded (already recorded by the observer): the answer's parts."""

    @property
    def status(self) -> int: ...

    @property
    def body(self) -> bytes: ...

    @property
    def headers(self) -> Mapping[str, str]: ...


class CallObserver(Protocol):
    @property
    def request_id(self) -> str: ...

    # -- the request and its admission --
    async def check_caller(self, headers: Mapping[str, str]) -> Refused | None:
        """Before the body is read: a refusal of the caller's credentials (recorded), else None."""
        ...

    async def read_request(self, body: bytes, content_type: str) -> bytes:
        """Read the request; returns the body to forward."""
        ...

    def on_unchecked_caller(self) -> None:
        """The request is refused before its caller was checked: the caller's own names are not trusted."""
        ...

    async def admit(self, headers: Mapping[str, str], path: str, method: str, body: bytes,
                    upstream_headers: CIMultiDict[str]) -> Refused | None:
        """Admit (amending `upstream_headers`, e.g. the upstream key) or refuse (recorded) the call."""
        ...

    # -- the response --
    @property
    def edits_stream(self) -> bool: ...

    @property
    def metering(self) -> bool: ...

    @property
    def max_meter_bytes(self) -> int: ...

    @property
    def upstream_key(self) -> str | None: ...

    def on_response_headers(self, status: int, content_type: str) -> None: ...

    def on_first_byte(self) -> None: ...

    def on_chunk(self, data: bytes) -> int | None:
        """Feed decoded bytes; returns the decoded offset from which to hold back (a stream's terminal event)."""
        ...

    def last_event_end(self) -> int | None:
        """End of the last complete event of the decoded stream (how far an edited stream may be sent)."""
        ...

    def stream_edits(self) -> list[Edit]:
        """The edits an edited stream must pass through (taking out what an injection added)."""
        ...

    def on_decode_error(self, error: str) -> None: ...

    def on_end(self) -> None: ...

    def on_failure(self, status: int | None, message: str) -> None: ...

    async def finish(self) -> None:
        """Price and commit the row; returns once it is committed, spooled or refused."""
        ...

    @property
    def recorded(self) -> bool | None:
        """After finish(): whether the row was stored."""
        ...
