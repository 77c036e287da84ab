"""Where samplers get their Gaussian draws.

No random generator agrees across frameworks, so a parity run hands both sides the same arrays
(`GivenNoise`); ordinary sampling uses a seeded numpy generator (`SeededNoise`).
"""
from __future__ import annotations

from typing import List, Optional, Protocol, Sequence, Tuple

import numpy as np


class NoiseSource(Protocol):
    def initial(self, shape: Tuple[int, ...]) -> np.ndarray:
        """Unit-variance noise for the starting latent (the sampler scales it)."""

    def step(self, index: int, shape: Tuple[int, ...]) -> np.ndarray:
        """Unit-variance noise a stochastic sampler adds at step `index`."""


class SeededNoise:
    """float32 standard normals from `numpy.random.default_rng(seed)`, drawn in call order."""

    def __init__(self, seed: int):
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def initial(self, shape):
        return self.rng.standard_normal(shape, dtype=np.float32)

    def step(self, index, shape):
        return self.rng.standard_normal(shape, dtype=np.float32)


class GivenNoise:
    """Fixed arrays: `initial`, and `per_step[i]` for step i (a list, or None if unused)."""

    def __init__(self, initial: np.ndarray, per_step: Optional[Sequence[np.ndarray]] = None):
        self._initial = np.asarray(initial, dtype=np.float32)
        self._per_step: List[np.ndarray] = [np.asarray(a, dtype=np.float32) for a in (per_step or [])]

    @staticmethod
    def _checked(what: str, arr: np.ndarray, shape) -> np.ndarray:
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"given {what} has shape {tuple(arr.shape)}, the sampler needs {tuple(shape)}")
        return arr

    def initial(self, shape):
        return self._checked("initial noise", self._initial, shape)

    def step(self, index, shape):
        if not 0 <= index < len(self._per_step):
            raise IndexError(f"the sampler asked for noise at step {index}, but only "
                             f"{len(self._per_step)} per-step arrays were given")
        return self._checked(f"noise for step {index}", self._per_step[index], shape)
