"""Tests for proxy.pricing_live: a real pricing file edited under a watching LivePrices, refused edits,
the admin routes (through the real admin app and its token) and SIGHUP."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.admin.pricing import admin_routes
from proxy.admin.routes import make_admin_app
from proxy.core.record import Usage
from proxy.pricing.live import LivePrices

LIVE = web.AppKey("live_prices", LivePrices)
TOKEN = "admin-secret"
MILLION = Usage(prompt_tokens=1_000_000, total_tokens=1_000_000)

GOOD = "models:\n  m:\n    input: 1.00\n    output: 2\n"


def price_of(live: LivePrices) -> Decimal:
    return live.table.cost("m", MILLION)[0]  # a plain attribute read, as a call does


async def until(check: Callable[[], bool], within: float = 2.0) -> float:
    """Poll `check` until it holds; the seconds it took. Fails after `within` seconds."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > within:
            pytest.fail(f"not within {within} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


@pytest.fixture
async def live(tmp_path: Path) -> Any:
    path = tmp_path / "pricing.yaml"
    path.write_text(GOOD, encoding="utf-8")
    prices = LivePrices(path)
    yield prices
    await prices.stop()


async def test_an_edit_applies_within_two_seconds_without_restart(live: LivePrices) -> None:
    path = Path(live.path)
    first_version, first_loaded = live.version, live.loaded_at
    live.start_watching()
    await asyncio.sleep(0.6)  # a poll or so with nothing to do
    assert price_of(live) == Decimal(1) and live.version == first_version
    path.write_text(GOOD.replace("1.00", "3.00"), encoding="utf-8")  # same size, same inode
    await until(lambda: price_of(live) == Decimal(3))
    assert live.version != first_version and live.loaded_at > first_loaded and live.error is None
    # Two edits in quick succession, same size again: the last one wins.
    path.write_text(GOOD.replace("1.00", "4.00"), encoding="utf-8")
    path.write_text(GOOD.replace("1.00", "5.00"), encoding="utf-8")
    await until(lambda: price_of(live) == Decimal(5))
    # An editor that writes a new file and renames it over the old one.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(GOOD.replace("1.00", "6.50"), encoding="utf-8")
    os.replace(tmp, path)
    await until(lambda: price_of(live) == Decimal("6.5"))


BAD_EDITS = [
    ("models:\n  m:\n    input: 1.00\n   output: [\n", "YAML error at line"),
    ("models:\n  m:\n    input: -1.00\n    output: 2\n", "line 3: model 'm': 'input' price -1.00 is negative"),
    ("models:\n  m:\n    input: 1.00\n    outptu: 2\n", "line 4: model 'm': unknown key 'outptu'"),
    ("models:\n  m:\n    input: 1.00\n    tiers: {flex: {input: cheap}}\n", "line 4: model 'm', tier 'flex'"),
]


@pytest.mark.parametrize(("text", "words"), BAD_EDITS)
async def test_a_bad_edit_is_refused_and_the_old_table_stays(live: LivePrices, caplog: pytest.LogCaptureFixture,
                                                             text: str, words: str) -> None:
    caplog.set_level(logging.INFO, logger="meterproxy.pricing")
    path = Path(live.path)
    version = live.version
    live.start_watching(interval=0.05)
    path.write_text(text, encoding="utf-8")
    await until(lambda: live.error is not None)
    assert live.version == version and price_of(live) == Decimal(1)
    assert live.error is not None and live.error.message.startswith(f"{path}: ") and words in live.error.message
    await asyncio.sleep(0.5)  # ten more polls while the file is fresh: the refusal is not logged again
    refused = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(refused) == 1
    line = refused[0].getMessage()
    assert "\n" not in line and str(path) in line and words in line and version in line
    path.write_text(GOOD.replace("1.00", "7.00"), encoding="utf-8")  # fixed: applies, the error goes
    await until(lambda: price_of(live) == Decimal(7) and live.error is None)


async def test_deleted_file_keeps_the_table_until_it_returns(live: LivePrices) -> None:
    path = Path(live.path)
    live.start_watching(interval=0.05)
    path.unlink()
    await until(lambda: live.error is not None)
    assert "cannot read price table" in live.error.message and price_of(live) == Decimal(1)  # type: ignore[union-attr]
    path.write_text(GOOD.replace("1.00", "8.00"), encoding="utf-8")
    await until(lambda: price_of(live) == Decimal(8) and live.error is None)


async def test_stop_ends_the_watcher(live: LivePrices) -> None:
    live.start_watching()
    assert any(t.get_name().startswith("pricing watcher") for t in asyncio.all_tasks())
    await live.stop()
    assert not any(t.get_name().startswith("pricing watcher") for t in asyncio.all_tasks())


async def test_reload_returns_whether_a_new_table_is_in_force(live: LivePrices) -> None:
    path = Path(live.path)
    assert await live.reload() is False  # nothing changed
    path.write_text(GOOD.replace("1.00", "2.00"), encoding="utf-8")
    assert await live.reload() is True and price_of(live) == Decimal(2)
    path.write_text("models: {m: {input: -2}}\n", encoding="utf-8")
    assert await live.reload() is False and live.error is not None and price_of(live) == Decimal(2)


# --- admin routes -------------------------------------------------------------------------------------


@pytest.fixture
async def admin(live: LivePrices, tmp_path: Path, aiohttp_client: Callable[..., Any]) -> Any:
    app = web.Application()
    app[LIVE] = live
    app.add_subapp("/admin", make_admin_app(str(tmp_path / "ledger.db"), TOKEN,
                                            lambda sub: admin_routes(sub, LIVE)))
    client = await aiohttp_client(app)
    client.session.headers["Authorization"] = f"Bearer {TOKEN}"
    return client


async def test_get_pricing_shows_the_active_table(admin: Any, live: LivePrices) -> None:
    resp = await admin.get("/admin/pricing")
    assert resp.status == 200
    body = await resp.json()
    assert body["version"] == live.version and body["source"] == live.path and body["error"] is None
    assert body["loaded_at"].endswith("Z")
    assert body["models"]["m"]["input"] == "1.00" and body["models"]["m"]["reasoning"] == "2"
    assert body["default"] is None


async def test_reload_endpoint(admin: Any, live: LivePrices) -> None:
    path = Path(live.path)
    first = live.version
    resp = await admin.post("/admin/pricing/reload")
    assert resp.status == 200
    assert (await resp.json())["reloaded"] is False
    path.write_text(GOOD.replace("1.00", "2.50"), encoding="utf-8")
    resp = await admin.post("/admin/pricing/reload")
    body = await resp.json()
    assert resp.status == 200 and body["reloaded"] is True and body["version"] == live.version != first
    assert body["error"] is None and price_of(live) == Decimal("2.5")
    good = live.version

    path.write_text("models:\n  m:\n    input: 1\n    output: -2\n", encoding="utf-8")
    resp = await admin.post("/admin/pricing/reload")
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_pricing"
    assert f"{path}: line 4: model 'm': 'output' price -2 is negative" in error["message"]
    assert good in error["message"] and live.version == good

    shown = await (await admin.get("/admin/pricing")).json()
    assert shown["version"] == good and shown["models"]["m"]["input"] == "2.50"
    assert "line 4" in shown["error"]["message"] and shown["error"]["at"].endswith("Z")


async def test_pricing_routes_need_the_admin_token(admin: Any) -> None:
    for method, url in (("GET", "/admin/pricing"), ("POST", "/admin/pricing/reload")):
        resp = await admin.request(method, url, headers={"Authorization": "Bearer wrong"})
        assert resp.status == 401


# --- SIGHUP -------------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
async def test_sighup_reloads(live: LivePrices) -> None:
    previous = signal.getsignal(signal.SIGHUP)
    try:
        live.install_sighup(asyncio.get_running_loop())
        Path(live.path).write_text(GOOD.replace("1.00", "9.00"), encoding="utf-8")
        assert price_of(live) == Decimal(1)  # not watching: only the signal reloads
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: price_of(live) == Decimal(9))
        await live.stop()  # removes the handler
    finally:
        signal.signal(signal.SIGHUP, previous)
