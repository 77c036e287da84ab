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

import dataclasses
import itertools
import json
import math
import re
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

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
            modules: bool = True, sizes: Sequence[Optional[int]] = (None,),
            log: Callable[[str], None] = lambda s: None) -> Dict:
    """Floors per dtype and stage over every (preset, size, seed, prompt), from record + truth
    + check; with `modules`, also per module kind (`parity.module_floors`) from module captures
    with module truths. `preset` may name several, comma-separated, and `sizes` several square
    image sizes (None: the preset's default): the floors are the largest over all of them,
    since a module's rounding depends on its map size (GroupNorm over a 1x1 map rounds 25x
    worse than over a 4x4 one, tiny, measured)."""
    from .framework import port_device
    from .module_floors import merge_floors, module_floors
    from .policy import load_policy
    from .ports import BUILTIN, PortSpec, load_port
    from .recording import Recording, RunSpec, resolve_checkpoint
    from .reference_process import record_to_folder
    from .runner import check

    presets = [p for p in preset.split(",") if p]
    floors: Dict = {"cases": [], "device": {"reference": "cpu", "port": port_device()},
                    "dtypes": {}, "modules": {}}
    policy = load_policy()  # verdicts do not matter here, only the numbers
    # the modules are measured once, by module_floors, not judged again inside check
    stages_only = dataclasses.replace(policy, module_truths=None)
    for dtype in dtypes:
        per_stage: Dict[str, Dict[str, float]] = {}
        per_kind: Dict = {}
        for name, size, seed, prompt in itertools.product(presets, sizes, seeds, prompts):
            spec = RunSpec(preset=name, prompt=prompt, seed=seed,
                           samplers=tuple(samplers), steps=steps, dtype=dtype,
                           height=size, width=size)
            log(f"calibrating {name} {size or 'default size'} {dtype}, seed {seed}, "
                f"prompt {prompt[:40]!r}")
            start = time.perf_counter()
            ckpt = resolve_checkpoint(spec)
            with tempfile.TemporaryDirectory(prefix="sdxl-parity-calibrate-") as work:
                record_to_folder(spec, ckpt, Path(work) / "rec", truth=True,
                                 modules=modules)
                rec = Recording.load(Path(work) / "rec")
                port = load_port(PortSpec.parse(BUILTIN), ckpt, dtype)
                report = check(rec, Path(work) / "report", policy=stages_only, port=port,
                               checkpoint=str(ckpt))
                if modules:
                    merge_floors(per_kind, module_floors(rec, port, policy))
            for stage_name, stage in report.stages.items():
                got = per_stage.setdefault(stage_name, {})
                for t in stage.tensors:
                    if t.name.startswith("module/"):
                        continue  # module truths: per kind, below
                    for key in ("rel_l2", "ref_vs_truth", "port_vs_truth",
                                "truth_ratio"):
                        v = getattr(t.metrics, key, None)
                        if v is not None and math.isfinite(v):
                            got[key] = max(got.get(key, 0.0), v)
            floors["cases"].append({"preset": name, "size": size, "dtype": dtype,
                                    "seed": seed, "prompt": prompt,
                                    "samplers": list(samplers), "steps": steps,
                                    "seconds": round(time.perf_counter() - start, 1)})
        floors["dtypes"][dtype] = per_stage
        if modules:
            floors["modules"][dtype] = per_kind
    floors["setup"] = {"preset": ",".join(presets), "sizes": list(sizes), "steps": steps,
                       "samplers": list(samplers),
                       "seeds": list(seeds), "prompts": list(prompts), "modules": modules}
    return floors


def combine_floors(runs: Sequence[Dict]) -> Dict:
    """Several calibrations' floors as one: per dtype and stage, and per dtype and module
    kind, the largest of each; their cases together; the presets and sizes of all."""
    from .module_floors import merge_floors

    if len(runs) == 1:
        return runs[0]
    out: Dict = {"cases": [], "device": runs[0].get("device", {}), "dtypes": {}, "modules": {}}
    presets, sizes = [], []
    for run in runs:
        setup = run.get("setup", {})
        run_of = {key: setup[key] for key in ("samplers", "steps") if key in setup}
        out["cases"] += [{**run_of, **case} for case in run.get("cases", [])]
        for dtype, stages in run.get("dtypes", {}).items():
            for stage, values in stages.items():
                got = out["dtypes"].setdefault(dtype, {}).setdefault(stage, {})
                for key, v in values.items():
                    got[key] = max(got.get(key, v), v)
        for dtype, kinds in run.get("modules", {}).items():
            merge_floors(out["modules"].setdefault(dtype, {}), kinds)
        presets += [p for p in setup.get("preset", "").split(",") if p and p not in presets]
        sizes += [z for z in setup.get("sizes", []) if z and z not in sizes]
    first = runs[0].get("setup", {})
    out["setup"] = {**first, "preset": ",".join(presets), "sizes": sizes,
                    "seeds": sorted({s for r in runs for s in r.get("setup", {}).get("seeds", [])})}
    return out


def derive_policy(base_text: str, floors: Dict, name: str = "calibrated") -> str:
    """The base policy's text with the calibrated bounds rewritten (see the module docstring)."""
    sources = {dtype: _source(floors, dtype) for dtype in
               set(floors.get("dtypes", {})) | set(floors.get("modules", {}))}
    lines, section, table = [], None, None
    for line in base_text.splitlines():
        header = re.match(r"\[stage\.(\w+)\.(\w+)\]", line)
        module_header = re.match(r"\[(module|module_truth)\.(\w+)\]", line)
        if header or module_header or re.match(r"\s*\[", line):
            _insert_missing_kinds(lines, table, floors, sources)
            table = None
        if header:
            section = header.groups()
        elif module_header:
            section = None
            table = {"table": module_header.groups(), "seen": set(), "last": len(lines) + 1}
        elif re.match(r"\s*\[", line):
            section = None
        if table is not None and "=" in line and not line.lstrip().startswith("#"):
            replaced = _module_line(line, table, floors, sources.get(table["table"][1], ""))
            if replaced is not None:
                line = replaced
            table["last"] = len(lines) + 1
        key = line.split("=", 1)[0].strip() if "=" in line and not line.lstrip().startswith("#") else ""
        if section and key:
            replaced = _calibrated_line(key, section, floors, sources.get(section[1], ""))
            if replaced is not None:
                line = replaced
        if line.startswith("name = "):
            line = f'name = "{name}"'
        lines.append(line)
    _insert_missing_kinds(lines, table, floors, sources)
    return "\n".join(lines) + "\n"


def _source(floors: Dict, dtype: str) -> str:
    """Where one dtype's floors were measured: its own cases' presets, sizes and seeds (a
    combined calibration may have measured float16 at fewer sizes than float32), or the setup's
    where the cases do not say."""
    setup = floors.get("setup", {})
    cases = [c for c in floors.get("cases", []) if c.get("dtype") == dtype]
    if cases:
        unique = lambda key: list(dict.fromkeys(  # noqa: E731
            "+".join(c[key]) if isinstance(c.get(key), list) else c.get(key)
            for c in cases if c.get(key)))
        presets, sizes, n = ",".join(unique("preset")), unique("size"), len(cases)
        seeds = sorted({c["seed"] for c in cases if "seed" in c})
        prompts, samplers, steps = len(unique("prompt")), unique("samplers"), unique("steps")
    else:
        presets, sizes = setup.get("preset", "?"), [z for z in setup.get("sizes", []) if z]
        n = len(floors.get("cases", [])) // max(1, len(floors.get("dtypes", {})))
        seeds, prompts = setup.get("seeds"), len(setup.get("prompts", []))
        samplers, steps = [], []
    # cases written before they carried their samplers and steps: the setup's
    samplers = samplers or (["+".join(setup["samplers"])] if setup.get("samplers") else [])
    steps = steps or ([setup["steps"]] if setup.get("steps") else [])
    at = f" at {'/'.join(str(z) for z in sizes)} px" if sizes else ""
    run = (f" {'/'.join(samplers)} x {'/'.join(str(k) for k in steps)} steps,"
           if samplers and steps else "")
    return (f"{presets or '?'}{at},{run} {n} cases (seeds {seeds}, {prompts} prompts), port on "
            f"{floors.get('device', {}).get('port', '?')}")


# module bounds from module floors: an own rel L2 bound MODULE_FACTOR x the faithful port's
# largest (the base's bounds sat 3-5x above their floors, enough to name an eps of 1e-6 for
# 1e-5 in a LayerNorm, 20x its floor); a truth-ratio bound MODULE_TRUTH_FACTOR x the largest
# ratio: a module's ratio, teacher-forced, spreads far less than a stage's (README, precision
# bugs: the faithful port's worst ratio per kind moves by < 10% over seeds)
MODULE_FACTOR = 3.0
MODULE_TRUTH_FACTOR = 1.25
_MODULE_TABLES = {("module", "float32"): ("own_rel_l2", MODULE_FACTOR),
                  ("module_truth", "float16"): ("truth_ratio", MODULE_TRUTH_FACTOR)}


def _module_bound(kind: str, table, floors: Dict):
    """(bound, floor, where) for one kind of a calibrated module table, or None."""
    calibrated = _MODULE_TABLES.get(table)
    if calibrated is None:
        return None
    key, factor = calibrated
    measured = floors.get("modules", {}).get(table[1], {})
    if kind == "default":  # kinds no line names: the loosest measured bound (and its kind)
        found = [(_module_bound(k, table, floors), k) for k in measured]
        found = [(f[0], f[1], k) for f, k in found if f is not None]
        return max(found, key=lambda f: f[0]) if found else None
    floor = measured.get(kind, {}).get(key)
    if not floor:  # 0: exact on both sides (a gather), which says nothing of noise
        return None
    bound = nice_up(factor * floor) if key == "own_rel_l2" else round(factor * max(floor, 1), 2)
    return bound, floor, measured[kind].get(f"{key}_at", "")


def _module_text(kind: str, bound, floor, where: str, table, source: str) -> str:
    key, factor = _MODULE_TABLES[table]
    what = "own rel L2" if key == "own_rel_l2" else "truth ratio"
    at = f" at {where}" if where else ""
    return (f"{kind} = {bound:g}".ljust(45) + f"# [calibrated] faithful port's largest {what} "
            f"{floor:.3g}{at} ({source}); {factor:g}x")


def _module_line(line: str, table: Dict, floors: Dict, source: str):
    kind = line.split("=", 1)[0].strip()
    table["seen"].add(kind)
    found = _module_bound(kind, table["table"], floors)
    if found is None:
        return None
    if kind == "default":
        return (f"default = {found[0]:g}".ljust(45) + "# [calibrated] the loosest calibrated "
                f"bound below ({found[2]}), for kinds no line names")
    return _module_text(kind, *found, table["table"], source)


def _insert_missing_kinds(lines: List[str], table: Optional[Dict], floors: Dict,
                          sources: Dict[str, str]) -> None:
    """Lines for the measured kinds the base's table has none for, after its last line."""
    if table is None or table["table"] not in _MODULE_TABLES:
        return
    source = sources.get(table["table"][1], "")
    measured = floors.get("modules", {}).get(table["table"][1], {})
    found = [(kind, _module_bound(kind, table["table"], floors))
             for kind in sorted(set(measured) - table["seen"])]
    lines[table["last"]:table["last"]] = [_module_text(kind, *f, table["table"], source)
                                          for kind, f in found if f is not None]


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
              name: str = "calibrated", modules: bool = True,
              sizes: Sequence[Optional[int]] = (None,), samplers: Sequence[str] = ("euler",),
              steps: int = 2) -> Dict[str, Path]:
    """Measure (unless `floors` are given, e.g. an earlier run's floors.json), then write
    `floors.json` and `policy.toml` into `out_dir` (atomically)."""
    from .policy import parse_policy_text, read_policy_text

    if floors is None:
        floors = measure(dtypes, seeds, prompts, preset=preset, modules=modules, sizes=sizes,
                         samplers=samplers, steps=steps, log=log)
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


def module_summary_rows(floors: Dict) -> List[List[str]]:
    """Per dtype and module kind: the largest own rel L2 and truth ratio, and where."""
    rows = []
    for dtype, kinds in floors.get("modules", {}).items():
        for kind, m in sorted(kinds.items()):
            rows.append([dtype, kind] + [f"{m[k]:.3g}" if k in m else "-"
                                         for k in ("own_rel_l2", "truth_ratio")]
                        + [m.get("truth_ratio_at") or m.get("own_rel_l2_at", "")])
    return rows
