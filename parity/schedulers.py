"""Which diffusers scheduler each of the port's samplers is compared with, and how it is
configured: the reference side's knowledge, so it lives with the harness, not the port."""
from __future__ import annotations

from typing import Dict, Tuple

from sdxl_common.errors import InputError
from sdxl_ms.sampling import check_sampler
from sdxl_ms.sampling.discretization import SCHEDULES
from sdxl_ms.weights.diffusers_configs import SDXL_SCHEDULER_CONFIG

DIFFUSERS_SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
}


def diffusers_scheduler_spec(name: str, schedule: str = "leading", final_sigma: str = "zero",
                             karras_spacing: str = "leading") -> Tuple[str, Dict]:
    """(diffusers scheduler class name, config overrides on SDXL's) matching (name, schedule)."""
    check_sampler(name, schedule)
    if name not in DIFFUSERS_SCHEDULERS:
        raise InputError(f"sampler {name!r} has no diffusers scheduler to compare with; those "
                         f"that do: {', '.join(DIFFUSERS_SCHEDULERS)}")
    if schedule == "sgm":
        raise InputError("the sgm schedule has no diffusers scheduler config; choose from "
                         f"{', '.join(s for s in SCHEDULES if s != 'sgm')}")
    cls = DIFFUSERS_SCHEDULERS[name]
    if schedule == "karras":
        if name == "euler_a":
            raise InputError("euler_a cannot be compared with the karras schedule: "
                             "EulerAncestralDiscreteScheduler has no karras sigmas")
        overrides = {"timestep_spacing": karras_spacing, "use_karras_sigmas": True}
    else:
        overrides = {"timestep_spacing": schedule}
    if final_sigma != "zero":
        if name not in ("euler", "dpmpp_2m"):
            raise InputError(f"{cls} has no final_sigmas_type")
        overrides["final_sigmas_type"] = final_sigma
    return cls, overrides


def diffusers_scheduler_config(name: str, schedule: str = "leading", **kwargs) -> Dict:
    """SDXL's scheduler config turned into the one for (name, schedule); JSON-ready."""
    cls, overrides = diffusers_scheduler_spec(name, schedule, **kwargs)
    return {**SDXL_SCHEDULER_CONFIG, "_class_name": cls, **overrides}
