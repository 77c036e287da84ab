"""Result objects of a parity run: tensor -> stage -> report, with a JSON-safe round trip.

A `ParityReport` is the single source of truth; every rendering (JSON, Markdown, HTML, JUnit,
CSV) is derived from it, and `ParityReport.from_dict(report.to_dict())` rebuilds it exactly, so
`sdxl-parity report DIR` can re-render from `report.json` alone.

Stages run in a fixed order (`STAGES`); "first failure" means the first failing stage in that
order and, inside it, the failing tensor with the earliest step (tensors without a step count
as step -1, i.e. before any step), ties broken by the order the runner recorded them.
"""
from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from parity.contract import STAGES
from parity.metrics import (ExactMetrics, ImageMetrics, TensorMetrics, decode_float,
                            encode_float, format_value, metrics_from_dict)

SCHEMA_VERSION = 1

Metrics = Union[TensorMetrics, ExactMetrics, ImageMetrics]


class Verdict(str, Enum):
    """Outcome of a judgement. `SKIP` marks a stage that was not compared; it never makes a
    report worse, but a report where nothing ran is SKIP, not PASS. `ERROR` marks a stage in
    which the port raised: nothing could be compared, and the port is broken. `WAIVED` marks a
    failure a waiver file accepts (`parity.waivers`): shown apart, not a failure of the run."""

    PASS = "pass"
    WARN = "warn"
    WAIVED = "waived"
    FAIL = "fail"
    ERROR = "error"
    SKIP = "skip"

    @property
    def rank(self) -> int:
        return {"skip": -1, "pass": 0, "warn": 1, "waived": 2, "fail": 3, "error": 4}[self.value]

    @staticmethod
    def worst(verdicts: Iterable["Verdict"]) -> "Verdict":
        """Worst of `verdicts` (ERROR > FAIL > WAIVED > WARN > PASS > SKIP); SKIP for an empty
        input."""
        out = Verdict.SKIP
        for v in verdicts:
            v = Verdict(v)
            if v.rank > out.rank:
                out = v
        return out

    def __str__(self) -> str:
        return self.value


def _step_key(step: Optional[int]) -> int:
    return -1 if step is None else int(step)


@dataclass
class TensorResult:
    """One judged comparison: a named tensor, at a sampling step or not (`step=None`).
    `reasons` lists the violated bounds, fail bounds first (see `parity.policy`)."""

    name: str
    step: Optional[int]
    metrics: Metrics
    verdict: Verdict
    reasons: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "step": self.step, "verdict": self.verdict.value,
                "reasons": list(self.reasons), "metrics": self.metrics.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TensorResult":
        return cls(name=d["name"], step=None if d.get("step") is None else int(d["step"]),
                   metrics=metrics_from_dict(d["metrics"]), verdict=Verdict(d["verdict"]),
                   reasons=list(d.get("reasons", [])))


def derive_per_step(tensors: Iterable[TensorResult], metric: str = "rel_l2"
                    ) -> Dict[str, List[float]]:
    """Per-step series `"<tensor>.<metric>"` from the stepped float-tensor results; index i is
    step i (NaN where a step is missing)."""
    by_name: Dict[str, Dict[int, float]] = {}
    for t in tensors:
        if t.step is not None and isinstance(t.metrics, TensorMetrics):
            by_name.setdefault(t.name, {})[int(t.step)] = float(getattr(t.metrics, metric))
    out = {}
    for name, steps in by_name.items():
        out[f"{name}.{metric}"] = [steps.get(i, math.nan) for i in range(max(steps) + 1)]
    return out


@dataclass
class StageResult:
    """All comparisons of one stage.

    `per_step` maps a series name (by convention `"<tensor>.<metric>"`) to one value per step;
    `images` maps a role ("ref", "port", "diff", or any label) to a PNG path relative to the
    report directory; `limits` optionally records the policy bounds of this stage
    (`{metric_key: {"warn": w, "fail": f}}`) so plots can draw them.
    """

    name: str
    verdict: Verdict
    tensors: List[TensorResult] = field(default_factory=list)
    per_step: Dict[str, List[float]] = field(default_factory=dict)
    images: Dict[str, str] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    first_failure: Optional[Tuple[str, Optional[int]]] = None
    limits: Dict[str, Dict[str, float]] = field(default_factory=dict)
    error: Optional[str] = None  # ERROR stages: the exception, "RuntimeError: message"
    traceback: Optional[str] = None  # ERROR stages: the port's traceback (report.json only)

    @classmethod
    def build(cls, name: str, tensors: Iterable[TensorResult], *,
              per_step: Optional[Dict[str, List[float]]] = None,
              images: Optional[Dict[str, str]] = None, notes: Optional[List[str]] = None,
              limits: Optional[Dict[str, Dict[str, float]]] = None,
              verdict: Optional[Verdict] = None) -> "StageResult":
        """Stage from its judged tensors: verdict = worst tensor verdict (or `verdict` if given
        and worse, e.g. FAIL when the runner raised), first_failure computed, per_step derived
        from the stepped tensors' rel_l2 when not given."""
        tensors = list(tensors)
        v = Verdict.worst([t.verdict for t in tensors] + ([verdict] if verdict else []))
        stage = cls(name=name, verdict=v, tensors=tensors,
                    per_step=derive_per_step(tensors) if per_step is None else dict(per_step),
                    images=dict(images or {}), notes=list(notes or []),
                    limits=dict(limits or {}))
        first = stage.first_tensor(Verdict.FAIL)
        stage.first_failure = None if first is None else (first.name, first.step)
        return stage

    @classmethod
    def skipped(cls, name: str, why: str) -> "StageResult":
        """A stage that was not compared, with the reason as its note."""
        return cls(name=name, verdict=Verdict.SKIP, notes=[why])

    @classmethod
    def errored(cls, name: str, exc: BaseException) -> "StageResult":
        """A stage in which the port raised `exc`."""
        import traceback

        return cls(name=name, verdict=Verdict.ERROR, error=exception_line(exc),
                   traceback="".join(traceback.format_exception(type(exc), exc,
                                                                exc.__traceback__)))

    def first_tensor(self, verdict: Verdict) -> Optional[TensorResult]:
        """Earliest-step tensor with exactly `verdict` (recording order breaks ties)."""
        hits = [(i, t) for i, t in enumerate(self.tensors) if t.verdict == verdict]
        if not hits:
            return None
        return min(hits, key=lambda it: (_step_key(it[1].step), it[0]))[1]

    def find(self, name: str, step: Optional[int]) -> Optional[TensorResult]:
        for t in self.tensors:
            if t.name == name and t.step == step:
                return t
        return None

    def worst_metric(self) -> str:
        """One-line summary of the stage's worst number per metric kind, e.g.
        "rel_l2 3.20e-07 (latents, step 4)"."""
        parts = []
        floats = [t for t in self.tensors if isinstance(t.metrics, TensorMetrics)]
        if floats:
            t = max(floats, key=lambda t: _nan_high(t.metrics.rel_l2))
            parts.append(f"rel_l2 {format_value(t.metrics.rel_l2)} ({_where(t)})")
        images = [t for t in self.tensors if isinstance(t.metrics, ImageMetrics)]
        if images:
            t = min(images, key=lambda t: -_nan_high(-t.metrics.psnr_db))  # NaN psnr is worst
            parts.append(f"psnr {format_value(t.metrics.psnr_db)} dB, ssim "
                         f"{format_value(t.metrics.ssim)} ({_where(t)})")
        exact = [t for t in self.tensors if isinstance(t.metrics, ExactMetrics)]
        if exact:
            t = max(exact, key=lambda t: t.metrics.mismatches)
            parts.append(f"mismatches {t.metrics.mismatches}/{t.metrics.numel} ({_where(t)})")
        return "; ".join(parts) if parts else "-"

    def to_dict(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "verdict": self.verdict.value,
            "first_failure": None if self.first_failure is None else {
                "tensor": self.first_failure[0], "step": self.first_failure[1]},
            "notes": list(self.notes),
            "images": dict(self.images),
            "limits": {k: {b: encode_float(x) for b, x in v.items()}
                       for k, v in self.limits.items()},
            "per_step": {k: [encode_float(x) for x in v] for k, v in self.per_step.items()},
            "tensors": [t.to_dict() for t in self.tensors],
            "error": self.error,
            "traceback": self.traceback,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StageResult":
        ff = d.get("first_failure")
        return cls(
            name=d["name"], verdict=Verdict(d["verdict"]),
            tensors=[TensorResult.from_dict(t) for t in d.get("tensors", [])],
            per_step={k: [decode_float(x) for x in v] for k, v in d.get("per_step", {}).items()},
            images=dict(d.get("images", {})), notes=list(d.get("notes", [])),
            first_failure=None if ff is None else (
                ff["tensor"], None if ff.get("step") is None else int(ff["step"])),
            limits={k: {b: decode_float(x) for b, x in v.items()}
                    for k, v in d.get("limits", {}).items()},
            error=d.get("error"), traceback=d.get("traceback"))


def exception_line(exc: BaseException) -> str:
    """`ValueError: For 'MatMul', ...`: the exception's type and the first line of its message.
    MindSpore appends its whole C++ call stack to the message; headlines carry this line, the
    whole text goes to report.json."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _nan_high(v: float) -> float:
    """Sort key that ranks NaN as the worst (largest) value."""
    return math.inf if math.isnan(v) else v


def _where(t: TensorResult) -> str:
    return t.name if t.step is None else f"{t.name}, step {t.step}"


def module_headline(m: Mapping[str, Any], verdict: str = "FAIL") -> str:
    """`FAIL at stage 'unet', step 0, module 'output_blocks...' (up_blocks...): own rel_l2 3.1e-04
    > fail 1e-05` for a `first_divergent_module` object; for a module that raised on the
    reference's inputs, `... module '...attn2' (...) raised ValueError: <first line>`."""
    where = "" if m.get("step") is None else f", step {m['step']}"
    ref = m["reference_module"].partition("/")[2]
    head = f"{verdict} at stage '{m['stage']}'{where}, module '{m['module']}' ({ref})"
    if m.get("error"):
        return f"{head} raised {m['error']} (traceback in report.json)"
    inside = f"; inside it, {m['inside']}" if m.get("inside") else ""
    return f"{head}: {m['metric']} {m['value']:.3g} > fail {m['bound']:.3g}{inside}"


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def ordered_stage_names(names: Iterable[str]) -> List[str]:
    """Known stages in `STAGES` order, then unknown ones in their given order."""
    names = list(names)
    known = [s for s in STAGES if s in names]
    return known + [n for n in names if n not in STAGES]


@dataclass
class ParityReport:
    """A whole parity run. `meta` carries the run description (versions, config, prompts,
    seeds, sampler, steps, dtype, checkpoint, policy name); `meta["policy"]` and
    `meta["dtype"]` appear in the headline."""

    schema_version: int
    verdict: Verdict
    stages: Dict[str, StageResult]
    meta: Dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=_utc_now)
    # `sdxl-parity run|check --locate`: one `parity.locate.Localisation.to_dict()` per stage
    localisation: List[Dict[str, Any]] = field(default_factory=list)
    # `--waivers FILE`: `parity.waivers.WaiverOutcome.to_dict()` (file, applied, problems)
    waivers: Optional[Dict[str, Any]] = None

    def set_waivers(self, outcome: Dict[str, Any]) -> None:
        """Attach what the waivers did; an expired, stale or exceeded waiver fails the run."""
        self.waivers = outcome
        verdicts = [s.verdict for s in self.stages.values()]
        if outcome.get("problems"):
            verdicts.append(Verdict.FAIL)
        self.verdict = Verdict.worst(verdicts)

    @property
    def first_divergent_module(self) -> Optional[Dict[str, Any]]:
        """The culprit of the first localised stage that has one (None when none)."""
        return next((loc["first_divergent_module"] for loc in self.localisation
                     if loc.get("first_divergent_module")), None)

    def _module_headline(self, stage: str, verdict: str = "FAIL") -> Optional[str]:
        """The located module, or where a difference between modules enters (a wiring bug:
        `FAIL at stage 'unet', step 0: the input of module '...' is the reference's with ...`)."""
        loc = next((loc for loc in self.localisation if loc["stage"] == stage), None)
        if loc is None:
            return None
        if loc.get("first_divergent_module"):
            return module_headline(loc["first_divergent_module"], verdict)
        if loc.get("divergence"):
            where = "" if loc.get("step") is None else f", step {loc['step']}"
            return f"{verdict} at stage '{stage}'{where}: {loc['divergence']['text']}"
        return None

    def _locate_note(self, stage: str) -> str:
        """`; --locate: <why no module was named>` where localisation of `stage` named none."""
        note = next((loc.get("note") for loc in self.localisation
                     if loc["stage"] == stage and loc.get("note")), None)
        return f"; --locate: {note}" if note else ""

    @classmethod
    def build(cls, stages: Union[Iterable[StageResult], Mapping[str, StageResult]],
              meta: Optional[Mapping[str, Any]] = None,
              created: Optional[str] = None) -> "ParityReport":
        """Report from stage results (any order): stages sorted into `STAGES` order, verdict =
        worst stage verdict."""
        if isinstance(stages, Mapping):
            stages = list(stages.values())
        by_name = {}
        for s in stages:
            if s.name in by_name:
                raise ValueError(f"stage {s.name!r} given twice")
            by_name[s.name] = s
        ordered = {n: by_name[n] for n in ordered_stage_names(by_name)}
        return cls(schema_version=SCHEMA_VERSION,
                   verdict=Verdict.worst(s.verdict for s in ordered.values()),
                   stages=ordered, meta=dict(meta or {}), created=created or _utc_now())

    @property
    def ok(self) -> bool:
        """True for PASS, WARN or WAIVED: what a CI gate should accept."""
        return self.verdict in (Verdict.PASS, Verdict.WARN, Verdict.WAIVED)

    def waiver_problems(self) -> List[str]:
        return list((self.waivers or {}).get("problems", []))

    def ordered_stages(self) -> List[StageResult]:
        return [self.stages[n] for n in ordered_stage_names(self.stages)]

    def headline(self) -> str:
        """First line of every report: the verdict and, for FAIL/WARN, where it first happened;
        with `--checkpoint` other than the golden's weights, what `diff-weights` found."""
        weights = self.meta.get("weights_vs_golden")  # `parity.runner._weights_vs_golden`
        note = ("" if not weights or weights.get("ok") else
                f"; weights vs the golden's: {weights['summary'].removeprefix('FAIL: ')}")
        return self._verdict_line() + note

    def _verdict_line(self) -> str:
        policy = self.meta.get("policy", "?")
        dtype = self.meta.get("dtype", "?")
        stages = self.ordered_stages()
        ran = [s for s in stages if s.verdict != Verdict.SKIP]
        not_run = [n for n in STAGES if n not in self.stages] + [
            s.name for s in stages if s.verdict == Verdict.SKIP]
        not_run = [n for n in ordered_stage_names(not_run)]
        tail = f"; not run: {', '.join(not_run)}" if not_run else ""
        if self.verdict == Verdict.ERROR:
            stage = next(s for s in ran if s.verdict == Verdict.ERROR)
            located = self._module_headline(stage.name, "ERROR")
            if located:
                return located
            return (f"ERROR at stage '{stage.name}': the port raised {stage.error} "
                    f"(traceback in report.json){self._locate_note(stage.name)}")
        problems = self.waiver_problems()
        if self.verdict == Verdict.FAIL and problems:  # a waiver expired, went stale or was
            # exceeded: that is what the team must act on, and it names the tensor
            more = f" (and {len(problems) - 1} more waiver problems)" if len(problems) > 1 else ""
            failed = [s.name for s in ran if s.verdict == Verdict.FAIL]
            stages = f"; failing stages: {', '.join(failed)}" if failed else ""
            return f"FAIL: {problems[0]}{more}{stages}"
        if self.verdict == Verdict.FAIL:
            stage = next(s for s in ran if s.verdict == Verdict.FAIL)
            located = self._module_headline(stage.name)
            if located:
                return located
            t = stage.find(*stage.first_failure) if stage.first_failure else None
            if t is None:
                why = stage.notes[0] if stage.notes else "stage failed"
                return f"FAIL at stage '{stage.name}': {why}{self._locate_note(stage.name)}"
            where = "" if t.step is None else f", step {t.step}"
            why = t.reasons[0] if t.reasons else "verdict fail"
            return (f"FAIL at stage '{stage.name}'{where}, tensor '{t.name}': {why}"
                    f"{self._locate_note(stage.name)}")
        if self.verdict == Verdict.WARN:
            stage = next(s for s in ran if s.verdict == Verdict.WARN)
            t = stage.first_tensor(Verdict.WARN)
            if t is None:
                first = f"stage '{stage.name}': " + (stage.notes[0] if stage.notes else "warning")
            else:
                where = "" if t.step is None else f", step {t.step}"
                first = (f"stage '{stage.name}'{where}, tensor '{t.name}': "
                         f"{t.reasons[0] if t.reasons else 'verdict warn'}")
            n_pass = sum(s.verdict == Verdict.PASS for s in ran)
            return (f"WARN: {len(ran)}/{len(ran)} stages within the fail bounds of policy "
                    f"'{policy}' ({dtype}), {n_pass} within warn bounds; first warning at "
                    f"{first}{tail}")
        if self.verdict == Verdict.PASS:
            return f"PASS: {len(ran)}/{len(ran)} stages within policy '{policy}' ({dtype}){tail}"
        if self.verdict == Verdict.WAIVED:
            applied = (self.waivers or {}).get("applied", [])
            first = applied[0] if applied else {}
            where = (f"stage '{first.get('stage')}', tensor '{first.get('tensor')}'"
                     + ("" if first.get("step") is None else f", step {first['step']}"))
            return (f"WAIVED: {len(ran)}/{len(ran)} stages within policy '{policy}' ({dtype}) "
                    f"once {len(applied)} failing tensor{'s' if len(applied) != 1 else ''} "
                    f"{'are' if len(applied) != 1 else 'is'} waived; first: {where} by "
                    f"'{first.get('waiver')}' ({first.get('reason')}){tail}")
        return f"SKIP: no stage was compared (policy '{policy}', {dtype})"

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe dict (non-finite floats as the strings 'inf', '-inf', 'nan')."""
        return {
            "schema_version": self.schema_version,
            "headline": self.headline(),
            "verdict": self.verdict.value,
            "created": self.created,
            "meta": self.meta,
            "stage_order": list(self.stages),
            "stages": {n: s.to_dict() for n, s in self.stages.items()},
            "first_divergent_module": self.first_divergent_module,
            "localisation": self.localisation,
            **({"waivers": self.waivers} if self.waivers is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ParityReport":
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"unsupported report schema_version {version!r} "
                             f"(this code reads {SCHEMA_VERSION})")
        order = d.get("stage_order", list(d["stages"]))
        return cls(schema_version=version, verdict=Verdict(d["verdict"]),
                   stages={n: StageResult.from_dict(d["stages"][n]) for n in order},
                   meta=dict(d.get("meta", {})), created=d.get("created", ""),
                   localisation=list(d.get("localisation", [])), waivers=d.get("waivers"))
