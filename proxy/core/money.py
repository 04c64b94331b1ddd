"""Money as every layer computes and shows it: exact `Decimal`, never float.

`EXACT` is the one arithmetic context: 200 significant digits, far more than any price times any token count
or any sum of ledger costs needs, with Inexact and InvalidOperation trapped, so a result is exact or an error
(a finite precision: with an unbounded one an inexact division raises MemoryError, not Inexact). `exact_sum` adds in it; `usd_text` is the plain decimal string the API and logs show.
"""

from __future__ import annotations

from decimal import MAX_EMAX, MIN_EMIN, Context, Decimal, Inexact, InvalidOperation
from typing import Iterable, overload

__all__ = ["EXACT", "exact_sum", "usd_text"]

EXACT = Context(prec=200, Emax=MAX_EMAX, Emin=MIN_EMIN, traps=[Inexact, InvalidOperation])


def exact_sum(values: Iterable[Decimal]) -> Decimal:
    """The sum of `values` to the last digit (Decimal(0) for none)."""
    total = Decimal(0)
    for value in values:
        total = EXACT.add(total, value)
    return total


@overload
def usd_text(value: Decimal) -> str: ...
@overload
def usd_text(value: None) -> None: ...
@overload
def usd_text(value: Decimal | None) -> str | None: ...


def usd_text(value: Decimal | None) -> str | None:
    """An amount as a plain decimal string (`0.0020075`, never `2.0075E-3`); None stays None."""
    return None if value is None else format(value, "f")
