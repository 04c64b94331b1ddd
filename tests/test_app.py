"""make_app's resources: one cleanup context each, closed in reverse order, and closed on a failed start."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
from aiohttp import web

from proxy.app import GATE, LEDGER, LIVE, SESSION, make_app
from proxy.core.record import CallRecord
from proxy.ledger.writer import LedgerError
from tests.support import proxy_settings

Ctx = Callable[[web.Application], AsyncIterator[None]]


def traced(ctx: Ctx, index: int, log: list[tuple[str, int]]) -> Ctx:
    async def wrapped(app: web.Application) -> AsyncIterator[None]:
        gen = ctx(app)
        await gen.__anext__()
        log.append(("open", index))
        yield
        log.append(("close", index))
        with pytest.raises(StopAsyncIteration):
            await gen.__anext__()
    return wrapped


async def failing(app: web.Application) -> AsyncIterator[None]:
    raise RuntimeError("this resource cannot open")
    yield  # pragma: no cover


def row() -> CallRecord:
    return CallRecord(request_id=uuid.uuid4().hex, started_at=0.0, method="POST", endpoint="/v1/chat/completions")


async def test_resources_close_in_reverse_order_of_opening(tmp_path: Path) -> None:
    app = make_app(proxy_settings(tmp_path, "http://127.0.0.1:9"))
    log: list[tuple[str, int]] = []
    count = len(app.cleanup_ctx)
    assert count >= 6  # prices, session, ledger, gate, price watching, retention, calls in flight
    app.cleanup_ctx[:] = [traced(ctx, i, log) for i, ctx in enumerate(app.cleanup_ctx)]
    runner = web.AppRunner(app)
    await runner.setup()
    session, ledger = app[SESSION], app[LEDGER]
    await ledger.record(row())
    await runner.cleanup()
    assert log == [("open", i) for i in range(count)] + [("close", i) for i in reversed(range(count))]
    assert session.closed
    with pytest.raises(LedgerError):
        ledger.submit(row())


@pytest.mark.parametrize("fails_at", range(1, 7))
async def test_a_start_whose_nth_resource_fails_closes_the_earlier_ones(tmp_path: Path, fails_at: int) -> None:
    app = make_app(proxy_settings(tmp_path, "http://127.0.0.1:9"))
    log: list[tuple[str, int]] = []
    contexts: list[Any] = [traced(ctx, i, log) for i, ctx in enumerate(app.cleanup_ctx)]
    contexts.insert(fails_at, failing)
    app.cleanup_ctx[:] = contexts
    runner = web.AppRunner(app)
    with pytest.raises(RuntimeError, match="cannot open"):
        await runner.setup()
    await runner.cleanup()  # what the CLI's serve does after a failed setup
    assert log == [("open", i) for i in range(fails_at)] + [("close", i) for i in reversed(range(fails_at))]
    if SESSION in app:
        assert app[SESSION].closed
    if LEDGER in app:
        with pytest.raises(LedgerError):
            app[LEDGER].submit(row())
    if fails_at <= 3:
        assert GATE not in app
    assert LIVE in app
