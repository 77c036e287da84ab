"""`sdxl-parity diff-weights REFERENCE PORT`: two checkpoints compared tensor by tensor, each
difference named by the transformation that explains it (`parity.difference`).

The commonest porting bug is in the weight conversion, and the two checkpoints hold the answer
before anything runs. Both are read in any format the harness reads (diffusers folder, its
fp16 variant, sgm file, MindSpore `.ckpt` with MindSpore's spellings), aligned by sgm name
through the key maps, and streamed: the reference one tensor at a time, the port's tensor of
the same name read beside it, so peak memory is a few tensors, not two checkpoints.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np

from .difference import ContentIndex, Explanation, content_key, explain


@dataclass
class TensorVerdict:
    name: str
    explanation: Explanation
    dtype: str

    def to_dict(self) -> Dict:
        return {"name": self.name, "dtype": self.dtype, **self.explanation.to_dict()}


@dataclass
class WeightDiff:
    """Every aligned tensor's verdict, and the layout problems of the port's checkpoint."""

    reference: str
    port: str
    preset: str
    tensors: List[TensorVerdict] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)      # in the layout, not in the port's
    unexpected: List[str] = field(default_factory=list)   # in the port's, not in the layout
    mismatched: List[str] = field(default_factory=list)   # "name: (a, b) != (c, d)"

    @property
    def differing(self) -> List[TensorVerdict]:
        return [t for t in self.tensors if not t.explanation.equal]

    @property
    def ok(self) -> bool:
        return not (self.differing or self.missing or self.unexpected or self.mismatched)

    def counts(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for t in self.tensors:
            out[t.explanation.kind] = out.get(t.explanation.kind, 0) + 1
        return out

    def summary(self) -> str:
        """One line: `PASS: 2514 tensors equal (...)` or `FAIL: 1 of 2514 tensors differ: ...`."""
        n, bad = len(self.tensors), self.differing
        layout = [f"{len(v)} {k}" for k, v in (("missing", self.missing),
                                               ("unexpected", self.unexpected),
                                               ("shape-mismatched", self.mismatched)) if v]
        if self.ok:
            rounding = [t for t in self.tensors if t.explanation.kind == "rounding"]
            if not rounding:
                return f"PASS: {n} tensors equal"
            dtypes = "/".join(sorted({t.dtype for t in rounding}))
            if len(rounding) == n:
                return f"PASS: {n} tensors equal up to {dtypes} rounding"
            return f"PASS: {n} tensors equal ({len(rounding)} up to {dtypes} rounding)"
        first = bad[0] if bad else None
        what = (f"{len(bad)} of {n} tensors differ; first: '{first.name}' is "
                f"{first.explanation.text}" if first else f"{n} tensors compared")
        return f"FAIL: {what}" + (f"; layout: {', '.join(layout)}" if layout else "")

    def to_dict(self) -> Dict:
        return {"reference": self.reference, "port": self.port, "preset": self.preset,
                "ok": self.ok, "summary": self.summary(), "counts": self.counts(),
                "missing": self.missing, "unexpected": self.unexpected,
                "mismatched": self.mismatched,
                "tensors": [t.to_dict() for t in self.tensors]}


def diff_weights(reference: Path, port: Path,
                 log: Callable[[str], None] = lambda s: None) -> WeightDiff:
    """Compare the port's checkpoint with the reference's, tensor by tensor (streamed)."""
    from sdxl_common.progress import bar
    from sdxl_ms.weights.checkpoint import DIFFUSERS, open_checkpoint
    from sdxl_ms.weights.loader import (diff_layout, expected_layout, infer_preset,
                                        sgm_getter, sgm_tensors)

    ref_ckpt, port_ckpt = open_checkpoint(Path(reference)), open_checkpoint(Path(port))
    cfg = infer_preset(ref_ckpt)
    layout = diff_layout(expected_layout(cfg, port_ckpt.format), port_ckpt.shapes)
    out = WeightDiff(str(reference), str(port), cfg.name, missing=list(layout.missing),
                     unexpected=list(layout.unexpected),
                     mismatched=[f"{n}: {a} != {b}" for n, a, b in layout.mismatched])
    names = list(expected_layout(cfg, "sgm"))
    if DIFFUSERS in (ref_ckpt.format, port_ckpt.format):  # sgm-only tensors (OpenCLIP's unused
        # logit_scale) are in no diffusers file: the loader makes them, so nothing to compare
        from sdxl_ms.weights.keymap import pipeline_rules

        stored = {n for rule in pipeline_rules(cfg) for n in rule.sgm}
        names = [n for n in names if n in stored]
    get_port, get_ref = sgm_getter(port_ckpt, cfg), sgm_getter(ref_ckpt, cfg)
    index = ContentIndex()
    unexplained: Dict[str, tuple] = {}  # resolved against the whole reference at the end
    log(f"comparing {len(names)} tensors ({ref_ckpt.format} reference, {port_ckpt.format} port)")
    with bar(total=len(names), desc="diff-weights", unit="tensor") as progress:
        for name, want in sgm_tensors(ref_ckpt, cfg, names):
            progress.update(1)
            index.add(name, want)
            try:
                got = get_port(name)
            except Exception:  # noqa: BLE001 - absent from the port's file: listed as missing
                continue
            dtype = _dtype_name(got)
            found = explain(want, got, dtype=dtype,
                            siblings=_siblings(name, names, get_ref, np.shape(got)))
            if found.kind == "equal" and dtype != _dtype_name(want):
                found = Explanation("rounding", f"equal up to {dtype} rounding", 0.0)
            found = _named_blocks(name, found)
            if found.kind in ("unexplained", "fresh_init"):
                unexplained[name] = content_key(got)
            out.tensors.append(TensorVerdict(name, found, dtype))
    for t in out.tensors:
        if t.name in unexplained:
            other = index.lookup(unexplained[t.name], exclude=t.name)
            if other is not None:
                t.explanation = Explanation("equals_other", f"equal to the reference's {other}",
                                            t.explanation.rel_l2, {"equals": other})
    return out


def _named_blocks(name: str, found: Explanation) -> Explanation:
    """A fused in_proj's three row blocks are q, k and v: say which order the port has."""
    order = found.detail.get("order")
    if found.kind != "permuted" or len(order or ()) != 3 or "in_proj" not in name:
        return found
    qkv = "qkv"
    return Explanation(found.kind, f"{found.text}: its q, k, v rows hold the reference's "
                                   f"{', '.join(qkv[i] for i in order)}", found.rel_l2,
                       found.detail)


def _dtype_name(a: np.ndarray) -> str:
    return {np.dtype(np.float16): "float16"}.get(np.asarray(a).dtype, "float32")


def _siblings(name: str, names: List[str], get, shape) -> Dict[str, np.ndarray]:
    """The other tensors of `name`'s module with its shape (weight/bias, gamma/beta)."""
    parent = name.rpartition(".")[0]
    out = {}
    for other in names:
        if other != name and other.rpartition(".")[0] == parent:
            try:
                a = get(other)
            except Exception:  # noqa: BLE001 - not in the reference: no sibling to swap with
                continue
            if np.shape(a) == tuple(shape):
                out[other.rpartition(".")[2]] = a
    return out


# ---- renderings ---------------------------------------------------------------------------

def table_rows(diff: WeightDiff) -> List[List[str]]:
    rows = [[t.name, t.explanation.kind, t.explanation.text, f"{t.explanation.rel_l2:.3g}"]
            for t in diff.differing]
    rows += [[n, "missing", "in the layout, not in the port's checkpoint", "-"]
             for n in diff.missing]
    rows += [[n, "unexpected", "in the port's checkpoint, not in the layout", "-"]
             for n in diff.unexpected]
    rows += [[m.partition(":")[0], "shape", m.partition(": ")[2], "-"] for m in diff.mismatched]
    return rows


HEADER = ["tensor", "verdict", "the port's tensor is", "rel_l2"]


def render_markdown(diff: WeightDiff) -> str:
    from .reports.markdown import markdown_table

    lines = [diff.summary(), "", f"- reference: `{diff.reference}`", f"- port: `{diff.port}`",
             f"- preset: `{diff.preset}`",
             "- counts: " + ", ".join(f"{k} {v}" for k, v in sorted(diff.counts().items())), ""]
    rows = table_rows(diff)
    lines += markdown_table(HEADER, rows) if rows else ["Every tensor is equal."]
    return "\n".join(lines) + "\n"


def write_reports(diff: WeightDiff, out: Path) -> Dict[str, Path]:
    from sdxl_common.atomic import atomic_write_text

    from .reports.json_report import jsonable

    out.mkdir(parents=True, exist_ok=True)
    return {"json": atomic_write_text(out / "diff-weights.json",
                                      json.dumps(jsonable(diff.to_dict()), indent=2,
                                                 allow_nan=False) + "\n"),
            "md": atomic_write_text(out / "diff-weights.md", render_markdown(diff))}


def terminal_table(diff: WeightDiff, limit: int = 40) -> str:
    rows = table_rows(diff)
    more = len(rows) - limit
    rows = rows[:limit]
    table = [HEADER] + rows
    widths = [min(max(len(r[i]) for r in table), 90) for i in range(len(HEADER))]
    fmt = lambda r: "  ".join(c[:w].ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    lines = [fmt(table[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    if more > 0:
        lines.append(f"... {more} more (diff-weights.json lists every tensor)")
    return "\n".join(lines)
