"""Managed keys: the proxy's own API keys, issued to users and swapped for the real upstream key.

A key is "mp-" and 256 random bits (URL-safe base64). Only its SHA-256 is stored; its key_id is the first
16 hex characters of that hash (the same identity `proxy.core.credentials.key_id_of` gives any key), and its
hint its last 4 characters. The key itself is returned once, by `create()`, and never again.

`lookup()` runs on every request in managed mode: a dict lookup by hash, filled from the database on a miss
(in a worker thread) and emptied whenever the control tables change (`ControlDB` notifies on our own
writes at once and on other processes' within its poll interval).

This module must never store, log or return a key after creating it, nor compare keys other than by
their hash.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import secrets
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable, Mapping

from proxy.control.db import ControlDB
from proxy.control.limits import (
    MAX_NAME,
    Limits,
    iso,
    parse_count,
    parse_money,
    parse_period,
    parse_text,
    parse_time,
)  # fmt: skip
from proxy.core.credentials import key_hash, key_id_of
from proxy.core.errors import ParameterError
from proxy.forwarding.routes import DEFAULT_POLICY, RouteError, RoutePolicy, parse_routes
from proxy.ledger import control_store as store
from proxy.ledger.sqlconn import Conn

__all__ = [
    "KEY_PREFIX", "KeyStore", "ManagedKey", "create_key", "get_key", "list_keys", "parse_key_fields",
    "revoke_key", "update_key",
]

KEY_PREFIX = "mp-"
MAX_MODELS = 100
_NEGATIVE_MAX = 10_000  # unknown keys remembered; emptied when full (random keys would never repeat)


@dataclass(frozen=True, slots=True)
class ManagedKey:
    key_id: str
    key_hint: str
    user: str
    team: str | None
    name: str | None
    budget_usd: Decimal | None
    budget_period: str
    expires_at: float | None
    models: tuple[str, ...] | None  # allowed model globs; None: any model
    rpm: int | None
    tpm: int | None
    created_at: float
    updated_at: float
    revoked_at: float | None
    routes: tuple[str, ...] | None = None  # route specs ("default" for the default set); None: the default
    organization: str | None = None  # sent upstream as OpenAI-Organization (the client's never is)
    project: str | None = None       # sent upstream as OpenAI-Project

    @property
    def route_policy(self) -> RoutePolicy:
        """What the key may call: its own routes, else the default inference routes."""
        return DEFAULT_POLICY if self.routes is None else _policy(self.routes)

    @property
    def explicit_routes(self) -> RoutePolicy | None:
        """The routes the admin named beyond the default set (allowed under a budget unmetered)."""
        named = tuple(r for r in self.routes or () if r != "default")
        return _policy(named) if named else None

    @property
    def limits(self) -> Limits:
        return Limits(self.budget_usd, self.budget_period, self.rpm, self.tpm)

    def status(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"

    def allows(self, model: str | None) -> bool:
        """Whether the key may call `model` (None: the request names none)."""
        if self.models is None:
            return True
        return model is not None and any(fnmatch.fnmatchcase(model, glob) for glob in self.models)

    def public(self, now: float | None = None) -> dict[str, Any]:
        """The key's fields for the API and the CLI (never the key itself, which is not kept)."""
        return {
            "key_id": self.key_id, "key_hint": self.key_hint, "user": self.user, "team": self.team,
            "name": self.name, "status": self.status(time.time() if now is None else now),
            "budget_usd": None if self.budget_usd is None else format(self.budget_usd, "f"),
            "budget_period": self.budget_period, "expires_at": iso(self.expires_at),
            "models": None if self.models is None else list(self.models), "rpm": self.rpm, "tpm": self.tpm,
            "routes": None if self.routes is None else list(self.routes), "organization": self.organization,
            "project": self.project, "created_at": iso(self.created_at), "updated_at": iso(self.updated_at),
            "revoked_at": iso(self.revoked_at),
        }  # fmt: skip


# --- fields ----------------------------------------------------------------------------------------
_FIELDS = ("user", "team", "name", "budget_usd", "budget_period", "expires_at", "models", "rpm", "tpm", "routes",
           "organization", "project")
_NULLABLE = frozenset(_FIELDS) - {"user", "budget_period"}


def _models(value: object) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not value or len(value) > MAX_MODELS:
        raise ParameterError(f"models must be a list of 1 to {MAX_MODELS} model names or globs (null: any model)",
                         "models")
    try:
        return tuple(parse_text(v, "models") for v in value)
    except ParameterError:
        raise ParameterError(f"models: each must be a non-empty model name or glob of at most {MAX_NAME} characters",
                         "models") from None


def _routes(value: object) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)) and any(isinstance(v, str) and len(v) > MAX_NAME for v in value):
        raise ParameterError(f"routes: each route is at most {MAX_NAME} characters", "routes")
    try:
        return parse_routes(value)
    except RouteError as exc:
        raise ParameterError(f"routes: {exc}", "routes") from None


_POLICIES: dict[tuple[str, ...], RoutePolicy] = {}


def _policy(routes: tuple[str, ...]) -> RoutePolicy:
    found = _POLICIES.get(routes)
    if found is None:
        if len(_POLICIES) >= 1024:
            _POLICIES.clear()
        found = _POLICIES[routes] = RoutePolicy(routes)
    return found


_PARSERS: dict[str, Callable[[object], object]] = {
    "user": lambda v: parse_text(v, "user"), "team": lambda v: parse_text(v, "team"),
    "name": lambda v: parse_text(v, "name"), "budget_usd": lambda v: parse_money(v, "budget_usd"),
    "budget_period": parse_period, "expires_at": lambda v: parse_time(v, "expires_at"), "models": _models,
    "rpm": lambda v: parse_count(v, "rpm"), "tpm": lambda v: parse_count(v, "tpm"), "routes": _routes,
    "organization": lambda v: parse_text(v, "organization"), "project": lambda v: parse_text(v, "project"),
}  # fmt: skip


def parse_key_fields(data: Mapping[str, object], *, creating: bool) -> dict[str, Any]:
    """Validated fields from an API body or CLI options. Absent fields are left out; null clears one."""
    if not isinstance(data, Mapping):
        raise ParameterError("the body must be a JSON object")
    out: dict[str, Any] = {}
    for name, value in data.items():
        if name not in _PARSERS:
            raise ParameterError(f"unknown field {name!r} (known: {', '.join(_FIELDS)})", str(name))
        if value is None:
            if name not in _NULLABLE:
                raise ParameterError(f"{name} cannot be null", name)
            out[name] = None
        else:
            out[name] = _PARSERS[name](value)
    if creating and "user" not in out:
        raise ParameterError("user is required", "user")
    return out


# --- the store -------------------------------------------------------------------------------------
class KeyStore:
    """Managed keys in the `api_keys` table, with the per-request lookup cached in memory."""

    def __init__(self, db: ControlDB) -> None:
        self._db = db
        self._known: dict[str, ManagedKey] = {}
        self._unknown: set[str] = set()  # emptied when full: sprayed random keys would never repeat
        self._pending: dict[str, asyncio.Task[ManagedKey | None]] = {}  # one read per hash, however many ask
        self._generation = 0  # bumped on every invalidation: a read begun before one is not cached
        db.on_change(self.invalidate)

    def invalidate(self) -> None:
        self._known, self._unknown, self._pending = {}, set(), {}
        self._generation += 1

    async def lookup(self, key: str) -> ManagedKey | None:
        """The managed key presented as `key`, revoked and expired ones included; None if unknown."""
        digest = key_hash(key)
        found = self._known.get(digest)
        if found is not None or digest in self._unknown:
            return found
        task = self._pending.get(digest)
        if task is None:
            # A task of its own: a requester that goes away must not cancel the others' answer.
            task = asyncio.ensure_future(self._fetch(digest))
            self._pending[digest] = task
            task.add_done_callback(lambda done: self._fetched(digest, done))
        return await asyncio.shield(task)

    async def _fetch(self, digest: str) -> ManagedKey | None:
        generation = self._generation
        row = await self._db.read(lambda conn: _by_hash(conn, digest))
        if generation == self._generation:
            if row is not None:
                self._known[digest] = row
            else:
                if len(self._unknown) >= _NEGATIVE_MAX:
                    self._unknown.clear()
                self._unknown.add(digest)
        return row

    def _fetched(self, digest: str, task: asyncio.Task[ManagedKey | None]) -> None:
        if self._pending.get(digest) is task:
            del self._pending[digest]
        if not task.cancelled():
            task.exception()  # retrieved: the requesters got it, or none was left to

    async def create(self, fields: Mapping[str, Any], now: float | None = None) -> tuple[str, ManagedKey]:
        """Issue a key; returns (the key, shown this once; its record)."""
        return await self._db.write(lambda conn: create_key(conn, fields, now))

    async def get(self, key_id: str) -> ManagedKey | None:
        return await self._db.read(lambda conn: get_key(conn, key_id))

    async def list(self, *, user: str | None = None, team: str | None = None,
                   include_revoked: bool = True) -> list[ManagedKey]:
        return await self._db.read(lambda conn: list_keys(conn, user=user, team=team,
                                                          include_revoked=include_revoked))

    async def update(self, key_id: str, fields: Mapping[str, Any], now: float | None = None) -> ManagedKey | None:
        return await self._db.write(lambda conn: update_key(conn, key_id, fields, now))

    async def revoke(self, key_id: str, now: float | None = None) -> ManagedKey | None:
        return await self._db.write(lambda conn: revoke_key(conn, key_id, now))


# --- statements (shared with the CLI, which runs them on its own connection) -----------------------
def _row_values(fields: Mapping[str, Any]) -> dict[str, Any]:
    budget = fields.get("budget_usd")
    models = fields.get("models")
    return {
        "user": fields.get("user"), "team": fields.get("team"), "name": fields.get("name"),
        "budget_usd": None if budget is None else format(budget, "f"),
        "budget_period": fields.get("budget_period") or "month", "expires_at": fields.get("expires_at"),
        "models": None if models is None else json.dumps(list(models)), "rpm": fields.get("rpm"),
        "tpm": fields.get("tpm"),
        "routes": None if fields.get("routes") is None else json.dumps(list(fields["routes"])),
        "organization": fields.get("organization"), "project": fields.get("project"),
    }  # fmt: skip


def _from_row(row: tuple[Any, ...] | None) -> ManagedKey | None:
    if row is None:
        return None
    (key_id, hint, user, team, name, budget, period, expires, models, rpm, tpm, created, updated,
     revoked, routes, organization, project) = row
    # budget_usd is text on SQLite and NUMERIC (a Decimal already) on PostgreSQL: exact either way.
    return ManagedKey(key_id, hint, user, team, name, None if budget is None else Decimal(budget), period,
                      expires, None if models is None else tuple(json.loads(models)), rpm, tpm, created,
                      updated, revoked, None if routes is None else tuple(json.loads(routes)), organization,
                      project)


def create_key(conn: Conn, fields: Mapping[str, Any], now: float | None = None) -> tuple[str, ManagedKey]:
    """Insert a new key with `fields` (validated here); returns (the key, its record)."""
    at = time.time() if now is None else now
    values = _row_values(parse_key_fields(fields, creating=True))
    while True:
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = key_id_of(key)
        row = {**values, "key_id": key_id, "key_hint": key[-4:], "created_at": at, "updated_at": at}
        if not store.insert_key(conn, key_hash(key), row):
            continue  # a key_id collision (one in 2^64 per pair): draw again
        created = get_key(conn, key_id)
        assert created is not None
        return key, created


def get_key(conn: Conn, key_id: str) -> ManagedKey | None:
    return _from_row(store.select_key(conn, key_id=key_id))


def _by_hash(conn: Conn, digest: str) -> ManagedKey | None:
    return _from_row(store.select_key(conn, key_hash=digest))


def list_keys(conn: Conn, *, user: str | None = None, team: str | None = None,
              include_revoked: bool = True) -> list[ManagedKey]:
    rows = store.select_keys(conn, user=user, team=team, include_revoked=include_revoked)
    return [key for key in map(_from_row, rows) if key is not None]


def update_key(conn: Conn, key_id: str, fields: Mapping[str, Any],
               now: float | None = None) -> ManagedKey | None:
    current = get_key(conn, key_id)
    if current is None:
        return None
    fields = parse_key_fields(fields, creating=False)
    if not fields:
        return current
    values = _row_values({**_fields_of(current), **fields})
    store.update_key(conn, key_id, {name: values[name] for name in fields}, time.time() if now is None else now)
    return get_key(conn, key_id)


def revoke_key(conn: Conn, key_id: str, now: float | None = None) -> ManagedKey | None:
    """Revoke (keeping the row, so reports still name the key); revoking twice keeps the first time."""
    store.revoke_key(conn, key_id, time.time() if now is None else now)
    return get_key(conn, key_id)


def _fields_of(key: ManagedKey) -> dict[str, Any]:
    return {name: getattr(key, name) for name in _FIELDS}

