"""`sdxl-parity`: the parity harness's command line.

Exit codes: 0 pass, 1 parity failure, 2 bad input or usage (one line on stderr).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from sdxl_ms.config import PRESETS


def cmd_make_checkpoint(args) -> int:
    from sdxl_ms.config import get_preset
    from sdxl_ms.weights.synthetic import make_checkpoint

    out = make_checkpoint(get_preset(args.preset), args.seed, Path(args.out), args.format,
                          args.dtype, overwrite=args.force)
    print(f"wrote {args.format} checkpoint ({args.preset}, seed {args.seed}) to {out}")
    return 0


def _spec(args):
    from .recording import DEFAULT_PROMPT, RunSpec

    samplers = tuple(s for part in (args.sampler or ["euler,euler_a"]) for s in part.split(",") if s)
    return RunSpec(preset=args.preset, checkpoint=args.checkpoint, checkpoint_seed=args.checkpoint_seed,
                   prompt=args.prompt or DEFAULT_PROMPT, negative_prompt=args.negative_prompt,
                   seed=args.seed, samplers=samplers, schedule=args.schedule, steps=args.steps,
                   guidance=args.guidance, height=args.height, width=args.width, dtype=args.dtype)


def _validate_spec(spec) -> None:
    from sdxl_ms.config import get_preset
    from sdxl_ms.pipeline import check_generation_args
    from sdxl_ms.sampling import DIFFUSERS_SCHEDULERS, SAMPLERS
    from sdxl_ms.sampling.discretization import SCHEDULES

    get_preset(spec.preset)
    for s in spec.samplers:
        if s not in SAMPLERS:
            raise ValueError(f"unknown sampler {s!r}; choose from {', '.join(SAMPLERS)}")
        if s not in DIFFUSERS_SCHEDULERS:
            raise ValueError(f"sampler {s!r} has no diffusers counterpart to compare with; "
                             f"choose from {', '.join(DIFFUSERS_SCHEDULERS)}")
    if spec.schedule not in SCHEDULES or spec.schedule == "sgm":
        raise ValueError(f"schedule {spec.schedule!r} cannot be compared with diffusers; choose "
                         f"from {', '.join(s for s in SCHEDULES if s != 'sgm')}")
    size = 8
    check_generation_args(spec.height or size, spec.width or size, spec.steps, "np")
    if spec.checkpoint and not Path(spec.checkpoint).exists():
        raise FileNotFoundError(f"checkpoint not found: {spec.checkpoint}")


def _log(args):
    return (lambda s: None) if args.quiet else (lambda s: print(f"[sdxl-parity] {s}", file=sys.stderr))


def _finish(report, out: Path) -> int:
    from .reports.markdown import summary_table

    print(report.headline())
    print(summary_table(report))
    print(f"report: {out / 'index.html'}  ({out / 'report.json'}, {out / 'report.md'})")
    return 0 if report.ok else 1


def cmd_run(args) -> int:
    from .policy import load_policy
    from .runner import run

    spec = _spec(args)
    _validate_spec(spec)
    policy = load_policy(args.policy)
    out = Path(args.out)
    report = run(spec, out, policy=policy, stages=_stages(args), fail_fast=args.fail_fast,
                 junit_xml=args.junit_xml and Path(args.junit_xml), log=_log(args))
    return _finish(report, out)


def cmd_record(args) -> int:
    from .record import record
    from .runner import resolve_checkpoint

    spec = _spec(args)
    _validate_spec(spec)
    rec = record(spec, resolve_checkpoint(spec), progress=lambda w: _log(args)(f"reference: {w}"))
    folder = rec.save(Path(args.out))
    print(f"wrote recording ({', '.join(spec.samplers)}, {spec.steps} steps) to {folder}")
    return 0


def cmd_check(args) -> int:
    from .policy import load_policy
    from .recording import Recording
    from .runner import check

    rec = Recording.load(Path(args.golden))
    if args.checkpoint and not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    out = Path(args.out)
    report = check(rec, out, policy=load_policy(args.policy), checkpoint=args.checkpoint,
                   stages=_stages(args), fail_fast=args.fail_fast,
                   junit_xml=args.junit_xml and Path(args.junit_xml), log=_log(args))
    return _finish(report, out)


def cmd_report(args) -> int:
    from .reports import render_from_json

    folder = Path(args.dir)
    src = folder / "report.json"
    if not src.is_file():
        raise FileNotFoundError(f"no report.json in {folder}")
    render_from_json(src, folder, junit_xml=args.junit_xml and Path(args.junit_xml))
    print(f"re-rendered {folder / 'report.md'} and {folder / 'index.html'}")
    return 0


def _stages(args):
    from .stages import STAGES

    if not args.stages:
        return STAGES
    chosen = tuple(s for s in args.stages.split(",") if s)
    bad = [s for s in chosen if s not in STAGES]
    if bad:
        raise ValueError(f"unknown stage(s) {', '.join(bad)}; choose from {', '.join(STAGES)}")
    return chosen


def _add_run_options(p, spec_options: bool = True) -> None:
    from sdxl_ms.pipeline import DTYPES

    if spec_options:
        p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
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
    p.add_argument("--quiet", action="store_true")


def _add_check_options(p) -> None:
    p.add_argument("--out", default="parity-report", help="report folder (default: ./parity-report)")
    p.add_argument("--policy", default=None, help="tolerance policy TOML (default: the packaged one)")
    p.add_argument("--junit-xml", default=None, help="also write a JUnit XML file for CI")
    p.add_argument("--stages", default=None, help="comma-separated subset of stages")
    p.add_argument("--fail-fast", action="store_true", help="skip the stages after the first failure")


def build_parser() -> argparse.ArgumentParser:
    from sdxl_ms.weights.checkpoint import FORMATS
    from sdxl_ms.weights.synthetic import DTYPES

    p = argparse.ArgumentParser(prog="sdxl-parity",
                                description="Stage-by-stage parity of the MindSpore SDXL port "
                                            "against diffusers")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("make-checkpoint", help="write seeded random weights in a real layout")
    m.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", required=True, help="folder (diffusers) or .safetensors file (sgm)")
    m.add_argument("--format", choices=FORMATS, default="diffusers")
    m.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    m.add_argument("--force", action="store_true", help="replace an existing output")
    m.set_defaults(func=cmd_make_checkpoint)

    r = sub.add_parser("run", help="record the reference and check the port (the embedded "
                                   "default: tiny preset, euler and euler_a)")
    _add_run_options(r)
    _add_check_options(r)
    r.set_defaults(func=cmd_run)

    rec = sub.add_parser("record", help="run the reference and write a recording (needs torch)")
    _add_run_options(rec)
    rec.add_argument("--out", required=True, help="recording folder")
    rec.set_defaults(func=cmd_record)

    c = sub.add_parser("check", help="check the port against a recording (no torch needed)")
    c.add_argument("--golden", required=True, help="recording folder (e.g. fixtures/golden/...)")
    c.add_argument("--checkpoint", default=None,
                   help="checkpoint (default: the one the recording names)")
    _add_run_options(c, spec_options=False)
    _add_check_options(c)
    c.set_defaults(func=cmd_check)

    rp = sub.add_parser("report", help="re-render report.md and index.html from report.json")
    rp.add_argument("dir")
    rp.add_argument("--junit-xml", default=None)
    rp.set_defaults(func=cmd_report)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    from sdxl_ms.weights.safetensors_io import CheckpointError

    from .policy import PolicyError  # noqa: F401  (a ValueError: reported below)
    from .recording import RecordingError  # noqa: F401  (a ValueError)

    args = build_parser().parse_args(["run"] if argv is None and len(sys.argv) == 1 else argv)
    try:
        return args.func(args)
    except (CheckpointError, FileExistsError, ValueError, OSError) as e:
        print(f"sdxl-parity: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
