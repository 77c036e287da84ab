"""Seeded random weights in the real layouts, a stand-in for checkpoints no hub can serve here.

Each tensor is drawn from its own generator seeded by (seed, crc32(name)), so a tensor's values
depend only on the seed and its sgm name: not on order, format or which other tensors exist.
Scales keep activations O(1) through deep stacks (1/sqrt(fan_in) for matrices, norms near 1).
"""
from __future__ import annotations

import math
import zlib
from typing import Iterator, Mapping, Tuple

import numpy as np

from .keymap_text import LOGIT_SCALE_INIT


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode())])


def random_tensor(seed: int, name: str, shape: Tuple[int, ...]) -> np.ndarray:
    shape = tuple(int(s) for s in shape)
    if name.endswith("logit_scale"):
        return np.full(shape, LOGIT_SCALE_INIT, dtype=np.float32)
    z = _rng(seed, name).standard_normal(shape, dtype=np.float32)
    leaf = name.rsplit(".", 1)[-1]
    if len(shape) == 1:
        if leaf == "weight":  # norm scales
            return 1.0 + 0.1 * z
        return 0.05 * z  # biases
    if "token_embedding" in name:  # CLIP's own init scales: small embeddings make the first
        return 0.02 * z             # LayerNorm's epsilon matter, as in the released weights
    if "position" in name:
        return 0.01 * z
    if leaf == "text_projection":
        return z / np.float32(math.sqrt(shape[0]))
    fan_in = int(np.prod(shape[1:]))
    return z / np.float32(math.sqrt(fan_in))


def random_state(layout: Mapping[str, Tuple[int, ...]], seed: int) -> Iterator[Tuple[str, np.ndarray]]:
    """Yield (name, tensor) for every entry of an sgm layout, lazily."""
    for name, shape in layout.items():
        yield name, random_tensor(seed, name, shape)
