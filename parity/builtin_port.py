"""The built-in port (`sdxl_ms`) where the harness needs it beyond the stage contract: its
`--jit` option and its sampler for ports that bring none. With the weight layouts, key maps and
checkpoint readers and writers (`sdxl_ms.weights`, `sdxl_ms.config`), the only place `parity`
imports `sdxl_ms` (`tests/test_tools/test_import_graph.py` holds it to that)."""
from __future__ import annotations

from typing import Callable

import numpy as np


def set_jit(mode: str) -> None:
    """`--jit`: which parts of the built-in port MindSpore compiles (off, blocks, model)."""
    from sdxl_ms.runtime import settings

    settings.set_jit(mode)


def builtin_sample(run, eps: Callable, callback: Callable) -> np.ndarray:
    """The built-in sampler repeating `run` (`parity.contract.SamplerRun`), for a port that
    offers no `sample()`."""
    from sdxl_ms.pipeline import sample_with_builtin_sampler

    return sample_with_builtin_sampler(run, eps, callback)
