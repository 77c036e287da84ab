"""The ratio bar chart (`ratios.png`), drawn with Pillow: no plotting library to install.

Bars start at ratio 1.0 (parity, a vertical line) and run right when the port is slower, left
when it is faster, on a log axis so 2x slower and 2x faster are the same length.
"""
from __future__ import annotations

import io
import math
from typing import Dict, List, Sequence

SLOWER, FASTER, INK, GRID = (214, 39, 40), (44, 160, 44), (30, 30, 30), (225, 225, 225)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def log_ticks(lo: float, hi: float) -> List[float]:
    """1-2-5 ticks within [lo, hi], thinned to powers of ten when there would be too many."""
    ticks = [m * 10.0 ** k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
             for m in (1, 2, 5)]
    ticks = [t for t in ticks if lo <= t <= hi]
    if len(ticks) > 9:
        ticks = [t for t in ticks if abs(math.log10(t) - round(math.log10(t))) < 1e-9]
    return ticks


def _tick_label(v: float) -> str:
    return f"{v:g}x" if 1e-3 <= v < 1e4 else f"1e{round(math.log10(v))}x"


def axis_range(values: Sequence[float]) -> tuple:
    """Log axis bounds: all values and 1.0 with some room, at least 0.5x .. 2x."""
    lo = min([1.0] + list(values)) / 1.3
    hi = max([1.0] + list(values)) * 1.3
    return min(lo, 0.5), max(hi, 2.0)


def ratio_chart_png(ratios: Sequence[Dict], title: str = "port / reference (median time)",
                    width: int = 760) -> bytes:
    """PNG bytes of one horizontal bar per ratio entry ({component, port_mode, ratio})."""
    from PIL import Image, ImageDraw

    rows = [r for r in ratios if r.get("ratio") and r["ratio"] > 0 and math.isfinite(r["ratio"])]
    modes = {r.get("port_mode") for r in rows}
    row_h, top, bottom, left, right = 36, 54, 46, 170, 70
    height = top + bottom + max(len(rows), 1) * row_h
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font, small, bold = _font(13), _font(11), _font(15)
    draw.text((width / 2, 14), title, fill=INK, font=bold, anchor="mt")
    plot_w = width - left - right
    if not rows:
        draw.text((width / 2, top + row_h / 2), "no ratios to plot (a side is missing)",
                  fill=INK, font=font, anchor="mm")
        return _png(img)

    lo, hi = axis_range([r["ratio"] for r in rows])
    span = math.log10(hi) - math.log10(lo)

    def x(v: float) -> float:
        return left + (math.log10(v) - math.log10(lo)) / span * plot_w

    axis_y = top + len(rows) * row_h
    for t in log_ticks(lo, hi):
        draw.line([(x(t), top - 4), (x(t), axis_y)], fill=GRID, width=1)
        draw.text((x(t), axis_y + 6), _tick_label(t), fill=INK, font=small, anchor="mt")
    draw.line([(left, axis_y), (left + plot_w, axis_y)], fill=INK, width=1)
    draw.text((left + plot_w / 2, axis_y + 24), "port median / reference median (log scale)",
              fill=INK, font=small, anchor="mt")

    for i, r in enumerate(rows):
        y0 = top + i * row_h + 6
        y1 = y0 + row_h - 12
        v = r["ratio"]
        x0, x1 = sorted((x(1.0), x(v)))
        draw.rectangle([x0, y0, max(x1, x0 + 1), y1], fill=SLOWER if v > 1 else FASTER)
        label = r["component"] if len(modes) < 2 else f"{r['component']} ({r.get('port_mode')})"
        draw.text((left - 10, (y0 + y1) / 2), label, fill=INK, font=font, anchor="rm")
        # the value sits right of the bar's far end, or right of parity for a faster port
        draw.text((max(x(v), x(1.0)) + 6, (y0 + y1) / 2), f"{v:.2f}x", fill=INK, font=font,
                  anchor="lm")
    draw.line([(x(1.0), top - 8), (x(1.0), axis_y)], fill=INK, width=2)
    draw.text((x(1.0), top - 10), "parity", fill=INK, font=small, anchor="mb")
    return _png(img)


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()

