"""The gate, without HTTP: managed keys, passthrough subjects, rate limits and budgets on real SQLite."""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
from multidict import CIMultiDict

from proxy.control.budgets import Budgets
from proxy.control.db import ControlDB
from proxy.control.gate import Admission, Gate, Refusal, open_gate
from proxy.control.keys import parse_key_fields
from proxy.control.limits import Limits, LimitStore, Subject
from proxy.control.ratelimit import RateLimiter
from proxy.core.record import CallRecord
from proxy.counting import count_request, get_encoding
from proxy.counting.counter import CountPolicy
from proxy.ledger.writer import Ledger
from proxy.pricing.table import PriceTable

UPSTREAM_KEY = "sk-real-upstream-key-1234"
PRICES = PriceTable.from_mapping({"models": {
    "gpt-4o": {"input": "2.50", "output": "10.00"},
    "o3": {"input": "2", "output": "8", "reasoning": "12"},
    "text-embedding-3-small": {"input": "0.02"},
    "gpt-5": {"input": "1.25", "output": "10", "max_output": 128000},
}})
CHAT = "/v1/chat/completions"


def chat(model: str = "gpt-4o", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Say hello to the budget."}], **extra}


def headers(key: str | None = None, **more: str) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict(more)
    if key is not None:
        out["Authorization"] = f"Bearer {key}"
    return out


@pytest.fixture
async def ledger_path(tmp_path: Path) -> str:
    led = Ledger(tmp_path / "ledger.db")
    await led.open()
    await led.close()
    return led.path


@pytest.fixture
async def make_gate(ledger_path: str) -> AsyncIterator[Callable[..., Any]]:
    opened: list[Gate] = []

    async def make(managed: bool = True, **kw: Any) -> Gate:
        gate = await open_gate(db_path=ledger_path, managed=managed, prices=PRICES, counting=CountPolicy(),
                               upstream_key=UPSTREAM_KEY if managed else None, **kw)
        opened.append(gate)
        return gate

    yield make
    for gate in opened:
        await gate.close()


def refusal(result: Admission | Refusal, status: int, code: str) -> Refusal:
    assert isinstance(result, Refusal), result
    assert (result.status, result.code) == (status, code), result.message
    body = json.loads(result.body)["error"]
    assert body["code"] == code and body["message"] == result.message and body["type"] == result.type
    return result


async def test_managed_unknown_revoked_expired_or_missing_keys_get_401(make_gate: Callable[..., Any]) -> None:
    gate = await make_gate()
    assert gate.keys is not None
    live, _ = await gate.keys.create({"user": "alice"})
    revoked, rec = await gate.keys.create({"user": "alice"})
    await gate.keys.revoke(rec.key_id)
    expired, _ = await gate.keys.create(parse_key_fields({"user": "alice", "expires_at": 1000}, creating=True))
    assert isinstance(await gate.admit(headers(live), chat(), CHAT), Admission)
    for key, words in ((None, "No API key"), ("mp-unknown-0000", "Incorrect API key"), (revoked, "revoked"),
                       (expired, "expired"), (UPSTREAM_KEY, "Incorrect API key")):
        refused = refusal(await gate.admit(headers(key), chat(), CHAT), 401, "invalid_api_key")
        assert words in refused.message and refused.headers == {"x-should-retry": "false"}
        if key is not None:
            assert key not in refused.message and refused.key_id is not None


async def test_managed_admission_swaps_in_the_upstream_key_and_attributes_by_the_key(
        make_gate: Callable[..., Any]) -> None:
    gate = await make_gate()
    key, rec = await gate.keys.create({"user": "alice", "team": "search"})
    adm = await gate.admit(headers(key, **{"X-Meter-User": "mallory", "X-Meter-Team": "other"}), chat(), CHAT)
    assert isinstance(adm, Admission)
    assert (adm.key_id, adm.user, adm.team) == (rec.key_id, "alice", "search")
    bearer = headers(key, Accept="application/json")
    adm.apply(bearer)
    assert bearer.getall("Authorization") == [f"Bearer {UPSTREAM_KEY}"]
    azure: CIMultiDict[str] = CIMultiDict({"api-key": key})
    adm.apply(azure)
    assert dict(azure) == {"api-key": UPSTREAM_KEY}
    assert UPSTREAM_KEY not in repr(adm) + repr(gate)


async def test_a_key_limited_to_models(make_gate: Callable[..., Any]) -> None:
    gate = await make_gate()
    key, _ = await gate.keys.create({"user": "u", "models": ("gpt-4o-mini", "o3*")})
    assert isinstance(await gate.admit(headers(key), chat("o3-mini"), CHAT), Admission)
    refused = refusal(await gate.admit(headers(key), chat("gpt-4o"), CHAT), 403, "model_not_allowed")
    assert refused.param == "model" and "gpt-4o" in refused.message
    refusal(await gate.admit(headers(key), None, "/v1/audio/transcriptions"), 403, "model_not_allowed")
    assert isinstance(await gate.admit(headers(key), None, "/v1/models", method="GET"), Admission)


async def test_passthrough_without_limits_changes_nothing(make_gate: Callable[..., Any]) -> None:
    gate = await make_gate(managed=False)
    adm = await gate.admit(headers("sk-client-own-key"), chat(user="end-user-7"), CHAT)
    assert isinstance(adm, Admission) and adm.authorization is None and adm.user == "end-user-7"
    sent = headers("sk-client-own-key")
    adm.apply(sent)
    assert sent["Authorization"] == "Bearer sk-client-own-key"
    adm.settle(Decimal("0.01"), 10)


async def test_passthrough_rate_limit_per_user_from_config(make_gate: Callable[..., Any]) -> None:
    gate = await make_gate(managed=False, limits={Subject("user", "alice"): Limits(rpm=2)})
    for _ in range(2):
        assert isinstance(await gate.admit(headers("sk-a", **{"X-Meter-User": "alice"}), chat(), CHAT), Admission)
    assert isinstance(await gate.admit(headers("sk-a", **{"X-Meter-User": "bob"}), chat(), CHAT), Admission)
    refused = refusal(await gate.admit(headers("sk-b", **{"X-Meter-User": "alice"}), chat(), CHAT),
                      429, "rate_limit_exceeded")
    assert refused.type == "requests" and refused.user == "alice"
    assert int(refused.headers["Retry-After"]) >= 59 and refused.headers["x-ratelimit-remaining-requests"] == "0"


async def test_passthrough_subjects_are_the_ledger_rows(make_gate: Callable[..., Any]) -> None:
    limits = {Subject("user", "bob"): Limits(rpm=1), Subject("team", "ml"): Limits(rpm=1)}
    gate = await make_gate(managed=False, limits=limits)
    repeated: CIMultiDict[str] = CIMultiDict([("Authorization", "Bearer sk-a"), ("X-Meter-User", "alice"),
                                              ("X-Meter-User", "bob")])
    adm = await gate.admit(repeated, chat(user="carol"), CHAT)
    assert isinstance(adm, Admission) and adm.user == "bob"  # the last, as attribution records it
    refusal(await gate.admit(headers("sk-b"), chat(user="bob"), CHAT), 429, "rate_limit_exceeded")
    record = CallRecord(request_id="r", started_at=0, method="POST", endpoint=CHAT, key_id="k", user="zed",
                        tags={"team": "ml"})
    adm = await gate.admit(headers("sk-c", **{"X-Meter-User": "bob"}), chat(), CHAT, record=record)
    assert isinstance(adm, Admission) and (adm.key_id, adm.user, adm.team) == ("k", "zed", "ml")
    refusal(await gate.admit(headers("sk-c"), chat(), CHAT, record=record), 429, "rate_limit_exceeded")


async def test_tokens_per_minute_count_the_estimate_then_the_real_tokens(make_gate: Callable[..., Any]) -> None:
    gate = await make_gate(managed=False, limits={Subject("team", "ml"): Limits(tpm=3000)})
    ask = headers("sk-a", **{"X-Meter-Team": "ml"})
    first = await gate.admit(ask, chat(max_tokens=2000), CHAT)
    assert isinstance(first, Admission)
    refusal(await gate.admit(ask, chat(max_tokens=2000), CHAT), 429, "rate_limit_exceeded")
    first.settle(Decimal(0), 30)  # it used 30 tokens, not 2000 + prompt
    assert isinstance(await gate.admit(ask, chat(max_tokens=2000), CHAT), Admission)


def prompt_tokens(body: dict[str, Any], path: str = CHAT) -> int:
    counted = count_request(path, body, get_encoding("o200k_base"))
    assert counted is not None
    return counted.tokens


@pytest.mark.parametrize("path,body,output,rate_output,usd_per_m", [
    (CHAT, chat(max_completion_tokens=100, max_tokens=7), 100, 100, (Decimal("2.50"), Decimal(10))),
    (CHAT, chat(max_tokens=50, n=3), 150, 150, (Decimal("2.50"), Decimal(10))),
    # No limit and no max_output for the model: the configured fallback; rate limits reserve the same worst case.
    (CHAT, chat(), 4096, 4096, (Decimal("2.50"), Decimal(10))),
    (CHAT, chat("gpt-5"), 128000, 128000, (Decimal("1.25"), Decimal(10))),  # the model's own max_output
    (CHAT, chat(max_tokens="300", max_completion_tokens=20.5), 300, 300, (Decimal("2.50"), Decimal(10))),
    (CHAT, chat(max_tokens=10, n="4"), 40, 40, (Decimal("2.50"), Decimal(10))),
    (CHAT, chat("gpt-5", max_tokens=10, max_completion_tokens="lots"), 128000, 128000,
     (Decimal("1.25"), Decimal(10))),  # a field an upstream might ignore: no limit at all
    ("/v1/responses", {"model": "gpt-4o", "input": "hi", "max_output_tokens": 9, "max_tokens": 90}, 90, 90,
     (Decimal("2.50"), Decimal(10))),
    (CHAT, chat("o3", max_completion_tokens=10), 10, 10, (Decimal(2), Decimal(12))),  # reasoning's higher price
    ("/v1/responses", {"model": "gpt-4o", "input": "hi", "max_output_tokens": 9}, 9, 9,
     (Decimal("2.50"), Decimal(10))),
    ("/v1/embeddings", {"model": "text-embedding-3-small", "input": "a b c"}, 0, 0, (Decimal("0.02"), Decimal(0))),
    (CHAT, chat("unlisted-model", max_tokens=5), 5, 5, None),
])
async def test_worst_case_is_the_counted_prompt_plus_max_output(
        make_gate: Callable[..., Any], path: str, body: dict[str, Any], output: int, rate_output: int,
        usd_per_m: tuple[Decimal, Decimal] | None) -> None:
    gate = await make_gate(managed=False)
    tokens, worst = gate.estimate(path, body, body["model"])
    prompt = prompt_tokens(body, path)
    assert tokens == prompt + rate_output
    expected = Decimal(0) if usd_per_m is None else (prompt * usd_per_m[0] + output * usd_per_m[1]) / 1_000_000
    assert worst == expected


async def test_fifty_concurrent_requests_against_a_key_budget_for_ten(make_gate: Callable[..., Any]) -> None:
    gate = await make_gate()
    body = chat(max_tokens=1000)
    _, worst = gate.estimate(CHAT, body, "gpt-4o")
    key, _ = await gate.keys.create({"user": "alice", "budget_usd": worst * 10, "budget_period": "day"})
    raw = json.dumps(body).encode()

    results = await asyncio.gather(*(gate.admit(headers(key), json.loads(raw), CHAT, body_size=len(raw))
                                     for _ in range(50)))
    admitted = [r for r in results if isinstance(r, Admission)]
    assert len(admitted) == 10
    for r in results:
        if isinstance(r, Refusal):
            refusal(r, 429, "budget_exceeded")
            assert r.type == "insufficient_quota" and r.headers["x-should-retry"] == "false"
    for adm in admitted:
        adm.settle(worst / 2, 100)
    again = await asyncio.gather(*(gate.admit(headers(key), body, CHAT) for _ in range(50)))
    assert sum(isinstance(r, Admission) for r in again) == 5  # half the budget was left


async def test_a_budget_refusal_gives_back_its_rate_limit_slot_and_changes_apply_at_once(
        make_gate: Callable[..., Any]) -> None:
    gate = await make_gate()
    key, rec = await gate.keys.create({"user": "bob", "budget_usd": "0", "rpm": 1})
    refusal(await gate.admit(headers(key), chat(), CHAT), 429, "budget_exceeded")
    await gate.keys.update(rec.key_id, {"budget_usd": Decimal(5)})
    assert isinstance(await gate.admit(headers(key), chat(), CHAT), Admission)  # the rpm slot was free
    refusal(await gate.admit(headers(key), chat(), CHAT), 429, "rate_limit_exceeded")


async def test_user_and_team_budgets_apply_to_managed_keys(make_gate: Callable[..., Any]) -> None:
    gate = await make_gate()
    await gate.limits.put(Subject("team", "ml"), Limits(Decimal("0"), "month"))
    key, _ = await gate.keys.create({"user": "carol", "team": "ml"})
    refused = refusal(await gate.admit(headers(key), chat(), CHAT), 429, "budget_exceeded")
    assert "team 'ml'" in refused.message and refused.team == "ml"


async def test_an_unreadable_ledger_refuses_budgeted_calls(ledger_path: str, tmp_path: Path) -> None:
    db = ControlDB(ledger_path)
    await db.open()
    try:
        store = LimitStore(db, {Subject("user", "u"): Limits(Decimal(1), "day")})
        await store.load()
        gate = Gate(managed=False, keys=None, limits=store, budgets=Budgets(str(tmp_path / "gone.db")),
                    rates=RateLimiter(), prices=PRICES, counting=CountPolicy())
        refusal(await gate.admit(headers("sk-x", **{"X-Meter-User": "u"}), chat(), CHAT), 503, "budget_unavailable")
        assert isinstance(await gate.admit(headers("sk-x", **{"X-Meter-User": "v"}), chat(), CHAT), Admission)
    finally:
        await db.close()


def test_managed_mode_needs_the_upstream_key() -> None:
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        Gate(managed=True, keys=None, limits=None, budgets=None, rates=RateLimiter(),  # type: ignore[arg-type]
             prices=PRICES, counting=CountPolicy())


async def test_an_unreachable_shared_store_refuses_limited_calls_with_503(ledger_path: str) -> None:
    from proxy.control.shared import SharedLimits
    from proxy.ledger.target import parse_target

    db = ControlDB(ledger_path)
    await db.open()
    shared = SharedLimits(parse_target("postgresql://meter:pw-not-shown@127.0.0.1:1/ledger"))
    try:
        store = LimitStore(db, {Subject("user", "u"): Limits(Decimal(1), "day"), Subject("user", "r"): Limits(rpm=5)})
        await store.load()
        gate = Gate(managed=False, keys=None, limits=store, budgets=Budgets(ledger_path), rates=RateLimiter(),
                    prices=PRICES, counting=CountPolicy(), shared=shared)
        for user in ("u", "r"):
            refused = refusal(await gate.admit(headers("sk-x", **{"X-Meter-User": user}), chat(), CHAT), 503,
                              "budget_unavailable")
            assert "pw-not-shown" not in refused.message and refused.headers["Retry-After"] == "1"
        assert isinstance(await gate.admit(headers("sk-x", **{"X-Meter-User": "v"}), chat(), CHAT), Admission)
    finally:
        await shared.close()
        await db.close()


async def test_on_postgres_the_gate_shares_budgets_and_rates_settled_by_the_ledger(pg_url: str) -> None:
    # open_gate opens the control store on the URL: ledger/control_store.py (i-control); a no-op once merged.
    from proxy.control.shared import SharedLimits
    from proxy.ledger import budget_store

    ledger = Ledger(pg_url)
    ledger.db.after_insert.append(budget_store.settle_rows)  # as app.py does on PostgreSQL
    await ledger.open()
    gates: list[Gate] = []
    try:
        worst = (await _pg_gate(pg_url, gates, {})).estimate(CHAT, chat(max_tokens=100), "gpt-4o")[1]
        limits = {Subject("team", "ml"): Limits(worst * 3, "day", rpm=4)}
        one, two = await _pg_gate(pg_url, gates, limits), await _pg_gate(pg_url, gates, limits)
        assert isinstance(one.shared, SharedLimits) and one.shared is not two.shared

        def record(n: int) -> CallRecord:
            return CallRecord(request_id=f"g{n}", started_at=time.time(), method="POST", endpoint=CHAT,
                              ended_at=time.time(), status=200, tags={"team": "ml"}, priced=True)

        async def ask(gate: Gate, n: int) -> Admission | Refusal:
            return await gate.admit(headers("sk-a"), chat(max_tokens=100), CHAT, record=record(n))

        first = [await ask(g, n) for n, g in enumerate((one, two, one))]
        assert all(isinstance(a, Admission) for a in first)
        assert first[2].headers["x-ratelimit-remaining-requests"] == "1"
        refused = refusal(await ask(two, 3), 429, "budget_exceeded")  # 3 worst cases held, across both gates
        assert refused.type == "insufficient_quota" and "team 'ml'" in refused.message
        await ledger.record(record(0))  # its row costs nothing: the hold goes with the row
        first[0].settle(Decimal(0), 10)
        assert isinstance(await ask(two, 4), Admission)  # the refusal took no rpm slot: this is the 4th
        refused = refusal(await ask(one, 5), 429, "rate_limit_exceeded")
        assert refused.type == "requests" and int(refused.headers["Retry-After"]) >= 59
        states = await one.budgets.states([(Subject("team", "ml"), "day", worst * 3)], time.time())
        assert (states[0].spent, states[0].reserved) == (Decimal(0), worst * 3)
    finally:
        for gate in gates:
            await gate.close()
        await ledger.close()


async def _pg_gate(pg_url: str, gates: list[Gate], limits: dict[Subject, Limits]) -> Gate:
    gate = await open_gate(db_path=pg_url, managed=False, prices=PRICES, counting=CountPolicy(), limits=limits)
    gates.append(gate)
    return gate
