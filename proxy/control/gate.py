"""The gate: what the request path asks before forwarding — may this call go, and as whom?

`Gate.admit(headers, body, path)` resolves the caller (in managed mode its managed key; in passthrough
its own key_id, X-Meter-User or the body's `user`, and X-Meter-Team), applies its rate limits and
reserves its worst-case cost against its budgets, then answers an `Admission` (settle it when the call
ends) or a `Refusal` (an OpenAI-shaped error to answer instead; nothing is forwarded).

Plain data in and out, no aiohttp web objects: headers are any case-insensitive mapping (multidict).

This module must never forward, log or repr the upstream key, and never await between a rate-limit check
and the budget hold that follows it (together they are one step, or concurrency would pass the limits). On
PostgreSQL that step is one database transaction shared by every replica (`control/shared.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from decimal import ROUND_CEILING, Decimal
from typing import Any, Callable, Mapping, MutableMapping, Protocol, TypedDict, Unpack

from proxy.control.alerts import Alerts
from proxy.control.budgets import BudgetRefusal, Budgets, Reservation
from proxy.control.db import ControlDB, ControlDBError
from proxy.control.keys import KeyStore, ManagedKey
from proxy.control.limits import Limits, LimitStore, Subject
from proxy.control.ratelimit import RateLimiter, RateRefusal, Ticket
from proxy.control.shared import DEFAULT_CONNECTIONS, DEFAULT_LEASE, DEFAULT_WAIT, SharedBudgets, SharedLimits
from proxy.core.attribution import caller_of, storable, team_of
from proxy.core.credentials import api_key, key_id_of
from proxy.core.errors import MeterproxyError, error_body
from proxy.core.record import CallRecord, Usage
from proxy.counting import count_request, encoding_for, get_encoding
from proxy.counting.counter import CountPolicy
from proxy.forwarding.forms import form_fields
from proxy.forwarding.routes import FREE_POLICY, METERED_POLICY, RoutePolicy
from proxy.ledger.target import parse_target
from proxy.pricing.live import LivePrices
from proxy.pricing.table import PriceTable

__all__ = ["Admission", "Gate", "Refusal", "open_gate"]

log = logging.getLogger("meterproxy")
_INLINE_COUNT_BYTES = 16 * 1024  # bodies up to this are counted on the loop (well under a millisecond)
_OUTPUT_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_CHOICE_FIELDS = ("n", "best_of")
_MAX_COUNT = 10**18  # more tokens than any budget (at most 10^12 USD) could pay for: a larger ask is this
# Headers that choose another account to bill: in managed mode only the key's own values are sent.
ACCOUNT_HEADERS = ("OpenAI-Organization", "OpenAI-Project")
_ZERO = Decimal(0)
_NO_RETRY = {"x-should-retry": "false"}  # openai SDKs would otherwise retry a 429 that cannot succeed


async def open_gate(*, db_path: str, managed: bool, prices: PriceTable | LivePrices, counting: CountPolicy,
                    upstream_key: str | None = None, limits: Mapping[Subject, Limits] | None = None,
                    reserve_max_tokens: int = 4096, alert_webhook: str | None = None,
                    alert_thresholds: tuple[Decimal, ...] = (Decimal("0.8"), Decimal(1)),
                    watch_interval: float = 1.0, unmetered_routes: tuple[str, ...] = (),
                    reservation_lease_seconds: float = DEFAULT_LEASE, pg_pool_size: int = DEFAULT_CONNECTIONS,
                    pg_pool_timeout: float = DEFAULT_WAIT) -> Gate:
    """Open the control tables on the ledger's file (after the ledger: it must exist) and build the gate.

    On PostgreSQL budgets and rate limits are shared by every replica (`control/shared.py`); on SQLite
    (one process) they are kept in memory."""
    db = ControlDB(db_path)
    await db.open(lazily=True)  # PostgreSQL away at start: an outage, served as one
    shared: SharedLimits | None = None
    try:
        store = LimitStore(db, limits)
        try:
            await store.load()
        except ControlDBError as exc:  # only when opened lazily: the tables' limits come once it answers
            log.error("limits: the database's limits cannot be read yet (%s); the configuration's apply", exc)
        alerts = Alerts(db, alert_webhook, alert_thresholds)
        budgets = Budgets(db_path, alerts=alerts)
        target = parse_target(db_path)
        if target.is_postgres:
            shared = SharedLimits(target, lease=reservation_lease_seconds, alerts=alerts, connections=pg_pool_size,
                                  wait_timeout=pg_pool_timeout)
            await shared.open()
            budgets = SharedBudgets(shared, db_path)
        gate = Gate(managed=managed, keys=KeyStore(db), limits=store, budgets=budgets, rates=RateLimiter(),
                    prices=prices, counting=counting, upstream_key=upstream_key,
                    reserve_max_tokens=reserve_max_tokens,
                    unmetered_routes=RoutePolicy(unmetered_routes) if unmetered_routes else None, shared=shared)
    except BaseException:
        if shared is not None:
            await shared.close()
        await db.close()
        raise
    gate.db, gate.alerts = db, alerts
    db.start_watch(watch_interval)
    return gate


class _Who(TypedDict, total=False):
    """The subject fields of a Refusal (its keyword arguments of the same names)."""

    key_id: str | None
    user: str | None
    team: str | None
    managed: bool


class Refusal:
    """An answer instead of forwarding: status, OpenAI-shaped error, headers, and who was refused."""

    __slots__ = ("code", "headers", "key_id", "managed", "message", "param", "status", "team", "type", "user")

    def __init__(self, status: int, message: str, type_: str, code: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None, key_id: str | None = None, user: str | None = None,
                 team: str | None = None, managed: bool = False) -> None:
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}
        self.key_id, self.user, self.team = key_id, user, team
        self.managed = managed  # the subject is the key's (or nobody's), never the client's X-Meter-*

    @property
    def body(self) -> bytes:
        return error_body(self.message, self.type, self.code, self.param)

    def __repr__(self) -> str:
        return f"Refusal({self.status}, {self.code!r})"


class Hold(Protocol):
    """What a call holds in shared limits until it ends (control/shared.py: SharedHold)."""

    @property
    def headers(self) -> dict[str, str]: ...

    def settle(self, cost_usd: Decimal, tokens: int | None = None, recorded: bool = True) -> None: ...


class Admission:
    """A call let through: how to authenticate upstream, whom to attribute it to, and its holds."""

    __slots__ = ("_budgets", "_hold", "_reservation", "_settled", "_ticket", "authorization", "key", "key_id",
                 "managed", "team", "user")

    def __init__(self, *, key_id: str | None, user: str | None, team: str | None,
                 authorization: str | None = None, key: ManagedKey | None = None, budgets: Budgets | None = None,
                 reservation: Reservation | None = None, ticket: Ticket | None = None,
                 hold: Hold | None = None) -> None:
        self.key_id, self.user, self.team, self.key = key_id, user, team, key
        self.authorization = authorization  # the real key, managed mode only; None: send the client's
        self.managed = authorization is not None  # the subject is the key's, never the client's X-Meter-*
        self._budgets, self._reservation, self._ticket, self._hold = budgets, reservation, ticket, hold
        self._settled = False

    @property
    def headers(self) -> dict[str, str]:
        """The proxy's own x-ratelimit-* for this call (empty without rate limits)."""
        if self._hold is not None:
            return self._hold.headers
        return self._ticket.headers if self._ticket is not None else {}

    def apply(self, upstream_headers: MutableMapping[str, str]) -> None:
        """In managed mode, put the real key where the client put its managed one (api-key or Bearer), and
        send the key's own organization and project, never the client's."""
        if self.authorization is None:
            return
        if "api-key" in upstream_headers:  # an Azure-style client: keep its scheme
            upstream_headers["api-key"] = self.authorization
            upstream_headers.pop("Authorization", None)
        else:
            upstream_headers["Authorization"] = f"Bearer {self.authorization}"
        popall = getattr(upstream_headers, "popall", None)  # a multidict: every copy, not the first only
        for name in ACCOUNT_HEADERS:
            if popall is not None:
                popall(name, None)
            else:
                upstream_headers.pop(name, None)
        if self.key is not None and self.key.organization:
            upstream_headers["OpenAI-Organization"] = self.key.organization
        if self.key is not None and self.key.project:
            upstream_headers["OpenAI-Project"] = self.key.project

    @property
    def settled(self) -> bool:
        return self._settled

    def settle(self, cost_usd: Decimal, tokens: int | None = None, recorded: bool = True) -> None:
        """The call ended (its row is committed, or `recorded` is False: it could not be stored): release its
        hold, count its real cost and tokens. Once."""
        if self._settled:
            return
        self._settled = True
        if self._hold is not None:
            self._hold.settle(cost_usd, tokens, recorded)
        if self._reservation is not None and self._budgets is not None:
            self._budgets.settle(self._reservation, cost_usd)
        if self._ticket is not None and tokens is not None:
            self._ticket.adjust(tokens)

    def __repr__(self) -> str:
        return f"Admission(key_id={self.key_id!r}, user={self.user!r}, team={self.team!r})"


class Gate:
    def __init__(self, *, managed: bool, keys: KeyStore | None, limits: LimitStore, budgets: Budgets,
                 rates: RateLimiter, prices: PriceTable | LivePrices, counting: CountPolicy,
                 upstream_key: str | None = None, reserve_max_tokens: int = 4096,
                 unmetered_routes: RoutePolicy | None = None, clock: Callable[[], float] = time.time,
                 shared: SharedLimits | None = None) -> None:
        if managed and (keys is None or not upstream_key):
            raise ValueError("managed keys need a key store and the upstream key (OPENAI_API_KEY)")
        self.managed = managed
        self.keys, self.limits, self.budgets, self.rates = keys, limits, budgets, rates
        self._prices, self._counting = prices, counting
        self._upstream_key = upstream_key
        self.reserve_max_tokens = reserve_max_tokens  # output reserved for a model without max_output
        self.unmetered_routes = unmetered_routes  # routes allowed under a budget or tpm without a meter
        self._clock = clock
        self.shared = shared  # PostgreSQL: budgets and rate limits in the database, shared by replicas
        self.db: ControlDB | None = None  # set by open_gate, closed by close()
        self.alerts: Alerts | None = None

    async def close(self) -> None:
        if self.shared is not None:
            await self.shared.close()
        if self.alerts is not None:
            await self.alerts.close()
        if self.db is not None:
            await self.db.close()

    def __repr__(self) -> str:
        return f"Gate(managed={self.managed})"

    async def resolve(self, headers: Mapping[str, str]) -> ManagedKey | Refusal:
        """The presented managed key, if usable now; else the 401 to answer."""
        assert self.keys is not None
        presented = api_key(headers)
        if presented is None:
            return Refusal(401, "No API key provided: send 'Authorization: Bearer <your meterproxy key>'.",
                           "invalid_request_error", "invalid_api_key", headers=_NO_RETRY)
        try:
            key = await self.keys.lookup(presented)
        except ControlDBError as exc:  # the database is down and the key is not in memory: refuse, say why
            log.error("managed key lookup failed: %s", exc)
            return Refusal(503, "The key store is unreachable, so this key cannot be checked now; retry shortly.",
                           "server_error", "key_store_unavailable", key_id=key_id_of(presented))
        status = key.status(self._clock()) if key is not None else "unknown"
        if key is None or status != "active":
            hint = presented[-4:] if len(presented) >= 8 else ""
            what = "Incorrect API key provided" if key is None else f"This API key was {status}"
            return Refusal(401, f"{what}: ...{hint}. Ask your administrator for a valid meterproxy key.",
                           "invalid_request_error", "invalid_api_key", headers=_NO_RETRY,
                           key_id=key_id_of(presented))
        return key

    async def admit(self, headers: Mapping[str, str], body: object, path: str, *, method: str = "POST",
                    body_size: int | None = None, record: CallRecord | None = None,
                    raw: bytes | None = None) -> Admission | Refusal:
        """Admit or refuse a request. `body` is the parsed JSON body (or None); `body_size` its length in
        bytes (small bodies are counted on the loop, others in a thread); `record` the call's ledger record
        as attribution filled it, whose key_id, user and "team" tag name the passthrough subjects (without
        it they are read from the headers and body the same way); `raw` the body's bytes, checked for
        duplicate JSON keys whenever a policy reads the body (a key policy, a budget, a tpm limit).
        """
        model = body.get("model") if isinstance(body, dict) else None
        model = model if isinstance(model, str) else None
        explicit: RoutePolicy | None = None
        key_id: str | None
        user: str | None
        team: str | None
        if self.managed:
            resolved = await self.resolve(headers)
            if isinstance(resolved, Refusal):
                resolved.managed = True
                return resolved
            key = resolved
            key_id, user, team = key.key_id, key.user, key.team
            who = _Who(key_id=key.key_id, user=key.user, team=key.team, managed=True)
            if not key.route_policy.allows(method, path):
                return Refusal(403, f"This key may not call {method} {path}; it may call: "
                               f"{', '.join(key.route_policy.specs)}. Ask your administrator to add the route.",
                               "invalid_request_error", "route_not_allowed", headers=_NO_RETRY, **who)
            duplicate = await self._duplicate(raw, body)
            if duplicate is not None:
                return duplicate.of(**who)
            if not key.allows(model) and not (model is None and method in ("GET", "HEAD")):
                what = f"model {model!r}" if model else "a request that names no model"
                return Refusal(403, f"This key may not use {what}; it may use: {', '.join(key.models or ())}",
                               "invalid_request_error", "model_not_allowed", param="model", headers=_NO_RETRY,
                               **who)
            charges = [(Subject("key", key_id), key.limits if not key.limits.empty else None)]
            explicit = key.explicit_routes
        else:
            key = None
            if record is not None:
                key_id, user, team = record.key_id, record.user, team_of(record.tags)
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
        if not self.managed:
            duplicate = await self._duplicate(raw, body)
            if duplicate is not None:
                return duplicate.of(key_id=key_id, user=user, team=team)
        request_id = record.request_id if record is not None else os.urandom(16).hex()
        return await self._limit(active, admission, method, path, body, model, body_size, explicit, request_id)

    async def _duplicate(self, raw: bytes | None, body: object) -> _Duplicate | None:
        """A request whose JSON repeats a key: upstream parsers may read either value, so no policy can."""
        if raw is None or not isinstance(body, dict):  # multipart forms are read into a dict too
            return None
        if len(raw) <= _INLINE_COUNT_BYTES:
            name = duplicate_key(raw)
        else:
            name = await asyncio.to_thread(duplicate_key, raw)
        return None if name is None else _Duplicate(name)

    async def _limit(self, active: list[tuple[Subject, Limits]], admission: dict[str, Any], method: str,
                     path: str, body: object, model: str | None, body_size: int | None,
                     explicit: RoutePolicy | None = None, request_id: str = "") -> Admission | Refusal:
        who: dict[str, Any] = {k: admission[k] for k in ("key_id", "user", "team")}
        who["managed"] = self.managed
        tokens, worst = 0, _ZERO
        metered = METERED_POLICY.allows(method, path)
        if any(lim.tpm is not None or lim.budget_usd is not None for _, lim in active):
            if not metered and not FREE_POLICY.allows(method, path) and not self._allowed_unmetered(
                    method, path, explicit):
                return Refusal(403, f"{method} {path} is not metered by the proxy (it cannot read or price "
                               "its usage), so a budget or tokens-per-minute limit cannot hold it; it was not "
                               "forwarded. An administrator can allow it with the unmetered_routes setting "
                               "(or a managed key's routes).", "invalid_request_error", "unmetered_route",
                               headers=_NO_RETRY, **who)
            if metered and any(lim.budget_usd is not None for _, lim in active) and self._table.resolve(
                    model) is None:
                return Refusal(403, f"The model {model!r} has no price in the proxy's price table and the table "
                               "has no default, so a budget cannot hold it; it was not forwarded.",
                               "invalid_request_error", "unpriced_model", param="model", headers=_NO_RETRY,
                               **who)
            if metered:
                if body_size is not None and body_size <= _INLINE_COUNT_BYTES:
                    tokens, worst = self.estimate(path, body, model, body_size)
                else:
                    tokens, worst = await asyncio.to_thread(self.estimate, path, body, model, body_size)
        if self.shared is not None:
            return await self._shared(active, admission, who, tokens, worst, request_id)
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

    async def _shared(self, active: list[tuple[Subject, Limits]], admission: dict[str, Any], who: dict[str, Any],
                      tokens: int, worst: Decimal, request_id: str) -> Admission | Refusal:
        assert self.shared is not None
        try:
            held = await self.shared.acquire(request_id, active, tokens, worst, self._clock())
        except Exception as exc:  # the database is away: limits that cannot be checked do not pass
            log.error("budgets: cannot reserve in %s: %s", self.shared.target, exc)
            return Refusal(503, "Budgets and rate limits cannot be checked right now (the database is "
                           "unreachable); the request was not forwarded. Retry shortly.", "server_error",
                           "budget_unavailable", headers={"Retry-After": "1"}, **who)
        if isinstance(held, RateRefusal):
            headers = held.headers if held.retry_after is not None else {**held.headers, **_NO_RETRY}
            return Refusal(429, held.message, held.kind, "rate_limit_exceeded", headers=headers, **who)
        if isinstance(held, BudgetRefusal):
            return Refusal(429, held.message, "insufficient_quota", "budget_exceeded", headers=_NO_RETRY, **who)
        return Admission(**admission, hold=held)

    def _allowed_unmetered(self, method: str, path: str, explicit: RoutePolicy | None) -> bool:
        return ((self.unmetered_routes is not None and self.unmetered_routes.allows(method, path))
                or (explicit is not None and explicit.allows(method, path)))

    @property
    def _table(self) -> PriceTable:
        # The live table when given one (prices edited while running).
        return self._prices.table if isinstance(self._prices, LivePrices) else self._prices

    def estimate(self, path: str, body: object, model: str | None,
                 body_size: int | None = None) -> tuple[int, Decimal]:
        """(tokens for rate limits, worst-case USD) of a request to a metered route.

        Worst case: the counted prompt plus the most output it may produce — the largest of the output
        limits it sets (any field an upstream may honour), else the model's own `max_output`, else the
        configured `reserve_max_tokens` — times its choices, at the model's prices. Rate limits reserve the
        same tokens; both are corrected to the real figures when the call ends.
        """
        if not isinstance(body, dict):
            return 0, _ZERO
        table = self._table
        entry = table.resolve(model)
        try:
            policy = self._counting
            name, exact = encoding_for(model, policy.default_encoding, policy.overrides)
            counted = count_request(path, body, get_encoding(name), exact_encoding=exact)
            # A route the counter does not know (images, audio): no token is shorter than a byte.
            prompt = counted.tokens if counted is not None else (body_size or 0)
        except Exception:  # a counting bug must not stop the call; a generous guess stands in
            log.exception("budgets: counting the prompt failed on %s", path)
            prompt = body_size or 0
        most = entry.max_output if entry is not None and entry.max_output is not None else self.reserve_max_tokens
        asked, choices = output_limit(path, body, most)
        output = asked * choices
        rate_tokens = prompt + output
        if entry is None:
            return rate_tokens, _ZERO  # unpriced: refused under a budget (admit), so only tpm sees this
        # The table's own rules: the tier the request asks for and a long-context price when the prompt is
        # long. Output is priced as the dearer of plain and reasoning tokens; on image and audio routes the
        # prompt and the output at the dearer of their text and media prices.
        tier = body.get("service_tier")
        tier = tier if isinstance(tier, str) else None
        media = _media_of(path)
        usages = [Usage(prompt_tokens=prompt, completion_tokens=output, total_tokens=prompt + output),
                  Usage(prompt_tokens=prompt, completion_tokens=output, reasoning_tokens=output,
                        total_tokens=prompt + output)]
        if media == "audio":
            usages.append(Usage(prompt_tokens=prompt, completion_tokens=output, total_tokens=prompt + output,
                                audio_prompt_tokens=prompt, audio_completion_tokens=output))
        elif media == "image":
            usages.append(Usage(prompt_tokens=prompt, completion_tokens=output, total_tokens=prompt + output,
                                image_prompt_tokens=prompt, image_completion_tokens=output))
        if media == "audio" and entry.audio_minute is not None:
            # Billed per minute (whisper-1): no audio format OpenAI takes is below 100 bytes a second.
            usages.append(Usage(audio_seconds=Decimal(body_size or 0) / _MIN_AUDIO_BYTES_PER_SECOND))
        return rate_tokens, max(table.cost(model, usage, tier)[0] for usage in usages)


_MEDIA = {"/v1/images/generations": "image", "/v1/audio/transcriptions": "audio"}
_MIN_AUDIO_BYTES_PER_SECOND = 100  # mp3 and Opus, the leanest formats accepted, need 750 or more


def _media_of(path: str) -> str | None:
    return _MEDIA.get(path)


class _Duplicate:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def of(self, **who: Unpack[_Who]) -> Refusal:
        return Refusal(400, f"The request body repeats the JSON key {self.name!r}; parsers differ on which value "
                       "counts, so it cannot be checked against this key's limits. Send each key once.",
                       "invalid_request_error", "duplicate_json_key", param=self.name[:64], headers=_NO_RETRY,
                       **who)


class _Repeated(MeterproxyError):
    def __init__(self, name: str) -> None:
        self.name = name


def _unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, value in pairs:
        if name in out:
            raise _Repeated(name)
        out[name] = value
    return out


def duplicate_key(raw: bytes) -> str | None:
    """The first key a JSON body repeats within one object, at any depth, or a multipart form's field
    sent twice; None if none (or neither)."""
    if raw[:2] == b"--":
        return form_fields(raw)[1]
    try:
        json.loads(raw, object_pairs_hook=_unique)
    except _Repeated as exc:
        return exc.name
    except (ValueError, RecursionError):
        return None
    return None


def output_limit(path: str, body: Mapping[str, object], most: int) -> tuple[int, int]:
    """(the output tokens a request may produce per choice, its number of choices).

    Every field an upstream may honour is read, as a JSON number or a numeric string, and the largest
    wins. Without one, or with one that is set but is not a positive number (an upstream may ignore it),
    the model's own maximum `most` is among them."""
    if path.endswith("/embeddings"):
        return 0, 1
    limits, unusable = [], False
    for name in _OUTPUT_FIELDS:
        if body.get(name) is None:
            continue
        value = _count(body[name])
        if value is None:
            unusable = True
        else:
            limits.append(value)
    choices = max((v for f in _CHOICE_FIELDS if (v := _count(body.get(f))) is not None), default=1)
    if unusable or not limits:
        limits.append(most)
    return max(limits), choices


def _count(value: object) -> int | None:
    """A positive count from a JSON number or numeric string (rounded up, capped); None if it is not one."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        number = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            return None
        number = Decimal(value)
    elif isinstance(value, str):
        try:
            number = Decimal(value.strip())
        except ArithmeticError:
            return None
        if not number.is_finite():
            return None
    else:
        return None
    if number <= 0:
        return None
    if number >= _MAX_COUNT:
        return _MAX_COUNT
    return int(number.to_integral_value(rounding=ROUND_CEILING))


def _attribution(headers: Mapping[str, str], body: object) -> tuple[str | None, str | None, str | None]:
    """(key_id, user, team) as the ledger row records them (`caller_of`), so a budget's subject is the row's."""
    found = caller_of(headers)
    user = found.user
    if not user:
        body_user = body.get("user") if isinstance(body, dict) else None
        user = storable(body_user) if isinstance(body_user, str) and body_user else None
    return found.key_id, user, found.team
