"""A stage's module table: each paired module's own error (run alone on the reference's
inputs), its accumulated error (in the port's free run), its truth ratio where the capture
holds module truths, and the policy's verdict on it; the culprit is the first row over."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple


@dataclass
class ModuleRow:
    """One module's own and accumulated error against its bound."""

    module: str
    reference: str
    kind: str
    own: Optional[float]
    accumulated: Optional[float]
    bound: float
    error: str = ""
    ref_vs_truth: Optional[float] = None  # with a module truth: the reference module's own error
    port_vs_truth: Optional[float] = None
    truth_ratio: Optional[float] = None  # port_vs_truth / max(ref_vs_truth, floor)
    truth_bound: Optional[float] = None
    error_text: str = ""  # the whole exception text where `error` holds its first line
    over: bool = False  # the policy's verdict (`Policy.judge_module`) is FAIL

    @property
    def raised(self) -> bool:
        """The port module raised on the reference's inputs: it is broken there, whatever
        its numbers would have been."""
        return bool(self.error)

    def to_dict(self) -> Dict:
        truth = {k: getattr(self, k) for k in ("ref_vs_truth", "port_vs_truth", "truth_ratio",
                                               "truth_bound") if getattr(self, k) is not None}
        return {"module": self.module, "reference_module": self.reference, "kind": self.kind,
                "own_rel_l2": self.own, "accumulated_rel_l2": self.accumulated,
                "bound": self.bound, **truth, "over": self.over,
                **({"error": self.error, "error_text": self.error_text} if self.error else {})}

    @classmethod
    def from_dict(cls, d: Dict) -> "ModuleRow":
        return cls(d["module"], d["reference_module"], d["kind"], d.get("own_rel_l2"),
                   d.get("accumulated_rel_l2"), d["bound"], d.get("error", ""),
                   d.get("ref_vs_truth"), d.get("port_vs_truth"), d.get("truth_ratio"),
                   d.get("truth_bound"), d.get("error_text", ""), bool(d.get("over")))


@dataclass
class Localisation:
    """The module table of one stage, in execution order, and the culprit if any."""

    stage: str
    sampler: str
    step: Optional[int]
    rows: List[ModuleRow] = field(default_factory=list)
    seconds: float = 0.0
    metric: str = "rel_l2"
    free_run_error: str = ""  # the port raised in its free run: no accumulated errors
    note: str = ""  # why nothing was named, where the harness knows more (set by the runner)
    # no module's own error is over: where the difference enters between modules (a wiring
    # bug), explained ({"where", "module"?, "reference_module"?, "rel_l2", "explanation", "text"})
    divergence: Optional[Dict] = None
    # what pairing left alone: port modules owning weights no captured module holds, captured
    # reference modules no port module computes; and paired modules the free run never called
    unpaired: Dict[str, List[str]] = field(default_factory=dict)

    @property
    def culprit(self) -> Optional[ModuleRow]:
        return next((r for r in self.rows if r.over), None)

    def first_divergent_module(self) -> Optional[Dict]:
        r = self.culprit
        if r is None:
            return None
        where = {"stage": self.stage, "step": self.step, "sampler": self.sampler or None,
                 "module": r.module, "reference_module": r.reference, "kind": r.kind}
        if self.divergence:  # the culprit holds the first divergent input: what flows inside
            where["inside"] = self.divergence["text"]
        if r.raised:
            return {**where, "error": r.error}
        metric, value, bound = _judged(r, self.metric)
        return {**where, "metric": metric, "value": value, "bound": bound}

    def describe(self) -> str:
        """`module 'output_blocks.3.1...' (up_blocks.0...): own rel_l2 3.1e-04 > fail 1e-05`."""
        r = self.culprit
        if r is None and self.divergence:
            return self.divergence["text"]
        if r is None:
            return (f"no module of stage '{self.stage}' is over its bound "
                    f"({len(self.rows)} modules compared)")
        if r.raised:
            return f"module '{r.module}' ({r.reference.partition('/')[2]}) raised {r.error}"
        metric, value, bound = _judged(r, self.metric)
        return (f"module '{r.module}' ({r.reference.partition('/')[2]}): {metric} "
                f"{value:.3g} > fail {bound:.3g}")

    def to_dict(self) -> Dict:
        return {"stage": self.stage, "sampler": self.sampler or None, "step": self.step,
                "metric": self.metric, "seconds": self.seconds,
                "first_divergent_module": self.first_divergent_module(),
                **({"free_run_error": self.free_run_error} if self.free_run_error else {}),
                **({"note": self.note} if self.note else {}),
                **({"divergence": self.divergence} if self.divergence else {}),
                **({"unpaired": self.unpaired} if any(self.unpaired.values()) else {}),
                "modules": [r.to_dict() for r in self.rows]}

    @classmethod
    def from_dict(cls, d: Dict) -> "Localisation":
        return cls(stage=d["stage"], sampler=d.get("sampler") or "", step=d.get("step"),
                   rows=[ModuleRow.from_dict(r) for r in d.get("modules", [])],
                   seconds=d.get("seconds", 0.0), metric=d.get("metric", "rel_l2"),
                   free_run_error=d.get("free_run_error", ""), note=d.get("note", ""),
                   divergence=d.get("divergence"), unpaired=d.get("unpaired", {}))


def _judged(row: ModuleRow, metric: str) -> Tuple[str, float, float]:
    """The number a row is judged by: its truth ratio where it has a truth bound, else its
    own error."""
    if row.truth_ratio is not None and row.truth_bound is not None:
        return "truth_ratio", row.truth_ratio, row.truth_bound
    return f"own {metric}", row.own, row.bound


