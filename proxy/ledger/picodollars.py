"""Picodollars: exact sums of costs for rollup rows, as integer picodollars plus a decimal exponent.

A cost that is a whole, non-negative number of picodollars (1e-12 USD, below 2**62) is kept as that
integer together with the smallest exponent of the costs summed into it, so that SQL can add costs as
integers and still print exactly what adding the decimals would (`pico`, `pico_text`, `from_pico`,
SUM_COST / `summed_values`); any other cost is summed as exact decimal text by the SQLite functions
`mp_decimal_add(a, b)` and `decimal_sum(x)` (`register_functions`). On PostgreSQL the costs are NUMERIC,
which adds exactly by itself, and `decimal_sum` is an aggregate of the schema (migrations_postgres.py).

This module must never round a cost and never read one through a float.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from proxy.core.money import EXACT
from proxy.ledger.sqlconn import Conn

__all__ = [
    "EXACT", "PICO_DIGITS", "PICO_LIMIT", "SUM_COST", "SUM_COST_SLOW", "exact_values", "from_pico", "parse_plain",
    "pico", "pico_text", "register_functions", "summed_values",
]  # fmt: skip

PICO_DIGITS = 12
PICO_LIMIT = 2**62  # well inside int64, so SQLite's integer sums of a few rows cannot overflow silently


def _decimal_add(a: str | None, b: str | None) -> str:
    total = EXACT.add(Decimal(a or 0), Decimal(b or 0))
    return format(total, "f")


class _DecimalSum:
    def __init__(self) -> None:
        self.total = Decimal(0)

    def step(self, value: str | None) -> None:
        if value is not None:
            self.total = EXACT.add(self.total, Decimal(value))

    def finalize(self) -> str:
        return format(self.total, "f")


def register_functions(conn: sqlite3.Connection | Conn) -> None:
    """`mp_decimal_add(a, b)` and `decimal_sum(x)` on `conn`: exact decimal text arithmetic. Nothing to do on
    PostgreSQL (NUMERIC; `decimal_sum` is in the schema)."""
    if isinstance(conn, Conn):
        if conn.dialect == "postgres":
            return
        conn = conn.raw
    assert isinstance(conn, sqlite3.Connection)
    conn.create_function("mp_decimal_add", 2, _decimal_add, deterministic=True)
    # typeshed's aggregate protocol has step(value: int); SQLite passes any SQL value (here text or NULL).
    conn.create_aggregate("decimal_sum", 1, _DecimalSum)  # type: ignore[arg-type]  # typeshed is too narrow


def parse_plain(text: str) -> tuple[int, int] | None:
    """(picodollars, exponent) of a plain non-negative decimal with at most 12 decimals, else None."""
    whole, _, frac = text.partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()) or len(frac) > PICO_DIGITS:
        return None
    units = int(whole) * 10**PICO_DIGITS + (int(frac) * 10 ** (PICO_DIGITS - len(frac)) if frac else 0)
    return (units, -len(frac)) if units < PICO_LIMIT else None


def pico(value: Decimal) -> tuple[int, int] | None:
    """(picodollars, exponent) when `value` is exactly a whole, non-negative number of picodollars (below
    2**62), else None."""
    exponent = value.as_tuple().exponent
    if not isinstance(exponent, int) or exponent < -PICO_DIGITS or value.is_signed():
        return None
    units = int(value.scaleb(PICO_DIGITS, EXACT))
    return (units, min(exponent, 0)) if abs(units) < PICO_LIMIT else None


def pico_text(units: int, exponent: int) -> str:
    """format(from_pico(units, exponent), "f") for units >= 0, without Decimal arithmetic."""
    whole, frac = divmod(units, 10**PICO_DIGITS)
    return f"{whole}.{f'{frac:0{PICO_DIGITS}d}'[:-exponent]}" if exponent < 0 else str(whole)


def from_pico(units: int, exponent: int) -> Decimal:
    """The decimal that `units` picodollars print as when the smallest addend had `exponent`."""
    return Decimal(units).scaleb(-PICO_DIGITS, EXACT).quantize(Decimal(1).scaleb(exponent), context=EXACT)


# The cost of a sum of rollup rows, in SQL over alias r: their picodollars and smallest exponent, and the
# exact decimal sum of those without picodollars (SUM_COST_SLOW when the integer sum would overflow).
SUM_COST = "SUM(r.cost_pico), MIN(r.cost_exp), decimal_sum(r.cost_usd) FILTER (WHERE r.cost_pico IS NULL)"
SUM_COST_SLOW = "NULL, NULL, decimal_sum(r.cost_usd)"


def summed_values(ints: Sequence[Any], units: int | None, exponent: int | None, slow: str | None) -> tuple[Any, ...]:
    """A rollup row's counter values from SUM_COST's three figures: what exact_values gives for the
    decimal sum of the summed rows' costs, without parsing any decimal in the common case."""
    if slow is None and units is not None and exponent is not None and units < PICO_LIMIT:
        return (*ints, pico_text(units, exponent), units, exponent)
    total = from_pico(units, exponent) if units is not None and exponent is not None else Decimal(0)
    if slow is not None:
        total = EXACT.add(total, Decimal(slow))
    return exact_values(ints, format(total, "f"))


def exact_values(ints: Sequence[Any], cost: str) -> tuple[Any, ...]:
    """A rollup row's counter values from its integer counters and exact cost text."""
    exact = pico(Decimal(cost))
    return (*ints, cost, *(exact if exact is not None else (None, None)))
