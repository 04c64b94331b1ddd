"""The key and budget admin routes and the key holder's own view, over real HTTP on loopback, on both backends."""

from __future__ import annotations

import time
import uuid
from decimal import Decimal
from typing import Any, AsyncIterator, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict

from proxy.admin.keys import add_key_routes, meter_usage
from proxy.control.gate import Gate, Refusal, open_gate
from proxy.control.limits import Limits, Subject
from proxy.core.credentials import key_id_of
from proxy.core.record import CallRecord
from proxy.counting.counter import CountPolicy
from proxy.ledger.writer import Ledger
from proxy.pricing.table import PriceTable

GATE = web.AppKey("gate", Gate)
PRICES = PriceTable.from_mapping({"models": {"gpt-4o": {"input": "2.50", "output": "10.00"}}})


@pytest.fixture
async def ledger(ledger_target: str) -> AsyncIterator[Ledger]:
    led = Ledger(ledger_target)  # a SQLite file, then a PostgreSQL schema
    await led.open()
    yield led
    await led.close()


async def spend(ledger: Ledger, key_id: str, cost: str, model: str = "gpt-4o", at: float | None = None) -> None:
    await ledger.record(CallRecord(request_id=uuid.uuid4().hex, started_at=at or time.time(), method="POST",
                                   endpoint="/v1/chat/completions", key_id=key_id, model=model, status=200,
                                   prompt_tokens=100, completion_tokens=10, total_tokens=110,
                                   cost_usd=Decimal(cost), priced=True))


@pytest.fixture
def client_for(ledger: Ledger, aiohttp_client: Callable[..., Any]) -> Callable[..., Any]:
    async def make(managed: bool = True) -> TestClient:
        app = web.Application()

        async def gate_ctx(app: web.Application) -> AsyncIterator[None]:
            app[GATE] = await open_gate(db_path=ledger.target.where, managed=managed, prices=PRICES,
                                        counting=CountPolicy(), upstream_key="sk-upstream" if managed else None,
                                        limits={Subject("team", "ml"): Limits(Decimal(100), "month")})
            yield
            await app[GATE].close()

        app.cleanup_ctx.append(gate_ctx)
        admin = web.Application()
        add_key_routes(admin, GATE)
        app.add_subapp("/admin", admin)
        app.router.add_get("/meter/usage", meter_usage(GATE))
        return await aiohttp_client(app)

    return make


async def call(client: TestClient, method: str, path: str, status: int, **kw: Any) -> Any:
    resp = await client.request(method, path, **kw)
    body = await resp.json()
    assert resp.status == status, body
    return body


async def test_create_shows_the_key_once_and_reads_money_exactly(client_for: Callable[..., Any]) -> None:
    client = await client_for()
    created = await call(client, "POST", "/admin/keys", 201, data='{"user": "alice", "team": "ml", '
                         '"budget_usd": 0.1, "budget_period": "day", "models": ["gpt-4o*"], "rpm": 60}')
    key, key_id = created["key"], created["key_id"]
    assert key_id == key_id_of(key) and created["budget_usd"] == "0.1" and created["left_usd"] == "0.1"
    assert created["status"] == "active" and created["models"] == ["gpt-4o*"] and created["rpm"] == 60
    shown = await call(client, "GET", f"/admin/keys/{key_id}", 200)
    listed = await call(client, "GET", "/admin/keys", 200)
    assert "key" not in shown and [k["key_id"] for k in listed["keys"]] == [key_id]
    assert key not in str(shown) + str(listed)


@pytest.mark.parametrize("method,path,body,status,param", [
    ("POST", "/admin/keys", "{not json", 400, None),
    ("POST", "/admin/keys", "[1]", 400, None),
    ("POST", "/admin/keys", '{"team": "x"}', 400, "user"),
    ("POST", "/admin/keys", '{"user": "a", "budget_usd": "lots"}', 400, "budget_usd"),
    ("POST", "/admin/keys", '{"user": "a", "admin": true}', 400, "admin"),
    ("GET", "/admin/keys/0123456789abcdef", None, 404, None),
    ("PATCH", "/admin/keys/0123456789abcdef", '{"rpm": 5}', 404, None),
    ("DELETE", "/admin/keys/0123456789abcdef", None, 404, None),
    ("GET", "/admin/keys?revoked=maybe", None, 400, "revoked"),
    ("PUT", "/admin/budgets/group/x", '{"budget_usd": 1}', 400, "kind"),
    ("PUT", "/admin/budgets/user/x", '{"budget_usd": 1, "budget_period": "week"}', 400, "budget_period"),
    ("GET", "/admin/budgets/user/nobody", None, 404, None),
    ("DELETE", "/admin/budgets/user/nobody", None, 404, None),
])
async def test_mistakes_are_openai_shaped(client_for: Callable[..., Any], method: str, path: str,
                                          body: str | None, status: int, param: str | None) -> None:
    client = await client_for()
    error = (await call(client, method, path, status, data=body))["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == param


async def test_spend_so_far_update_and_revoke(client_for: Callable[..., Any], ledger: Ledger) -> None:
    client = await client_for()
    created = await call(client, "POST", "/admin/keys", 201, json={"user": "bob", "budget_usd": "1",
                                                                   "budget_period": "month"})
    key, key_id = created["key"], created["key_id"]
    await spend(ledger, key_id, "0.25")
    await spend(ledger, key_id, "0.05")
    await spend(ledger, key_id, "9", at=time.time() - 40 * 86400)  # an earlier month
    shown = await call(client, "GET", f"/admin/keys/{key_id}", 200)
    assert (shown["spent_usd"], shown["left_usd"], shown["reserved_usd"]) == ("0.30", "0.70", "0")

    patched = await call(client, "PATCH", f"/admin/keys/{key_id}", 200, json={"budget_period": "total",
                                                                              "tpm": 100000})
    assert (patched["budget_period"], patched["spent_usd"], patched["left_usd"], patched["tpm"]) == (
        "total", "9.30", "0", 100000)
    gate: Gate = client.app[GATE]
    refused = await gate.admit(CIMultiDict(Authorization=f"Bearer {key}"), {"model": "gpt-4o"},
                               "/v1/chat/completions")
    assert isinstance(refused, Refusal) and refused.code == "budget_exceeded"

    revoked = await call(client, "DELETE", f"/admin/keys/{key_id}", 200)
    assert revoked["status"] == "revoked" and revoked["revoked_at"]
    refused = await gate.admit(CIMultiDict(Authorization=f"Bearer {key}"), {"model": "gpt-4o"},
                               "/v1/chat/completions")
    assert isinstance(refused, Refusal) and refused.code == "invalid_api_key"
    active = await call(client, "GET", "/admin/keys?revoked=false", 200)
    assert active["keys"] == []


async def test_budgets_of_passthrough_subjects(client_for: Callable[..., Any], ledger: Ledger) -> None:
    client = await client_for(managed=False)
    put = await call(client, "PUT", "/admin/budgets/user/alice", 200,
                     data='{"budget_usd": 2.5, "budget_period": "month", "rpm": 10}')
    assert (put["kind"], put["name"], put["budget_usd"], put["source"], put["rpm"]) == (
        "user", "alice", "2.5", "api", 10)
    listed = (await call(client, "GET", "/admin/budgets", 200))["budgets"]
    assert [(b["kind"], b["name"], b["source"]) for b in listed] == [("team", "ml", "config"),
                                                                    ("user", "alice", "api")]
    gate: Gate = client.app[GATE]
    assert gate.limits.get(Subject("user", "alice")) == Limits(Decimal("2.5"), "month", 10)
    deleted = await call(client, "DELETE", "/admin/budgets/user/alice", 200)
    assert deleted["deleted"] is True and gate.limits.get(Subject("user", "alice")) is None


async def test_a_managed_key_takes_its_limits_on_the_key(client_for: Callable[..., Any]) -> None:
    client = await client_for()
    created = await call(client, "POST", "/admin/keys", 201, json={"user": "carol"})
    error = (await call(client, "PUT", f"/admin/budgets/key/{created['key_id']}", 409,
                        json={"budget_usd": 1}))["error"]
    assert error["code"] == "managed_key" and "PATCH" in error["message"]


async def test_a_key_holder_sees_its_own_usage_and_budget(client_for: Callable[..., Any], ledger: Ledger) -> None:
    client = await client_for()
    created = await call(client, "POST", "/admin/keys", 201, json={"user": "dave", "team": "ml",
                                                                   "budget_usd": "2", "budget_period": "day"})
    key, key_id = created["key"], created["key_id"]
    await spend(ledger, key_id, "0.5")
    await spend(ledger, key_id, "0.25", model="gpt-4o-mini")
    await spend(ledger, key_id_of("sk-someone-else"), "7")
    mine = await call(client, "GET", "/meter/usage", 200, headers={"Authorization": f"Bearer {key}"})
    assert (mine["key_id"], mine["user"], mine["team"]) == (key_id, "dave", "ml")
    assert sorted((r["model"], r["cost_usd"], r["calls"]) for r in mine["rows"]) == [
        ("gpt-4o", "0.5", 1), ("gpt-4o-mini", "0.25", 1)]
    assert all(r["day"] == time.strftime("%Y-%m-%d", time.gmtime()) for r in mine["rows"])
    budgets = {(b["kind"], b["period"]): b for b in mine["budgets"]}
    assert budgets[("key", "day")]["left_usd"] == "1.25" and budgets[("team", "month")]["budget_usd"] == "100"

    for auth, status in (({}, 401), ({"Authorization": "Bearer mp-nope"}, 401)):
        assert (await call(client, "GET", "/meter/usage", status, headers=auth))["error"]["code"] == "invalid_api_key"
    bad = await call(client, "GET", "/meter/usage?since=yesterday", 400, headers={"Authorization": f"Bearer {key}"})
    assert bad["error"]["param"] == "since"


async def test_usage_view_in_passthrough_is_by_the_presented_key(client_for: Callable[..., Any],
                                                                 ledger: Ledger) -> None:
    client = await client_for(managed=False)
    await spend(ledger, key_id_of("sk-own-key-1234"), "0.125")
    mine = await call(client, "GET", "/meter/usage", 200, headers={"Authorization": "Bearer sk-own-key-1234"})
    assert mine["totals"]["cost_usd"] == "0.125" and mine["budgets"][0]["budget_usd"] is None
    assert mine["budgets"][0]["spent_usd"] == "0.125"


async def test_an_unusable_control_store_is_a_503_in_openai_shape(client_for: Callable[..., Any]) -> None:
    client = await client_for()
    gate = client.server.app[GATE]
    assert gate.db is not None
    gate.db.close_sync()  # its connections gone (as when the database cannot be reached)
    for method, path, body in (("POST", "/admin/keys", '{"user": "a"}'), ("GET", "/admin/keys", None),
                               ("PUT", "/admin/budgets/user/x", '{"budget_usd": 1}')):
        error = (await call(client, method, path, 503, data=body))["error"]
        assert error["type"] == "server_error" and error["code"] == "control_store_unavailable", error
        assert set(error) == {"message", "type", "param", "code"}
