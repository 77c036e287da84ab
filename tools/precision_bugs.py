"""Measure the float16 precision-bug table behind `[module_truth.float16]` in the default policy.

For each seed it records a tiny float16 golden with per-module truths (`record --modules
--truth`), then checks the faithful port and the port with each bug of `tests/fp16_bugs.py`
injected, and prints, per bug, the verdict, the first failure and the worst truth ratio of each
module kind per stage: the numbers the policy comments cite.

    python tools/precision_bugs.py --seeds 0,1,2,3 --out /tmp/precision-bugs
"""
from __future__ import annotations

import argparse
import importlib.util
import tempfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("conditioner", "unet", "decode")


def _bugs_module():
    spec = importlib.util.spec_from_file_location("fp16_bugs", REPO / "tests" / "fp16_bugs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _worst_by_kind(report, rec, stage: str) -> str:
    kinds = {f"module/{m['module']}": m["kind"] for m in rec.modules[stage][0]["modules"]}
    worst = defaultdict(float)
    for t in report.stages[stage].tensors:
        if t.name in kinds and t.metrics.truth_ratio is not None:
            worst[kinds[t.name]] = max(worst[kinds[t.name]], t.metrics.truth_ratio)
    stage_ratios = [t.metrics.truth_ratio for t in report.stages[stage].tensors
                    if not t.name.startswith("module/")
                    and getattr(t.metrics, "truth_ratio", None) is not None]
    top = sorted(worst.items(), key=lambda kv: -kv[1])[:4]
    modules = ", ".join(f"{k} {v:.2f}" for k, v in top)
    tensors = f"stage tensors <= {max(stage_ratios):.2f}" if stage_ratios else "no stage truth"
    return f"{tensors}; worst modules: {modules}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--bugs", default="none,softmax,groupnorm,timestep,vae")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from parity.reference_process import record_to_folder
    from parity.recording import Recording, RunSpec, resolve_checkpoint
    from parity.runner import check
    from sdxl_ms import load_pipeline

    bugs = _bugs_module()
    out = Path(args.out or tempfile.mkdtemp(prefix="precision-bugs-"))
    for seed in (int(s) for s in args.seeds.split(",")):
        spec = RunSpec(dtype="float16", samplers=("euler",), steps=2, seed=seed)
        ckpt = resolve_checkpoint(spec)
        folder = out / f"seed{seed}"
        if not (folder / "manifest.json").exists():
            record_to_folder(spec, ckpt, folder, truth=True, modules=True)
        rec, port = Recording.load(folder), load_pipeline(ckpt, "float16")
        for bug in args.bugs.split(","):
            undo = []
            if bug != "none":
                bugs.inject(bug, lambda owner, name, value: (
                    undo.append((owner, name, getattr(owner, name))), setattr(owner, name, value)))
            try:
                report = check(rec, out / f"seed{seed}-{bug}", port=port, stages=STAGES)
            finally:
                for owner, name, value in reversed(undo):
                    setattr(owner, name, value)
            print(f"seed {seed} {bug:9s} {report.headline()}")
            for stage in STAGES:
                print(f"    {stage:11s} {_worst_by_kind(report, rec, stage)}")


if __name__ == "__main__":
    main()
