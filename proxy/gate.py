"""The gate: what the request path asks before forwarding — may this call go, and as whom?

`Gate.admit(headers, body, path)` resolves the caller (in managed mode its managed key; in passthrough
its own key_id, X-Meter-User or the body's `user`, and X-Meter-Team), applies its rate limits and
reserves its worst-case cost against its budgets, then answers an `Admission` (settle it when the call
ends) or a `Refusal` (an OpenAI-shaped error to answer instead; nothing is forwarded).

Plain data in and out, no aiohttp web objects: headers are any case-insensitive mapping (multidict).

This module must never forward, log or repr the upstream key, and never await between a rate-limit check
and the budget hold that follows it (together they are one step, or concurrency would pass the limits).
"""

from __future__ import annotations

import asyncio
import logging
import time
from decimal import Decimal
from typing import Any, Callable, Mapping, MutableMapping

from proxy.alerts import Alerts
from proxy.attribution import api_key, key_id_of, storable
from proxy.budgets import BudgetRefusal, Budgets, Reservation
from proxy.controldb import ControlDB
from proxy.counter import CountPolicy
from proxy.counting import count_request, encoding_for, get_encoding
from proxy.errors import error_body
from proxy.keys import KeyStore, ManagedKey
from proxy.limits import Limits, LimitStore, Subject
from proxy.pricing import PriceTable
from proxy.pricing_live import LivePrices
from proxy.ratelimit import RateLimiter, RateRefusal, Ticket
from proxy.record import CallRecord, Usage

__all__ = ["Admission", "Gate", "Refusal", "open_gate", "upstream_key_from"]

log = logging.getLogger("meterproxy")
UPSTREAM_KEY_ENV = "OPENAI_API_KEY"
_INLINE_COUNT_BYTES = 16 * 1024  # bodies up to this are counted on the loop (well under a millisecond)
_METERED_SUFFIXES = ("/chat/completions", "/completions", "/embeddings", "/responses")
_OUTPUT_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_ZERO = Decimal(0)
_NO_RETRY = {"x-should-retry": "false"}  # openai SDKs would otherwise retry a 429 that cannot succeed


def upstream_key_from(configured: str | None, environ: Mapping[str, str]) -> str | None:
    """The real upstream key of managed mode: OPENAI_API_KEY, else the configured one."""
    return environ.get(UPSTREAM_KEY_ENV) or configured or None


async def open_gate(*, db_path: str, managed: bool, prices: PriceTable | LivePrices, counting: CountPolicy,
                    upstream_key: str | None = None, limits: Mapping[Subject, Limits] | None = None,
                    reserve_max_tokens: int = 4096, alert_webhook: str | None = None,
                    alert_thresholds: tuple[Decimal, ...] = (Decimal("0.8"), Decimal(1)),
                    watch_interval: float = 1.0) -> Gate:
    """Open the control tables on the ledger's file (after the ledger: it must exist) and build the gate."""
    db = ControlDB(db_path)
    await db.open()
    try:
        store = LimitStore(db, limits)
        await store.load()
        alerts = Alerts(db, alert_webhook, alert_thresholds)
        gate = Gate(managed=managed, keys=KeyStore(db), limits=store,
                    budgets=Budgets(db_path, alerts=alerts), rates=RateLimiter(), prices=prices,
                    counting=counting, upstream_key=upstream_key, reserve_max_tokens=reserve_max_tokens)
    except BaseException:
        await db.close()
        raise
    gate.db, gate.alerts = db, alerts
    db.start_watch(watch_interval)
    return gate


class Refusal:
    """An answer instead of forwarding: status, OpenAI-shaped error, headers, and who was refused."""

    __slots__ = ("code", "headers", "key_id", "message", "param", "status", "team", "type", "user")

    def __init__(self, status: int, message: str, type_: str, code: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None, key_id: str | None = None, user: str | None = None,
                 team: str | None = None) -> None:
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}
        self.key_id, self.user, self.team = key_id, user, team

    @property
    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)

    def __repr__(self) -> str:
        return f"Refusal({self.status}, {self.code!r})"


class Admission:
    """A call let through: how to authenticate upstream, whom to attribute it to, and its holds."""

    __slots__ = ("_budgets", "_reservation", "_settled", "_ticket", "authorization", "key", "key_id", "team",
                 "user")

    def __init__(self, *, key_id: str | None, user: str | None, team: str | None,
                 authorization: str | None = None, key: ManagedKey | None = None, budgets: Budgets | None = None,
                 reservation: Reservation | None = None, ticket: Ticket | None = None) -> None:
        self.key_id, self.user, self.team, self.key = key_id, user, team, key
        self.authorization = authorization  # the real key, managed mode only; None: send the client's
        self._budgets, self._reservation, self._ticket = budgets, reservation, ticket
        self._settled = False

    @property
    def headers(self) -> dict[str, str]:
        """The proxy's own x-ratelimit-* for this call (empty without rate limits)."""
        return self._ticket.headers if self._ticket is not None else {}

    def apply(self, upstream_headers: MutableMapping[str, str]) -> None:
        """In managed mode, put the real key where the client put its managed one (api-key or Bearer)."""
        if self.authorization is None:
            return
        if "api-key" in upstream_headers:  # an Azure-style client: keep its scheme
            upstream_headers["api-key"] = self.authorization
            upstream_headers.pop("Authorization", None)
        else:
            upstream_headers["Authorization"] = f"Bearer {self.authorization}"

    @property
    def settled(self) -> bool:
        return self._settled

    def settle(self, cost_usd: Decimal, tokens: int | None = None) -> None:
        """The call ended (its row is committed): release its hold, count its real cost and tokens. Once."""
        if self._settled:
            return
        self._settled = True
        if self._reservation is not None and self._budgets is not None:
            self._budgets.settle(self._reservation, cost_usd)
        if self._ticket is not None and tokens is not None:
            self._ticket.adjust(tokens)

    def __repr__(self) -> str:
        return f"Admission(key_id={self.key_id!r}, user={self.user!r}, team={self.team!r})"


class Gate:
    def __init__(self, *, managed: bool, keys: KeyStore | None, limits: LimitStore, budgets: Budgets,
                 rates: RateLimiter, prices: PriceTable | LivePrices, counting: CountPolicy,
                 upstream_key: str | None = None,
                 reserve_max_tokens: int = 4096, clock: Callable[[], float] = time.time) -> None:
        if managed and (keys is None or not upstream_key):
            raise ValueError(f"managed keys need a key store and the upstream key ({UPSTREAM_KEY_ENV})")
        self.managed = managed
        self.keys, self.limits, self.budgets, self.rates = keys, limits, budgets, rates
        self._prices, self._counting = prices, counting
        self._upstream_key = upstream_key
        self.reserve_max_tokens = reserve_max_tokens
        self._clock = clock
        self.db: ControlDB | None = None  # set by open_gate, closed by close()
        self.alerts: Alerts | None = None

    async def close(self) -> None:
        if self.alerts is not None:
            await self.alerts.close()
        if self.db is not None:
            await self.db.close()

    def __repr__(self) -> str:
        return f"Gate(managed={self.managed})"

    async def resolve(self, headers: Mapping[str, str]) -> ManagedKey | Refusal:
        """The presented managed key, if usable now; else the 401 to answer."""
        assert self.keys is not None
        presented = api_key(headers)  # type: ignore[arg-type]
        if presented is None:
            return Refusal(401, "No API key provided: send 'Authorization: Bearer <your meterproxy key>'.",
                           "invalid_request_error", "invalid_api_key", headers=_NO_RETRY)
        key = await self.keys.lookup(presented)
        status = key.status(self._clock()) if key is not None else "unknown"
        if key is None or status != "active":
            hint = presented[-4:] if len(presented) >= 8 else ""
            what = "Incorrect API key provided" if key is None else f"This API key was {status}"
            return Refusal(401, f"{what}: ...{hint}. Ask your administrator for a valid meterproxy key.",
                           "invalid_request_error", "invalid_api_key", headers=_NO_RETRY,
                           key_id=key_id_of(presented))
        return key

    async def admit(self, headers: Mapping[str, str], body: object, path: str, *, method: str = "POST",
                    body_size: int | None = None, record: CallRecord | None = None) -> Admission | Refusal:
        """Admit or refuse a request. `body` is the parsed JSON body (or None); `body_size` its length in
        bytes (small bodies are counted on the loop, others in a thread); `record` the call's ledger record
        as attribution filled it, whose key_id, user and "team" tag name the passthrough subjects (without
        it they are read from the headers and body the same way).
        """
        model = body.get("model") if isinstance(body, dict) else None
        model = model if isinstance(model, str) else None
        if self.managed:
            resolved = await self.resolve(headers)
            if isinstance(resolved, Refusal):
                return resolved
            key = resolved
            key_id, user, team = key.key_id, key.user, key.team
            if not key.allows(model) and not (model is None and method in ("GET", "HEAD")):
                what = f"model {model!r}" if model else "a request that names no model"
                return Refusal(403, f"This key may not use {what}; it may use: {', '.join(key.models or ())}",
                               "invalid_request_error", "model_not_allowed", param="model", headers=_NO_RETRY,
                               key_id=key_id, user=user, team=team)
            charges = [(Subject("key", key_id), key.limits if not key.limits.empty else None)]
        else:
            key = None
            if record is not None:
                key_id, user, team = record.key_id, record.user, record.tags.get("team")
            else:
                key_id, user, team = _attribution(headers, body)
            charges = [(Subject("key", key_id), self.limits.get(Subject("key", key_id)))] if key_id else []
        if user:
            charges.append((Subject("user", user), self.limits.get(Subject("user", user))))
        if team:
            charges.append((Subject("team", team), self.limits.get(Subject("team", team))))
        active = [(s, lim) for s, lim in charges if lim is not None and not lim.empty]
        admission: dict[str, Any] = {"key_id": key_id, "user": user, "team": team, "key": key,
                                     "authorization": self._upstream_key if self.managed else None}
        if not active:
            return Admission(**admission)
        return await self._limit(active, admission, path, body, model, body_size)

    async def _limit(self, active: list[tuple[Subject, Limits]], admission: dict[str, Any], path: str,
                     body: object, model: str | None, body_size: int | None) -> Admission | Refusal:
        who = {k: admission[k] for k in ("key_id", "user", "team")}
        tokens, worst = 0, _ZERO
        if any(lim.tpm is not None or lim.budget_usd is not None for _, lim in active):
            if body_size is not None and body_size <= _INLINE_COUNT_BYTES:
                tokens, worst = self.estimate(path, body, model, body_size)
            else:
                tokens, worst = await asyncio.to_thread(self.estimate, path, body, model, body_size)
        try:
            holds = await self.budgets.prepare(active, self._clock())
        except Exception as exc:  # the ledger cannot be read: a budget that cannot be checked does not pass
            log.error("budgets: cannot load spend from the ledger: %s", exc)
            return Refusal(503, "Budgets cannot be checked right now (the ledger is unreadable); the request was "
                           "not forwarded. Retry shortly.", "server_error", "budget_unavailable",
                           headers={"Retry-After": "1"}, **who)
        # From here on nothing awaits: the rate check, the budget check and both holds are one step.
        ticket = self.rates.try_acquire([(s, lim.rpm, lim.tpm) for s, lim in active], tokens)
        if isinstance(ticket, RateRefusal):
            headers = ticket.headers if ticket.retry_after is not None else {**ticket.headers, **_NO_RETRY}
            return Refusal(429, ticket.message, ticket.kind, "rate_limit_exceeded", headers=headers, **who)
        reservation = self.budgets.try_reserve(holds, worst) if holds else None
        if isinstance(reservation, BudgetRefusal):
            ticket.release()
            return Refusal(429, reservation.message, "insufficient_quota", "budget_exceeded", headers=_NO_RETRY,
                           **who)
        return Admission(**admission, budgets=self.budgets, reservation=reservation, ticket=ticket)

    def estimate(self, path: str, body: object, model: str | None,
                 body_size: int | None = None) -> tuple[int, Decimal]:
        """(tokens for rate limits, worst-case USD) of a request.

        Worst case: the counted prompt plus the most output it may produce (its max_tokens, else the
        configured cap, times its choices) at the model's prices. Rate limits count the prompt plus the
        max_tokens the client set (none if it set none), as OpenAI's limiter does; corrected when it ends.
        """
        if not isinstance(body, dict) or not path.rstrip("/").endswith(_METERED_SUFFIXES):
            return 0, _ZERO
        try:
            policy = self._counting
            name, exact = encoding_for(model, policy.default_encoding, policy.overrides)
            counted = count_request(path, body, get_encoding(name), exact_encoding=exact)
            prompt = counted.tokens if counted is not None else 0
        except Exception:  # a counting bug must not stop the call; a generous guess stands in
            log.exception("budgets: counting the prompt failed on %s", path)
            prompt = (body_size or 0) // 2
        asked, choices = output_limit(path, body)
        # The live table when given one (prices edited while running), with the table's own rules: the tier
        # the request asks for and a long-context price when the prompt is long. Output is priced as the
        # dearer of plain and reasoning tokens.
        table = getattr(self._prices, "table", self._prices)
        rate_tokens = prompt + (asked or 0) * choices
        if table.resolve(model) is None:
            return rate_tokens, _ZERO  # unpriced: it costs 0 in the ledger, so it spends no budget
        output = (asked if asked is not None else self.reserve_max_tokens) * choices
        tier = body.get("service_tier")
        tier = tier if isinstance(tier, str) else None
        plain = Usage(prompt_tokens=prompt, completion_tokens=output, total_tokens=prompt + output)
        reasoned = Usage(prompt_tokens=prompt, completion_tokens=output, reasoning_tokens=output,
                         total_tokens=prompt + output)
        return rate_tokens, max(table.cost(model, plain, tier)[0], table.cost(model, reasoned, tier)[0])


def output_limit(path: str, body: Mapping[str, object]) -> tuple[int | None, int]:
    """(the output tokens a request allows per choice, None if it sets no limit; its number of choices)."""
    if path.rstrip("/").endswith("/embeddings"):
        return 0, 1
    limit = next((v for f in _OUTPUT_FIELDS if _positive(v := body.get(f))), None)
    choices = max((v for f in ("n", "best_of") if _positive(v := body.get(f))), default=1)
    return limit, choices  # type: ignore[return-value]


def _positive(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _attribution(headers: Mapping[str, str], body: object) -> tuple[str | None, str | None, str | None]:
    """(key_id, user, team) as proxy.attribution records them, so a budget's subject is the ledger row's."""
    presented = api_key(headers)  # type: ignore[arg-type]
    user, team = _last(headers, "X-Meter-User"), _last(headers, "X-Meter-Team")
    if not user:
        body_user = body.get("user") if isinstance(body, dict) else None
        user = body_user if isinstance(body_user, str) else None
    return (key_id_of(presented) if presented is not None else None, storable(user) if user else None,
            storable(team) if team else None)


def _last(headers: Mapping[str, str], name: str) -> str | None:
    # attribution.attribute keeps the last of repeated X-Meter-* headers.
    getall = getattr(headers, "getall", None)
    values = getall(name, ()) if getall is not None else [headers[name]] if name in headers else []
    return values[-1] if values else None
