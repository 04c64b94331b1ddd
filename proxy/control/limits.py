"""What a subject (a key, a user, a team) may spend and how fast: the values, their parsing, their periods.

`Limits` is a budget in USD per day, calendar month (UTC) or in total, and requests / tokens per minute.
Limits for passthrough subjects come from the config (`limits:`) or from the `subject_limits` table (the
admin API); a table row wins over the config for the same subject. Managed keys carry their own.

Parsing accepts what JSON, YAML and a command line give: money as a decimal string, an int, a `Decimal`
(JSON read with parse_float=Decimal) or a YAML float (read back from its shortest repr, which is what was
written). This module must never hold money as a float and never read the database on the event loop.

    ParameterError (ValueError)   a bad value; `param` names the field, the message is for the user
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Mapping, NamedTuple

from proxy.control.db import ControlDB
from proxy.core.errors import ParameterError
from proxy.core.times import (  # re-exported: limits' callers use them
    MAX_TIME,
    MAX_TIME_TEXT,
    iso,
    parse_time,  # re-exported: keys parse expires_at with it
)
from proxy.ledger import control_store as store
from proxy.ledger.sqlconn import Conn

__all__ = [
    "KINDS", "MAX_COUNT", "MAX_NAME", "MAX_QUERY_VALUE", "MAX_TIME", "MAX_TIME_TEXT", "PERIODS",
    "LimitStore", "Limits", "Subject", "iso", "parse_count", "parse_limits", "parse_limits_setting", "parse_money",
    "parse_period", "parse_text", "parse_thresholds", "parse_time", "period_of",
]  # fmt: skip

log = logging.getLogger("meterproxy")
KINDS = ("key", "user", "team")
PERIODS = ("day", "month", "total")
MAX_NAME = 256
MAX_COUNT = 10**12  # rpm and tpm: beyond any real limit, far inside SQLite's 64-bit integers
MAX_QUERY_VALUE = 1024  # an admin query parameter's value; none needs more (names are at most MAX_NAME)
_MAX_MONEY = Decimal(10) ** 12




class Subject(NamedTuple):
    kind: str  # "key" (a key_id), "user" or "team"
    name: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"


@dataclass(frozen=True, slots=True)
class Limits:
    budget_usd: Decimal | None = None
    budget_period: str = "month"
    rpm: int | None = None
    tpm: int | None = None

    @property
    def empty(self) -> bool:
        return self.budget_usd is None and self.rpm is None and self.tpm is None

    def public(self) -> dict[str, Any]:
        return {"budget_usd": None if self.budget_usd is None else format(self.budget_usd, "f"),
                "budget_period": self.budget_period, "rpm": self.rpm, "tpm": self.tpm}


# --- parsing ---------------------------------------------------------------------------------------
def parse_money(value: object, param: str = "budget_usd") -> Decimal:
    if isinstance(value, bool):
        raise ParameterError(f"{param} must be a number of USD, not a boolean", param)
    try:
        if isinstance(value, Decimal):
            number = value
        elif isinstance(value, int):
            number = Decimal(value)
        elif isinstance(value, float):
            number = Decimal(repr(value))  # YAML: the shortest text that round-trips is what was written
        elif isinstance(value, str):
            number = Decimal(value.strip())
        else:
            raise ParameterError(f"{param} must be a number of USD or a decimal string", param)
    except InvalidOperation:
        raise ParameterError(f"{param} must be a number of USD, not {str(value)[:40]!r}", param) from None
    if not number.is_finite() or number < 0 or number > _MAX_MONEY:
        raise ParameterError(f"{param} must be a finite amount from 0 to 10^12 USD", param)
    number = number.copy_abs()  # -0 -> 0
    exponent = number.as_tuple().exponent
    # Without a positive exponent, so that format(number, "f") and str() agree ("1E+2" -> "100").
    return Decimal(int(number)) if isinstance(exponent, int) and exponent > 0 else number


def parse_count(value: object, param: str) -> int:
    """A whole number from 1 to MAX_COUNT (requests or tokens per minute)."""
    # Bounded before converting: int() of "9" * 5000 or of Decimal("1E+999999999") is an error or a hang,
    # and a number past 2^63 cannot be stored.
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,13}", value.strip()):
        value = int(value.strip())
    elif (isinstance(value, Decimal) and value.is_finite() and 1 <= value <= MAX_COUNT
          and value == value.to_integral_value()):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COUNT:
        raise ParameterError(f"{param} must be a whole number from 1 to {MAX_COUNT}", param)
    return value


def parse_period(value: object, param: str = "budget_period") -> str:
    if value not in PERIODS:
        raise ParameterError(f"{param} must be one of {', '.join(PERIODS)}", param)
    return str(value)


def parse_text(value: object, param: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME or not _encodable(value):
        raise ParameterError(f"{param} must be a non-empty string of at most {MAX_NAME} characters", param)
    return value


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")  # a lone surrogate (JSON "\ud800") cannot be stored
    except UnicodeEncodeError:
        return False
    return True


_LIMIT_FIELDS = ("budget_usd", "budget_period", "rpm", "tpm")


def parse_limits(data: Mapping[str, object], where: str = "") -> Limits:
    """A whole `Limits` from a mapping (absent fields: none); unknown fields are an error."""
    for name in data:
        if name not in _LIMIT_FIELDS:
            raise ParameterError(f"{where}unknown field {name!r} (known: {', '.join(_LIMIT_FIELDS)})", str(name))
    budget, rpm, tpm = data.get("budget_usd"), data.get("rpm"), data.get("tpm")
    return Limits(budget_usd=None if budget is None else parse_money(budget),
                  budget_period=parse_period(data.get("budget_period", "month")),
                  rpm=None if rpm is None else parse_count(rpm, "rpm"),
                  tpm=None if tpm is None else parse_count(tpm, "tpm"))


def parse_limits_setting(value: object) -> dict[Subject, Limits]:
    """The `limits` config setting: {key|user|team: {name: {budget_usd, budget_period, rpm, tpm}}}."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError("must map key, user or team to {name: {budget_usd, budget_period, rpm, tpm}}")
    out: dict[Subject, Limits] = {}
    for kind, entries in value.items():
        if kind not in KINDS or not isinstance(entries, Mapping):
            raise ValueError(f"{kind!r} must be one of {', '.join(KINDS)}, mapping names to limits")
        for name, data in entries.items():
            if not isinstance(data, Mapping):
                raise ValueError(f"{kind} {name!r}: must be a mapping of budget_usd, budget_period, rpm, tpm")
            try:
                out[Subject(kind, str(name))] = parse_limits(data)
            except ParameterError as exc:
                raise ValueError(f"{kind} {name!r}: {exc}") from None
    return out


def parse_thresholds(value: object) -> tuple[Decimal, ...]:
    """The `alert_thresholds` setting: shares of a budget, e.g. [0.8, 1.0]."""
    if not isinstance(value, (list, tuple)):
        raise ValueError("must be a list of shares of a budget, such as [0.8, 1.0]")
    out = []
    for item in value:
        try:
            share = parse_money(item, "alert_thresholds")
        except ParameterError as exc:
            raise ValueError(str(exc)) from None
        if not 0 < share <= 10:
            raise ValueError("each share must be more than 0 and at most 10")
        out.append(share)
    return tuple(sorted(set(out)))


# --- periods ---------------------------------------------------------------------------------------
def period_of(period: str, now: float) -> tuple[float, str]:
    """(start in unix seconds, label) of the period holding `now`: a UTC day, a UTC calendar month, or all time."""
    if period == "total":
        return 0.0, "total"
    moment = datetime.fromtimestamp(now, timezone.utc)
    if period == "day":
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.timestamp(), start.strftime("%Y-%m-%d")
    start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return start.timestamp(), start.strftime("%Y-%m")


# --- the store -------------------------------------------------------------------------------------
class LimitStore:
    """Limits per subject from the config and the `subject_limits` table, held in memory.

    `get()` is a dict lookup (the request path calls it); the table is read again whenever the control
    tables change (ControlDB notifies).
    """

    def __init__(self, db: ControlDB, config: Mapping[Subject, Limits] | None = None) -> None:
        self._db = db
        self._config = dict(config or {})
        self._table: dict[Subject, Limits] = {}
        self._merged: dict[Subject, Limits] = dict(self._config)
        self._reload: asyncio.Future[None] | None = None
        db.on_change(self._changed)

    async def load(self) -> None:
        self._table = await self._db.read(_read_table)
        self._merged = {**self._config, **self._table}

    def _changed(self) -> None:
        if self._reload is None or self._reload.done():
            self._reload = asyncio.ensure_future(self._load_logged())

    async def _load_logged(self) -> None:
        try:
            await self.load()
        except Exception as exc:  # the old limits stay in force; the next change tries again
            log.error("limits: cannot reload subject_limits: %s", exc)

    async def reloaded(self) -> None:
        """Wait for a reload in progress (tests, and the admin API after its own write)."""
        if self._reload is not None:
            await self._reload

    def get(self, subject: Subject) -> Limits | None:
        return self._merged.get(subject)

    def entries(self) -> list[tuple[Subject, Limits, str]]:
        """Every subject with limits: (subject, limits, "api" or "config")."""
        return [(s, lim, "api" if s in self._table else "config") for s, lim in sorted(self._merged.items())]

    async def put(self, subject: Subject, limits: Limits) -> None:
        await self._db.write(lambda conn: write_limits(conn, subject, limits))
        await self.load()

    async def delete(self, subject: Subject) -> bool:
        deleted = await self._db.write(lambda conn: delete_limits(conn, subject))
        await self.load()
        return deleted


def write_limits(conn: Conn, subject: Subject, limits: Limits) -> None:
    """Set a subject's limits in `subject_limits` (the API's and `meterproxy budgets set`'s table)."""
    store.upsert_limits(conn, subject.kind, subject.name, _money_text(limits.budget_usd), limits.budget_period,
                        limits.rpm, limits.tpm, time.time())


def delete_limits(conn: Conn, subject: Subject) -> bool:
    """Remove a subject's limits from `subject_limits`; False if it had none there."""
    return store.delete_limits(conn, subject.kind, subject.name)


def _money_text(value: Decimal | None) -> str | None:
    return None if value is None else format(value, "f")


def read_limits(conn: Conn) -> dict[Subject, Limits]:
    """Every subject's limits in `subject_limits`."""
    return _read_table(conn)


def _read_table(conn: Conn) -> dict[Subject, Limits]:
    # budget_usd is text on SQLite and NUMERIC (a Decimal already) on PostgreSQL: exact either way.
    return {Subject(kind, name): Limits(None if budget is None else Decimal(budget), period, rpm, tpm)
            for kind, name, budget, period, rpm, tpm in store.select_limits(conn)}
