"""Self-drawn figures for the HTML report: SVG line charts and ref/port/diff PNGs.

No plotting library: a report must open anywhere, offline, as one file, and the charts are
simple enough (a few series over <= a few hundred steps) that drawing them by hand is shorter
than depending on one.
"""
from __future__ import annotations

import html
import io
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from sdxl_common.atomic import atomic_write_bytes

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b",
           "#e377c2", "#7f7f7f", "#bcbd22")
BOUND_COLOURS = {"fail": "#c62828", "warn": "#ef8f00"}


def _fmt_tick(v: float, log: bool) -> str:
    if log:
        return f"1e{int(round(math.log10(v)))}"
    return f"{v:.3g}"


def _nice_step(span: float, target: int) -> float:
    """Round step (1, 2 or 5 times a power of ten) giving about `target` ticks over `span`."""
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def line_chart_svg(series: Mapping[str, Sequence[float]], *, title: str = "",
                   x_label: str = "step", y_label: str = "", log_y: bool = True,
                   hlines: Optional[Mapping[str, float]] = None, width: int = 640,
                   height: int = 320, vlines: Optional[Mapping[str, float]] = None) -> str:
    """An inline `<svg>` line chart: one line per series, x = index (step), y on a log scale
    (decade ticks) by default. `hlines` draws labelled dashed horizontal lines (policy bounds:
    a label starting with "fail"/"warn" gets the matching colour); `vlines` labelled vertical
    lines at x positions (a culprit module). Non-finite values break a
    line; on a log axis, values <= 0 (e.g. an exact match) are left out and counted in a note.
    """
    hlines = dict(hlines or {})
    names = list(series)
    n_x = max((len(v) for v in series.values()), default=0)
    left, right, top = 70, 20, 28 if title else 12
    legend_rows = math.ceil(len(names) / 3) if names else 0
    bottom = 44 + 16 * legend_rows
    pw, ph = width - left - right, height - top - bottom
    out: List[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" class="chart" '
        f'font-family="sans-serif" font-size="11">',
        f"<title>{html.escape(title or 'chart')}</title>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
    ]
    if title:
        out.append(f'<text x="{width / 2:.1f}" y="17" text-anchor="middle" font-size="13" '
                   f'font-weight="bold">{html.escape(title)}</text>')

    def usable(v: float) -> bool:
        return math.isfinite(v) and (v > 0 or not log_y)

    values = [float(v) for s in series.values() for v in s]
    dropped = sum(1 for v in values if math.isfinite(v) and log_y and v <= 0)
    ys = [v for v in values if usable(v)] + [v for v in hlines.values() if usable(v)]
    if not ys or n_x == 0:
        out.append(f'<text x="{width / 2:.1f}" y="{height / 2:.1f}" text-anchor="middle">'
                   f'no {"positive " if log_y else ""}finite values to plot</text></svg>')
        return "".join(out)

    if log_y:
        lo, hi = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
        if lo == hi:
            lo, hi = lo - 1, hi + 1
        y_lo, y_hi = float(lo), float(hi)
        to_y = lambda v: math.log10(v)  # noqa: E731
        every = max(1, math.ceil((hi - lo) / 8))
        ticks = [10.0 ** e for e in range(lo, hi + 1, every)]
    else:
        y_lo, y_hi = min(ys), max(ys)
        if y_lo == y_hi:
            pad = abs(y_lo) * 0.1 or 1.0
            y_lo, y_hi = y_lo - pad, y_hi + pad
        step = _nice_step(y_hi - y_lo, 5)
        y_lo, y_hi = math.floor(y_lo / step) * step, math.ceil(y_hi / step) * step
        to_y = lambda v: v  # noqa: E731
        ticks = [y_lo + i * step for i in range(int(round((y_hi - y_lo) / step)) + 1)]
    x_hi = max(n_x - 1, 1)

    def px(i: float) -> float:
        return left + pw * i / x_hi

    def py(v: float) -> float:
        return top + ph * (1.0 - (to_y(v) - y_lo) / (y_hi - y_lo))

    # grid and axes
    for t in ticks:
        y = py(t)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" '
                   f'stroke="#e0e0e0"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">'
                   f'{_fmt_tick(t, log_y)}</text>')
    x_step = max(1, int(_nice_step(x_hi, 10)))
    for i in range(0, x_hi + 1, x_step):
        x = px(i)
        out.append(f'<line x1="{x:.1f}" y1="{top + ph}" x2="{x:.1f}" y2="{top + ph + 4}" '
                   f'stroke="#333"/>')
        out.append(f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">{i}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" '
               f'stroke="#333"/>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{top + ph + 32}" text-anchor="middle">'
               f'{html.escape(x_label)}</text>')
    if y_label:
        yc = top + ph / 2
        out.append(f'<text x="14" y="{yc:.1f}" text-anchor="middle" '
                   f'transform="rotate(-90 14 {yc:.1f})">'
                   f'{html.escape(y_label + (" (log)" if log_y else ""))}</text>')

    # bounds
    for label, v in hlines.items():
        if not usable(v):
            continue
        colour = next((c for k, c in BOUND_COLOURS.items() if label.startswith(k)), "#555")
        y = py(v)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" '
                   f'stroke="{colour}" stroke-dasharray="6 4"/>')
        out.append(f'<text x="{left + pw - 4}" y="{y - 4:.1f}" text-anchor="end" '
                   f'fill="{colour}">{html.escape(label)}</text>')

    for label, x_at in (vlines or {}).items():
        x = px(x_at)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" '
                   f'stroke="{BOUND_COLOURS.get("fail", "#c00")}" stroke-width="1.5"/>')
        out.append(f'<text x="{x + 4:.1f}" y="{top + 12}" fill="{BOUND_COLOURS.get("fail", "#c00")}">'
                   f'{html.escape(label)}</text>')

    # series
    for k, name in enumerate(names):
        colour = PALETTE[k % len(PALETTE)]
        vals = [float(v) for v in series[name]]
        segments: List[List[Tuple[float, float]]] = [[]]
        for i, v in enumerate(vals):
            if usable(v):
                segments[-1].append((px(i), py(v)))
            elif segments[-1]:
                segments.append([])
        for seg in segments:
            if len(seg) > 1:
                pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in seg)
                out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" '
                           f'stroke-width="1.6"/>')
            if len(vals) <= 60 or len(seg) == 1:
                out.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.2" fill="{colour}"/>'
                           for x, y in seg)
        col, row = k % 3, k // 3
        lx, ly = left + col * (pw / 3), top + ph + 44 + 16 * row
        out.append(f'<line x1="{lx:.1f}" y1="{ly - 4:.1f}" x2="{lx + 18:.1f}" y2="{ly - 4:.1f}" '
                   f'stroke="{colour}" stroke-width="2"/>')
        out.append(f'<text x="{lx + 22:.1f}" y="{ly:.1f}">{html.escape(name)}</text>')
    if dropped:
        out.append(f'<text x="{left + 4}" y="{top + 12}" fill="#555">{dropped} zero value(s) '
                   f'not drawn on the log axis</text>')
    out.append("</svg>")
    return "".join(out)


# --------------------------------------------------------------------------------------------
# Images

def _to_uint8_image(a: Any) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ValueError(f"expected an HxW or HxWxC (C=3/4) image, got shape {a.shape}")
    if a.dtype != np.uint8:
        a = np.clip(np.rint(np.asarray(a, dtype=np.float64)), 0, 255).astype(np.uint8)
    return a


def png_bytes(image: Any) -> bytes:
    """PNG encoding of a 0-255 image (uint8, or float rounded and clipped)."""
    from PIL import Image  # pillow is only needed when images are written

    buf = io.BytesIO()
    Image.fromarray(_to_uint8_image(image)).save(buf, format="PNG")
    return buf.getvalue()


def diff_image(ref: Any, port: Any) -> Tuple[np.ndarray, float]:
    """|port - ref| per pixel (max over channels), stretched so the largest difference is
    white; returns (uint8 image, gain). A zero difference gives a black image and gain 0."""
    r = np.asarray(ref, dtype=np.float64)
    p = np.asarray(port, dtype=np.float64)
    if r.shape != p.shape:
        raise ValueError(f"shape mismatch: ref {r.shape} vs port {p.shape}")
    d = np.abs(p - r)
    if d.ndim == 3:
        d = d.max(axis=-1)
    peak = float(d.max()) if d.size else 0.0
    gain = 255.0 / peak if peak > 0 else 0.0
    return np.clip(np.rint(d * gain), 0, 255).astype(np.uint8), gain


def write_image_triplet(ref: Any, port: Any, out_dir: os.PathLike | str,
                        stem: str = "image") -> Dict[str, str]:
    """Write `<stem>_ref.png`, `<stem>_port.png`, `<stem>_diff.png` (stretched |diff|) under
    `out_dir/images/`; return `{"ref": ..., "port": ..., "diff": ...}` paths relative to
    `out_dir`, ready for `StageResult.images`."""
    out_dir = Path(out_dir)
    diff, _ = diff_image(ref, port)
    rel = {}
    for role, img in (("ref", ref), ("port", port), ("diff", diff)):
        rp = Path("images") / f"{stem}_{role}.png"
        atomic_write_bytes(out_dir / rp, png_bytes(img))
        rel[role] = rp.as_posix()
    return rel
