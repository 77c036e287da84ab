"""This port's own sampler loop (parity.contract.SamplingContract) and its CFG, in numpy.

Euler and Euler-ancestral on the reference's grid (`run.sigmas`, `run.timesteps`), written the
way diffusers' EulerDiscreteScheduler / EulerAncestralDiscreteScheduler step: the step itself
in float32 (`pred = x - sigma * eps`, `d = (x - pred) / sigma`, not `d = eps`, as the
reference rounds), and in a float16 run the pipeline's tensors rounded where diffusers holds
them in float16 (latents between steps, the UNet input, the CFG arithmetic, `sigma * eps`
and the ancestral noise term), with torch's CPU rule for a float32 sigma meeting a float16
tensor (`Rounding.scalar_first`). On the float16 golden this repeats the reference's latents
bit for bit. The eps network is the caller's: the harness passes the
reference's recorded outputs (sampler stage) or this port's UNet (trajectory stage).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

SAMPLERS = ("euler", "euler_a")


class Rounding:
    """float32 arithmetic, with a float16 round trip where the reference holds float16."""

    def __init__(self, half: bool):
        self.half = half

    def __call__(self, x) -> np.ndarray:
        x = np.asarray(x, np.float32)
        return x.astype(np.float16).astype(np.float32) if self.half else x

    def scalar_first(self, s) -> np.float32:
        """A float32 0-dim tensor `s` in torch's `s * half_tensor` on CPU: the product is
        float16 and `s`, as the *first* operand, is cast to float16 before the multiply.
        As the second operand (`half_tensor * s`, `half_tensor / s`) torch's CPU-scalar path
        keeps it in float32 (measured with torch 2.13: each rule is exact on 1e5 draws, the
        other one off by an ulp), so only `sigma_hat * model_output` takes this."""
        s = np.float32(s)
        return np.float32(np.float16(s)) if self.half else s


def guide(eps: np.ndarray, scale: float, r: Rounding) -> np.ndarray:
    """uncond + scale * (cond - uncond) on an uncond-first batch, each op rounded as
    diffusers' pipeline rounds it in the model dtype."""
    uncond, cond = np.split(r(eps), 2)
    return r(uncond + r(np.float32(scale) * r(cond - uncond)))


def sample(run, eps: Callable, callback: Callable, r: Rounding) -> np.ndarray:
    if run.sampler not in SAMPLERS:
        raise NotImplementedError(f"this port's loop runs {', '.join(SAMPLERS)}, "
                                  f"not {run.sampler!r}")
    sigmas = np.asarray(run.sigmas, np.float32)
    one = np.float32(1)
    x = r(r(run.initial_noise) * np.float32(run.init_noise_sigma))
    for i, t in enumerate(np.asarray(run.timesteps, np.float32)):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x_in = r(x / np.sqrt(sigma * sigma + one))  # scale_model_input: c_in
        e = guide(eps(np.concatenate([x_in, x_in]), float(t)), run.guidance, r)
        pred_x0 = x - r(r.scalar_first(sigma) * e)
        derivative = (x - pred_x0) / sigma
        if run.sampler == "euler":
            x_next = x + derivative * (sigma_next - sigma)
        else:
            sigma_up = np.sqrt(sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next)
                               / (sigma * sigma))
            sigma_down = np.sqrt(sigma_next * sigma_next - sigma_up * sigma_up)
            x_next = x + derivative * (sigma_down - sigma)
            x_next = x_next + r(r(run.step_noise[i]) * sigma_up)
        x = r(x_next)
        callback(i, x)
    return x
