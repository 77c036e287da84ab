"""Record, check and run: the orchestration behind `sdxl-parity`.

`check` needs only the port (no torch): it reads a recording and runs every stage against it.
`run` records the reference and checks the port against it in one go.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from sdxl_common.progress import bar as progress_bar

from . import eta, framework
from .policy import Policy, load_policy
from .recording import Recording, RunSpec, resolve_checkpoint
from .guard import PortError, PortGuard
from .reference_process import peak_rss_bytes
from .port_cells import has_cells
from .ports import BUILTIN, PortSpec, describe, load_port, own_description
from .results import ParityReport, StageResult, Verdict
from .stages import STAGE_FUNCTIONS, STAGES, StageContext


def check(rec: Recording, out_dir: Path, *, policy: Optional[Policy] = None, port=None,
          port_spec: Optional[PortSpec] = None, checkpoint: Optional[str] = None,
          stages: Sequence[str] = STAGES, fail_fast: bool = False,
          junit_xml: Optional[Path] = None, log: Callable[[str], None] = lambda s: None,
          command: Optional[str] = None, locate: bool = False,
          reference_process: Optional[Dict] = None, waivers=None,
          rename=None) -> ParityReport:
    """Check a port against a recording. `locate`: name the first divergent module of the
    first failing stage (`parity.locate`). `port` is a built port object; else it is built from
    `port_spec` (default: the built-in MindSpore port) on the checkpoint and dtype recorded.
    `waivers` (a `parity.waivers.WaiverFile`): known deviations, waived within their bounds.
    Whatever MindSpore dumps when a graph fails to compile lands in `out_dir`."""
    policy = policy or load_policy()
    spec = rec.spec
    unknown = [s for s in stages if s not in STAGE_FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    ckpt = resolve_checkpoint(spec, checkpoint, rec.meta.get("checkpoint_generator_version"))
    devices = {"port": framework.port_device(), "reference": reference_device(rec)}
    policy = policy.for_devices(devices["port"], devices["reference"])
    policy.check_covers([s for s in stages], spec.dtype)
    out_dir = Path(out_dir)
    weights = _weights_vs_golden(rec, ckpt, out_dir, log) if checkpoint else None
    with compile_dumps_in(out_dir):
        if port is None:
            port_spec = port_spec or PortSpec.parse(BUILTIN)
            log(f"loading the port ({port_spec}) from {ckpt}")
            port = load_port(port_spec, ckpt, spec.dtype)
            if str(port_spec) == BUILTIN:
                from .builtin_port import choose_execution

                chosen = choose_execution(rec, stages)
                modes = ", ".join(f"{net} {mode}" for net, mode in chosen.get("networks", {}).items())
                log(f"port execution: jit {modes or chosen['jit']} ({chosen['reason']})")
        if locate and has_cells(port):
            check_locate_inputs(rec)
        return _check_port(rec, out_dir, port, port_spec, ckpt, policy, devices, stages,
                           fail_fast, junit_xml, log, command, locate, reference_process,
                           waivers, weights, rename)


def _weights_vs_golden(rec: Recording, ckpt: Path, out_dir: Path,
                       log: Callable[[str], None]) -> Optional[Dict]:
    """`diff-weights` of the port's checkpoint against the golden's weights, where those are
    on this machine and the two are not the same content: the commonest porting bug is in the
    conversion, and this names it before any stage runs (diff-weights.json/.md in the report
    folder, a summary in meta and the headline)."""
    from .diff_weights import diff_weights, write_reports
    from .recording import RecordingError

    try:
        golden = rec.weights()
    except RecordingError as e:
        log(f"weights: not compared with the golden's ({e})")
        return None
    if rec.recorded_on(ckpt, golden):
        return None
    log(f"weights: comparing {ckpt} with the golden's {golden}")
    diff = diff_weights(golden, ckpt, log=log)
    paths = write_reports(diff, out_dir)
    log(f"weights: {diff.summary()}")
    return {"ok": diff.ok, "summary": diff.summary(), "golden": str(golden),
            "report": str(paths["md"]),
            "differing": [t.to_dict() for t in diff.differing[:20]],
            "layout": {"missing": diff.missing[:20], "unexpected": diff.unexpected[:20],
                       "mismatched": diff.mismatched[:20]}}


def _check_port(rec, out_dir, port, port_spec, ckpt, policy, devices, stages, fail_fast,
                junit_xml, log, command, locate, reference_process, waivers,
                weights, rename) -> ParityReport:
    from .reports import write_reports

    spec = rec.spec
    ctx = StageContext(port=PortGuard(port), rec=rec, policy=policy, out_dir=out_dir,
                       dtype=spec.dtype, rename=rename)
    chosen = [name for name in STAGES if name in stages]
    own_clock = eta.current() is None  # `check` alone: the port's work is the whole run
    if own_clock:
        eta.start(eta.RunClock(eta.RunPlan.for_run(spec.samplers, spec.steps,
                                                   stages=chosen).port))
    try:
        results, timings, failed = _run_stages(ctx, chosen, fail_fast, log)
    finally:
        if own_clock:
            eta.start(None)
    localisation = []
    if locate and failed is not None:
        localisation = locate_failure(rec, port, policy, results[failed], ckpt, log, rename)
    meta = {
        "command": command or command_line(), "spec": _spec_dict(spec), "policy": policy.name,
        "policy_source": policy.source, "dtype": spec.dtype, "checkpoint": str(ckpt),
        "recording": str(rec.path) if rec.path else None,
        "reference": rec.meta.get("reference", {}),
        "port": {**describe(port, port_spec), **framework.versions()},
        "execution": {**framework.execution(), **own_description(port).get("execution", {})},
        "devices": {**devices, "policy_keys": list(policy.context)},
        "schedules": {k: v.get("timesteps") for k, v in rec.schedules.items()},
        "stage_seconds": timings,
        "processes": {"port": {"peak_rss_bytes": peak_rss_bytes()},
                      **({"reference": reference_process} if reference_process else {})},
    }
    if weights is not None:
        meta["weights_vs_golden"] = weights
    dumps = out_dir / COMPILE_DUMPS
    if dumps.exists():
        meta["compile_dumps"] = str(dumps)
    outcome = None
    if waivers is not None:
        from .waivers import apply_waivers, located_modules

        outcome = apply_waivers(results, waivers, policy, spec.dtype,
                                modules=located_modules(localisation)).to_dict()
    report = ParityReport.build(results, meta)
    report.localisation = localisation
    if outcome is not None:
        report.set_waivers(outcome)
    write_reports(report, out_dir, junit_xml=junit_xml)
    return report


def _run_stages(ctx: StageContext, chosen: List[str], fail_fast: bool,
                log: Callable[[str], None]) -> Tuple[Dict[str, StageResult], Dict[str, float],
                                                     Optional[str]]:
    """Every stage in order, those in `chosen` run: results, seconds per stage, and the first
    failing stage."""
    results: Dict[str, StageResult] = {}
    timings: Dict[str, float] = {}
    failed = None
    with progress_bar(total=len(chosen), desc="port: stages", unit="stage") as bar:
        for name in STAGES:
            if name not in chosen:
                results[name] = StageResult.skipped(name, "not selected (--stages)")
                continue
            if failed and fail_fast:
                results[name] = StageResult.skipped(
                    name, f"not run: stage '{failed}' did not pass (--fail-fast)")
                continue
            log(f"stage {name}{eta.summary()}")
            bar.set_postfix_str(name)
            start = time.perf_counter()
            try:
                results[name] = STAGE_FUNCTIONS[name](ctx)
            except PortError as e:  # the port raised: nothing to compare, the port is broken
                results[name] = StageResult.errored(name, e.original)
            results[name] = _with_module_truths(ctx, results[name])
            timings[name] = round(time.perf_counter() - start, 3)
            bar.update(1)
            if results[name].verdict in (Verdict.FAIL, Verdict.ERROR) and failed is None:
                failed = name
    return results, timings, failed


def _with_module_truths(ctx: StageContext, result: StageResult) -> StageResult:
    """The stage's result with each recorded module judged against its float64 truth
    (`record --modules --truth`) where the policy has `[module_truth.<dtype>]` bounds."""
    from .locate import has_module_truths, judge_module_truths

    rec, policy, dtype = ctx.rec, ctx.policy, ctx.dtype
    if result.verdict in (Verdict.SKIP, Verdict.ERROR) or not has_module_truths(rec, result.name):
        return result
    port = ctx.port.unwrapped
    if not has_cells(port):
        result.notes.append("per-module truths recorded but not judged: the port offers no "
                            "cells() (parity/contract.py) whose modules can be run")
        return result
    if not (policy.module_truths or {}).get(dtype):
        result.notes.append(f"per-module truths recorded but not judged: policy "
                            f"'{policy.name}' has no [module_truth.{dtype}] bounds")
        return result
    unrun: List[str] = []
    modules = judge_module_truths(rec, port, policy, result.name, unrun, ctx.rename)
    notes = [f"{len(modules)} modules judged by their own float64 truth ratio (each module on "
             "the reference module's recorded inputs)"]
    if unrun:
        notes.append(f"{len(unrun)} modules could not be run on the recorded inputs, not "
                     f"judged: {'; '.join(unrun[:3])}{' ...' if len(unrun) > 3 else ''}")
    return policy.stage_result(result.name, dtype, result.tensors + modules,
                               per_step=result.per_step, images=result.images,
                               notes=result.notes + notes)


def check_locate_inputs(rec: Recording) -> None:
    """Before any work: where localisation would capture the reference live, torch must be
    importable and the golden's own weights on this machine (`Recording.weights`)."""
    from .locate import LOCATABLE_STAGES

    live = [s for s in LOCATABLE_STAGES if s not in rec.modules]
    if live:
        from .reference import require_reference

        require_reference(f"--locate in {', '.join(live)} (the recording has no module "
                          "captures for it; record it with --modules to locate without torch)")
        rec.weights()


COMPILE_DUMPS = "mindspore-dumps"


@contextlib.contextmanager
def compile_dumps_in(folder: Path):
    """MindSpore writes `rank_0/om/analyze_fail.ir` into the current folder when a graph fails
    to compile (a port's `ms.jit` code); `MS_OM_PATH` sends it under `folder` instead, so a run
    writes nothing outside its report folder."""
    before = os.environ.get("MS_OM_PATH")
    os.environ["MS_OM_PATH"] = str(Path(folder).resolve() / COMPILE_DUMPS)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MS_OM_PATH", None)
        else:
            os.environ["MS_OM_PATH"] = before


NO_MODULES_NOTE = ("--locate: this port offers no cells() (parity/contract.py), so no module "
                   "can be named; the stage verdicts stand")


def locate_failure(rec: Recording, port, policy: Policy, stage: StageResult, ckpt: Path,
                   log: Callable[[str], None], rename=None) -> List[Dict]:
    """The module table of a failing stage, at the sampler and step of its first failure (a
    note in the stage where it cannot be localised). The reference runs on the golden's own
    weights; `ckpt` is the port's checkpoint, named in the finding where it differs."""
    from .locate import LOCATABLE_STAGES, locate

    if stage.name not in LOCATABLE_STAGES:
        stage.notes.append(f"--locate: stage '{stage.name}' has no modules to compare "
                           f"(localisable: {', '.join(LOCATABLE_STAGES)})")
        return []
    if not has_cells(port):
        stage.notes.append(NO_MODULES_NOTE)
        log(NO_MODULES_NOTE)
        return []
    sampler, step = None, None
    if stage.first_failure and stage.name == "unet":
        name, step = stage.first_failure
        sampler = name.split("/")[0]
    log(f"locating the first divergent module of stage {stage.name}")
    loc = locate(rec, port, policy, stage.name, sampler=sampler, step=step, log=log,
                 rename=rename)
    if loc.culprit is None and loc.divergence is None:
        loc.note = _nothing_named(rec, port, ckpt, loc, log)
    return [loc.to_dict()]


def _nothing_named(rec: Recording, port, ckpt: Path, loc, log: Callable[[str], None]) -> str:
    """Why a failing stage has no module over its bound, as far as the harness can tell: where
    the port's checkpoint is not the golden's weights, the port's tensors that differ from
    them (a tensor no module owns, such as bigG's text_projection)."""
    from .weight_check import differing_weights

    why = "no module over its bound: the difference enters between modules"
    if loc.free_run_error:
        why += f" (the port's free run raised {loc.free_run_error})"
    weights = rec.weights()
    if rec.recorded_on(ckpt, weights):
        return why
    log(f"comparing the port's weights with the golden's ({weights})")
    from .port_cells import PortCells

    found = differing_weights(PortCells(port), weights)
    if not found:
        return (f"{why}; the port's checkpoint {ckpt} is another file than the golden's "
                f"weights ({weights}), but every tensor the port holds equals them")
    named = ", ".join(f"'{name}' (rel_l2 {value:.3g})" for name, value in found[:3])
    more = f" and {len(found) - 3} more" if len(found) > 3 else ""
    return (f"{why}; {len(found)} of the port's tensors differ from the golden's weights "
            f"({weights}): {named}{more}")


def run(spec: RunSpec, out_dir: Path, *, policy: Optional[Policy] = None,
        port_spec: Optional[PortSpec] = None, stages: Sequence[str] = STAGES,
        fail_fast: bool = False, junit_xml: Optional[Path] = None,
        log: Callable[[str], None] = lambda s: None, command: Optional[str] = None,
        locate: bool = False, truth: bool = False, modules: bool = False,
        quiet: bool = False, waivers=None, rename=None) -> ParityReport:
    """Record the reference in a process of its own (`parity.reference_process`), then check the port
    here: the two are never resident together."""
    from .reference_process import record_isolated

    policy = policy or load_policy()
    policy.check_covers(stages, spec.dtype)  # a policy that cannot judge fails before any work
    ckpt = resolve_checkpoint(spec)
    plan = eta.RunPlan.for_run(spec.samplers, spec.steps, truth=truth, stages=stages)
    log(f"recording the reference (diffusers) on {ckpt}, in a process of its own")
    rec, stats = record_isolated(spec, ckpt, Path(out_dir) / "recording", truth=truth,
                                 modules=modules, quiet=quiet, run_units=plan.total)
    eta.start(eta.RunClock(plan.total, done=plan.reference + plan.truth,
                           elapsed=stats["seconds"]))
    log(f"reference: done in {stats['seconds']} s, peak RSS "
        f"{stats['peak_rss_bytes'] / 2**30:.2f} GiB{eta.summary()}")
    try:
        return check(rec, out_dir, policy=policy, port_spec=port_spec, checkpoint=str(ckpt),
                     stages=stages, fail_fast=fail_fast, junit_xml=junit_xml, log=log,
                     command=command, locate=locate, reference_process=stats,
                     waivers=waivers, rename=rename)
    finally:
        eta.start(None)


def reference_device(rec: Recording) -> str:
    """The device the golden's reference ran on (cpu, cuda, ...), from its versions."""
    return str(rec.meta.get("reference", {}).get("device", "cpu")).split(":")[0].lower()


def command_line() -> str:
    """The command as the user typed it (program name and quoted arguments)."""
    import shlex
    import sys

    return " ".join([Path(sys.argv[0]).name] + [shlex.quote(a) for a in sys.argv[1:]])


def _spec_dict(spec: RunSpec) -> Dict:
    from dataclasses import asdict

    return asdict(spec)
