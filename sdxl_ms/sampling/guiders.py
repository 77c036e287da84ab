"""Classifier-free guidance, and `GuidedDenoiser`: the one callable a sampler talks to.

The batch is uncond first, then cond, like diffusers' `torch.cat([negative, positive])`.
diffusers guides the network output (eps), sgm guides the denoised x0; the two are equal in
exact arithmetic (x0 = x - sigma * eps is affine in eps) and differ only by rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np

from .denoiser import Denoiser, Network

Batch = Tuple[np.ndarray, np.ndarray, Any]  # (x, t, cond) as the network gets them


def _concat(uncond: Any, cond: Any) -> Any:
    """Stack uncond before cond along the batch axis, through dicts (sgm's `crossattn`, ...)."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        if set(cond) != set(uncond):
            raise ValueError(f"cond and uncond keys differ: {sorted(cond)} vs {sorted(uncond)}")
        return {k: _concat(uncond[k], cond[k]) for k in cond}
    return np.concatenate([np.asarray(uncond), np.asarray(cond)], axis=0)


@dataclass(frozen=True)
class IdentityGuider:
    """No guidance: one pass with the conditional inputs."""

    guide: str = "eps"

    def prepare_inputs(self, x: np.ndarray, t: np.ndarray, cond: Any, uncond: Any) -> Batch:
        return x, t, cond

    def combine(self, out: np.ndarray) -> np.ndarray:
        return out


@dataclass(frozen=True)
class VanillaCFG:
    """`out_u + scale * (out_c - out_u)` on eps (diffusers, default) or on x0 (sgm)."""

    scale: float
    guide: str = "eps"

    def __post_init__(self):
        if self.guide not in ("eps", "x0"):
            raise ValueError(f"unknown guide {self.guide!r}; valid choices: eps, x0")

    def prepare_inputs(self, x: np.ndarray, t: np.ndarray, cond: Any, uncond: Any) -> Batch:
        if uncond is None:
            raise ValueError("VanillaCFG needs an unconditional input (uncond)")
        return np.concatenate([x, x]), np.concatenate([t, t]), _concat(uncond, cond)

    def combine(self, out: np.ndarray) -> np.ndarray:
        out_u, out_c = np.split(out, 2)
        return out_u + np.float32(self.scale) * (out_c - out_u)


@dataclass
class GuidedDenoiser:
    """`denoise(x, sigma, timestep) -> guided x0`, owning network, scalings, guider and cond.

    This is the model function every sampler calls; samplers never see eps or the batch
    doubling. With `guide="eps"` the guider combines the network outputs before the scalings
    (diffusers); with `guide="x0"` it combines two denoised predictions (sgm).
    """

    network: Network
    denoiser: Denoiser
    guider: Any = IdentityGuider()
    cond: Any = None
    uncond: Any = None

    def __call__(self, x: np.ndarray, sigma: float, timestep: Optional[float]) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if self.guider.guide == "eps":
            def guided_eps(x_in, t, _cond):
                xb, tb, cb = self.guider.prepare_inputs(x_in, t, self.cond, self.uncond)
                return self.guider.combine(np.asarray(self.network(xb, tb, cb), dtype=np.float32))
            return self.denoiser(guided_eps, x, sigma, timestep)
        xb, _, cb = self.guider.prepare_inputs(x, np.zeros(len(x), np.float32), self.cond, self.uncond)
        return self.guider.combine(self.denoiser(self.network, xb, sigma, timestep, cb))
