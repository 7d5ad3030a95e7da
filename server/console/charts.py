"""Charts rendered on the server as inline SVG: no JavaScript, no CDN, nothing to load.

Two kinds serve the console: a line chart (held-out loss of base, prior and personal
adapter per round) and a grouped bar chart (bytes moved per round). Every label is
XML-escaped, every point carries a ``<title>`` the browser shows on hover, and the
colours come from CSS classes (``series-0``...), so the page's stylesheet decides them
and the Content-Security-Policy needs no inline styles.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

WIDTH, HEIGHT = 640, 260
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 16, 28, 40


@dataclass(frozen=True)
class _Frame:
    """Data ranges mapped onto the plot area."""

    x0: float
    x1: float
    y0: float
    y1: float
    width: int
    height: int

    def x(self, value: float) -> float:
        span = self.x1 - self.x0 or 1.0
        return _LEFT + (value - self.x0) / span * (self.width - _LEFT - _RIGHT)

    def y(self, value: float) -> float:
        span = self.y1 - self.y0 or 1.0
        return self.height - _BOTTOM - (value - self.y0) / span * (self.height - _TOP - _BOTTOM)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering ``[low, high]`` (1, 2, 5 steps).

    Examples
    --------
    >>> nice_ticks(0.0, 1.0)
    [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    """
    if not (math.isfinite(low) and math.isfinite(high)):
        return []
    if high <= low:
        high = low + 1.0
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    start = math.floor(low / step) * step
    ticks = []
    value = start
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def byte_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Like :func:`nice_ticks` but round in binary units, so labels read 64 KiB, not 62.5 KiB.

    Examples
    --------
    >>> [format_bytes(t) for t in byte_ticks(0, 150 * 1024)]
    ['0 B', '50 KiB', '100 KiB', '150 KiB']
    """
    unit = next((u for u in (2**30, 2**20, 2**10) if max(abs(low), abs(high)) >= u), 1)
    return [t * unit for t in nice_ticks(low / unit, high / unit, count)]


def format_number(value: float) -> str:
    """Short labels: 1.2k, 3.4M for big values, 3 significant digits for small ones."""
    magnitude = abs(value)
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= threshold:
            return f"{value / threshold:.3g}{suffix}"
    if value == int(value):
        return str(int(value))
    return f"{value:.3g}"


def format_bytes(value: float) -> str:
    """Bytes in binary units: 512 B, 1.5 KiB, 3.2 MiB."""
    for threshold, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(value) >= threshold:
            return f"{value / threshold:.3g} {suffix}"
    return f"{int(value)} B"


def _empty(title: str, width: int, height: int, message: str) -> Markup:
    return Markup(
        f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" aria-label="{escape(title)}">'
        f'<text class="chart-title" x="{_LEFT}" y="18">{escape(title)}</text>'
        f'<text class="chart-empty" x="{width / 2:.0f}" y="{height / 2:.0f}" '
        f'text-anchor="middle">{escape(message)}</text></svg>'
    )


def _axes(
    frame: _Frame,
    title: str,
    x_label: str,
    y_label: str,
    y_ticks: Sequence[float],
    x_ticks: Sequence[tuple[float, str]],
    y_format: str,
) -> list[str]:
    w, h = frame.width, frame.height
    fmt = format_bytes if y_format == "bytes" else format_number
    parts = [
        f'<text class="chart-title" x="{_LEFT}" y="18">{escape(title)}</text>',
        f'<line class="axis" x1="{_LEFT}" y1="{h - _BOTTOM}" x2="{w - _RIGHT}" y2="{h - _BOTTOM}"/>',
        f'<line class="axis" x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{h - _BOTTOM}"/>',
        f'<text class="axis-label" x="{(w + _LEFT) / 2:.0f}" y="{h - 6}" text-anchor="middle">'
        f"{escape(x_label)}</text>",
        f'<text class="axis-label" x="14" y="{(h - _BOTTOM + _TOP) / 2:.0f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {(h - _BOTTOM + _TOP) / 2:.0f})">{escape(y_label)}</text>',
    ]
    for tick in y_ticks:
        y = frame.y(tick)
        parts.append(
            f'<line class="grid" x1="{_LEFT}" y1="{y:.1f}" x2="{w - _RIGHT}" y2="{y:.1f}"/>'
        )
        parts.append(
            f'<text class="tick" x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{escape(fmt(tick))}</text>"
        )
    for value, label in x_ticks:
        x = frame.x(value)
        parts.append(
            f'<text class="tick" x="{x:.1f}" y="{h - _BOTTOM + 16}" text-anchor="middle">'
            f"{escape(label)}</text>"
        )
    return parts


def _legend(names: Sequence[str], width: int) -> list[str]:
    parts = []
    x = width - _RIGHT
    for index in reversed(range(len(names))):
        label = escape(names[index])
        x -= 14 + 7 * len(names[index]) + 12
        parts.append(
            f'<rect class="swatch series-{index}" x="{x}" y="9" width="10" height="10"/>'
            f'<text class="legend" x="{x + 14}" y="18">{label}</text>'
        )
    return parts


def _x_ticks(xs: Sequence[float], limit: int = 12) -> list[tuple[float, str]]:
    unique = sorted(set(xs))
    step = max(1, math.ceil(len(unique) / limit))
    return [(x, format_number(x)) for x in unique[::step]]


def line_chart(
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    width: int = WIDTH,
    height: int = HEIGHT,
    y_format: str = "number",
) -> Markup:
    """An SVG line chart of named ``(x, y)`` series; non-finite points are skipped.

    Examples
    --------
    >>> svg = line_chart({"base": [(1, 3.2), (2, 3.1)]}, title="loss", x_label="round",
    ...                  y_label="loss")
    >>> svg.startswith("<svg") and "<polyline" in svg
    True
    """
    clean = {
        name: sorted(
            (float(x), float(y)) for x, y in points if math.isfinite(x) and math.isfinite(y)
        )
        for name, points in series.items()
    }
    xs = [x for pts in clean.values() for x, _ in pts]
    ys = [y for pts in clean.values() for _, y in pts]
    if not xs:
        return _empty(title, width, height, "no data yet")
    ticks = byte_ticks if y_format == "bytes" else nice_ticks
    y_ticks = ticks(min(ys), max(ys))
    frame = _Frame(min(xs), max(xs), y_ticks[0], y_ticks[-1], width, height)
    if frame.x0 == frame.x1:
        frame = _Frame(frame.x0 - 1, frame.x1 + 1, frame.y0, frame.y1, width, height)
    parts = _axes(frame, title, x_label, y_label, y_ticks, _x_ticks(xs), y_format)
    fmt = format_bytes if y_format == "bytes" else format_number
    for index, (name, points) in enumerate(clean.items()):
        if not points:
            continue
        coords = " ".join(f"{frame.x(x):.1f},{frame.y(y):.1f}" for x, y in points)
        parts.append(f'<polyline class="line series-{index}" points="{coords}"/>')
        for x, y in points:
            parts.append(
                f'<circle class="dot series-{index}" cx="{frame.x(x):.1f}" cy="{frame.y(y):.1f}" r="3">'
                f"<title>{escape(name)}, {escape(x_label)} {escape(format_number(x))}: "
                f"{escape(fmt(y) if y_format == 'bytes' else f'{y:.4g}')}</title></circle>"
            )
    parts += _legend(list(clean), width)
    return _wrap(title, width, height, parts)


def bar_chart(
    groups: Sequence[tuple[float, Mapping[str, float]]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    width: int = WIDTH,
    height: int = HEIGHT,
    y_format: str = "bytes",
) -> Markup:
    """An SVG grouped bar chart: one group per x value, one bar per named series.

    Examples
    --------
    >>> svg = bar_chart([(1, {"up": 2048, "down": 4096})], title="bytes", x_label="round",
    ...                 y_label="bytes")
    >>> svg.count('<rect class="bar') == 2
    True
    """
    names: list[str] = []
    for _, values in groups:
        names += [n for n in values if n not in names]
    values_all = [v for _, vals in groups for v in vals.values() if math.isfinite(v)]
    if not groups or not values_all:
        return _empty(title, width, height, "no data yet")
    ticks = byte_ticks if y_format == "bytes" else nice_ticks
    y_ticks = ticks(0.0, max(max(values_all), 1.0))
    xs = [float(x) for x, _ in groups]
    frame = _Frame(min(xs) - 0.5, max(xs) + 0.5, 0.0, y_ticks[-1], width, height)
    parts = _axes(frame, title, x_label, y_label, y_ticks, _x_ticks(xs), y_format)
    slot = (frame.x(frame.x0 + 1) - frame.x(frame.x0)) * 0.8
    bar_w = max(slot / max(len(names), 1), 1.0)
    fmt = format_bytes if y_format == "bytes" else format_number
    for x, vals in groups:
        left = frame.x(float(x)) - slot / 2
        for index, name in enumerate(names):
            value = vals.get(name)
            if value is None or not math.isfinite(value):
                continue
            top = frame.y(value)
            parts.append(
                f'<rect class="bar series-{index}" x="{left + index * bar_w:.1f}" y="{top:.1f}" '
                f'width="{bar_w:.1f}" height="{frame.y(0.0) - top:.1f}">'
                f"<title>{escape(name)}, {escape(x_label)} {escape(format_number(float(x)))}: "
                f"{escape(fmt(value))}</title></rect>"
            )
    parts += _legend(names, width)
    return _wrap(title, width, height, parts)


def _wrap(title: str, width: int, height: int, parts: Sequence[str]) -> Markup:
    body = "".join(parts)
    return Markup(
        f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">'
        f"{body}</svg>"
    )
