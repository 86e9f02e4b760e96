"""Inline SVG charts, rendered on the server (pure functions: no I/O, no JavaScript, no CDN).

A chart is a ``<svg>`` string sized by its ``viewBox`` (it scales to its container's width), with a
y axis of round ticks starting at 0, sparse x labels, a legend, and a ``<title>`` per point so that
hovering shows the exact value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

WIDTH, HEIGHT = 640, 180
LEFT, RIGHT, TOP, BOTTOM = 48, 8, 10, 26
PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2")


@dataclass(frozen=True)
class Series:
    name: str
    values: Sequence[float | None]   # None: no data at that point (a gap in the line)


def nice_max(value: float, *, minimum: float = 0.0) -> float:
    """The y axis's top: the smallest 1, 2, 4, 6 or 8 × 10^n at or above ``value`` (and ``minimum``), so
    that its quarters (the grid lines) are round numbers too; 1 for nothing."""
    value = max(value, minimum)
    if value <= 0 or math.isnan(value):
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 4, 6, 8, 10):
        if value <= step * power * (1 + 1e-9):
            return step * power
    return 10 * power


def fmt(value: float, unit: str = "", *, top: float = 0.0) -> str:
    """A short label: 1234 → 1.2k, 0.25 → 0.25; ``$`` goes in front with as many places as an axis up to
    ``top`` needs to tell its quarters apart; other units go after."""
    if unit == "$":
        if value == 0:
            return "$0"
        quarter = (top or abs(value) or 1) / 4
        places = 2 if quarter >= 0.01 else min(10, math.ceil(-math.log10(quarter)) + 1)
        return f"${value:,.{places}f}"
    if abs(value) >= 1000:
        text = f"{value / 1000:.1f}k"
    elif value == int(value):
        text = f"{int(value)}"
    else:
        text = f"{value:.3g}"
    return f"{text}{' ' + unit if unit else ''}"


def _ticks(top: float, unit: str) -> tuple[list[str], int]:
    """The y axis's five labels (top first) and the left margin they need (about 6 px a character)."""
    ticks = [fmt(top * (4 - i) / 4, unit, top=top) for i in range(5)]
    return ticks, max(LEFT, 6 * max(len(t) for t in ticks) + 10)


def _frame(top: float, labels: Sequence[str], unit: str) -> tuple[list[str], int]:
    """Grid, y ticks and x labels; returns them and the plot's left edge."""
    ticks, left = _ticks(top, unit)
    plot_w, plot_h = WIDTH - left - RIGHT, HEIGHT - TOP - BOTTOM
    parts = []
    for i, tick in enumerate(ticks):
        y = TOP + plot_h * i / 4
        parts.append(f'<line x1="{left}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" class="ytick">{escape(tick)}</text>')
    n = len(labels)
    every = max(1, math.ceil(n / 8))
    for i, label in enumerate(labels):
        if label and i % every == 0:
            x = left + (plot_w * (i + 0.5) / n if n else 0)
            parts.append(f'<text x="{x:.1f}" y="{HEIGHT - 8}" class="xtick">{escape(label)}</text>')
    return parts, left


def _legend(names: Sequence[str]) -> str:
    items = "".join(f'<span><i style="background:{PALETTE[i % len(PALETTE)]}"></i>{escape(name)}</span>'
                    for i, name in enumerate(names))
    return f'<div class="legend">{items}</div>'


def line_chart(series: Sequence[Series], labels: Sequence[str], *, unit: str = "", title: str = "") -> Markup:
    """One line per series over the points ``labels`` names (equal lengths); gaps where a value is None
    (a point between two gaps is a dot)."""
    values = [v for s in series for v in s.values if v is not None]
    top = nice_max(max(values, default=0.0))
    parts, left = _frame(top, labels, unit)
    plot_w, plot_h = WIDTH - left - RIGHT, HEIGHT - TOP - BOTTOM
    n = max(len(labels), 1)
    for index, s in enumerate(series):
        color = PALETTE[index % len(PALETTE)]
        runs: list[list[str]] = [[]]
        for i, v in enumerate(s.values):
            if v is None:
                runs.append([])
                continue
            x, y = left + plot_w * (i + 0.5) / n, TOP + plot_h * (1 - v / top)
            runs[-1].append(f"{x:.1f},{y:.1f}")
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2" fill="{color}"><title>'
                         f'{escape(s.name)} {escape(labels[i] if i < len(labels) else "")}: '
                         f'{escape(fmt(v, unit, top=top))}</title></circle>')
        parts.extend(f'<polyline points="{" ".join(run)}" stroke="{color}" class="line"/>'
                     for run in runs if len(run) > 1)
    return _wrap(parts, title, [s.name for s in series])


def bar_chart(series: Sequence[Series], labels: Sequence[str], *, unit: str = "", title: str = "",
              whole: bool = False) -> Markup:
    """Stacked bars, one per label, a segment per series (None counts as 0); ``whole``: counts, so the
    axis goes to at least 4 (its quarters stay whole numbers)."""
    totals = [sum(s.values[i] or 0 for s in series) for i in range(len(labels))]
    top = nice_max(max(totals, default=0.0), minimum=4.0 if whole else 0.0)
    parts, left = _frame(top, labels, unit)
    plot_w, plot_h = WIDTH - left - RIGHT, HEIGHT - TOP - BOTTOM
    n = max(len(labels), 1)
    slot = plot_w / n
    bar = max(1.0, min(slot * 0.7, 48.0))
    for i, label in enumerate(labels):
        base = 0.0
        for index, s in enumerate(series):
            v = s.values[i] or 0
            if v <= 0:
                continue
            y, h = TOP + plot_h * (1 - (base + v) / top), plot_h * v / top
            x = left + slot * (i + 0.5) - bar / 2
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{max(h, 0.5):.1f}" '
                         f'fill="{PALETTE[index % len(PALETTE)]}"><title>{escape(s.name)} {escape(label)}: '
                         f'{escape(fmt(v, unit, top=top))}</title></rect>')
            base += v
    return _wrap(parts, title, [s.name for s in series])


def _wrap(parts: list[str], title: str, names: Sequence[str]) -> Markup:
    heading = f"<h3>{escape(title)}</h3>" if title else ""
    svg = (f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" class="chart" role="img" aria-label="{escape(title)}">'
           + "".join(parts) + "</svg>")
    legend = _legend(names) if len(names) > 1 else ""
    return Markup(f'<figure class="chartbox">{heading}{svg}{legend}</figure>')
