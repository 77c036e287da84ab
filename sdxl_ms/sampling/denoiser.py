"""From an eps-predicting network to a denoiser `D(x, sigma) -> x0` (Karras et al. 2022, sec. 5).

`D(x, sigma) = c_skip * x + c_out * F(c_in * x, t)`; for an eps network (SDXL) the scalings are
c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma**2 + 1) (sgm `EpsScaling`), and `t` is the
timestep the network was trained with at that sigma.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import numpy as np

from .discretization import QuantizedTimesteps, SigmaToTimestep

# network(x_in, t, cond) -> eps; x_in (B, C, H, W) float32, t (B,) float32, cond anything batched
Network = Callable[[np.ndarray, np.ndarray, Any], np.ndarray]


@dataclass(frozen=True)
class EpsScaling:
    """sgm `EpsScaling`: the network predicts the noise."""

    def __call__(self, sigma: np.float32) -> Tuple[np.float32, np.float32, np.float32]:
        sigma = np.float32(sigma)
        c_in = np.float32(1) / np.sqrt(sigma * sigma + np.float32(1))
        return np.float32(1), -sigma, c_in


@dataclass(frozen=True)
class Denoiser:
    """Scalings plus the sigma -> timestep map, applied around any network.

    A sampler passes the grid timestep when it has one; for sigmas off the grid (churn, the
    DPM++(2S) midpoint) it passes None and `timestep_map` decides. `quantize_sigma=True` is
    sgm's `DiscreteDenoiser`: sigma itself is snapped to the nearest training sigma (the map
    must then be a `QuantizedTimesteps`), so the scalings use the snapped value.
    """

    scaling: EpsScaling = EpsScaling()
    timestep_map: Optional[SigmaToTimestep] = None
    quantize_sigma: bool = False

    def __post_init__(self):
        if self.quantize_sigma and not isinstance(self.timestep_map, QuantizedTimesteps):
            raise ValueError("quantize_sigma=True needs timestep_map=QuantizedTimesteps(...)")

    @classmethod
    def for_schedule(cls, schedule) -> "Denoiser":
        """The denoiser matching a schedule's family: sgm quantises, diffusers interpolates."""
        quantize = isinstance(schedule.timestep_map, QuantizedTimesteps)
        return cls(timestep_map=schedule.timestep_map, quantize_sigma=quantize)

    def resolve(self, sigma: float, timestep: Optional[float]) -> Tuple[np.float32, float]:
        """(sigma used for the scalings, timestep given to the network)."""
        if self.quantize_sigma:
            sigma = self.timestep_map.snap(sigma)
        if timestep is None:
            if self.timestep_map is None:
                raise ValueError(f"sigma {float(sigma):.6g} is off the grid and the denoiser has no "
                                 "timestep_map")
            timestep = self.timestep_map(sigma)
        return np.float32(sigma), float(timestep)

    def __call__(self, network: Network, x: np.ndarray, sigma: float, timestep: Optional[float],
                 cond: Any = None) -> np.ndarray:
        sigma, timestep = self.resolve(sigma, timestep)
        c_skip, c_out, c_in = self.scaling(sigma)
        t = np.full((x.shape[0],), timestep, dtype=np.float32)
        eps = np.asarray(network(x * c_in, t, cond), dtype=np.float32)
        return x * c_skip + eps * c_out
