"""Managed keys: the proxy's own API keys, issued to users and swapped for the real upstream key.

A key is "mp-" and 256 random bits (URL-safe base64). Only its SHA-256 is stored; its key_id is the first
16 hex characters of that hash (the same identity `proxy.core.attribution.key_id_of` gives any key), and its
hint its last 4 characters. The key itself is returned once, by `create()`, and never again.

`lookup()` runs on every request in managed mode: a dict lookup by hash, filled from SQLite on a miss
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
import sqlite3
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable, Mapping

from proxy.control.db import ControlDB
from proxy.control.limits import (
    MAX_NAME,
    FieldError,
    Limits,
    iso,
    parse_count,
    parse_money,
    parse_period,
    parse_text,
    parse_time,
)  # fmt: skip
from proxy.core.credentials import key_hash, key_id_of
from proxy.forwarding.routes import DEFAULT_POLICY, RouteError, RoutePolicy, parse_routes

__all__ = [
    "KEY_PREFIX", "KeyStore", "ManagedKey", "create_key", "get_key", "list_keys", "parse_key_fields",
    "revoke_key", "update_key",
]

KEY_PREFIX = "mp-"
MAX_MODELS = 100
_NEGATIVE_MAX = 10_000  # unknown keys remembered; emptied when full (random keys would never repeat)
_COLUMNS = ('key_id, key_hint, "user", team, name, budget_usd, budget_period, expires_at, models, rpm, tpm, '
            "created_at, updated_at, revoked_at, routes, organization, project")


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
        raise FieldError(f"models must be a list of 1 to {MAX_MODELS} model names or globs (null: any model)",
                         "models")
    try:
        return tuple(parse_text(v, "models") for v in value)
    except FieldError:
        raise FieldError(f"models: each must be a non-empty model name or glob of at most {MAX_NAME} characters",
                         "models") from None


def _routes(value: object) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)) and any(isinstance(v, str) and len(v) > MAX_NAME for v in value):
        raise FieldError(f"routes: each route is at most {MAX_NAME} characters", "routes")
    try:
        return parse_routes(value)
    except RouteError as exc:
        raise FieldError(f"routes: {exc}", "routes") from None


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
        raise FieldError("the body must be a JSON object")
    out: dict[str, Any] = {}
    for name, value in data.items():
        if name not in _PARSERS:
            raise FieldError(f"unknown field {name!r} (known: {', '.join(_FIELDS)})", str(name))
        if value is None:
            if name not in _NULLABLE:
                raise FieldError(f"{name} cannot be null", name)
            out[name] = None
        else:
            out[name] = _PARSERS[name](value)
    if creating and "user" not in out:
        raise FieldError("user is required", "user")
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
        row = await self._db.read(lambda conn: _select(conn, "key_hash = ?", digest))
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


def _from_row(row: tuple[Any, ...]) -> ManagedKey:
    (key_id, hint, user, team, name, budget, period, expires, models, rpm, tpm, created, updated,
     revoked, routes, organization, project) = row
    return ManagedKey(key_id, hint, user, team, name, None if budget is None else Decimal(budget), period,
                      expires, None if models is None else tuple(json.loads(models)), rpm, tpm, created,
                      updated, revoked, None if routes is None else tuple(json.loads(routes)), organization,
                      project)


def create_key(conn: sqlite3.Connection, fields: Mapping[str, Any],
               now: float | None = None) -> tuple[str, ManagedKey]:
    """Insert a new key with `fields` (validated here); returns (the key, its record)."""
    at = time.time() if now is None else now
    values = _row_values(parse_key_fields(fields, creating=True))
    while True:
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        digest = key_hash(key)
        try:
            conn.execute(
                f"INSERT INTO api_keys (key_hash, {_COLUMNS}) VALUES ({', '.join('?' * 18)})",
                (digest, key_id_of(key), key[-4:], values["user"], values["team"], values["name"],
                 values["budget_usd"], values["budget_period"], values["expires_at"], values["models"],
                 values["rpm"], values["tpm"], at, at, None, values["routes"], values["organization"],
                 values["project"]))
        except sqlite3.IntegrityError:
            continue  # a key_id collision (one in 2^64 per pair): draw again
        created = get_key(conn, key_id_of(key))
        assert created is not None
        return key, created


def get_key(conn: sqlite3.Connection, key_id: str) -> ManagedKey | None:
    return _select(conn, "key_id = ?", key_id)


def _select(conn: sqlite3.Connection, where: str, value: str) -> ManagedKey | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE {where}", (value,)).fetchone()
    return None if row is None else _from_row(row)


def list_keys(conn: sqlite3.Connection, *, user: str | None = None, team: str | None = None,
              include_revoked: bool = True) -> list[ManagedKey]:
    clauses, params = [], []
    if user is not None:
        clauses.append('"user" = ?')
        params.append(user)
    if team is not None:
        clauses.append("team = ?")
        params.append(team)
    if not include_revoked:
        clauses.append("revoked_at IS NULL")
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = conn.execute(f"SELECT {_COLUMNS} FROM api_keys{where} ORDER BY created_at, key_id", params)
    return [_from_row(row) for row in rows]


def update_key(conn: sqlite3.Connection, key_id: str, fields: Mapping[str, Any],
               now: float | None = None) -> ManagedKey | None:
    current = _select(conn, "key_id = ?", key_id)
    if current is None:
        return None
    # Validated here: column names are formatted into the statement, so only known ones may reach it.
    fields = parse_key_fields(fields, creating=False)
    if not fields:
        return current
    values = _row_values({**_fields_of(current), **fields})
    sets = ", ".join(f'"{name}" = ?' for name in fields)
    conn.execute(f"UPDATE api_keys SET {sets}, updated_at = ? WHERE key_id = ?",
                 (*(values[name] for name in fields), time.time() if now is None else now, key_id))
    return _select(conn, "key_id = ?", key_id)


def revoke_key(conn: sqlite3.Connection, key_id: str, now: float | None = None) -> ManagedKey | None:
    """Revoke (keeping the row, so reports still name the key); revoking twice keeps the first time."""
    at = time.time() if now is None else now
    conn.execute("UPDATE api_keys SET revoked_at = ?, updated_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                 (at, at, key_id))
    return _select(conn, "key_id = ?", key_id)


def _fields_of(key: ManagedKey) -> dict[str, Any]:
    return {name: getattr(key, name) for name in _FIELDS}

