"""`report.json`: the machine-readable report, from which every other file can be re-rendered.

Schema (schema_version 1)::

    {
      "schema_version": 1,
      "headline": "FAIL at stage 'unet', step 2, tensor 'eps_cond': rel_l2 3.10e-03 > fail 1e-05",
      "verdict": "pass" | "warn" | "fail" | "skip",
      "created": "2025-01-01T00:00:00+00:00",          # ISO 8601, UTC
      "meta": {...},                                   # run description: versions, config,
                                                       # prompts, seeds, sampler, steps, dtype,
                                                       # checkpoint, policy
      "stage_order": ["tokens", "conditioner", ...],
      "stages": {
        "<stage>": {
          "name": "<stage>",
          "verdict": "pass" | "warn" | "fail" | "skip",
          "first_failure": null | {"tensor": "eps_cond", "step": 2 | null},
          "notes": ["..."],
          "images": {"ref": "images/x_ref.png", ...},  # relative to the report directory
          "limits": {"rel_l2": {"warn": 1e-06, "fail": 1e-05}, ...},   # policy bounds
          "per_step": {"latents.rel_l2": [v_step0, v_step1, ...], ...},
          "tensors": [
            {"name": "eps_cond", "step": 2 | null, "verdict": "fail",
             "reasons": ["rel_l2 3.10e-03 > fail 1e-05"],
             "metrics": {"kind": "tensor", "shape": [2, 4, 8, 8], "numel": 512,
                         "max_abs": ..., "mean_abs": ..., "max_rel": ..., "rel_l2": ...,
                         "cosine": ..., "psnr_db": ..., "mismatch_ratio": ..., "mismatches": ...,
                         "ratio_rel_err_le_1e3": ..., "ratio_rel_err_le_5e3": ...,
                         "nonfinite_port": 0, "nonfinite_ref": 0, "rtol": ..., "atol": ...}}
            # kind "image": shape, numel, psnr_db, ssim, max_abs_255, mean_abs_255, nonfinite_*
            # kind "exact": shape, numel, mismatches, mismatch_ratio,
            #               first_mismatch (null | [flat_index, ref, port]), nonfinite_*
          ]
        }
      }
    }

Non-finite floats are written as the strings "inf", "-inf", "nan" so the file is strict JSON.
Metric definitions are in `parity.metrics`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from json import JSONEncoder
from pathlib import Path
from typing import Any

from sdxl_common.atomic import atomic_open
from parity.results import ParityReport


def jsonable(obj: Any) -> Any:
    """Strict-JSON form of `obj`: numpy scalars/arrays, paths, tuples, sets, dataclasses and
    non-finite floats converted; anything else unknown becomes its str()."""
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((jsonable(v) for v in obj), key=str)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return jsonable(obj.tolist())
    return str(obj)


def write_json(report: ParityReport, path: os.PathLike | str) -> Path:
    """Write `report` to `path` atomically (streamed; a failure leaves no partial file)."""
    data = jsonable(report.to_dict())
    encoder = JSONEncoder(indent=1, allow_nan=False, ensure_ascii=False)
    with atomic_open(path, "w") as f:
        for chunk in encoder.iterencode(data):
            f.write(chunk)
        f.write("\n")
    return Path(path)


def read_json(path: os.PathLike | str) -> ParityReport:
    """Load a report written by `write_json`."""
    with open(path, encoding="utf-8") as f:
        return ParityReport.from_dict(json.load(f))
