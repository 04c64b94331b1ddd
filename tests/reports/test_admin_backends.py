"""The admin API's read endpoints over real HTTP, on a SQLite ledger and on a PostgreSQL one: same answers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.admin.routes import make_admin_app
from tests.reports.support import write_target
from tests.reports.test_queries import CALLS
from tests.support.ledger import call

TOKEN = "admin-token-for-tests"
PATHS = [
    "/usage", "/usage?group_by=model,day", "/usage?group_by=key&tz=Europe/Berlin&since=2026-11-23",
    "/usage?group_by=tag:team,user&format=csv", "/usage?group_by=week&model=gpt-4o",
    "/calls", "/calls?limit=3", "/calls?key=k2&status=429", "/calls/r5", "/accuracy",
    "/usage?group_by=colour", "/calls?before=x", "/calls/nope",
]  # fmt: skip



@pytest.fixture
async def serve() -> AsyncIterator[Callable[[str], Any]]:
    """Start the admin app over the ledger `db` on a loopback port; returns its base URL."""
    runners: list[web.AppRunner] = []

    async def start(db: str) -> str:
        runner = web.AppRunner(make_admin_app(db, TOKEN))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def fetch(base: str, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(base + path, headers={"Authorization": f"Bearer {TOKEN}"}) as response:
            return response.status, await response.text()


async def test_usage_and_calls_are_the_same_from_both_backends(serve: Callable[[str], Any], tmp_path: Any,
                                                               pg_url: str) -> None:
    extra = [call(9, "2026-11-25 10:00:00", key_id="k3", model="gpt-4o", cost_usd=Decimal("0.000"),
                  tags={"team": "ads"})]  # fmt: skip
    lite = await serve(write_target(str(tmp_path / "ledger.db"), CALLS + extra))
    pg = await serve(write_target(pg_url, CALLS + extra))
    for path in PATHS:
        a, b = await fetch(lite, path), await fetch(pg, path)
        assert a[0] == b[0], path
        if a[0] == 200 and not path.startswith("/calls/"):
            assert a[1] == b[1], path
        elif a[0] == 200:  # one call: every column, the row's own id aside
            one, other = json.loads(a[1]), json.loads(b[1])
            assert {k: v for k, v in one.items() if k != "id"} == {k: v for k, v in other.items() if k != "id"}
        else:
            assert json.loads(a[1])["error"]["message"] == json.loads(b[1])["error"]["message"], path
    status, body = await fetch(pg, "/usage?group_by=model")
    assert status == 200 and json.loads(body)["totals"]["cost_usd"] == "1.60003"


async def test_an_unreachable_postgres_ledger_is_a_503_without_the_password(serve: Callable[[str], Any]) -> None:
    base = await serve("postgresql://meter:s3cret-pw@127.0.0.1:1/ledger")
    for path in ("/usage", "/calls", "/calls/r1"):
        status, body = await fetch(base, path)
        assert status == 503, (path, body)
        error = json.loads(body)["error"]
        assert error["code"] == "ledger_unavailable" and "cannot reach ledger" in error["message"]
        assert "s3cret-pw" not in body
