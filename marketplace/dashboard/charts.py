"""Charts drawn as inline SVG on the server: no script, no CDN, readable by screen readers.

Each chart carries a <title> naming what it shows and its latest value, and scales to its
container's width (viewBox), so it works at phone width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import date, datetime
from html import escape

from django.utils.safestring import SafeString, mark_safe

# viewBox sizes: a wide chart spans the page, a narrow one sits in a grid of several.
WIDE = 900
NARROW = 420
HEIGHT = 180
PAD_LEFT = 24
PAD_BOTTOM = 22
PAD_TOP = 28

Point = tuple[datetime | date, float]


def _label(at: datetime | date) -> str:
    return at.strftime("%H:%M") if isinstance(at, datetime) else at.strftime("%b %d")


def _frame(
    title: str, body: str, top: float, fmt: Callable[[float], str], first: str, last: str, width: int
) -> SafeString:
    plot_h = HEIGHT - PAD_BOTTOM - PAD_TOP
    axis = (
        f'<line x1="{PAD_LEFT}" y1="{PAD_TOP + plot_h}" x2="{width}" y2="{PAD_TOP + plot_h}" class="axis"/>'
        f'<line x1="{PAD_LEFT}" y1="{PAD_TOP}" x2="{width}" y2="{PAD_TOP}" class="grid"/>'
        f'<text x="{PAD_LEFT + 4}" y="{PAD_TOP + 12}" class="tick">{escape(fmt(top))}</text>'
        f'<text x="{PAD_LEFT - 4}" y="{PAD_TOP + plot_h}" text-anchor="end" class="tick">0</text>'
        f'<text x="{PAD_LEFT}" y="{HEIGHT - 4}" class="tick">{escape(first)}</text>'
        f'<text x="{width}" y="{HEIGHT - 4}" text-anchor="end" class="tick">{escape(last)}</text>'
        f'<text x="0" y="16" class="caption">{escape(title)}</text>'
    )
    return mark_safe(
        f'<svg class="chart" viewBox="0 0 {width} {HEIGHT}" role="img" aria-label="{escape(title)}" '
        f"><title>{escape(title)}</title>{axis}{body}</svg>"
    )


def bar_chart(
    points: Sequence[Point], *, title: str, fmt: Callable[[float], str] = str, width: int = WIDE
) -> SafeString:
    """One bar per point (days, hours); an empty series draws the axes and says so in the title."""
    if not points:
        return _frame(f"{title}: no data yet", "", 0, fmt, "", "", width)
    top = max(max(v for _, v in points), 1)
    plot_w = width - PAD_LEFT
    plot_h = HEIGHT - PAD_BOTTOM - PAD_TOP
    step = plot_w / len(points)
    bars = []
    for i, (at, value) in enumerate(points):
        h = plot_h * value / top
        bars.append(
            f'<rect x="{PAD_LEFT + i * step + step * 0.1:.1f}" y="{PAD_TOP + plot_h - h:.1f}" '
            f'width="{step * 0.8:.1f}" height="{h:.1f}" class="bar"><title>{escape(_label(at))}: '
            f"{escape(fmt(value))}</title></rect>"
        )
    total = sum(v for _, v in points)
    return _frame(
        f"{title}: {fmt(total)} in all",
        "".join(bars),
        top,
        fmt,
        _label(points[0][0]),
        _label(points[-1][0]),
        width,
    )


def line_chart(
    points: Sequence[Point],
    *,
    title: str,
    fmt: Callable[[float], str] = str,
    top: float | None = None,
    width: int = NARROW,
) -> SafeString:
    """A line over time, x spaced by time (gaps show where the agent was away)."""
    if not points:
        return _frame(f"{title}: no readings yet", "", 0, fmt, "", "", width)
    values = [v for _, v in points]
    high = top if top is not None else max(max(values), 1.0)
    low = min(0.0, min(values))
    span_v = (high - low) or 1.0
    t0 = points[0][0].timestamp() if isinstance(points[0][0], datetime) else 0.0
    t1 = points[-1][0].timestamp() if isinstance(points[-1][0], datetime) else float(len(points) - 1)
    span_t = (t1 - t0) or 1.0
    plot_w = width - PAD_LEFT
    plot_h = HEIGHT - PAD_BOTTOM - PAD_TOP
    coords = []
    for i, (at, value) in enumerate(points):
        t = at.timestamp() if isinstance(at, datetime) else float(i)
        x = PAD_LEFT + plot_w * (t - t0) / span_t if len(points) > 1 else PAD_LEFT + plot_w / 2
        y = PAD_TOP + plot_h * (1 - (value - low) / span_v)
        coords.append(f"{x:.1f},{y:.1f}")
    body = f'<polyline points="{" ".join(coords)}" class="line"/>'
    if len(points) == 1:
        cx, cy = coords[0].split(",")
        body += f'<circle cx="{cx}" cy="{cy}" r="3" class="dot"/>'
    return _frame(
        f"{title}: {fmt(values[-1])} now",
        body,
        high,
        fmt,
        _label(points[0][0]),
        _label(points[-1][0]),
        width,
    )
