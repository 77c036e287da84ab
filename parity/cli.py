"""`sdxl-parity`: the parity harness's command line.

Exit codes (`sdxl_common.errors`): 0 pass, 1 a stage failed or the port raised in a stage, 2 bad
input or usage (one line on stderr), 3 an internal error of the harness (`--debug` shows the
traceback), 130 interrupted.
"""
from __future__ import annotations

import argparse
import shlex
import os
import sys
from pathlib import Path
from typing import List, Optional

from sdxl_common.cli import (ArgumentParser, add_global_options, add_version, common_options,
                                 run_command)
from sdxl_ms.config import PRESETS
from sdxl_common.errors import EXIT_FAILED, EXIT_OK, InputError
from sdxl_common.validate import (check_choice, check_existing, check_output_dir, check_size,
                                  check_writable_file)


def cmd_make_checkpoint(args) -> int:
    from sdxl_ms.config import get_preset
    from sdxl_ms.weights.synthetic import make_checkpoint

    out = make_checkpoint(get_preset(args.preset), args.seed, Path(args.out), args.format,
                          args.dtype, overwrite=args.force, variant=args.variant)
    print(f"wrote {args.format} checkpoint ({args.preset}, seed {args.seed}) to {out}")
    return EXIT_OK


def _spec(args):
    from .recording import DEFAULT_PROMPT, RunSpec

    samplers = tuple(s for part in (args.sampler or ["euler,euler_a"]) for s in part.split(",") if s)
    return RunSpec(preset=_preset(args), checkpoint=args.checkpoint, checkpoint_seed=args.checkpoint_seed,
                   prompt=args.prompt or DEFAULT_PROMPT, negative_prompt=args.negative_prompt,
                   seed=args.seed, samplers=samplers, schedule=args.schedule, steps=args.steps,
                   guidance=args.guidance, height=args.height, width=args.width, dtype=args.dtype)


def _preset(args) -> str:
    """`--preset`, or with `--checkpoint` the preset whose layout the checkpoint holds (a
    golden records it, and `check` compares it with the port's checkpoint)."""
    if not args.checkpoint:
        return args.preset or "tiny"
    from sdxl_ms.weights.loader import preset_name_of

    found = preset_name_of(check_existing(args.checkpoint, "checkpoint"))
    if found is None:  # a diffusers folder of its own widths: no preset to name
        return args.preset or "tiny"
    if args.preset and args.preset != found:
        raise InputError(f"--preset {args.preset}, but checkpoint {args.checkpoint} holds the "
                         f"{found!r} layout: leave out --preset (it is read from the checkpoint)")
    return found


def _log(args):
    if getattr(args, "quiet", False):
        return lambda s: None
    return lambda s: print(f"[sdxl-parity] {s}", file=sys.stderr)


def _outputs(args) -> Path:
    """Check the report folder and the JUnit path before any work; return the folder."""
    out = check_output_dir(args.out, "report folder")
    if args.junit_xml:
        check_writable_file(args.junit_xml)
    return out


def _command(args) -> str:
    return "sdxl-parity " + shlex.join(args.argv)


def _finish(report, out: Path) -> int:
    from .reports.markdown import summary_table

    print(report.headline())
    print(summary_table(report))
    print(f"report: {out / 'index.html'}  ({out / 'report.json'}, {out / 'report.md'})")
    return EXIT_OK if report.ok else EXIT_FAILED


def _port_spec(args):
    """`--port MODULE:FACTORY`, its module imported and factory found before any work."""
    from .ports import BUILTIN, PortSpec

    spec = PortSpec.parse(args.port or BUILTIN)
    spec.resolve()
    return spec


def _port_backend(args, dtype: str) -> None:
    """`--jit` applied, and a dtype the port's backend cannot compute refused, before any work."""
    from .builtin_port import set_jit
    from .ports import refuse_unsupported_dtype

    if getattr(args, "jit", None):
        set_jit(args.jit)
    refuse_unsupported_dtype(dtype)


def _module_names(args):
    """`--module-names FILE` read and checked before any work (a bad file is exit 2)."""
    if not getattr(args, "module_names", None):
        return None
    from .module_names import load_module_names

    return load_module_names(args.module_names)


def _waivers(args):
    """`--waivers FILE` read and validated before any work (a bad file is exit 2)."""
    if not getattr(args, "waivers", None):
        return None
    from .waivers import load_waivers

    return load_waivers(args.waivers)


def _wants_truth(args, dtype: str) -> bool:
    """The float64 truth: asked for, or by default in reduced precision (where the verdict
    compares the port with the reference's own error)."""
    return args.truth if args.truth is not None else dtype != "float32"


def cmd_run(args) -> int:
    from .policy import load_policy
    from .reference import require_reference
    from .runner import run

    require_reference("sdxl-parity run (it records the reference)")
    spec = _spec(args)
    spec.validate()
    _port_backend(args, spec.dtype)
    port_spec = _port_spec(args)
    policy = load_policy(args.policy)
    waivers = _waivers(args)
    stages = _stages(args)
    policy.check_covers(stages, spec.dtype)
    out = _outputs(args)
    if args.locate:
        policy.module_bound("default", spec.dtype)  # bounds for locate exist, before any work
    report = run(spec, out, policy=policy, port_spec=port_spec, stages=stages,
                 fail_fast=args.fail_fast,
                 junit_xml=args.junit_xml and Path(args.junit_xml), log=_log(args),
                 command=_command(args), locate=args.locate,
                 truth=_wants_truth(args, spec.dtype), modules=args.modules, quiet=args.quiet,
                 waivers=waivers, rename=_module_names(args))
    return _finish(report, out)


def cmd_record(args) -> int:
    from .reference_process import record_to_folder
    from .recording import check_recording_target
    from .reference import require_reference
    from .recording import resolve_checkpoint

    require_reference("sdxl-parity record")
    spec = _spec(args)
    spec.validate()
    out = check_recording_target(check_output_dir(args.out, "recording folder"))
    log = _log(args)
    truth = _wants_truth(args, spec.dtype)
    rec = record_to_folder(spec, resolve_checkpoint(spec), out, truth=truth,
                           modules=args.modules, sampler=args.locate_sampler, step=args.step,
                           log=lambda w: log(f"reference: {w}"))
    what = "".join(w for w, on in ((", float64 truth", truth),
                                   (", per-module tensors", args.modules)) if on)
    print(f"wrote recording ({', '.join(spec.samplers)}, {spec.steps} steps{what}) to {rec.path}")
    return EXIT_OK


def _check_golden_matches(rec, args) -> None:
    """`--preset`, `--dtype` and the checkpoint's layout agree with what the golden recorded."""
    recorded = rec.spec
    for field in ("preset", "dtype"):
        wanted = getattr(args, field)
        if wanted is not None and wanted != getattr(recorded, field):
            raise InputError(f"golden {rec.path} was recorded with {field} "
                             f"{getattr(recorded, field)!r}, not {wanted!r}: record a golden "
                             f"with --{field} {wanted}")
    if args.checkpoint:
        from sdxl_ms.weights.checkpoint import open_checkpoint
        from sdxl_ms.weights.loader import infer_preset

        found = infer_preset(open_checkpoint(check_existing(args.checkpoint, "checkpoint"))).name
        if found != recorded.preset:
            raise InputError(f"golden {rec.path} was recorded with preset {recorded.preset!r}, "
                             f"but checkpoint {args.checkpoint} holds the {found!r} layout")


def cmd_check(args) -> int:
    from .policy import load_policy
    from .recording import Recording
    from .runner import check

    rec = Recording.load(check_existing(args.golden, "golden recording"))
    _check_golden_matches(rec, args)
    _port_backend(args, rec.spec.dtype)
    port_spec = _port_spec(args)
    policy = load_policy(args.policy)
    waivers = _waivers(args)
    stages = _stages(args)
    policy.check_covers(stages, rec.spec.dtype)
    out = _outputs(args)
    if args.locate:
        policy.module_bound("default", rec.spec.dtype)
    report = check(rec, out, policy=policy, port_spec=port_spec, checkpoint=args.checkpoint,
                   stages=stages, fail_fast=args.fail_fast,
                   junit_xml=args.junit_xml and Path(args.junit_xml), log=_log(args),
                   command=_command(args), locate=args.locate, waivers=waivers,
                   rename=_module_names(args))
    return _finish(report, out)


def _integers(text: str, option: str) -> List[int]:
    """A comma-separated list of integers, or bad input naming `option`."""
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise InputError(f"{option} must be comma-separated integers, got {text!r}") from None


def cmd_calibrate(args) -> int:
    import json

    from .calibrate import DEFAULT_PROMPTS, calibrate, module_summary_rows, summary_rows
    from .policy import load_policy
    from .reference import require_reference
    from .reports.markdown import markdown_table

    require_reference("sdxl-parity calibrate (it records the reference and its truth)")
    dtypes = [d for d in args.dtype.split(",") if d]
    from sdxl_common.dtypes import DTYPES

    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        raise InputError(f"--dtype: unknown dtype(s) {', '.join(bad) or '(none)'}; choose from "
                         f"{', '.join(sorted(DTYPES))}")
    for d in dtypes:
        _port_backend(args, d)
    seeds = _integers(args.seeds, "--seeds")
    prompts = DEFAULT_PROMPTS
    if args.prompts:
        path = check_existing(args.prompts, "prompt file")
        prompts = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
        if not prompts:
            raise InputError(f"prompt file {path} holds no prompt")
    for name in args.preset.split(","):
        check_choice(name, tuple(PRESETS), "preset")
    sizes = [None]
    if args.size:
        sizes = _integers(args.size, "--size")
        for size in sizes:
            check_size(size, size)
    samplers = tuple(s for s in args.sampler.split(",") if s)
    from .recording import RunSpec

    for name in args.preset.split(","):  # bad samplers or steps fail before any work
        RunSpec(preset=name, samplers=samplers, steps=args.steps).validate()
    load_policy(args.base_policy)  # a bad base fails before any work
    floors = None
    if args.floors:
        from .calibrate import combine_floors

        found = []
        for name in args.floors.split(","):
            path = check_existing(name, "floors file")
            try:
                found.append(json.loads(path.read_text()))
                found[-1]["dtypes"]
            except (ValueError, KeyError, TypeError):
                raise InputError(f"{path} is not a floors.json written by sdxl-parity "
                                 "calibrate") from None
        floors = combine_floors(found)
    out = check_output_dir(args.out, "calibration folder")
    paths = calibrate(out, dtypes, seeds, prompts, base_policy=args.base_policy,
                      preset=args.preset, log=_log(args), floors=floors, name=args.name,
                      modules=args.modules, sizes=sizes, samplers=samplers, steps=args.steps)
    floors = json.loads(paths["floors"].read_text())
    print("\n".join(markdown_table(["dtype", "stage", "port vs ref (rel_l2)", "ref vs truth",
                            "port vs truth", "truth_ratio"], summary_rows(floors))))
    if floors.get("modules"):
        print()
        print("\n".join(markdown_table(["dtype", "module kind", "own rel_l2", "truth_ratio",
                                        "largest at"], module_summary_rows(floors))))
    print(f"wrote {paths['floors']} and {paths['policy']} "
          f"(use it with --policy {paths['policy']})")
    return EXIT_OK


def cmd_locate(args) -> int:
    from .locate import LOCATABLE_STAGES, locate, needs_live_capture
    from .policy import load_policy
    from .ports import load_port
    from .recording import Recording, resolve_checkpoint
    from .reports.locate_report import write_locate_reports
    from .runner import compile_dumps_in

    rec = Recording.load(check_existing(args.golden, "golden recording"))
    _check_golden_matches(rec, args)
    _port_backend(args, rec.spec.dtype)
    port_spec = _port_spec(args)
    rename = _module_names(args)
    policy = load_policy(args.policy)
    policy.module_bound("default", rec.spec.dtype)
    stages = [args.stage] if args.stage else list(LOCATABLE_STAGES)
    live = [s for s in stages if needs_live_capture(rec, s, args.sampler, args.step)]
    if live:
        from .reference import require_reference

        require_reference(f"locate in {', '.join(live)} (the recording has no module "
                          "captures for it; record it with --modules to locate without torch)")
        rec.weights()  # the reference runs on the golden's own weights: here, and unchanged
    out = check_output_dir(args.out, "report folder")
    ckpt = resolve_checkpoint(rec.spec, args.checkpoint,
                              rec.meta.get("checkpoint_generator_version"))
    log = _log(args)
    with compile_dumps_in(out):
        log(f"loading the port ({port_spec}) from {ckpt}")
        port = load_port(port_spec, ckpt, rec.spec.dtype)
        from .port_cells import has_cells

        if not has_cells(port):
            raise InputError(f"--port {port_spec}: {type(port).__name__} offers no cells() "
                             "(parity/contract.py), so locate cannot run its modules; "
                             "`sdxl-parity check --port` gives its stage verdicts")
        found = [locate(rec, port, policy, stage, sampler=args.sampler, step=args.step,
                        log=log, rename=rename).to_dict() for stage in stages]
    headline = write_locate_reports(found, out, meta={"command": _command(args),
                                                      "recording": str(rec.path),
                                                      "checkpoint": str(ckpt),
                                                      "port": str(port_spec),
                                                      "policy": policy.name,
                                                      "dtype": rec.spec.dtype})
    print(headline)
    print(f"report: {out / 'index.html'}  ({out / 'report.json'}, {out / 'report.md'})")
    named = any(loc["first_divergent_module"] or loc.get("divergence") for loc in found)
    unpaired = headline.startswith("UNPAIRED")  # nothing compared is no pass
    return EXIT_FAILED if named or unpaired else EXIT_OK


def cmd_diff_weights(args) -> int:
    from .diff_weights import diff_weights, terminal_table, write_reports

    reference = check_existing(args.reference, "reference checkpoint")
    port = check_existing(args.port, "port checkpoint")
    out = check_output_dir(args.out, "report folder") if args.out else None
    from sdxl_ms.weights.checkpoint import open_checkpoint

    for path in (reference, port):
        open_checkpoint(path)  # a format it cannot read is bad input, before any work
    diff = diff_weights(reference, port, log=_log(args))
    print(diff.summary())
    if not diff.ok:
        print(terminal_table(diff))
    if out is not None:
        paths = write_reports(diff, out)
        print(f"report: {paths['md']}  ({paths['json']})")
    return EXIT_OK if diff.ok else EXIT_FAILED


def cmd_sweep(args) -> int:
    from .reference import require_reference
    from .sweep import SweepOptions, load_sweep, run_sweep
    from .sweep.executors import RayExecutor

    if args.executor == "ray":
        RayExecutor.require()
    elif args.address:
        raise InputError("--address names a Ray cluster: use it with --executor ray")
    require_reference("sdxl-parity sweep (it records the reference)")
    sweep = load_sweep(args.sweep)
    waivers = _waivers(args)
    out = check_output_dir(args.out, "sweep folder")
    result = run_sweep(sweep, SweepOptions(out=out, executor=args.executor, address=args.address,
                                           workers=args.workers, max_retries=args.max_retries,
                                           command=_command(args),
                                           waivers=waivers and str(waivers.path.resolve())),
                       log=_log(args))
    print(result.headline)
    print(f"report: {out / 'index.html'}  ({out / 'sweep.json'}, {out / 'sweep.md'}, "
          f"{out / 'junit.xml'})")
    return EXIT_OK if result.ok else EXIT_FAILED


def _count(minimum: int):
    """An argparse type: an integer >= `minimum`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"want an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"want an integer >= {minimum}, got {value}")
        return value

    return parse


def cmd_report(args) -> int:
    from .reports import render_from_json

    folder = Path(args.dir)
    src = folder / "report.json"
    if not src.is_file():
        raise InputError(f"no report.json in {folder}")
    render_from_json(src, folder, junit_xml=args.junit_xml and Path(args.junit_xml))
    print(f"re-rendered {folder / 'report.md'} and {folder / 'index.html'}")
    return EXIT_OK


def _stages(args):
    return stage_selection(args.stages)


def stage_selection(text: Optional[str]):
    """A comma-separated subset of the stages (`--stages`), all of them for None."""
    from .stages import STAGES

    if not text:
        return STAGES
    chosen = tuple(s for s in text.split(",") if s)
    bad = [s for s in chosen if s not in STAGES]
    if bad or not chosen:
        raise InputError(f"unknown stage(s) {', '.join(bad) or '(none given)'} in --stages; "
                         f"valid choices: {', '.join(STAGES)}")
    return chosen


def _add_run_options(p, spec_options: bool = True) -> None:
    from sdxl_common.dtypes import DTYPES

    if spec_options:
        p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help="model layout (default: read from --checkpoint; tiny without one)")
        p.add_argument("--checkpoint", help="diffusers folder or sgm .safetensors "
                                            "(default: the seeded checkpoint of --preset, cached)")
        p.add_argument("--checkpoint-seed", type=int, default=0)
        p.add_argument("--prompt", default=None)
        p.add_argument("--negative-prompt", default=None)
        p.add_argument("--seed", type=int, default=0, help="noise seed")
        p.add_argument("--sampler", action="append",
                       help="sampler(s), repeat or comma-separate (default: euler,euler_a)")
        p.add_argument("--schedule", default="leading")
        p.add_argument("--steps", type=int, default=4)
        p.add_argument("--guidance", type=float, default=5.0)
        p.add_argument("--height", type=int, default=None)
        p.add_argument("--width", type=int, default=None)
        p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
        p.add_argument("--truth", action=argparse.BooleanOptionalAction, default=None,
                       help="also run the reference in float64 on the same inputs, so each "
                            "tensor gets port-vs-truth and reference-vs-truth errors (default: "
                            "on for float16/bfloat16, off for float32)")
        p.add_argument("--modules", action="store_true",
                       help="also record every module's inputs and output (conditioner, one "
                            "UNet call, decode), so `locate` runs without torch; with the truth, "
                            "each module's float64 truth too, and `check` judges every module "
                            "by its truth ratio (the policy's [module_truth.<dtype>]); the "
                            "reference and its float64 twin are then resident together")
    else:  # check: optional expectations on the golden
        p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help="fail unless the golden was recorded with this preset")
        p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                       help="fail unless the golden was recorded with this dtype")


def _add_module_names(p) -> None:
    p.add_argument("--module-names", default=None, metavar="FILE",
                   help="TOML [rename] table of port name prefix = sgm name prefix, for a "
                        "port whose module names differ from sgm's (pairing for --locate and "
                        "module truths; see parity/module_names.py)")


def _add_check_options(p) -> None:
    p.add_argument("--port", default=None, metavar="MODULE:FACTORY",
                   help="the port to check: a factory(checkpoint, dtype) returning an object "
                        "with the stage contract (parity/contract.py); MODULE is importable or "
                        "a .py file (default: the built-in sdxl_ms port)")
    p.add_argument("--out", default="parity-report", help="report folder (default: ./parity-report)")
    p.add_argument("--policy", default=None, help="tolerance policy TOML (default: the packaged one)")
    p.add_argument("--junit-xml", default=None, help="also write a JUnit XML file for CI")
    p.add_argument("--stages", default=None, help="comma-separated subset of stages")
    p.add_argument("--fail-fast", action="store_true",
                   help="skip the stages after the first that fails or errors")
    p.add_argument("--jit", choices=("off", "blocks", "model"), default=None,
                   help="the built-in port's execution mode: PyNative, one graph per block "
                        "structure, or one graph per network (default: SDXL_MS_JIT, else the "
                        "mode with the least estimated time for the preset, size and calls "
                        "from measured costs, float32 only; float16/bfloat16 run PyNative); "
                        "the mode and why are in the report")
    p.add_argument("--waivers", default=None, metavar="FILE",
                   help="known deviations (TOML: stage/tensor/step/module globs, reason, owner, "
                        "expiry, looser bound): a matching failure within its bound is verdict "
                        "'waived' and the run passes; an expired, stale or exceeded waiver "
                        "fails it (see parity/waivers.py)")
    _add_module_names(p)
    p.add_argument("--locate", action="store_true",
                   help="name the first divergent module of the first failing stage "
                        "(conditioner, unet or decode), each port module run on the "
                        "reference's recorded inputs: see `sdxl-parity locate`. Needs a port "
                        "that offers cells() (the built-in one does; others get a one-line "
                        "note and their stage verdicts); without module captures in the "
                        "golden, torch and the golden's own weights")


def build_parser() -> argparse.ArgumentParser:
    from sdxl_ms.weights.checkpoint import FORMATS
    from sdxl_ms.weights.synthetic import DTYPES

    p = ArgumentParser(prog="sdxl-parity",
                       description="Stage-by-stage parity of the MindSpore SDXL port against "
                                   "diffusers. With no arguments: `sdxl-parity run`.",
                       epilog="exit codes: 0 pass, 1 a stage failed or the port raised, 2 bad "
                              "input, 3 internal error, 130 interrupted")
    add_version(p)
    add_global_options(p)
    sub = p.add_subparsers(dest="command", required=True)
    common = [common_options()]

    m = sub.add_parser("make-checkpoint", parents=common,
                       help="write seeded random weights in a real layout")
    m.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", required=True, help="folder (diffusers), .safetensors file (sgm) or "
                                                ".ckpt file (mindspore)")
    m.add_argument("--format", choices=FORMATS, default="diffusers")
    m.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    m.add_argument("--force", action="store_true", help="replace an existing output")
    m.add_argument("--variant", choices=("fp16",), default=None,
                   help="diffusers only: float16 weights in *.fp16.safetensors files, as the "
                        "published SDXL folder's fp16 variant")
    m.set_defaults(func=cmd_make_checkpoint)

    r = sub.add_parser("run", parents=common, help="record the reference and check the port "
                                                   "(the embedded default: tiny preset, euler "
                                                   "and euler_a)")
    _add_run_options(r)
    _add_check_options(r)
    r.set_defaults(func=cmd_run)

    rec = sub.add_parser("record", parents=common,
                         help="run the reference and write a recording (needs torch)")
    _add_run_options(rec)
    rec.add_argument("--out", required=True, help="recording folder")
    rec.add_argument("--locate-sampler", default=None,
                     help="with --modules: the sampler whose UNet call is stored (default: the first)")
    rec.add_argument("--step", type=int, default=None,
                     help="with --modules: the UNet call stored (default: 0)")
    rec.set_defaults(func=cmd_record)

    c = sub.add_parser("check", parents=common,
                       help="check the port against a recording (no torch needed)")
    c.add_argument("--golden", required=True, help="recording folder (e.g. fixtures/golden/...)")
    c.add_argument("--checkpoint", default=None,
                   help="checkpoint (default: the one the recording names)")
    _add_run_options(c, spec_options=False)
    _add_check_options(c)
    c.set_defaults(func=cmd_check)

    ca = sub.add_parser("calibrate", parents=common,
                        help="measure the floors (port vs reference, each vs the float64 "
                             "truth) over seeds and prompts; write floors.json and a policy")
    ca.add_argument("--preset", default="tiny",
                    help=f"preset(s), comma-separated ({', '.join(PRESETS)}); the floors are "
                         "the largest over all (default: tiny)")
    ca.add_argument("--size", default=None,
                    help="square image size(s), comma-separated (default: each preset's own); "
                         "module floors depend on map sizes, so calibrate at the sizes the "
                         "policy will judge")
    ca.add_argument("--modules", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure per-module floors and derive [module.float32] and "
                         "[module_truth.float16] (default: on)")
    ca.add_argument("--dtype", default="float32,float16", help="comma-separated dtypes")
    ca.add_argument("--seeds", default="0,1", help="comma-separated noise seeds")
    ca.add_argument("--sampler", default="euler",
                    help="comma-separated samplers of each case (default: euler); calibrate "
                         "with the samplers and steps the policy will judge")
    ca.add_argument("--steps", type=int, default=2, help="steps of each case (default: 2)")
    ca.add_argument("--prompts", default=None, help="a file, one prompt per line "
                                                    "(default: two built-in prompts)")
    ca.add_argument("--base-policy", default="default",
                    help="policy whose other bounds are kept (default: the packaged one)")
    ca.add_argument("--out", default="calibration", help="folder (default: ./calibration)")
    ca.add_argument("--floors", default=None, metavar="FLOORS[,FLOORS...]",
                    help="derive the policy from floors.json files of earlier runs instead of "
                         "measuring; several (e.g. tiny's and small's) combine into their "
                         "largest floors")
    ca.add_argument("--name", default="calibrated", help="the written policy's name")
    ca.set_defaults(func=cmd_calibrate)

    lo = sub.add_parser("locate", parents=common,
                        help="name the first divergent module: each port module run on the "
                             "reference's recorded inputs (own error) beside the free run "
                             "(accumulated error)")
    lo.add_argument("--golden", required=True, help="recording folder")
    lo.add_argument("--stage", choices=("conditioner", "unet", "decode"), default=None,
                    help="the stage to localise (default: all three)")
    lo.add_argument("--sampler", default=None, help="the sampler of the UNet call "
                                                    "(default: the recording's first)")
    lo.add_argument("--step", type=int, default=None, help="the UNet call (default: 0)")
    lo.add_argument("--checkpoint", default=None,
                    help="checkpoint (default: the one the recording names)")
    lo.add_argument("--policy", default=None, help="policy TOML with [module.<dtype>] bounds")
    lo.add_argument("--out", default="locate-report", help="report folder (default: ./locate-report)")
    lo.add_argument("--port", default=None, metavar="MODULE:FACTORY",
                    help="the port whose modules are run: its factory's object must offer "
                         "cells() (parity/contract.py; default: the built-in sdxl_ms port)")
    _add_module_names(lo)
    _add_run_options(lo, spec_options=False)
    lo.set_defaults(func=cmd_locate)

    sw = sub.add_parser("sweep", parents=common,
                        help="a matrix of parity cases from a sweep file (prompts x seeds x "
                             "samplers x ...), each recorded and checked in worker processes, "
                             "on a local pool or a Ray cluster, with one combined report")
    sw.add_argument("sweep", nargs="?", default=None,
                    help="sweep file (TOML; default: the packaged example, "
                         "parity/sweeps/example.toml)")
    sw.add_argument("--out", default="sweep-report",
                    help="sweep folder: index.html, sweep.json, sweep.md, junit.xml and "
                         "cases/<id>/ (default: ./sweep-report); a rerun skips finished cases")
    sw.add_argument("--executor", choices=("local", "ray"), default="local",
                    help="a local process pool, or Ray tasks (pip install 'sdxl-parity[ray]')")
    sw.add_argument("--address", default=None,
                    help="with --executor ray: the cluster to use (default: start a local one)")
    sw.add_argument("--workers", type=_count(1), default=None,
                    help="cases at once (default: min(cores, memory / a case's estimate))")
    sw.add_argument("--waivers", default=None, metavar="FILE",
                    help="known deviations applied to every case (see `sdxl-parity check`)")
    sw.add_argument("--max-retries", type=_count(0), default=2,
                    help="times a record or check is rerun after its worker died (default: 2)")
    sw.set_defaults(func=cmd_sweep)

    dw = sub.add_parser("diff-weights", parents=common,
                        help="compare two checkpoints tensor by tensor (any formats, aligned "
                             "through the key maps, streamed) and name the transformation "
                             "behind each difference (transposed, flipped, q/k/v order, "
                             "swapped, scaled, copied from another tensor, ...)")
    dw.add_argument("reference", help="the checkpoint the reference runs on")
    dw.add_argument("port", help="the port's checkpoint (e.g. your converter's output)")
    dw.add_argument("--out", default=None, help="also write diff-weights.json and .md here")
    dw.set_defaults(func=cmd_diff_weights)

    rp = sub.add_parser("report", parents=common,
                        help="re-render report.md and index.html from report.json")
    rp.add_argument("dir")
    rp.add_argument("--junit-xml", default=None)
    rp.set_defaults(func=cmd_report)
    return p


def keep_temp_clean() -> None:
    """torch makes `$TMPDIR/torchinductor_<user>` when it is imported, even when nothing is
    compiled; a command's only trace in the temp folder. Its cache goes to ours instead,
    unless the user chose a place."""
    from sdxl_common.paths import cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "torchinductor"))


def main(argv: Optional[List[str]] = None) -> int:
    if argv is None:
        argv = sys.argv[1:] or ["run"]
    keep_temp_clean()
    args = build_parser().parse_args(argv)
    args.argv = list(argv)
    return run_command("sdxl-parity", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
