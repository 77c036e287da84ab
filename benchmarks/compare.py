"""`sdxl-bench compare BASELINE.json CURRENT.json --fail-over 10%`: the regression gate.

Matches measurements by (component, side, mode) and compares the median time and the peak
RSS. A gated side (the port, by default: the reference is someone else's code) that got slower
or bigger by more than the threshold fails the gate (exit 1); everything that moved beyond the
threshold either way is tabulated. Exit 2, with one line on stderr, for unusable input.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from sdxl_common.cli import ArgumentParser
from sdxl_common.errors import InputError

from .report import entry_key, fmt_bytes, fmt_seconds

METRICS = ("median", "peak_rss")
RUN_KEYS = ("preset", "height", "width", "dtype", "steps", "threads", "reference_device")


class BadInput(InputError):
    """Input the gate cannot judge: reported in one line, exit status 2."""


def parse_threshold(text: str) -> float:
    """'10%' -> 0.10; a bare number is a fraction ('0.1'). Must be finite and >= 0. A bare
    number above 1 is refused: `--fail-over 25` meant 25% and gated at 2500%."""
    raw = str(text).strip()
    percent = raw.endswith("%")
    try:
        value = float(raw[:-1]) / 100 if percent else float(raw)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 0:
        raise BadInput(f"bad threshold {text!r}: give a percentage like 10% or a fraction like 0.1")
    if not percent and value > 1:
        raise BadInput(f"bad threshold {text!r}: a bare number is a fraction; write "
                       f"{raw}% for a percentage, or {value / 100:g} as a fraction")
    return value


def load_results(path: Path) -> Dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInput(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path}: cannot read it ({exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInput(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise BadInput(f"{path}: not a benchmark results file (no 'benchmarks' list)")
    for i, e in enumerate(data["benchmarks"]):
        median = (e.get("stats") or {}).get("median") if isinstance(e, dict) else None
        if not isinstance(median, (int, float)) or isinstance(median, bool) or not math.isfinite(median):
            name = e.get("name", "?") if isinstance(e, dict) else "?"
            raise BadInput(f"{path}: benchmark #{i} ({name}) has no numeric stats.median")
    return data


@dataclass
class Row:
    component: str
    side: str
    mode: str
    metric: str
    baseline: Optional[float]
    current: Optional[float]
    change: Optional[float]  # current / baseline - 1
    status: str  # REGRESSED | improved | ok | moved (not gated) | new | missing | n/a

    @property
    def moved(self) -> bool:
        return self.status not in ("ok", "n/a")


def _metric(entry: Dict, metric: str) -> Optional[float]:
    if metric == "median":
        return float(entry["stats"]["median"])
    value = (entry.get("extra_info") or {}).get("peak_rss_bytes")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def compare(baseline: Dict, current: Dict, threshold: float,
            gated_sides: Sequence[str] = ("port",)) -> List[Row]:
    base = {entry_key(e): e for e in baseline["benchmarks"]}
    cur = {entry_key(e): e for e in current["benchmarks"]}
    keys: List[Tuple[str, str, str]] = list(base) + [k for k in cur if k not in base]
    rows = []
    for key in keys:
        b, c = base.get(key), cur.get(key)
        if b is None or c is None:
            rows.append(Row(*key, "median", b and _metric(b, "median"), c and _metric(c, "median"),
                            None, "new" if b is None else "missing"))
            continue
        for metric in METRICS:
            bv, cv = _metric(b, metric), _metric(c, metric)
            if bv is None or cv is None or bv <= 0:
                rows.append(Row(*key, metric, bv, cv, None, "n/a"))
                continue
            change = cv / bv - 1
            if change > threshold:
                status = "REGRESSED" if key[1] in gated_sides else "moved (not gated)"
            elif change < -threshold:
                status = "improved"
            else:
                status = "ok"
            rows.append(Row(*key, metric, bv, cv, change, status))
    return rows


def setting_mismatches(baseline: Dict, current: Dict) -> List[str]:
    b, c = baseline.get("run") or {}, current.get("run") or {}
    return [f"{k}: {b.get(k)} -> {c.get(k)}" for k in RUN_KEYS if k in b and k in c and b[k] != c[k]]


def render(rows: Sequence[Row], threshold: float) -> str:
    def value(row: Row, v: Optional[float]) -> str:
        if v is None:
            return "-"
        return fmt_seconds(v) if row.metric == "median" else fmt_bytes(int(v))

    moved = [r for r in rows if r.moved]
    if not moved:
        return f"nothing moved by more than {threshold:.0%} ({len(rows)} figures compared)"
    lines = [f"moved by more than {threshold:.0%}:", "",
             "| component | side | mode | metric | baseline | current | change | verdict |",
             "|---|---|---|---|---:|---:|---:|---|"]
    for r in moved:
        change = "-" if r.change is None else f"{r.change:+.1%}"
        lines.append(f"| {r.component} | {r.side} | {r.mode} | {r.metric} | {value(r, r.baseline)} "
                     f"| {value(r, r.current)} | {change} | {r.status} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ArgumentParser(
        prog="sdxl-bench compare",
        description="exit 1 when a gated side got slower (median) or bigger (peak RSS) than "
                    "the baseline by more than the threshold; 2 on unusable input")
    parser.add_argument("baseline", type=Path)
    parser.add_argument("current", type=Path)
    parser.add_argument("--fail-over", default="10%", metavar="PCT",
                        help="threshold, e.g. 10%% (default) or 0.1")
    parser.add_argument("--sides", default="port",
                        help="comma-separated sides that can fail the gate (default: port)")
    args = parser.parse_args(argv)
    try:
        threshold = parse_threshold(args.fail_over)
        sides = [s.strip() for s in args.sides.split(",") if s.strip()]
        bad = [s for s in sides if s not in ("port", "reference")]
        if bad or not sides:
            raise BadInput(f"bad --sides {args.sides!r}: use port, reference or both")
        baseline, current = load_results(args.baseline), load_results(args.current)
    except BadInput as exc:
        print(f"sdxl-bench compare: error: {exc}", file=sys.stderr)
        return 2
    for m in setting_mismatches(baseline, current):
        print(f"warning: the runs differ in {m}", file=sys.stderr)
    rows = compare(baseline, current, threshold, sides)
    print(render(rows, threshold))
    regressed = [r for r in rows if r.status == "REGRESSED"]
    print(f"\n{'FAIL' if regressed else 'PASS'}: {len(regressed)} regression(s) over "
          f"{threshold:.0%} on {', '.join(sides)}")
    return 1 if regressed else 0
