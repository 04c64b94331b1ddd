"""The listening side's own bounds: how long a client may take to send headers, idle keep-alive, open files.

aiohttp closes an idle keep-alive connection after `keepalive_timeout`, but has no limit on how long a
client may take to send a request's headers: a slowloris client that sends a byte now and then would hold
its connection (and a file descriptor) for good. `ProxyRunner` serves with a handler that closes a
connection whose request headers are not complete `header_timeout` seconds after the connection opened,
or after the first byte of its next request arrived. It never closes a connection while a request is being
handled (a long upload or a slow stream is not a slow header).

This module relies on two details of aiohttp's RequestHandler (3.9 to 3.14): `_waiter` is set only while
it waits for the next request, and `_request_count` counts the requests whose headers were parsed.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

__all__ = ["ProxyRunner", "raise_open_file_limit"]

log = logging.getLogger("meterproxy")


class _Handler(RequestHandler):
    """aiohttp's handler, plus the header timeout."""

    def __init__(self, *args: Any, header_timeout: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._start_header_timer()  # a connection that never sends anything is a slow header too

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self._waiter is not None:
            self._start_header_timer()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _start_header_timer(self) -> None:
        if self._header_timeout is None:
            return
        count = self._request_count
        self._header_timer = self._loop.call_later(self._header_timeout, self._header_deadline, count)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline(self, count: int) -> None:
        self._header_timer = None
        if self._request_count == count and self._waiter is not None and not self._waiter.done():
            # No request's headers came complete in time, and none is being handled: close it.
            self.force_close()


class _Server(web.Server):
    _header_timeout: float | None = None

    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, header_timeout=self._header_timeout, **self._kwargs)


class ProxyRunner(web.AppRunner):
    """`web.AppRunner` whose connections also have a header timeout (see the module docstring)."""

    def __init__(self, app: web.Application, *, header_timeout: float | None = None, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout = header_timeout

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The app builds its own Server (routing, request factory); give it our handler class.
        server.__class__ = _Server
        assert isinstance(server, _Server)
        server._header_timeout = self._header_timeout
        return server


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard one (each client connection holds a descriptor); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if target == resource.RLIM_INFINITY:
        target = 1 << 20  # the kernel's usual nr_open; "unlimited" is refused for descriptors
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
        return soft
    return target
