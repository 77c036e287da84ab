"""Module floors: the faithful port's largest own error and truth ratio per module kind.

A module's own error (the port module on the reference module's recorded inputs) is rounding
alone when the port is faithful; its largest value per kind, over cases, is the floor a
`[module.<dtype>]` bound sits above, and its largest truth ratio the floor of a
`[module_truth.<dtype>]` bound. `sdxl-parity calibrate` derives both tables from these floors,
and tools/module_floor_table.py compares them between presets.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable

KindFloors = Dict[str, Dict[str, float]]  # kind -> {"own_rel_l2", "truth_ratio", ...}

# per kind, the largest of each (the module where the largest own error sits is kept too)
FLOOR_KEYS = ("own_rel_l2", "ref_vs_truth", "port_vs_truth", "truth_ratio")


def module_floors(rec, port, policy, stages: Iterable[str] = None,
                  log: Callable[[str], None] = lambda s: None) -> KindFloors:
    """Per module kind, the largest own error and truth ratio of the port's modules over the
    recording's module captures (`record --modules`, with module truths for truth ratios)."""
    from .locate import LOCATABLE_STAGES, locate

    floors: KindFloors = {}
    policy = measuring(policy, rec.spec.dtype)
    for stage in stages or LOCATABLE_STAGES:
        if stage not in rec.modules:
            continue
        loc = locate(rec, port, policy, stage, log=log)
        for row in loc.rows:
            if row.raised:
                raise RuntimeError(f"module {row.module} raised on its recorded inputs: "
                                   f"{row.error}; a floor needs a port that runs")
            values = {"own_rel_l2": row.own, "ref_vs_truth": row.ref_vs_truth,
                      "port_vs_truth": row.port_vs_truth, "truth_ratio": row.truth_ratio}
            merge_into(floors, row.kind, values, where=f"{stage}:{row.module}")
    return floors


def measuring(policy, dtype: str):
    """`policy` with no module bound (every module passes, so `locate` measures every one,
    whatever tables the policy has for `dtype`), keeping its module truth floor."""
    import dataclasses

    floor = (policy.module_truths or {}).get(dtype, {}).get("truth_floor", 0.0)
    unbounded = {"default": math.inf}
    return dataclasses.replace(
        policy, modules={**(policy.modules or {}), dtype: unbounded},
        module_truths={**(policy.module_truths or {}),
                       dtype: {**unbounded, "truth_floor": floor}})


def merge_into(floors: KindFloors, kind: str, values: Dict[str, float], where: str = "") -> None:
    """Fold one module's (or one case's) values of `kind` into `floors`: the largest finite
    value of each key, and where the largest own error and truth ratio were."""
    got = floors.setdefault(kind, {})
    for key in FLOOR_KEYS:
        v = values.get(key)
        if v is not None and math.isfinite(v) and v > got.get(key, -1.0):
            got[key] = float(v)
            at = values.get(f"{key}_at", where)
            if at and key in ("own_rel_l2", "truth_ratio"):
                got[f"{key}_at"] = at


def merge_floors(total: KindFloors, more: KindFloors) -> KindFloors:
    """`more`'s per-kind floors folded into `total` (in place; returned)."""
    for kind, values in more.items():
        merge_into(total, kind, values)
    return total
