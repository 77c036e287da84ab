"""Reading and writing a Cell's parameters by name, one tensor at a time."""
from __future__ import annotations

from typing import Dict, Iterable, Tuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from .random_init import random_tensor


def named_parameters(cell: nn.Cell, prefix: str = "") -> Dict[str, ms.Parameter]:
    return {prefix + name: p for name, p in cell.parameters_and_names()}


def layout(cell: nn.Cell, prefix: str = "") -> Dict[str, Tuple[int, ...]]:
    """Parameter names and shapes, in module-tree order."""
    return {name: tuple(p.shape) for name, p in named_parameters(cell, prefix).items()}


def set_weights(cell: nn.Cell, items: Iterable[Tuple[str, np.ndarray]], prefix: str = "") -> None:
    """Assign (name, array) pairs to the parameters of `cell`, casting to each parameter's dtype.

    Names must exist and shapes must match; the loader checks the whole checkpoint first and
    reports every problem at once, so here a mismatch is a programming error.
    """
    params = named_parameters(cell, prefix)
    for name, arr in items:
        p = params[name]
        if tuple(arr.shape) != tuple(p.shape):
            raise ValueError(f"{name}: shape {tuple(arr.shape)} != expected {tuple(p.shape)}")
        p.set_data(Tensor(np.asarray(arr, order="C"), dtype=p.dtype))


def randomize(cell: nn.Cell, seed: int, prefix: str = "") -> None:
    """Fill `cell` with the seeded random weights of `random_init`, by full sgm name."""
    set_weights(cell, ((n, random_tensor(seed, n, s)) for n, s in layout(cell, prefix).items()),
                prefix)
