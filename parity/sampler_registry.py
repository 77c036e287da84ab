"""What the harness knows of each sampler, in one entry per sampler.

The port owns the samplers (`sdxl_ms.sampling.SAMPLERS`); the harness owns how each one is
compared with diffusers: which scheduler, which options that scheduler has, how many UNet
calls it makes and which of its callback latents are full steps. Kept here, not read from the
port, so the harness does not import it; `tests/test_parity/test_sampler_registry.py` checks that the two
agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from sdxl_common.validate import check_choice

# the port's timestep schedules; "sgm" is sgm's own grid, which no diffusers config builds
SCHEDULES: Tuple[str, ...] = ("leading", "trailing", "linspace", "karras", "sgm")
DIFFUSERS_SCHEDULES: Tuple[str, ...] = tuple(s for s in SCHEDULES if s != "sgm")


@dataclass(frozen=True)
class SamplerEntry:
    """One sampler: the port's class, and how diffusers runs its counterpart."""

    name: str
    port_class: str  # its class in sdxl_ms.sampling.SAMPLERS (sgm-style name)
    grid: str  # diffusers' timestep grid family: "euler" or "dpm"
    diffusers: Optional[str] = None  # the diffusers scheduler class; None: nothing to compare
    karras: bool = True  # the scheduler has use_karras_sigmas
    final_sigmas_type: bool = False  # the scheduler has final_sigmas_type
    # diffusers runs each 2nd-order step as two scheduler steps on the doubled timestep list
    # [t0, t1, t1, t2, t2, ...], the last step Euler: 2n-1 UNet calls and step callbacks
    doubled_steps: bool = False
    vp_latents: bool = False  # the scheduler's latents are x / sqrt(1 + sigma^2), not x
    step_noise: bool = False  # draws fresh noise at every step (ancestral)

    def unet_calls(self, steps: int) -> int:
        return 2 * steps - 1 if self.doubled_steps else steps

    def full_step_indices(self, steps: int) -> List[int]:
        """Which of the scheduler's step callbacks follow a whole sampler step: with doubled
        steps the corrected states at the odd indices, then the final Euler step."""
        if not self.doubled_steps:
            return list(range(steps))
        return list(range(1, 2 * steps - 2, 2)) + [2 * steps - 2]


SAMPLERS: Dict[str, SamplerEntry] = {e.name: e for e in (
    SamplerEntry("euler", "EulerEDMSampler", "euler", "EulerDiscreteScheduler",
                 final_sigmas_type=True),
    SamplerEntry("euler_a", "EulerAncestralSampler", "euler", "EulerAncestralDiscreteScheduler",
                 karras=False, step_noise=True),
    SamplerEntry("heun", "HeunEDMSampler", "euler", "HeunDiscreteScheduler", doubled_steps=True),
    SamplerEntry("dpmpp_2m", "DPMPP2MSampler", "dpm", "DPMSolverMultistepScheduler",
                 final_sigmas_type=True, vp_latents=True),
    SamplerEntry("dpmpp_2s_a", "DPMPP2SAncestralSampler", "euler", step_noise=True),
    SamplerEntry("lms", "LinearMultistepSampler", "euler", "LMSDiscreteScheduler"),
)}


def sampler_entry(name: str) -> SamplerEntry:
    """The entry of a known sampler; `InputError` naming the choices otherwise."""
    return SAMPLERS[check_choice(name, tuple(SAMPLERS), "sampler")]


def unet_calls_per_sampler(name: str, steps: int) -> int:
    """The UNet calls diffusers makes for `steps` steps of sampler `name`."""
    return sampler_entry(name).unet_calls(steps)


def check_schedule(schedule: str) -> str:
    return check_choice(schedule, SCHEDULES, "schedule")
