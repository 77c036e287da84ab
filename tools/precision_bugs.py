"""Measure the float16 precision-bug table (docs/precision-at-real-widths.md).

For each seed it records a float16 golden of --preset with per-module truths (`record --modules
--truth`), then checks the faithful port and the port with each bug of `tests/fp16_bugs.py`
injected, and prints, per bug, the verdict, the first failure and the worst truth ratio of each
module kind per stage; every module's ratio goes to --out as JSON, for the table's margins.

    python tools/precision_bugs.py --preset small --seeds 0,1,2,3 --policy small --out DIR

A seed's recording in --out is reused, so the bugs can be judged again under another policy.
"""
from __future__ import annotations

import argparse
import importlib.util
import tempfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("conditioner", "unet", "decode")


def load_fp16_bugs():
    """tests/fp16_bugs.py, the float16 bugs the tools inject (the tests import it as a sibling)."""
    spec = importlib.util.spec_from_file_location("fp16_bugs", REPO / "tests" / "fp16_bugs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _module_kinds(rec, port, stage: str) -> dict:
    """`module/<port name>` -> kind of every module the port pairs with the capture, and of
    every attention core it has a row for."""
    from parity.locate import PortRun
    from parity.module_capture import CaptureIndex, CaptureReader
    from parity.module_pairs import core_pair

    index_dict, path = rec.modules[stage]
    reader = CaptureReader(path, CaptureIndex.from_dict(index_dict))
    try:
        run = PortRun(port, reader, rec)
        rows = list(run.paired.values()) + [core_pair(run.paired[j]) for j in run.cores]
        return {f"module/{p.module}": p.kind for p in rows}
    finally:
        reader.close()


def _stage_truth_ratios(report, stage: str) -> list:
    """The truth ratios of a stage's own tensors (not its `module/` rows)."""
    return [t.metrics.truth_ratio for t in report.stages[stage].tensors
            if not t.name.startswith("module/")
            and getattr(t.metrics, "truth_ratio", None) is not None]


def _worst_by_kind(report, kinds, stage: str) -> str:
    worst = defaultdict(float)
    for t in report.stages[stage].tensors:
        if t.name in kinds and t.metrics.truth_ratio is not None:
            worst[kinds[t.name]] = max(worst[kinds[t.name]], t.metrics.truth_ratio)
    stage_ratios = _stage_truth_ratios(report, stage)
    top = sorted(worst.items(), key=lambda kv: -kv[1])[:4]
    modules = ", ".join(f"{k} {v:.2f}" for k, v in top)
    tensors = f"stage tensors <= {max(stage_ratios):.2f}" if stage_ratios else "no stage truth"
    return f"{tensors}; worst modules: {modules}"


def _module_ratios_json(report, kinds) -> str:
    """Every module's truth ratio and kind, per stage: what the table is computed from."""
    import json

    rows = {stage: [{"module": t.name, "kind": kinds[stage][t.name],
                     "truth_ratio": t.metrics.truth_ratio, "verdict": t.verdict.value}
                    for t in report.stages[stage].tensors
                    if t.name in kinds[stage] and t.metrics.truth_ratio is not None]
            for stage in STAGES if stage in report.stages}
    stage_ratios = {stage: max(_stage_truth_ratios(report, stage), default=None)
                    for stage in STAGES if stage in report.stages}
    return json.dumps({"headline": report.headline(), "verdict": report.verdict.value,
                       "stage_truth_ratio": stage_ratios, "modules": rows}, indent=1)


# the module kinds each bug lives in
BUG_KINDS = {"softmax": ("CLIPAttentionCore", "CrossAttentionCore", "CLIPAttention",
                         "MultiheadAttention", "CrossAttention"),
             "groupnorm": ("GroupNorm",), "timestep": ("SinusoidalTimesteps",),
             "vae": ("Decoder",)}


def summary_table(out: Path, seeds, bugs) -> str:
    """Per bug: verdicts over seeds, and per module kind it lives in the faithful port's
    largest truth ratio over seeds against the bug's smallest worst-module ratio: the margin."""
    import json

    def worst(seed, bug):
        d = json.loads((out / f"seed{seed}-{bug}.json").read_text())
        ratios = defaultdict(float)
        for rows in d["modules"].values():
            for r in rows:
                ratios[r["kind"]] = max(ratios[r["kind"]], r["truth_ratio"])
        return d, ratios

    faithful = [worst(s, "none") for s in seeds]
    lines = ["| bug | verdicts over seeds | module kind | faithful largest | bug smallest "
             "| margin |", "|---|---|---|---:|---:|---:|"]
    for bug in bugs:
        runs = [worst(s, bug) for s in seeds]
        verdicts = ", ".join(sorted({d["verdict"] for d, _ in runs}))
        for kind in BUG_KINDS.get(bug, ()) if bug != "none" else ():
            best = max(r[kind] for _, r in faithful)
            low = min(r[kind] for _, r in runs)
            lines.append(f"| {bug} | {verdicts} | {kind} | {best:.3g} | {low:.3g} "
                         f"| {low / best:.2f}x |")
        if bug == "none":
            top = max(((k, max(r[k] for _, r in faithful)) for k in faithful[0][1]),
                      key=lambda kv: kv[1])
            lines.append(f"| none | {verdicts} | (largest: {top[0]}) | {top[1]:.3g} | - | - |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--bugs", default="none,softmax,groupnorm,timestep,vae")
    parser.add_argument("--out", default=None)
    parser.add_argument("--policy", default=None,
                        help="policy name or TOML that judges (default: the packaged default)")
    args = parser.parse_args()

    from parity.policy import load_policy
    from parity.reference_process import record_to_folder
    from parity.recording import Recording, RunSpec, resolve_checkpoint
    from parity.runner import check
    from sdxl_ms import load_pipeline

    bugs = load_fp16_bugs()
    policy = load_policy(args.policy)
    out = Path(args.out or tempfile.mkdtemp(prefix="precision-bugs-"))
    for seed in (int(s) for s in args.seeds.split(",")):
        spec = RunSpec(preset=args.preset, dtype="float16", samplers=("euler",), steps=2,
                       seed=seed)
        ckpt = resolve_checkpoint(spec)
        folder = out / f"seed{seed}"
        if not (folder / "manifest.json").exists():
            record_to_folder(spec, ckpt, folder, truth=True, modules=True)
        rec, port = Recording.load(folder), load_pipeline(ckpt, "float16")
        kinds = {stage: _module_kinds(rec, port, stage) for stage in STAGES}
        for bug in args.bugs.split(","):
            undo = []
            if bug != "none":
                bugs.inject(bug, lambda owner, name, value: (
                    undo.append((owner, name, getattr(owner, name))), setattr(owner, name, value)))
            try:
                report = check(rec, out / f"seed{seed}-{bug}", port=port, stages=STAGES,
                               policy=policy)
            finally:
                for owner, name, value in reversed(undo):
                    setattr(owner, name, value)
            print(f"seed {seed} {bug:9s} {report.headline()}", flush=True)
            (out / f"seed{seed}-{bug}.json").write_text(_module_ratios_json(report, kinds))
            for stage in STAGES:
                print(f"    {stage:11s} {_worst_by_kind(report, kinds[stage], stage)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    print(summary_table(out, seeds, args.bugs.split(",")))


if __name__ == "__main__":
    main()
