"""The listening side's own bounds: how long a client may take to send headers, idle keep-alive, open files.

aiohttp closes an idle keep-alive connection after `keepalive_timeout`, but has no limit on how long a
client may take to send a request's headers: a slowloris client that sends a byte now and then would hold
its connection (and a file descriptor) for good. `ProxyRunner` serves with a handler that closes a
connection whose request headers are not complete `header_timeout` seconds after the connection opened,
or after the first byte of its next request arrived. It never closes a connection while a request is being
handled (a long upload or a slow stream is not a slow header).

`run_workers` is `meterproxy serve --workers N`: N worker processes on one port (SO_REUSEPORT), a parent
that passes signals on and reports a worker that dies.

This module relies on two details of aiohttp's RequestHandler (3.9 to 3.14): `_waiter` is set only while
it waits for the next request, and `_request_count` counts the requests whose headers were parsed.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

__all__ = ["ProxyRunner", "die_with_parent", "raise_open_file_limit", "run_workers", "worker_command",
           "worker_spool"]

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


# --- serve --workers N ------------------------------------------------------------------------------
def worker_command(argv: Sequence[str], number: int) -> list[str]:
    """The `meterproxy serve` command line of worker `number`: `argv` without --workers, with --worker
    (which binds with SO_REUSEPORT and gives the worker a spool file of its own)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return [sys.executable, "-m", "proxy", *out, "--worker", str(number)]


def die_with_parent() -> None:
    """In a worker (Linux): SIGTERM when the parent goes, even killed outright, so no worker is orphaned."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: a worker outlives a parent killed with -9
        pass


def run_workers(argv: Sequence[str], workers: int) -> int:
    """Run `workers` processes of `meterproxy serve` on one port (SO_REUSEPORT: the kernel spreads the
    connections over them); the parent binds nothing. SIGTERM and SIGINT are passed on to every worker;
    a worker that exits on its own is reported (the others keep serving). Returns once every worker has
    exited: 0 when each stopped cleanly after a signal, else the first non-zero status."""
    procs: dict[int, tuple[int, subprocess.Popen[bytes]]] = {}
    stopping = False

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for _, proc in procs.values():
            if proc.poll() is None:
                try:
                    proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        for number in range(1, workers + 1):
            proc = subprocess.Popen(worker_command(argv, number), preexec_fn=die_with_parent)
            procs[proc.pid] = (number, proc)
        log.info("meterproxy: %d workers on one port: pids %s", workers, ", ".join(map(str, procs)))
        running = dict(procs)
        while running:
            time.sleep(0.1)
            for pid, (number, proc) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[pid]
                if not stopping or code != 0:
                    how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
                    print(f"meterproxy: worker {number} (pid {pid}) {how}; {len(running)} of {workers} still "
                          "serving", file=sys.stderr, flush=True)
                if code != 0 and status == 0:
                    status = code if code > 0 else 128 - code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for _, proc in procs.values():  # the parent failed: leave no worker behind it
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return status


def worker_spool(path: str, number: int) -> str:
    """Worker `number`'s own spool beside `path` (spool.jsonl -> spool.worker2.jsonl): a spool has one writer,
    and the same number finds its file again after a restart, to replay it."""
    root, ext = os.path.splitext(path)
    return f"{root}.worker{number}{ext}"
