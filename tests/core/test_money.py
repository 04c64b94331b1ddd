"""proxy/core/money.py: the one exact Decimal context, exact sums and the plain money text."""

from __future__ import annotations

from decimal import Decimal, Inexact, InvalidOperation

import pytest

from proxy.core.money import EXACT, exact_sum, usd_text


def test_exact_sum_keeps_every_digit_where_the_default_context_rounds() -> None:
    values = [Decimal("123456789012345678901234567890"), Decimal("0.000000000001"), Decimal("-0.000000000001"),
              Decimal("0.000000000001")]
    assert sum(values, Decimal(0)) != Decimal("123456789012345678901234567890.000000000001")  # 28 digits
    assert exact_sum(values) == Decimal("123456789012345678901234567890.000000000001")
    assert exact_sum([]) == 0 and exact_sum(iter([Decimal("0.1")] * 3)) == Decimal("0.3")


def test_a_result_that_is_not_exact_is_an_error_never_a_rounding() -> None:
    assert EXACT.divide(Decimal("2.5"), Decimal(1_000_000)) == Decimal("0.0000025")
    with pytest.raises((Inexact, InvalidOperation)):
        EXACT.sqrt(Decimal(2))


def test_usd_text_is_a_plain_decimal_string() -> None:
    assert usd_text(Decimal("2.0075E-3")) == "0.0020075" and usd_text(Decimal("1E+2")) == "100"
    assert usd_text(None) is None
