"""Charts as server-rendered SVG: no script, no library, nothing to download; text is escaped.

Each bar carries a <title> with its exact decimal string, which a browser shows on hover. Only
presentation attributes are used (no style attributes), so the pages' Content-Security-Policy can forbid
inline styles.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Sequence

from markupsafe import Markup, escape

from proxy.core.money import exact_sum

__all__ = ["PALETTE", "bars", "meter", "stacked"]

PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac")


def _num(value: Decimal | int) -> float:
    return float(value)  # for geometry only: every label shows the exact value


def stacked(days: Sequence[str], series: Sequence[tuple[str, Sequence[Decimal]]], *, width: int = 760,
            height: int = 220, unit: str = "USD") -> Markup:
    """Columns per day, each the stack of `series` (name, one value per day), largest series at the bottom."""
    pad_l, pad_b, pad_t = 64, 28, 8
    plot_w, plot_h = width - pad_l - 8, height - pad_b - pad_t
    totals = [exact_sum(s[1][i] for s in series) for i in range(len(days))]
    top = max((_num(t) for t in totals), default=0.0) or 1.0
    col = plot_w / max(len(days), 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" role="img" aria-label="spend per day">']
    for frac in (0.0, 0.5, 1.0):
        y = pad_t + plot_h * (1 - frac)
        parts.append(f'<line x1="{pad_l}" x2="{width - 8}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                     f'<text x="{pad_l - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="11" fill="#555">'
                     f'{escape(_short(top * frac))}</text>')
    for i, day in enumerate(days):
        x, base = pad_l + i * col, 0.0
        for n, (name, values) in enumerate(series):
            value = values[i]
            if not value:
                continue
            h = plot_h * _num(value) / top
            y = pad_t + plot_h - base - h
            parts.append(f'<rect x="{x + 1:.1f}" y="{y:.2f}" width="{max(col - 2, 1):.1f}" height="{h:.2f}" '
                         f'fill="{PALETTE[n % len(PALETTE)]}"><title>{escape(day)} {escape(name)}: '
                         f'{escape(format(value, "f"))} {unit}</title></rect>')
            base += h
        if len(days) <= 16 or i % max(len(days) // 8, 1) == 0:
            parts.append(f'<text x="{x + col / 2:.1f}" y="{height - 10}" text-anchor="middle" font-size="10" '
                         f'fill="#555">{escape(day[5:10] if len(day) >= 10 else day)}</text>')
        parts.append(f'<rect x="{x:.1f}" y="{pad_t}" width="{col:.1f}" height="{plot_h}" fill="none" '
                     f'pointer-events="none"><title>{escape(day)} total: {escape(format(totals[i], "f"))} '
                     f'{unit}</title></rect>')
    parts.append("</svg>")
    return Markup("".join(parts))


def bars(rows: Sequence[tuple[str, Decimal | int]], *, width: int = 760, unit: str = "USD") -> Markup:
    """Horizontal bars, one per (label, value), with the exact value as text and on hover."""
    label_w, row_h = 220, 20
    height = row_h * len(rows) + 4
    top = max((_num(v) for _, v in rows), default=0.0) or 1.0
    plot_w = width - label_w - 140
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" role="img" aria-label="bars">']
    for i, (label, value) in enumerate(rows):
        y = 2 + i * row_h
        w = plot_w * max(_num(value), 0.0) / top
        exact = format(value, "f") if isinstance(value, Decimal) else str(value)
        parts.append(f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end" font-size="12" fill="#222">'
                     f'{escape(_clip(label))}</text>'
                     f'<rect x="{label_w}" y="{y + 3}" width="{w:.2f}" height="{row_h - 6}" fill="{PALETTE[0]}">'
                     f'<title>{escape(label)}: {escape(exact)} {unit}</title></rect>'
                     f'<text x="{label_w + w + 6:.2f}" y="{y + 14}" font-size="11" fill="#333">{escape(exact)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def meter(spent: Decimal, reserved: Decimal, budget: Decimal | None, *, width: int = 320) -> Markup:
    """A budget as one bar: spent, then reserved (in flight), over the budget's width."""
    height = 16
    total = _num(budget) if budget else max(_num(spent + reserved), 1e-12)
    def w(v: Decimal) -> float:
        return min(width * max(_num(v), 0.0) / total, width) if total > 0 else 0.0
    s, r = w(spent), w(reserved)
    r = min(r, width - s)
    color = "#e15759" if budget is not None and spent + reserved >= budget * Decimal("0.9") else "#4e79a7"
    return Markup(
        f'<svg xmlns="http://www.w3.org/2000/svg" class="meter" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="budget used"><rect x="0" y="0" width="{width}" '
        f'height="{height}" fill="#eee"/><rect x="0" y="0" width="{s:.2f}" height="{height}" fill="{color}">'
        f'<title>spent {escape(format(spent, "f"))} USD</title></rect><rect x="{s:.2f}" y="0" width="{r:.2f}" '
        f'height="{height}" fill="#f1ce63"><title>reserved {escape(format(reserved, "f"))} USD</title></rect></svg>')


def _short(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.4f}"


def _clip(text: str, n: int = 32) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
