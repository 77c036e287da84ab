"""The built-in port (`sdxl_ms`) where the harness needs it beyond the stage contract: its
`--jit` option and its sampler for ports that bring none. With the weight layouts, key maps and
checkpoint readers and writers (`sdxl_ms.weights`, `sdxl_ms.config`), the only place `parity`
imports `sdxl_ms` (`tests/test_tools/test_import_graph.py` holds it to that)."""
from __future__ import annotations

from typing import Callable, Dict, Sequence

import numpy as np


def set_jit(mode: str) -> None:
    """`--jit`: which parts of the built-in port MindSpore compiles (off, blocks, model)."""
    from sdxl_ms.runtime import settings

    settings.set_jit(mode, reason="--jit")


def choose_execution(rec, stages: Sequence[str]) -> Dict[str, object]:
    """The built-in port's execution mode for a check of `stages` on `rec`: the one with the
    least estimated time for its preset, size and dtype (`sdxl_ms.execution_costs`, measured
    costs, compile included), unless `--jit` or SDXL_MS_JIT decided it. Returns what the
    report records: the mode, why, and each mode's estimate."""
    from sdxl_ms.execution_costs import choose
    from sdxl_ms.runtime import settings

    from .stage_calls import network_calls

    if settings.jit_decided():
        return {"jit": settings.jit, "reason": settings.jit_reason}
    spec = rec.spec
    choice = choose(spec.preset, rec.meta["height"], rec.meta["width"], spec.dtype,
                    network_calls(rec, stages))
    settings.pick_jit(choice.jit, f"picked: {choice.reason}", choice.networks)
    return choice.to_dict()


def builtin_sample(run, eps: Callable, callback: Callable) -> np.ndarray:
    """The built-in sampler repeating `run` (`parity.contract.SamplerRun`), for a port that
    offers no `sample()`."""
    from sdxl_ms.pipeline import sample_with_builtin_sampler

    return sample_with_builtin_sampler(run, eps, callback)
