"""`sdxl-bench`: port and reference side by side, one fresh process per measurement.

    sdxl-bench --preset tiny --out bench-out
    sdxl-bench --preset sdxl-base --height 256 --width 256 --components unet
    sdxl-bench compare BASELINE.json CURRENT.json --fail-over 10%

For each component (text, unet, vae, pipeline) and side (each port mode, the reference) it
spawns `python -m benchmarks.measure`, one at a time (never two full-size models in memory at
once), then writes `results.json` (pytest-benchmark format + ratios), `results.md` and
`ratios.png` under `--out`. Exit status: 0, 1 when a measurement failed, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from sdxl_common.cli import ArgumentParser, add_global_options, add_version, run_command
from sdxl_common.dtypes import DTYPES
from sdxl_common.errors import InputError
from sdxl_common.validate import check_output_dir

from .flops import COMPONENTS
from .workloads import PORT_MODES, REFERENCE_MODES, Spec, check_reference_device

PRESET_NAMES = ("tiny", "small", "sdxl-base")  # sdxl_ms.config.PRESETS, without importing MindSpore
PROJECT_ROOT = Path(__file__).resolve().parents[1]
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class UsageError(InputError):
    """A bad argument: one line on stderr, exit status 2."""


class MeasureError(RuntimeError):
    pass


def _csv(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="sdxl-bench",
        usage="%(prog)s [options]\n       %(prog)s compare BASELINE.json CURRENT.json "
              "[--fail-over PCT] [--sides SIDES]",
        description="Latency and memory of the MindSpore port against the diffusers reference.",
        epilog="commands:\n  compare     gate a run against a baseline: exit 1 when a gated "
               "side got slower or bigger\n              than the threshold (sdxl-bench compare "
               "--help)\n\nexit codes: 0 done, 1 a measurement failed (compare: a "
               "regression), 2 bad input,\n3 internal error, 130 interrupted",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version(p)
    add_global_options(p)
    p.add_argument("--preset", choices=PRESET_NAMES, default=None,
                   help="model size (default tiny, or the --checkpoint's)")
    p.add_argument("--height", type=int, default=None, help="image height (default: preset's)")
    p.add_argument("--width", type=int, default=None, help="image width (default: preset's)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--components", default=",".join(COMPONENTS),
                   help=f"comma-separated subset of {','.join(COMPONENTS)} (default: all)")
    p.add_argument("--steps", type=int, default=4, help="sampling steps of the pipeline component")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before the rounds")
    p.add_argument("--rounds", type=int, default=5, help="timed calls per measurement")
    p.add_argument("--repeats", type=int, default=1,
                   help="passes over all measurements, interleaved (port, reference, port, "
                        "...); samples are pooled, so a machine whose speed drifts during the "
                        "run biases neither side")
    p.add_argument("--checkpoint", default=None,
                   help="sgm file or diffusers folder (default: the cached seeded checkpoint of "
                        "tiny; random weights for sdxl-base, no 14 GB file)")
    p.add_argument("--random-weights", action="store_true",
                   help="seeded random weights without a checkpoint, for any preset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port-modes", default="pynative",
                   help=f"comma-separated port execution modes (offered: {','.join(PORT_MODES)})")
    p.add_argument("--port-device", default=None,
                   help="MindSpore device target for the port (default: MindSpore's, CPU here)")
    p.add_argument("--reference-device", default="cpu", help="torch device: cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for both frameworks (default: each framework's own); "
                        "on a shared machine 1 avoids OpenMP spin-wait collapse")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="give up on one measurement after S seconds")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder")
    return p


# ---- planning -------------------------------------------------------------------------------

def resolve(args: argparse.Namespace) -> Dict:
    """Validate the arguments and settle preset, size and weights; raises UsageError."""
    requested = _csv(args.components)
    unknown = [c for c in requested if c not in COMPONENTS]
    components = [c for c in COMPONENTS if c in requested]
    if unknown or not components:
        raise UsageError(f"unknown component(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(COMPONENTS)}")
    port_modes = _csv(args.port_modes)
    missing = [m for m in port_modes if m not in PORT_MODES]
    if missing or not port_modes:
        raise UsageError(f"unknown port mode {', '.join(missing) or '(none given)'}; "
                         f"choose from {', '.join(PORT_MODES)}")
    for name in ("rounds", "steps", "repeats"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1")
    if args.warmup < 0:
        raise UsageError("--warmup must be >= 0")
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads must be >= 1")
    if args.checkpoint and args.random_weights:
        raise UsageError("--checkpoint and --random-weights exclude each other")
    try:
        check_reference_device(args.reference_device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    from sdxl_ms.config import get_preset

    preset, checkpoint = args.preset or "tiny", None
    if args.checkpoint:
        path = Path(args.checkpoint)
        if not path.exists():
            raise UsageError(f"--checkpoint {path}: no such file or folder")
        found = _checkpoint_preset(path)
        if args.preset and args.preset != found:
            raise UsageError(f"--checkpoint {path} holds the {found} layout, not {args.preset}")
        preset, checkpoint = found, str(path.resolve())
    elif not args.random_weights:
        checkpoint = default_checkpoint(preset, args.seed)
    cfg = get_preset(preset)
    height = args.height or cfg.default_size
    width = args.width or cfg.default_size
    factor = cfg.vae.downsample_factor
    if height <= 0 or width <= 0 or height % factor or width % factor:
        raise UsageError(f"--height/--width must be positive multiples of {factor}, "
                         f"got {height}x{width}")
    return {"components": components, "port_modes": port_modes, "preset": preset,
            "height": height, "width": width, "checkpoint": checkpoint}


def default_checkpoint(preset: str, seed: int) -> Optional[str]:
    """What a measurement loads without --checkpoint: tiny's cached seeded checkpoint (small
    on disk, and both sides read the same file), None (seeded random weights built in memory)
    for the larger presets, whose checkpoint files would be gigabytes."""
    if preset != "tiny":
        return None
    from sdxl_ms.weights.synthetic import cached_checkpoint

    return str(cached_checkpoint("tiny", seed))


def _checkpoint_preset(path: Path) -> str:
    from sdxl_ms.weights.checkpoint import open_checkpoint
    from sdxl_ms.weights.loader import infer_preset

    try:
        return infer_preset(open_checkpoint(path)).name
    except Exception as exc:  # a layout error names what differs; keep it to one line
        raise UsageError(f"--checkpoint {path}: {str(exc).splitlines()[0]}") from None


def plan(args: argparse.Namespace, settled: Dict) -> List[Spec]:
    """One Spec per (component, side, mode), port modes first, in component order."""
    common = dict(preset=settled["preset"], height=settled["height"], width=settled["width"],
                  dtype=args.dtype, steps=args.steps, warmup=args.warmup, rounds=args.rounds,
                  checkpoint=settled["checkpoint"], seed=args.seed, threads=args.threads)
    specs = []
    for component in settled["components"]:
        for mode in settled["port_modes"]:
            specs.append(Spec(component, "port", mode, device=args.port_device, **common))
        for mode in REFERENCE_MODES:
            specs.append(Spec(component, "reference", mode, device=args.reference_device, **common))
    return specs


# ---- measuring --------------------------------------------------------------------------------

def measure_in_subprocess(spec: Spec, timeout: Optional[float] = None) -> Dict:
    """Run `python -m benchmarks.measure` for `spec` and return its record."""
    return run_spec_in_subprocess("benchmarks.measure", spec, timeout)


def run_spec_in_subprocess(module: str, spec: Spec, timeout: Optional[float] = None) -> Dict:
    """Run `python -m <module> --spec <spec as JSON> --result FILE` in a fresh process (one
    framework, its own peak RSS) and return the JSON it wrote; a failure raises MeasureError
    with the child's `measurement failed: ...` line, else its last stderr line."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    if spec.threads:
        env.update({k: str(spec.threads) for k in THREAD_ENV})
    with tempfile.TemporaryDirectory(prefix="sdxl-bench-") as tmp:
        result = Path(tmp) / "measurement.json"
        cmd = [sys.executable, "-m", module, "--spec", spec.to_json(), "--result", str(result)]
        try:
            proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, errors="replace", timeout=timeout)
        except subprocess.TimeoutExpired:
            raise MeasureError(f"timed out after {timeout:g} s") from None
        if proc.returncode != 0 or not result.is_file():
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            last = next((ln for ln in reversed(lines) if ln.startswith("measurement failed")),
                        lines[-1] if lines else f"exit status {proc.returncode}")
            raise MeasureError(last.removeprefix("measurement failed: "))
        return json.loads(result.read_text())


def _load_average() -> Optional[float]:
    """The 1-minute load average: a busy shared machine explains odd absolute figures."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _log(msg: str) -> None:
    from sdxl_common import progress

    if progress.enabled():  # --quiet silences the progress lines
        print(msg, file=sys.stderr, flush=True)


def merge_passes(records: Sequence[Dict]) -> Dict:
    """One record from the same spec measured in several passes: samples pooled (the median
    is over all of them), memory the worst pass's, one-off costs the median pass's, and each
    pass's median kept so drift between passes stays visible."""
    if len(records) == 1:
        return records[0]
    merged = dict(records[0])
    merged["samples_s"] = [s for r in records for s in r["samples_s"]]
    merged["warmup_s"] = [s for r in records for s in r["warmup_s"]]
    merged["pass_medians_s"] = [statistics.median(r["samples_s"]) for r in records]
    for key in ("baseline_rss_bytes", "loaded_rss_bytes", "peak_rss_bytes", "device_peak_bytes"):
        values = [r[key] for r in records if r.get(key) is not None]
        merged[key] = max(values) if values else None
    for key in ("first_call_s", "compile_s", "load_s"):
        values = [r[key] for r in records if r.get(key) is not None]
        merged[key] = statistics.median(values) if values else None
    return merged


def run(args: argparse.Namespace, measure: Optional[Callable[[Spec, Optional[float]], Dict]] = None) -> int:
    """Plan, measure one at a time, write the three outputs. `measure` is injectable for tests."""
    from .report import build_results, fmt_bytes, fmt_seconds, render_markdown, write_outputs

    settled = resolve(args)
    specs = plan(args, settled)
    if measure is None and any(s.side == "reference" for s in specs):
        from parity.reference import require_reference

        require_reference("sdxl-bench's reference measurements")
    check_output_dir(args.out, "output folder")
    measure = measure or measure_in_subprocess
    if settled["checkpoint"] and any(s.side == "reference" for s in specs):
        from parity.reference import diffusers_folder_for  # convert an sgm file once, up front

        diffusers_folder_for(Path(settled["checkpoint"]))
    # each spec's records, one per pass; None once it failed (not retried in later passes)
    passes: List[Optional[List[Dict]]] = [[] for _ in specs]
    failures = []
    load_start = _load_average()
    total, step = len(specs) * args.repeats, 0
    for _ in range(args.repeats):
        for i, spec in enumerate(specs):
            step += 1
            if passes[i] is None:
                continue
            _log(f"[{step}/{total}] {spec.component:8s} {spec.side:9s} ({spec.mode}) ...")
            try:
                record = measure(spec, args.timeout)
            except MeasureError as exc:
                failures.append({"component": spec.component, "side": spec.side,
                                 "mode": spec.mode, "error": str(exc)})
                _log(f"      FAILED: {exc}")
                passes[i] = None
                continue
            passes[i].append(record)
            _log(f"      median {fmt_seconds(statistics.median(record['samples_s']))}, "
                 f"peak RSS {fmt_bytes(record['peak_rss_bytes'])}")
    records = [merge_passes(done) for done in passes if done]
    run_info = {"preset": settled["preset"], "height": settled["height"],
                "width": settled["width"], "dtype": args.dtype, "steps": args.steps,
                "warmup": args.warmup, "rounds": args.rounds, "repeats": args.repeats,
                "threads": args.threads,
                "components": settled["components"], "port_modes": settled["port_modes"],
                "reference_device": args.reference_device, "port_device": args.port_device,
                "checkpoint": settled["checkpoint"],
                "weights": specs[0].weights_note() if specs else None,
                "load_average": [load_start, _load_average()],
                "command": "sdxl-bench " + " ".join(getattr(args, "argv", []) or [])}
    results = build_results(records, run_info, failures)
    paths = write_outputs(results, args.out)
    print(render_markdown(results).split("\n<details>")[0].rstrip())
    print(f"\nwrote {paths['json']}, {paths['md']}, {paths['png']}")
    return 1 if failures else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        from .compare import main as compare_main

        return compare_main(argv[1:])
    args = build_parser().parse_args(argv)
    args.argv = argv
    return run_command("sdxl-bench", run, args)


if __name__ == "__main__":
    sys.exit(main())
