"""Small, dependency-free SVG line charts for the HTML report."""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b",
           "#e377c2", "#7f7f7f", "#bcbd22")


@dataclass(frozen=True)
class Series:
    """One line: its name, colour, points and whether it is dashed."""

    name: str
    points: list[tuple[float, float]]
    color: str = PALETTE[0]
    dashed: bool = False


def nice_ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    """Round tick values covering ``lo``..``hi``."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 2)
            if first + i * step <= hi + step * 1e-9]


def log_ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten (and 2x, 5x when the range is narrow) covering ``lo``..``hi``."""
    out = []
    for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        for m in ((1,) if hi / lo > 1000 else (1, 2, 5)):
            v = m * 10 ** e
            if lo <= v <= hi:
                out.append(float(v))
    return out or [lo, hi]


def cdf_points(values: list[float], max_points: int = 300) -> list[tuple[float, float]]:
    """The empirical CDF of ``values``, thinned to at most ``max_points`` points."""
    v = sorted(values)
    if not v:
        return []
    n = len(v)
    idx = range(n) if n <= max_points else sorted({round(i * (n - 1) / (max_points - 1))
                                                   for i in range(max_points)})
    return [(v[i], (i + 1) / n) for i in idx]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def line_chart(series: list[Series], *, title: str, x_label: str, y_label: str,
               log_x: bool = False, y_from_zero: bool = True, markers: bool = False,
               width: int = 640, height: int = 330) -> str:
    """Render series as an SVG line chart with axes, grid and a legend."""
    pts = [p for s in series for p in s.points
           if math.isfinite(p[0]) and math.isfinite(p[1]) and (not log_x or p[0] > 0)]
    left, right, top, bottom = 64, 16, 34, 48
    legend_h = 18 * ((len(series) + 2) // 3)
    height += legend_h
    pw, ph = width - left - right, height - top - bottom - legend_h
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="14" '
           f'font-weight="bold">{escape(title)}</text>']
    if not pts:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" '
                   'fill="#888">no data</text></svg>')
        return "".join(out)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = (0.0 if y_from_zero else min(ys)), max(ys)
    if log_x:
        x1 = max(x1, x0 * 10)
        xt = log_ticks(x0, x1)
        lx0, lx1 = math.log10(x0), math.log10(x1)
        def sx(x: float) -> float:
            return left + (math.log10(x) - lx0) / (lx1 - lx0) * pw
    else:
        xt = nice_ticks(x0, x1)
        x0, x1 = min(x0, xt[0]), max(x1, xt[-1])
        def sx(x: float) -> float:
            return left + (x - x0) / ((x1 - x0) or 1) * pw
    yt = nice_ticks(y0, y1 * 1.02 if y1 > 0 else 1)
    y0, y1 = min(y0, yt[0]), max(y1, yt[-1])
    def sy(y: float) -> float:
        return top + ph - (y - y0) / ((y1 - y0) or 1) * ph
    for t in yt:
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" '
                   f'stroke="#e5e5e5"/><text x="{left - 6}" y="{sy(t) + 4:.1f}" '
                   f'text-anchor="end" fill="#444">{_fmt(t)}</text>')
    for t in xt:
        out.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{top}" y2="{top + ph}" '
                   f'stroke="#eeeeee"/><text x="{sx(t):.1f}" y="{top + ph + 16}" '
                   f'text-anchor="middle" fill="#444">{_fmt(t)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" '
               'stroke="#999"/>')
    out.append(f'<text x="{left + pw / 2}" y="{top + ph + 36}" text-anchor="middle">'
               f'{escape(x_label)}</text>')
    out.append(f'<text transform="translate(16,{top + ph / 2}) rotate(-90)" '
               f'text-anchor="middle">{escape(y_label)}</text>')
    for s in series:
        p = [(x, y) for x, y in s.points if math.isfinite(x) and math.isfinite(y)
             and (not log_x or x > 0)]
        if not p:
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in p)
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        out.append(f'<polyline points="{path}" fill="none" stroke="{s.color}" '
                   f'stroke-width="2"{dash}/>')
        if markers or len(p) == 1:
            out.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{s.color}"/>'
                       for x, y in p)
    for i, s in enumerate(series):
        lx, ly = left + (i % 3) * (pw / 3), top + ph + 54 + 18 * (i // 3)
        dash = ' stroke-dasharray="6 4"' if s.dashed else ""
        out.append(f'<line x1="{lx:.1f}" x2="{lx + 22:.1f}" y1="{ly - 4}" y2="{ly - 4}" '
                   f'stroke="{s.color}" stroke-width="2"{dash}/><text x="{lx + 28:.1f}" '
                   f'y="{ly}">{escape(s.name)}</text>')
    out.append("</svg>")
    return "".join(out)
