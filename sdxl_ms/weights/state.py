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
    reports every problem at once, so here a mismatch is a programming error. An array already
    in the parameter's dtype becomes its storage (`parameter_data`): do not change it after.
    """
    params = named_parameters(cell, prefix)
    for name, arr in items:
        p = params[name]
        if tuple(arr.shape) != tuple(p.shape):
            raise ValueError(f"{name}: shape {tuple(arr.shape)} != expected {tuple(p.shape)}")
        p.set_data(parameter_data(arr, p.dtype))


def parameter_data(arr: np.ndarray, dtype) -> Tensor:
    """`arr` as a Tensor of `dtype`. Where no cast is needed the Tensor takes over the array's
    memory instead of copying it: the arrays here are read or generated for this assignment
    alone, and copying sdxl-base's 12.9 GB of float32 weights took 17 of a 45 s load
    (measured, `load_pipeline` under cProfile)."""
    arr = np.asarray(arr, order="C")  # (not ascontiguousarray: it makes a 0-d array 1-d)
    if arr.dtype == _NUMPY_DTYPES.get(dtype):
        return Tensor.from_numpy(arr)
    return Tensor(arr, dtype=dtype)


# the parameter dtypes numpy holds natively (bfloat16 is not among them: it is always cast)
_NUMPY_DTYPES = {ms.float32: np.dtype(np.float32), ms.float16: np.dtype(np.float16)}


def randomize(cell: nn.Cell, seed: int, prefix: str = "") -> None:
    """Fill `cell` with the seeded random weights of `random_init`, by full sgm name."""
    set_weights(cell, ((n, random_tensor(seed, n, s)) for n, s in layout(cell, prefix).items()),
                prefix)
