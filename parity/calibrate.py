"""`sdxl-parity calibrate`: the measured floors behind the policy's bounds.

For every dtype, seed and prompt it records the reference (with its float64 truth) and checks
the faithful port, then keeps, per stage and dtype, the largest port-vs-reference rel L2 and,
where there is a truth, the largest reference-vs-truth, port-vs-truth and truth ratio. It
writes them to `floors.json` and derives a policy from a base policy file: the base's lines
are kept, and the bounds that calibration owns are rewritten with their measured source in
the comment:
  - float32 `rel_l2` warn of the teacher-forced stages (conditioner, unet, sampler, decode):
    1.5x the floor, rounded up to 1, 1.5, 2, 3, 5 or 7 in its decade; fail stays the base's target unless
    2x the floor exceeds it (then it moves up, and says so);
  - reduced-precision `truth_ratio`: warn 1.25x, fail 1.5x the largest ratio of the faithful
    port, at least 1.25 and 1.5 (`K_WARN`, `K_FAIL`; *measured* on tiny fp16: faithful ratios
    0.97-1.36 over runs, so 1.5x keeps a run-to-run margin; the fp16 timestep-embedding bug
    1.9-2.05, the un-upcast VAE 33.5).
"""
from __future__ import annotations

import json
import math
import re
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

from sdxl_common.atomic import atomic_write_text

K_WARN, K_FAIL = 1.25, 1.5
WARN_FACTOR, FAIL_FACTOR = 1.5, 2.0
CALIBRATED_RELL2_STAGES = ("conditioner", "unet", "sampler", "decode")
DEFAULT_PROMPTS = ("a lighthouse on a rocky coast at dusk, volumetric light, highly detailed",
                   "a bowl of ramen on a wooden table, studio photograph")


def nice_up(x: float) -> float:
    """The smallest 1, 1.5, 2, 3, 5 or 7 x 10^k at or above x."""
    if x <= 0:
        return 0.0
    exp = math.floor(math.log10(x))
    for m in (1, 1.5, 2, 3, 5, 7, 10):
        v = m * 10 ** exp
        if v >= x * (1 - 1e-12):
            return float(f"{v:.2g}")
    return float(f"{10 ** (exp + 1):.2g}")


def measure(dtypes: Sequence[str], seeds: Sequence[int], prompts: Sequence[str], *,
            preset: str = "tiny", steps: int = 2, samplers: Sequence[str] = ("euler",),
            log: Callable[[str], None] = lambda s: None) -> Dict:
    """Floors per dtype and stage over every (seed, prompt), from record + truth + check."""
    from .policy import load_policy
    from .reference_run import record, record_truth
    from .recording import RunSpec, resolve_checkpoint
    from .framework import port_device
    from .runner import check

    floors: Dict = {"cases": [], "device": {"reference": "cpu", "port": port_device()},
                    "dtypes": {}}
    policy = load_policy()  # verdicts do not matter here, only the numbers
    for dtype in dtypes:
        per_stage: Dict[str, Dict[str, float]] = {}
        for seed in seeds:
            for prompt in prompts:
                spec = RunSpec(preset=preset, prompt=prompt, seed=seed, samplers=tuple(samplers),
                               steps=steps, dtype=dtype)
                log(f"calibrating {dtype}, seed {seed}, prompt {prompt[:40]!r}")
                start = time.perf_counter()
                ckpt = resolve_checkpoint(spec)
                rec = record(spec, ckpt)
                record_truth(rec, ckpt)
                with tempfile.TemporaryDirectory() as out:
                    report = check(rec, Path(out), policy=policy, checkpoint=str(ckpt))
                for name, stage in report.stages.items():
                    got = per_stage.setdefault(name, {})
                    for t in stage.tensors:
                        for key in ("rel_l2", "ref_vs_truth", "port_vs_truth", "truth_ratio"):
                            v = getattr(t.metrics, key, None)
                            if v is not None and math.isfinite(v):
                                got[key] = max(got.get(key, 0.0), v)
                floors["cases"].append({"dtype": dtype, "seed": seed, "prompt": prompt,
                                        "seconds": round(time.perf_counter() - start, 1)})
        floors["dtypes"][dtype] = per_stage
    floors["setup"] = {"preset": preset, "steps": steps, "samplers": list(samplers),
                       "seeds": list(seeds), "prompts": list(prompts)}
    return floors


def derive_policy(base_text: str, floors: Dict, name: str = "calibrated") -> str:
    """The base policy's text with the calibrated bounds rewritten (see the module docstring)."""
    setup = floors.get("setup", {})
    n = len(floors.get("cases", [])) // max(1, len(floors.get("dtypes", {})))
    source = (f"{setup.get('preset', '?')}, {n} cases (seeds {setup.get('seeds')}, "
              f"{len(setup.get('prompts', []))} prompts), port on "
              f"{floors.get('device', {}).get('port', '?')}")
    lines, section = [], None
    for line in base_text.splitlines():
        header = re.match(r"\[stage\.(\w+)\.(\w+)\]", line)
        if header:
            section = header.groups()
        elif re.match(r"\s*\[", line):
            section = None
        key = line.split("=", 1)[0].strip() if "=" in line and not line.lstrip().startswith("#") else ""
        if section and key:
            replaced = _calibrated_line(key, section, floors, source)
            if replaced is not None:
                line = replaced
        if line.startswith("name = "):
            line = f'name = "{name}"'
        lines.append(line)
    return "\n".join(lines) + "\n"


def _calibrated_line(key: str, section, floors: Dict, source: str):
    stage, dtype = section
    measured = floors.get("dtypes", {}).get(dtype, {}).get(stage)
    if not measured:
        return None
    if key == "rel_l2" and dtype == "float32" and stage in CALIBRATED_RELL2_STAGES \
            and measured.get("rel_l2", 0) > 0:  # an exact match (0) says nothing of noise
        floor = measured["rel_l2"]
        fail = 1e-5
        moved = ""
        if floor * FAIL_FACTOR > fail:
            fail = nice_up(floor * FAIL_FACTOR)
            moved = f"; fail moved up from the 1e-5 target to {FAIL_FACTOR:g}x the floor"
        warn = min(nice_up(floor * WARN_FACTOR), fail)
        return (f"rel_l2 = {{ warn = {warn:g}, fail = {fail:g} }}".ljust(45)
                + f"# [calibrated] floor {floor:.2g} ({source}); warn {WARN_FACTOR:g}x the floor, "
                  f"fail [target]{moved}")
    if key == "truth_ratio" and "truth_ratio" in measured:
        # a ratio under 1 comes from the floor (the reference nearly exact): k x 1 then
        worst = measured["truth_ratio"]
        warn, fail = round(K_WARN * max(worst, 1), 2), round(K_FAIL * max(worst, 1), 2)
        return (f"truth_ratio = {{ warn = {warn:g}, fail = {fail:g} }}".ljust(45)
                + f"# [calibrated] faithful port's largest truth_ratio {worst:.3g} ({source}; "
                  f"reference-vs-truth up to {measured.get('ref_vs_truth', float('nan')):.2g}); "
                  f"warn {K_WARN:g}x, fail {K_FAIL:g}x [truth]")
    return None


def calibrate(out_dir: Path, dtypes: Sequence[str], seeds: Sequence[int],
              prompts: Sequence[str], base_policy: str = "default", preset: str = "tiny",
              log: Callable[[str], None] = lambda s: None, floors: Dict = None,
              name: str = "calibrated") -> Dict[str, Path]:
    """Measure (unless `floors` are given, e.g. an earlier run's floors.json), then write
    `floors.json` and `policy.toml` into `out_dir` (atomically)."""
    from .policy import parse_policy_text, read_policy_text

    if floors is None:
        floors = measure(dtypes, seeds, prompts, preset=preset, log=log)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"floors": atomic_write_text(out_dir / "floors.json",
                                         json.dumps(floors, indent=2) + "\n")}
    text = derive_policy(read_policy_text(base_policy)[1], floors, name)
    parse_policy_text(text, str(out_dir / "policy.toml"))  # what is written must load
    paths["policy"] = atomic_write_text(out_dir / "policy.toml", text)
    return paths


def summary_rows(floors: Dict) -> List[List[str]]:
    rows = []
    for dtype, stages in floors.get("dtypes", {}).items():
        for stage, m in stages.items():
            rows.append([dtype, stage] + [f"{m[k]:.3g}" if k in m else "-"
                                          for k in ("rel_l2", "ref_vs_truth", "port_vs_truth",
                                                    "truth_ratio")])
    return rows
