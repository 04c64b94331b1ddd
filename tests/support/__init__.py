"""Test support: real servers on loopback, each in its own thread and event loop.

`FakeUpstream` is a real aiohttp server that answers with scripted bytes (status, headers, body chunks,
pauses, a broken connection) and remembers every request it got. `ProxyServer` runs the real meterproxy
app. Running both in threads lets the official openai SDK's sync client and async client, and plain
HTTP clients, talk to them over real TCP from ordinary test functions.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from aiohttp import web

from proxy.app import make_app
from proxy.config import Settings
from proxy.ledger.sqlconn import connect_postgres
from proxy.ledger.target import parse_target

ADMIN_TOKEN = "admin-secret-for-tests"


class ServerThread:
    """Run an aiohttp app on 127.0.0.1:<free port> in a background thread."""

    def __init__(self, app_factory: Callable[[], web.Application]) -> None:
        self._factory = app_factory
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    def start(self) -> "ServerThread":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(self._factory(), access_log=None, handle_signals=False,
                                     shutdown_timeout=2)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        site = web.SockSite(self._runner, sock)
        await site.start()

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=timeout)

    def stop(self) -> None:
        if self._runner is not None:
            self.call(self._runner.cleanup())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Reply:
    """One scripted upstream answer."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    pause: float = 0.0            # seconds between chunks
    pause_before: float = 0.0     # seconds before the headers
    pause_after: float = 0.0      # seconds after the last chunk, before the end
    break_after: int | None = None  # drop the connection after this many chunks
    content_length: bool = False  # send Content-Length instead of chunked encoding


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: dict[str, str]
    header_items: list[tuple[str, str]]
    body: bytes


class FakeUpstream:
    """A real HTTP server that plays scripted replies in order (the last one repeats)."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.handler: Callable[[bytes], Reply] | None = None  # when set: the reply is made from the request body
        self.seen: list[Seen] = []
        self.server = ServerThread(self._app)

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    def reply(self, *replies: Reply) -> None:
        self.replies = list(replies)

    def json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None, **kw: Any) -> bytes:
        body = json.dumps(obj).encode()
        self.reply(Reply(status=status, headers={"Content-Type": "application/json", **(headers or {})},
                         chunks=[body], content_length=True, **kw))
        return body

    def sse(self, body: bytes, chunk_size: int | None = None, splits: list[int] | None = None,
            **kw: Any) -> bytes:
        self.reply(Reply(headers={"Content-Type": "text/event-stream"}, chunks=split(body, chunk_size, splits),
                         **kw))
        return body

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.method, request.raw_path, dict(request.headers),
                              list(request.headers.items()), body))
        if self.handler is not None:
            reply = self.handler(body)
        else:
            reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if reply.pause_before:
            await asyncio.sleep(reply.pause_before)
        resp = web.StreamResponse(status=reply.status, headers=reply.headers)
        if reply.content_length:
            resp.content_length = sum(len(c) for c in reply.chunks)
        else:
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i, chunk in enumerate(reply.chunks):
            if reply.break_after is not None and i >= reply.break_after:
                assert request.transport is not None
                request.transport.abort()
                return resp
            await resp.write(chunk)
            if reply.pause and i < len(reply.chunks) - 1:
                await asyncio.sleep(reply.pause)
        if reply.pause_after:
            await asyncio.sleep(reply.pause_after)
        await resp.write_eof()
        return resp

    @property
    def url(self) -> str:
        return self.server.url


def split(body: bytes, size: int | None = None, at: list[int] | None = None) -> list[bytes]:
    if at is not None:
        points = [0, *sorted(at), len(body)]
        return [body[a:b] for a, b in zip(points, points[1:]) if b > a]
    if size is None:
        return [body]
    return [body[i:i + size] for i in range(0, len(body), size)]


def gzipped(body: bytes) -> bytes:
    return gzip.compress(body, mtime=0)


class ProxyServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.server = ServerThread(lambda: make_app(settings))

    @property
    def url(self) -> str:
        return self.server.url

    def rows(self, where: str = "1=1", params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Ledger rows, read through a separate connection as any other reader would (SQLite or
        PostgreSQL, whichever `settings.db` names; `where` in SQLite's spelling with `?`). On PostgreSQL
        money comes back as Decimal: compare it with Decimal, or format(value, "f") for SQLite's text."""
        return ledger_rows(self.settings.db, where, params)


def ledger_rows(db: str, where: str = "1=1", params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """The calls rows of the ledger `db` (a path or a PostgreSQL URL), oldest first, as dicts."""
    target = parse_target(db)
    if target.is_postgres:
        conn = connect_postgres(target, application_name="meterproxy-tests", read_only=True)
        try:
            cur = conn.execute(f"SELECT * FROM calls WHERE {where} ORDER BY id", params)
            names = [d.name for d in cur.description]  # type: ignore[attr-defined]
            return [dict(zip(names, r)) for r in cur.fetchall()]
        finally:
            conn.close()
    raw = sqlite3.connect(target.where)
    raw.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in raw.execute(f"SELECT * FROM calls WHERE {where} ORDER BY id", params)]
    finally:
        raw.close()


def proxy_settings(tmp_path: Path, upstream_url: str, db: str | None = None, **overrides: Any) -> Settings:
    """Settings for a test proxy: the ledger `db` (a path or a PostgreSQL URL such as `ledger_target`
    gives; default a SQLite file in tmp_path; a PostgreSQL ledger's spool in tmp_path), no spool reserve."""
    db = db if db is not None else str(tmp_path / "ledger.db")
    values: dict[str, Any] = dict(host="127.0.0.1", port=0, upstream=upstream_url, db=db,
                                  spool=str(tmp_path / "ledger.spool.jsonl") if parse_target(db).is_postgres
                                  else None,
                                  admin_token=ADMIN_TOKEN, first_byte_timeout=10.0, idle_timeout=10.0,
                                  spool_reserve=0)  # else every test's proxy holds 8 MiB of real disk
    values.update(overrides)
    return Settings(**values)
