"""Name the first divergent module: teacher-forced, module by module.

Accumulated error (the port run freely, compared module by module with the reference) grows
from the first bug on: every module after it inherits the error, so the first module over a
bound is not necessarily the one that made it. Here each port module is also run on the
*reference's* recorded inputs for that module, and its output compared with the reference's:
its own error, free of anything upstream. The culprit is the first module in execution order
(the order in which forwards return, so a leaf comes before the block that holds it) whose own
error exceeds its kind's bound (`[module.<dtype>]` in the policy).

The reference's per-module inputs and outputs come from forward hooks on the diffusers modules
(`capture_reference`), streamed to a file (`module_capture`), so `locate` can run later, and
without torch, from a recording made with `sdxl-parity record --modules`.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from sdxl_common.errors import InputError
from sdxl_common.progress import bar as progress_bar

from .contract import ENCODE_OUTPUTS, cfg_batch, has_modules
from .metrics import against_truth, format_value, rel_l2
from .module_capture import CaptureIndex, CaptureReader, CaptureWriter
from .module_pairs import (LOCATABLE_STAGES, PORT_CALLS, TOKEN_ID_INPUTS, ModulePair,
                           pair_modules, reference_inputs, reference_module_table,
                           run_port_module, to_reference_layout)
from .recording import Recording, call_key, conditioner_key, sampler_key, tokens_key
from .difference import explain
from .results import TensorResult, Verdict, exception_line


# ---- what a stage's localisation runs on --------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """The stage, and for the UNet the sampler and step, whose modules are compared."""

    stage: str
    sampler: str = ""
    step: int = 0


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


def _stage_inputs(rec: Recording, target: Target) -> Dict[str, np.ndarray]:
    """What the stage's networks run on, from the recording (the same on both sides)."""
    if target.stage == "conditioner":
        return {"input_ids": rec.get(tokens_key("input_ids")),
                "input_ids_2": rec.get(tokens_key("input_ids_2"))}
    if target.stage == "unet":
        batch = cfg_batch({k: rec.get(conditioner_key("generation", k)) for k in ENCODE_OUTPUTS})
        return {"sample": rec.get(call_key(target.sampler, target.step, "x_in")),
                "timestep": rec.get(call_key(target.sampler, target.step, "timestep")), **batch}
    return {"latents": rec.get(sampler_key(target.sampler, "latents"))[-1]}


# ---- the reference side ------------------------------------------------------------------------

def capture_reference(ref, port_model, cfg, rec: Recording, target: Target, path: Path,
                      log: Callable[[str], None] = lambda s: None, truth=None) -> CaptureIndex:
    """Run the reference's networks of `target.stage` on the recorded inputs with a forward hook
    on every paired module; each module's inputs and output go to `path` as it returns.

    `truth` (the reference in float64 on the same rounded weights, `record.round_weights`):
    each module's float64 twin also runs on exactly the arguments the reference module got,
    upcast, so every module has its own truth ("truth"): in reduced precision a module's own
    error is judged against the reference module's own error, as stages are."""
    import torch

    from .reference import to_numpy

    modules = reference_module_table(ref, target.stage)
    twins = reference_module_table(truth, target.stage) if truth is not None else None
    pairs = pair_modules(port_model, cfg, target.stage, modules)
    index = CaptureIndex(stage=target.stage, sampler=target.sampler, step=target.step)
    writer = CaptureWriter(path, index)
    handles = []

    def hook_for(pair: ModulePair):
        wanted = set(PORT_CALLS[pair.kind].inputs) | {"out"}
        fired = []

        def hook(module, args, kwargs, output):
            if fired:  # the first call only (CLIP-L's layers run once per encode)
                return
            fired.append(True)
            got = reference_inputs(args, kwargs, output)
            if twins is not None:
                exact = twins[pair.reference](*_float64(args), **_float64(kwargs))
                got["truth"] = reference_inputs(args, kwargs, exact)["out"]
            writer.add(pair, {k: to_numpy(v) for k, v in got.items() if k in wanted | {"truth"}})
        return hook

    try:
        for pair in pairs:
            handles.append(modules[pair.reference].register_forward_hook(hook_for(pair),
                                                                         with_kwargs=True))
        log(f"reference: capturing {len(pairs)} modules of stage {target.stage}")
        inputs = _stage_inputs(rec, target)
        with torch.no_grad():
            if target.stage == "conditioner":
                for key, encoder in (("input_ids", ref.pipe.text_encoder),
                                     ("input_ids_2", ref.pipe.text_encoder_2)):
                    encoder(torch.from_numpy(np.asarray(inputs[key], np.int64)).to(ref.device),
                            output_hidden_states=True)
            elif target.stage == "unet":
                ref.unet(**inputs)
            else:
                ref.decode(inputs["latents"])
    finally:
        for h in handles:
            h.remove()
        writer.close()
    return index


def _float64(value):
    """A hook's arguments for the float64 twin: float tensors upcast, the rest unchanged."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(torch.float64) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_float64(v) for v in value)
    if isinstance(value, dict):
        return {k: _float64(v) for k, v in value.items()}
    return value


# ---- the port side -----------------------------------------------------------------------------

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

    @property
    def raised(self) -> bool:
        """The port module raised on the reference's inputs: it is broken there, whatever
        its numbers would have been."""
        return bool(self.error)

    @property
    def over(self) -> bool:
        if self.raised:
            return True
        if self.truth_ratio is not None and self.truth_bound is not None:
            return math.isnan(self.truth_ratio) or self.truth_ratio > self.truth_bound
        return self.own is not None and (math.isnan(self.own) or self.own > self.bound)

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
                   d.get("truth_bound"), d.get("error_text", ""))


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
                "modules": [r.to_dict() for r in self.rows]}

    @classmethod
    def from_dict(cls, d: Dict) -> "Localisation":
        return cls(stage=d["stage"], sampler=d.get("sampler") or "", step=d.get("step"),
                   rows=[ModuleRow.from_dict(r) for r in d.get("modules", [])],
                   seconds=d.get("seconds", 0.0), metric=d.get("metric", "rel_l2"),
                   free_run_error=d.get("free_run_error", ""), note=d.get("note", ""),
                   divergence=d.get("divergence"))


def _judged(row: ModuleRow, metric: str) -> Tuple[str, float, float]:
    """The number a row is judged by: its truth ratio where it has a truth bound, else its
    own error."""
    if row.truth_ratio is not None and row.truth_bound is not None:
        return "truth_ratio", row.truth_ratio, row.truth_bound
    return f"own {metric}", row.own, row.bound


def module_access(port):
    """The port's declared module access (`modules()` of the contract), or bad input."""
    if not has_modules(port):
        raise InputError(f"{type(port).__name__} offers no modules() (parity/contract.py): "
                         "localisation needs the port's module tree")
    return port.modules()


@contextlib.contextmanager
def _eager():
    """PyNative, no graph units: every module's own `__call__` runs, so it can be observed."""
    from sdxl_ms.backend import settings

    before = settings.jit
    settings.set_jit("off")
    try:
        yield
    finally:
        settings.set_jit(before)


@contextlib.contextmanager
def _observe(wanted: Dict[int, int], on_output: Callable[[int, object], None],
             on_input: Callable[[int, tuple], None] = lambda i, inputs: None) -> Iterator[None]:
    """Hand the inputs of the first call of each port module in `wanted` (id -> capture
    index) to `on_input` as it starts, and its output to `on_output` as it returns (nothing is
    kept: a full-size UNet has hundreds)."""
    from sdxl_ms.nn.module import Module

    original = Module.__call__
    started, done = set(), set()

    def observed(self, p, *inputs):
        i = wanted.get(id(self))
        if i is not None and i not in started:
            started.add(i)
            on_input(i, inputs)
        out = original(self, p, *inputs)
        if i is not None and i not in done:
            done.add(i)
            on_output(i, out)
        return out

    from sdxl_ms.nn.layers import Linear

    entries = {name: getattr(Linear, name) for name in _LINEAR_ENTRY_INPUTS}

    def entry(name):
        def observed_entry(self, p, x, *rest):
            i = wanted.get(id(self))
            if i is not None and i not in started:
                started.add(i)
                on_input(i, (_LINEAR_ENTRY_INPUTS[name](x),))
            return entries[name](self, p, x, *rest)
        return observed_entry

    Module.__call__ = observed
    for name in entries:
        setattr(Linear, name, entry(name))
    try:
        yield
    finally:
        Module.__call__ = original
        for name, method in entries.items():
            setattr(Linear, name, method)


def _channels_first_tokens(x) -> np.ndarray:
    a = np.asarray(x.float().asnumpy())
    b, c = a.shape[:2]
    return a.reshape(b, c, -1).transpose(0, 2, 1).reshape(-1, c)


# the port Linear's layout entry points beside its call (`sdxl_ms.nn.layers.Linear`): each
# one's input as row-major tokens (N, in), the layout the reference's Linear takes
_LINEAR_ENTRY_INPUTS = {
    "transposed_out": lambda x: x,
    "to_channels_first": lambda x: x,
    "from_transposed": lambda y_t: np.asarray(y_t.float().asnumpy()).T,
    "from_channels_first": _channels_first_tokens,
}


def _port_modules(access, index: CaptureIndex) -> List:
    """The port module of each captured pair, in capture order."""
    return [access.module(pair.port_path) for pair in index.pairs]


def _port_module_outputs(reader: CaptureReader, modules: List, desc: str):
    """(index, pair, recorded tensors, the port module's output or None, error text) for every
    captured module: the port module (`modules`, from `_port_modules`) run on the reference's
    recorded inputs."""
    index = reader.index
    with progress_bar(total=len(index.pairs), desc=desc, unit="module") as bar:
        for i, (pair, module) in enumerate(zip(index.pairs, modules)):
            recorded = reader.tensors(i)
            out, error = None, None
            try:
                out = run_port_module(pair, module, recorded)
            except Exception as e:  # noqa: BLE001 - the module raised: named, never fatal
                error = e
            yield i, pair, recorded, out, error
            bar.update(1)


def locate_in_port(port, reader: CaptureReader, rec: Recording, bound_of: Callable[[str], float],
                   log: Callable[[str], None] = lambda s: None,
                   truth_bound_of: Callable[[str], Optional[Tuple[float, float]]] = (
                       lambda kind: None)) -> Localisation:
    """Own error of every captured module (the port module on the reference's inputs) and its
    accumulated error (the port's stage run freely on the stage's recorded inputs). Where the
    capture holds module truths, also each module's truth ratio, judged by `truth_bound_of`
    (kind -> (bound, floor), or None for no truth bound)."""
    index = reader.index
    target = Target(index.stage, index.sampler, index.step)
    start = time.perf_counter()
    access = module_access(port)
    modules = _port_modules(access, index)
    rows: List[ModuleRow] = []
    free_run_error = ""
    accumulated: Dict[int, float] = {}
    watch = InputWatch(reader, rec.spec.dtype)
    outputs = None

    def compare_output(i: int, out) -> None:
        want = reader.tensor(i, "out")
        accumulated[i] = rel_l2(want, to_reference_layout(index.pairs[i], out, want.shape))
        watch.returned(accumulated[i])

    with _eager():
        log(f"port: free run of stage {target.stage} (accumulated error)")
        with _observe({id(m): i for i, m in enumerate(modules)}, compare_output, watch.started):
            try:
                outputs = access.run_stage(target.stage, _stage_inputs(rec, target))
            except Exception as e:  # noqa: BLE001 - the port's failure: its modules say where
                free_run_error = exception_line(e)
                log(f"port: the free run of stage {target.stage} raised {free_run_error}")
        for i, pair, recorded, out, error in _port_module_outputs(
                reader, modules, f"port: modules of {target.stage}"):
            own = None if out is None else rel_l2(recorded["out"], out)
            truth = {}
            found = truth_bound_of(pair.kind)
            if out is not None and "truth" in recorded:
                bound, floor = found if found is not None else (None, 0.0)
                truth = {**against_truth(recorded["out"], out, recorded["truth"], floor),
                         "truth_bound": bound}
            rows.append(ModuleRow(pair.module, pair.reference, pair.kind, own,
                                  accumulated.get(i), bound_of(pair.kind),
                                  "" if error is None else exception_line(error), **truth,
                                  error_text="" if error is None else f"{type(error).__name__}: "
                                                                      f"{error}"))
    step = target.step if target.stage == "unet" else None
    loc = Localisation(stage=target.stage, sampler=target.sampler, step=step, rows=rows,
                       free_run_error=free_run_error)
    loc.divergence = watch.explained(rec.spec.dtype)
    culprit = loc.culprit
    if culprit is not None and not (loc.divergence and loc.divergence["module"].startswith(
            culprit.module + ".")):
        loc.divergence = None  # named by its own error; a divergence elsewhere is downstream
    if culprit is None and loc.divergence is None:
        loc.divergence = _divergent_output(reader, rec, target, access, outputs)
    loc.seconds = round(time.perf_counter() - start, 3)
    return loc


# a module input this far from the reference's (rel L2), and 100x further than anything that
# returned before it, did not drift there: something between modules changed it
INPUT_OFF = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 2e-1}
INPUT_OFF_OVER_UPSTREAM = 100.0
# a transformation explains an activation when it reproduces it to this (compute noise ~1e-6)
ACTIVATION_TOL = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 5e-2}


class InputWatch:
    """During the free run: the first module whose input is off while everything that returned
    before it was close to the reference (a wiring bug enters there)."""

    def __init__(self, reader: CaptureReader, dtype: str):
        self.reader = reader
        self.off = INPUT_OFF.get(dtype, INPUT_OFF["float32"])
        self.upstream = 0.0  # the largest accumulated error returned so far
        self.first: Optional[Tuple[int, np.ndarray, float]] = None

    def returned(self, accumulated: float) -> None:
        if not math.isnan(accumulated):
            self.upstream = max(self.upstream, accumulated)

    def started(self, i: int, inputs: tuple) -> None:
        if self.first is not None or not inputs or not hasattr(inputs[0], "shape"):
            return
        try:
            want = self.reader.tensor(i, "x")
        except KeyError:
            return
        pair = self.reader.index.pairs[i]
        if pair.kind in TOKEN_ID_INPUTS:
            return
        try:
            got = to_reference_layout(pair, inputs[0], want.shape, is_input=True)
        except ValueError:  # another shape altogether: that is off too
            got = None
        err = math.inf if got is None else rel_l2(want, got)
        if err > max(self.off, INPUT_OFF_OVER_UPSTREAM * self.upstream):
            self.first = (i, got, err)

    def explained(self, dtype: str) -> Optional[Dict]:
        if self.first is None:
            return None
        i, got, err = self.first
        pair = self.reader.index.pairs[i]
        want = self.reader.tensor(i, "x")
        if got is None:
            found = {"kind": "shape", "text": "of another shape than the reference's input"}
        else:
            found = explain(want, got, dtype=dtype, tol=ACTIVATION_TOL.get(dtype, 1e-3),
                            channel_axis=1 if want.ndim == 4 else None,
                            others=lambda a: _recorded_output_equal_to(self.reader, a, i,
                                                                       dtype)).to_dict()
        ref = pair.reference.partition("/")[2]
        return {"where": "input", "module": pair.module, "reference_module": pair.reference,
                "rel_l2": err, "explanation": found,
                "text": f"the input of module '{pair.module}' ({ref}) differs from the "
                        f"reference's: {found['text']} (rel_l2 {err:.3g}), while every module "
                        "before it is within bounds"}


def _recorded_output_equal_to(reader: CaptureReader, a: np.ndarray, exclude: int,
                              dtype: str) -> Optional[str]:
    """The captured module whose recorded output `a` equals (a wrong tap), or None."""
    tol = ACTIVATION_TOL.get(dtype, 1e-3)
    for j, pair in enumerate(reader.index.pairs):
        if j == exclude:
            continue
        out = reader.tensor(j, "out")
        if out.shape == a.shape and rel_l2(out, a) <= tol:
            return f"output of module '{pair.module}' ({pair.reference.partition('/')[2]})"
    return None


def _stage_outputs(rec: Recording, target: Target) -> Dict[str, np.ndarray]:
    """The reference's outputs of the stage's networks on `_stage_inputs` (from the
    recording): the conditioner encodes [prompt, cond_negative], as its neg_text variant."""
    if target.stage == "conditioner":
        both = lambda key: np.concatenate([rec.get(conditioner_key("neg_text", key)),  # noqa: E731
                                           rec.get(conditioner_key("neg_text", "negative_" + key))])
        return {"prompt_embeds": both("prompt_embeds"),
                "pooled_prompt_embeds": both("pooled_prompt_embeds")}
    if target.stage == "unet":
        return {"eps": rec.get(call_key(target.sampler, target.step, "eps"))}
    return {"decoded": rec.get(sampler_key(target.sampler, "decoded"))}


def _divergent_output(reader: CaptureReader, rec: Recording, target: Target, access,
                      outputs) -> Optional[Dict]:
    """Every module and its input within bounds, yet the stage's output off: the difference
    enters after the last module (which layer is tapped, which row pooled). Each output the
    port's `run_stage` returned is explained against the reference's, block by block along its
    last axis (the conditioner's crossattn is CLIP-L's hidden state beside bigG's); None when
    no block is explained."""
    if not isinstance(outputs, dict):
        return None
    dtype = rec.spec.dtype
    tol = ACTIVATION_TOL.get(dtype, 1e-3)
    for name, want in _stage_outputs(rec, target).items():
        got = outputs.get(name)
        if got is None:
            continue
        got = np.asarray(got, np.float32).reshape(want.shape)
        err = rel_l2(want, got)
        if err <= tol:
            continue
        parts = []
        eos = _eos_positions(rec, target)
        blocks = [("all", (0, want.shape[-1]))] + [b for b in _blocks(want.shape[-1], access)
                                                    if b[0] != "all"]
        for label, (lo, hi) in blocks:
            w, g = want[..., lo:hi], got[..., lo:hi]
            if rel_l2(w, g) <= tol:
                continue
            found = explain(w, g, dtype=dtype, tol=tol,
                            others=lambda a: (_recorded_output_equal_to(reader, a, -1, dtype)
                                              or _pooled_row(reader, a, access, tol, eos)))
            if found.kind == "unexplained":
                continue
            block = "" if (lo, hi) == (0, want.shape[-1]) else f"[..., {lo}:{hi}] ({label})"
            parts.append(f"{name}{block} differs from the reference's: {found.text}")
            if label == "all":  # the whole output explained: no need to look block by block
                break
        if not parts:  # nothing explained: the runner's note says what else it knows
            continue
        return {"where": "output", "output": name, "rel_l2": err,
                "text": f"the stage's {'; '.join(parts)} (rel_l2 "
                        f"{err:.3g}), while every module and its input are within bounds"}
    return None


def _eos_positions(rec: Recording, target: Target) -> Optional[List[int]]:
    """Where bigG pools in the conditioner's ids: the first largest id (EOS) of each row."""
    if target.stage != "conditioner":
        return None
    return [int(np.argmax(row)) for row in _stage_inputs(rec, target)["input_ids_2"]]


def _pooled_row(reader: CaptureReader, pooled: np.ndarray, access, tol: float,
                eos: Optional[List[int]]) -> Optional[str]:
    """SDXL's pooled text embedding is bigG's final hidden state at the EOS token times
    `text_projection` (a bare parameter, no module): the position whose projected row the
    port's pooled output holds, when it is not the EOS token's."""
    final = next((j for j, pair in enumerate(reader.index.pairs)
                  if pair.port_path.endswith("embedders.1.model.ln_final")), None)
    projection = next((prm for name, prm in access.root.parameters_and_names()
                       if name.endswith("embedders.1.model.text_projection")), None)
    if final is None or projection is None or pooled.ndim != 2:
        return None
    hidden = reader.tensor(final, "out").astype(np.float64)  # (B, L, W)
    rows = hidden @ projection.asnumpy().astype(np.float64)  # (B, L, D): every position pooled
    if rows.shape[0] != pooled.shape[0] or rows.shape[2] != pooled.shape[1]:
        return None
    found = []
    for b in range(pooled.shape[0]):
        distance = [rel_l2(rows[b, q], pooled[b]) for q in range(rows.shape[1])]
        q = int(np.argmin(distance))
        if distance[q] > tol:
            return None
        found.append(q)
    if eos is None or found == list(eos):  # the right rows: the projection itself differs
        return None
    return (f"final hidden state of bigG at position(s) {sorted(set(found))}, projected (the "
            "pooled row taken there, not at the EOS token)")


def _blocks(width: int, access):
    """(label, (lo, hi)) blocks of the conditioner's crossattn: each text encoder's width
    (one block, "all", for other outputs)."""
    cond = getattr(getattr(access, "config", None), "conditioner", None)
    widths = [("CLIP-L", getattr(getattr(cond, "clip_l", None), "width", None)),
              ("OpenCLIP-bigG", getattr(getattr(cond, "clip_g", None), "width", None))]
    if all(w for _, w in widths) and sum(w for _, w in widths) == width:
        lo = 0
        for label, w in widths:
            yield label, (lo, lo + w)
            lo += w
    else:
        yield "all", (0, width)


def has_module_truths(rec: Recording, stage: str) -> bool:
    """Whether the recording's module capture of `stage` holds each module's float64 truth."""
    found = rec.modules.get(stage)
    return found is not None and any("truth" in m.get("tensors", {})
                                     for m in found[0].get("modules", []))


def judge_module_truths(rec: Recording, port, policy, stage: str,
                        unrun: List[str]) -> List[TensorResult]:
    """Each captured module of `stage` judged by its truth ratio, as tensors of that stage
    (`module/<sgm name>`): in reduced precision a module can be broken by far less than the
    stage's spread of precision noise (float16 GroupNorm statistics: module truth ratio 2.1-2.8
    where the faithful module's is 1.00, yet the UNet output only moves within its noise), and
    each module, teacher-forced, has a spread of its own that is narrow. Modules the harness
    cannot run on the recorded inputs are appended to `unrun`, not judged."""
    from .metrics import compare

    index_dict, path = rec.modules[stage]
    reader = CaptureReader(path, CaptureIndex.from_dict(index_dict))
    tolerances = policy.tolerances(stage, rec.spec.dtype)
    step = reader.index.step if stage == "unet" else None
    results: List[TensorResult] = []
    try:
        with _eager():
            for _, pair, recorded, out, error in _port_module_outputs(
                    reader, _port_modules(module_access(port), reader.index),
                    f"port: module truths of {stage}"):
                found = policy.module_truth_bound(pair.kind, rec.spec.dtype)
                if found is None or "truth" not in recorded:
                    continue
                if out is None:  # it raised: said, not judged
                    unrun.append(f"{pair.module} ({exception_line(error)})")
                    continue
                bound, floor = found
                name = f"module/{pair.module}"
                metrics = compare(recorded["out"], out, truth=recorded["truth"],
                                  truth_floor=floor, **tolerances)
                ratio = metrics.truth_ratio
                ok = ratio is not None and not math.isnan(ratio) and ratio <= bound
                results.append(TensorResult(
                    name, step, metrics, Verdict.PASS if ok else Verdict.FAIL,
                    [] if ok else [f"truth_ratio {format_value(ratio)} > fail "
                                   f"{format_value(bound)} ({pair.kind})"]))
    finally:
        reader.close()
    return results


# ---- orchestration -----------------------------------------------------------------------------

def port_structure(checkpoint) -> tuple:
    """(model, cfg): the port's module tree for `checkpoint`, weights unallocated: what the
    pairing needs on the recording side."""
    from sdxl_ms.models.sdxl import build_sdxl
    from sdxl_ms.weights.checkpoint import open_checkpoint
    from sdxl_ms.weights.loader import infer_preset

    cfg = infer_preset(open_checkpoint(Path(checkpoint)))
    return build_sdxl(cfg), cfg


def record_modules(rec: Recording, ref, checkpoint, work_dir: Path,
                   stages=LOCATABLE_STAGES, sampler: Optional[str] = None,
                   step: Optional[int] = None,
                   log: Callable[[str], None] = lambda s: None, truth=None) -> None:
    """Capture the reference's per-module tensors of `stages` into `work_dir` and attach them
    to `rec` (saved with it), so `locate` later runs without torch; with `truth` (the float64
    twin), each module's truth too, which `check` then judges as part of its stage."""
    model, cfg = port_structure(checkpoint)
    for stage in stages:
        target = resolve_target(rec, stage, sampler, step)
        path = Path(work_dir) / f"modules-{stage}.npz"
        index = capture_reference(ref, model, cfg, rec, target, path, log=log, truth=truth)
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
           reference=None, log: Callable[[str], None] = lambda s: None) -> Localisation:
    """The module table of `stage`: from the recording's own module capture when it has one
    for this sampler and step, else captured now from the reference (needs torch), always on
    the weights the recording was made with (`Recording.weights`), not the port's checkpoint:
    a conversion bug in the port's weights then shows as the own error of the module that
    holds the tensor."""
    target = resolve_target(rec, stage, sampler, step)
    bound_of = lambda kind: policy.module_bound(kind, rec.spec.dtype)  # noqa: E731
    bound_of("default")  # a policy without module bounds fails before any work
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
        access = module_access(port)
        with contextlib.ExitStack() as stack:
            if work_dir is None:
                import tempfile

                work_dir = stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="sdxl-parity-locate-"))
            path = Path(work_dir) / f"modules-{stage}.npz"
            Path(work_dir).mkdir(parents=True, exist_ok=True)
            index = capture_reference(reference, access.root, access.config, rec, target,
                                      path, log=log)
            return _locate_from_capture(port, rec, policy, path, index, bound_of, log)
    index, path = found
    return _locate_from_capture(port, rec, policy, path, index, bound_of, log)


def _locate_from_capture(port, rec: Recording, policy, path: Path, index: CaptureIndex,
                         bound_of, log) -> Localisation:
    reader = CaptureReader(path, index)
    try:
        return locate_in_port(port, reader, rec, bound_of, log=log,
                              truth_bound_of=lambda kind: policy.module_truth_bound(
                                  kind, rec.spec.dtype))
    finally:
        reader.close()
