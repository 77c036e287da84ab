"""Name the first divergent module: teacher-forced, module by module.

Accumulated error (the port run freely, compared module by module with the reference) grows
from the first bug on: every module after it inherits the error, so the first module over a
bound is not necessarily the one that made it. Here each port module is also run on the
*reference's* recorded inputs for that module, and its output compared with the reference's:
its own error, free of anything upstream. The culprit is the first module in execution order
(the order in which forwards return, so a leaf comes before the block that holds it) whose own
error exceeds its kind's bound (`[module.<dtype>]` in the policy).

The reference's per-module inputs and outputs come from forward hooks on the diffusers modules
(`reference_capture`), streamed to a file (`module_capture`), so `locate` can run later, and
without torch, from a recording made with `sdxl-parity record --modules`. Any port that names
its Cells (the contract's `cells()`) is paired with the capture through its weights
(`module_pairs`), observed with MindSpore's forward hooks (`port_cells`), and its modules are
called the way its free run called them, with the reference's inputs in their place
(`module_layouts`).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from sdxl_common.errors import InputError
from sdxl_common.progress import bar as progress_bar

from .metrics import against_truth, compare, rel_l2
from .module_capture import CaptureIndex, CaptureReader
from .module_kinds import ATTENTION_PARTS, CORE_TENSORS
from .module_layouts import match
from .module_names import Rename, port_rename
from .module_pairs import LOCATABLE_STAGES, ModulePair, core_pair, layout_config, pair_with_port
from .module_table import Localisation, ModuleRow
from .port_cells import (INPUT_SOURCES, CallPlan, PortCells, as_argument, has_cells,
                         is_tensor, plain_call, to_numpy)
from .recording import Recording
from .reference_capture import capture_to
from .results import TensorResult, Verdict, exception_line
from .wiring import InputWatch, divergent_output


# ---- what a stage's localisation runs on --------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """The stage, and for the UNet the sampler and step, whose modules are compared."""

    stage: str
    sampler: str = ""
    step: int = 0

    @property
    def at(self) -> Tuple[str, str, int]:
        return self.stage, self.sampler, self.step


def resolve_target(rec: Recording, stage: str, sampler: Optional[str] = None,
                   step: Optional[int] = None) -> Target:
    if stage not in LOCATABLE_STAGES:
        raise InputError(f"locate: stage {stage!r} has no modules to compare; choose from "
                         f"{', '.join(LOCATABLE_STAGES)}")
    samplers = rec.spec.samplers
    sampler = sampler or samplers[0]
    if sampler not in samplers:
        raise InputError(f"locate: the recording has no sampler {sampler!r} (it has "
                         f"{', '.join(samplers)})")
    step = 0 if step is None else step
    if stage == "unet":
        calls = rec.unet_calls(sampler)
        if not 0 <= step < calls:
            raise InputError(f"locate: --step {step} is out of range: the recording has UNet "
                             f"calls 0..{calls - 1} for {sampler}")
    return Target(stage, sampler if stage != "conditioner" else "", step if stage == "unet" else 0)


# ---- the port side -----------------------------------------------------------------------------

NO_CELLS = ("offers no cells() (parity/contract.py): localisation needs the port's modules")


def port_cells(port) -> PortCells:
    """The port's declared modules (the contract's `cells()`), or bad input."""
    if not has_cells(port):
        raise InputError(f"{type(port).__name__} {NO_CELLS}")
    return PortCells(port)


class PortRun:
    """The port's modules of one captured stage: paired with the capture, observed in one free
    run of the stage (how each is called, its accumulated error, where an input goes off),
    then each run alone on the reference's recorded inputs (its own error).

    Rows come in capture (execution) order. A captured reference module that no port module
    computes but whose output is a paired module's input (the port computes it inline, as sgm
    computes the timestep embedding in a function) gets a row too, `(inline) <name>`: the
    port's value there is that input."""

    def __init__(self, port, reader: CaptureReader, rec: Recording,
                 rename: Optional[Rename] = None):
        self.reader, self.rec = reader, rec
        self.cells = port_cells(port)
        index = reader.index
        self.stage = index.stage
        self.at = (index.stage, index.sampler, index.step)
        self.cfg = layout_config(rec.weights())
        self.pairing = pair_with_port(self.cells.roots(self.stage), self.cfg, self.stage,
                                      index.kinds(), index.containers, port_rename(port, rename))
        position = {p.reference: j for j, p in enumerate(index.pairs)}
        self.paired: Dict[int, ModulePair] = {position[p.reference]: p
                                              for p in self.pairing.pairs}
        for j, p in self.paired.items():  # the capture's entries name their port module now
            index.pairs[j] = p
        self.modules = {j: self.cells.module(p.port_path) for j, p in self.paired.items()}
        self.cores = self._core_parts()  # attention's position -> {q, k, v, core: port cell}
        self.inline = _inline_producers(index, self.paired)  # consumer -> producer
        self.plans: Dict[int, CallPlan] = {}
        self.out_layouts: Dict[int, object] = {}
        self.accumulated: Dict[int, float] = {}
        self.inline_values: Dict[int, np.ndarray] = {}  # producer -> the port's value
        self.watch = InputWatch(reader, rec.spec.dtype)
        self.outputs = None
        self.free_run_error = ""
        self.not_called: List[str] = []
        self.reversed_batch = False  # the port was seen running the batch in the other order

    def free_run(self, log: Callable[[str], None] = lambda s: None) -> None:
        order = sorted(self.modules)
        log(f"port: free run of stage {self.stage} (accumulated error)")

        def started(k: int, args: tuple, kwargs: dict) -> None:
            j = order[k]
            members = self.reader.index.members[j]
            recorded = {name: self.reader.tensor(j, name) for name in INPUT_SOURCES
                        if name in members}
            plan = self.plans[j] = CallPlan(args, kwargs, recorded, self.paired[j].kind,
                                            self.reversed_batch)
            self.reversed_batch = plan.reversed_batch
            self.watch.started(j, self.paired[j], plan)
            if j in self.inline and plan.x_layout is not None:
                self.inline_values[self.inline[j]] = plan.x_layout.to_reference(
                    plan.x_port, recorded["x"].shape)
            plan.x_port = None  # read: not kept (a full-size UNet has hundreds)

        def returned(k: int, out) -> None:
            j = order[k]
            want = self.reader.tensor(j, "out")
            found = match({"out": want}, to_numpy(out), ["out"], self.paired[j].kind,
                          self.reversed_batch)
            if found is not None:
                self.out_layouts[j], self.accumulated[j] = found
                self.watch.returned(found[1])

        with self.cells.observe([self.modules[j] for j in order], started, returned):
            try:
                stage, sampler, step = self.at
                self.outputs = self.cells.run_stage(stage, self.rec, sampler, step)
            except Exception as e:  # noqa: BLE001 - the port's failure: its modules say where
                self.free_run_error = exception_line(e)
                log(f"port: the free run of stage {self.stage} raised {self.free_run_error}")

    def own_outputs(self, desc: str):
        """(capture position, pair, recorded tensors, the module's own output in the reference's
        layout or None, the exception it raised or None), in capture order, paired and inline
        rows alike; the recorded `out` and `truth` are cut to the rows the port ran. A module
        the free run never called (a parent reads its weights, or the run stopped before it)
        is called as a stock Cell is, on the reference's inputs; where that fails too it goes
        to `not_called`, not a row."""
        rows = sorted(list(self.paired) + list(self.inline_values))
        with progress_bar(total=len(rows) + len(self.cores), desc=desc,
                          unit="module") as bar, self.cells.eager():
            for j in rows:
                bar.update(1)
                recorded = self.reader.tensors(j)
                if j in self.inline_values:
                    entry = self.reader.index.pairs[j]
                    pair = ModulePair(f"(inline) {entry.reference.partition('/')[2]}",
                                      entry.reference, entry.kind, "")
                    yield j, pair, recorded, self.inline_values[j], None
                    continue
                pair, plan = self.paired[j], self.plans.get(j)
                out, error = None, None
                try:
                    args, kwargs = (plan.call_args(recorded) if plan is not None
                                    else plain_call(self.modules[j], recorded, pair.kind))
                    got = to_numpy(self.cells.call(self.modules[j], args, kwargs))
                    out = self._in_reference_layout(j, got, recorded["out"])
                except Exception as e:  # noqa: BLE001 - the module raised: named, never fatal
                    if plan is None:  # not callable that way: not judged
                        self.not_called.append(pair.module)
                        continue
                    error = e
                if j in self.cores:  # its core's row first: the core returns before the module
                    bar.update(1)
                    if error is None:  # a module that raised is named by its own row
                        yield self._core_row(j, pair, recorded, args, kwargs)
                if out is not None:
                    recorded = {k: (v[:len(out)] if k in ("out", "truth") else v)
                                for k, v in recorded.items()}
                yield j, pair, recorded, out, error

    def _core_parts(self) -> Dict[int, Dict[str, object]]:
        """The paired attentions whose core the capture holds and whose q, k, v and output
        projections are port modules of their own, paired with the reference's: position ->
        {"q", "k", "v", "core": the port cell}. A port that computes q, k and v in one
        projection of the module's own (open_clip's `in_proj_weight`) has no core row."""
        at = {p.reference: j for j, p in self.paired.items()}
        out = {}
        for j, pair in self.paired.items():
            children = ATTENTION_PARTS.get(pair.kind)
            if children is None or "core" not in self.reader.index.members[j]:
                continue
            found = [at.get(f"{pair.reference}.{child}") for child in children]
            if None not in found:
                out[j] = {role: self.modules[i] for role, i in zip(CORE_TENSORS, found)}
        return out

    def _core_row(self, j: int, pair: ModulePair, recorded: Dict[str, np.ndarray],
                  args: tuple, kwargs: dict):
        """The attention's core teacher-forced: the port's attention on the reference's inputs
        with its q, k and v projections' outputs replaced by the reference's own (through
        forward hooks that return them, laid out as the port's were), its output projection's
        input taken as the port's core output. What `own_outputs` yields for the core's row."""
        core = core_pair(pair)
        want = {"out": recorded["core"]}
        if "core_truth" in recorded:
            want["truth"] = recorded["core_truth"]
        kept: Dict[str, object] = {}

        def force(role: str):
            def hook(cell, hook_args, output):
                port = to_numpy(output)
                layout = match({role: recorded[role]}, port, [role], "Linear",
                               self.reversed_batch)
                if layout is None:
                    raise ValueError(f"its {role} projection's output of shape {port.shape} "
                                     f"fits no layout of the reference's {recorded[role].shape}")
                return as_argument(layout[0].to_port(recorded[role]), (True, output.dtype))
            return hook

        def keep(cell, hook_args):
            kept.setdefault("core", next(a for a in hook_args if is_tensor(a)))

        parts = self.cores[j]
        handles = [parts[role].register_forward_hook(force(role)) for role in ("q", "k", "v")]
        handles.append(parts["core"].register_forward_pre_hook(keep))
        try:
            self.cells.call(self.modules[j], args, kwargs)
            if "core" not in kept:
                raise ValueError("its output projection was not called")
            port = to_numpy(kept["core"])
            layout = match({"out": want["out"]}, port, ["out"], "Linear", self.reversed_batch)
            if layout is None:
                raise ValueError(f"its core output of shape {port.shape} fits no layout of "
                                 f"the reference's {want['out'].shape}")
            got = layout[0].to_reference(port, want["out"].shape)
        except Exception as e:  # noqa: BLE001 - the core raised: named, never fatal
            return None, core, want, None, e
        finally:
            for handle in handles:
                handle.remove()
        return None, core, {k: v[:len(got)] for k, v in want.items()}, got, None

    def _in_reference_layout(self, j: int, got: np.ndarray, want: np.ndarray) -> np.ndarray:
        layout = self.out_layouts.get(j)
        if layout is None:
            found = match({"out": want}, got, ["out"], self.paired[j].kind,
                          self.reversed_batch)
            if found is None:
                raise ValueError(f"its output of shape {got.shape} fits no layout of the "
                                 f"reference's output {want.shape}")
            layout = found[0]
        return layout.to_reference(got, want.shape)

    def unpaired(self) -> Dict[str, List[str]]:
        inline = {self.reader.index.pairs[j].reference for j in self.inline_values}
        return {"port_modules": self.pairing.port_alone,
                "reference_modules": [r for r in self.pairing.reference_alone
                                      if r not in inline],
                "not_called": self.not_called}


def _inline_producers(index: CaptureIndex, paired: Dict[int, ModulePair]) -> Dict[int, int]:
    """consumer -> producer: a captured module no port module computes whose recorded output is
    the recorded input of a paired one (the capture stores equal tensors once, so they share a
    member)."""
    out_of = {members.get("out"): j for j, members in enumerate(index.members)
              if j not in paired and members.get("out")}
    found = {}
    for j in paired:
        producer = out_of.get(index.members[j].get("x"))
        if producer is not None:
            found[j] = producer
    return found


def locate_in_port(port, reader: CaptureReader, rec: Recording, policy,
                   log: Callable[[str], None] = lambda s: None,
                   rename: Optional[Rename] = None) -> Localisation:
    """Own error of every paired module (the port module on the reference's inputs) and its
    accumulated error (the port's stage run freely on the stage's recorded inputs). Where the
    capture holds module truths, also each module's truth ratio. Every row is judged by
    `policy.judge_module`."""
    start = time.perf_counter()
    dtype = rec.spec.dtype
    run = PortRun(port, reader, rec, rename)
    run.free_run(log)
    rows: List[ModuleRow] = []
    for j, pair, recorded, out, error in run.own_outputs(f"port: modules of {run.stage}"):
        own = None if out is None else rel_l2(recorded["out"], out)
        truth = {}
        found = policy.module_truth_bound(pair.kind, dtype)
        if out is not None and "truth" in recorded:
            bound, floor = found if found is not None else (None, 0.0)
            truth = {**against_truth(recorded["out"], out, recorded["truth"], floor),
                     "truth_bound": bound}
        raised = "" if error is None else exception_line(error)
        verdict = policy.judge_module(pair.kind, dtype, own=own, raised=raised,
                                      truth_ratio=truth.get("truth_ratio")).verdict
        accumulated = run.accumulated.get(j, own if j in run.inline_values else None)
        rows.append(ModuleRow(pair.module, pair.reference, pair.kind, own, accumulated,
                              policy.module_bound(pair.kind, dtype), raised, **truth,
                              error_text="" if error is None else f"{type(error).__name__}: "
                                                                  f"{error}",
                              over=verdict == Verdict.FAIL))
    stage, sampler, step = run.at
    loc = Localisation(stage=stage, sampler=sampler, step=step if stage == "unet" else None,
                       rows=rows, free_run_error=run.free_run_error,
                       unpaired=run.unpaired())
    loc.divergence = run.watch.explained(dtype)
    culprit = loc.culprit
    if culprit is not None and not (loc.divergence and loc.divergence["module"].startswith(
            culprit.module + ".")):
        loc.divergence = None  # named by its own error; a divergence elsewhere is downstream
    if culprit is None and loc.divergence is None:
        loc.divergence = divergent_output(reader, rec, run.at, run.cells, run.cfg, run.outputs)
    loc.seconds = round(time.perf_counter() - start, 3)
    return loc


def has_module_truths(rec: Recording, stage: str) -> bool:
    """Whether the recording's module capture of `stage` holds each module's float64 truth."""
    found = rec.modules.get(stage)
    return found is not None and any("truth" in m.get("tensors", {})
                                     for m in found[0].get("modules", []))


def judge_module_truths(rec: Recording, port, policy, stage: str, unrun: List[str],
                        rename: Optional[Rename] = None) -> List[TensorResult]:
    """Each captured module of `stage` judged by its truth ratio, as tensors of that stage
    (`module/<sgm name>`): in reduced precision a module can be broken by far less than the
    stage's spread of precision noise (float16 GroupNorm statistics: module truth ratio 2.1-2.8
    where the faithful module's is 1.00, yet the UNet output only moves within its noise), and
    each module, teacher-forced, has a spread of its own that is narrow. Modules the harness
    cannot run on the recorded inputs are appended to `unrun`, not judged."""
    index_dict, path = rec.modules[stage]
    reader = CaptureReader(path, CaptureIndex.from_dict(index_dict))
    tolerances = policy.tolerances(stage, rec.spec.dtype)
    step = reader.index.step if stage == "unet" else None
    results: List[TensorResult] = []
    try:
        run = PortRun(port, reader, rec, rename)
        run.free_run()
        for _, pair, recorded, out, error in run.own_outputs(f"port: module truths of {stage}"):
            found = policy.module_truth_bound(pair.kind, rec.spec.dtype)
            if found is None or "truth" not in recorded:
                continue
            if out is None:  # it raised: said, not judged
                unrun.append(f"{pair.module} ({exception_line(error)})")
                continue
            metrics = compare(recorded["out"], out, truth=recorded["truth"],
                              truth_floor=found[1], **tolerances)
            verdict, reasons = policy.judge_module(pair.kind, rec.spec.dtype,
                                                   truth_ratio=metrics.truth_ratio)
            results.append(TensorResult(f"module/{pair.module}", step, metrics, verdict,
                                        reasons))
    finally:
        reader.close()
    return results


# ---- orchestration -----------------------------------------------------------------------------

def record_modules(rec: Recording, ref, checkpoint, work_dir: Path,
                   stages=LOCATABLE_STAGES, sampler: Optional[str] = None,
                   step: Optional[int] = None,
                   log: Callable[[str], None] = lambda s: None, truth: bool = False) -> None:
    """Capture the reference's per-module tensors of `stages` into `work_dir` and attach them
    to `rec` (saved with it), so `locate` later runs without torch; with `truth`, each module's
    float64 truth too, which `check` then judges as part of its stage."""
    for stage in stages:
        target = resolve_target(rec, stage, sampler, step)
        index, path = capture_to(ref, rec, *target.at, work_dir, log=log, truth=truth)
        rec.modules[stage] = (index.to_dict(), path)


def _capture_for(rec: Recording, target: Target) -> Optional[tuple]:
    found = rec.modules.get(target.stage)
    if found is None:
        return None
    index = CaptureIndex.from_dict(found[0])
    if (index.sampler, index.step) != (target.sampler, target.step):
        return None
    return index, found[1]


def needs_live_capture(rec: Recording, stage: str, sampler: Optional[str] = None,
                       step: Optional[int] = None) -> bool:
    """Whether localising `stage` needs the reference now (the recording has no module capture
    for it at this sampler and step)."""
    return _capture_for(rec, resolve_target(rec, stage, sampler, step)) is None


def locate(rec: Recording, port, policy, stage: str, *, sampler: Optional[str] = None,
           step: Optional[int] = None, work_dir: Optional[Path] = None,
           reference=None, log: Callable[[str], None] = lambda s: None,
           rename: Optional[Rename] = None) -> Localisation:
    """The module table of `stage`: from the recording's own module capture when it has one
    for this sampler and step, else captured now from the reference (needs torch), always on
    the weights the recording was made with (`Recording.weights`), not the port's checkpoint:
    a conversion bug in the port's weights then shows as the own error of the module that
    holds the tensor."""
    target = resolve_target(rec, stage, sampler, step)
    policy.module_bound("default", rec.spec.dtype)  # without module bounds: fail before any work
    found = _capture_for(rec, target)
    if found is None:
        from .reference import load_reference, require_reference

        where = "the recording has none for it" if rec.modules else \
            "the recording has no module captures (record it with --modules)"
        require_reference(f"locating in stage '{stage}' ({where})")
        weights = rec.weights()
        if reference is None:
            log(f"loading the reference from {weights} (the golden's weights)")
            reference = load_reference(weights, dtype=rec.spec.dtype)
        port_cells(port)  # a port without cells() fails before the reference runs
        with contextlib.ExitStack() as stack:
            if work_dir is None:
                import tempfile

                work_dir = stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="sdxl-parity-locate-"))
            index, path = capture_to(reference, rec, *target.at, work_dir, log=log)
            return _locate_from_capture(port, rec, policy, path, index, log, rename)
    index, path = found
    return _locate_from_capture(port, rec, policy, path, index, log, rename)


def _locate_from_capture(port, rec: Recording, policy, path: Path, index: CaptureIndex,
                         log, rename: Optional[Rename]) -> Localisation:
    reader = CaptureReader(path, index)
    try:
        return locate_in_port(port, reader, rec, policy, log=log, rename=rename)
    finally:
        reader.close()
