"""Which diffusers scheduler each of the port's samplers is compared with, and how it is
configured: the reference side's knowledge, so it lives with the harness, not the port."""
from __future__ import annotations

from typing import Dict, Tuple

from sdxl_common.errors import InputError
from sdxl_ms.weights.diffusers_configs import SDXL_SCHEDULER_CONFIG

from .sampler_registry import (DIFFUSERS_SCHEDULES, SAMPLERS, SamplerEntry, check_schedule,
                               sampler_entry)

DIFFUSERS_SCHEDULERS = {e.name: e.diffusers for e in SAMPLERS.values() if e.diffusers}


def check_comparable_sampler(name: str) -> SamplerEntry:
    """A known sampler with a diffusers scheduler to compare with."""
    entry = sampler_entry(name)
    if entry.diffusers is None:
        raise InputError(f"sampler {name!r} has no diffusers scheduler to compare with; those "
                         f"that do: {', '.join(DIFFUSERS_SCHEDULERS)}")
    return entry


def check_comparable_schedule(schedule: str) -> str:
    """A known schedule that a diffusers scheduler config can build."""
    check_schedule(schedule)
    if schedule not in DIFFUSERS_SCHEDULES:
        raise InputError(f"the {schedule} schedule has no diffusers scheduler config; choose "
                         f"from {', '.join(DIFFUSERS_SCHEDULES)}")
    return schedule


def diffusers_scheduler_spec(name: str, schedule: str = "leading", final_sigma: str = "zero",
                             karras_spacing: str = "leading") -> Tuple[str, Dict]:
    """(diffusers scheduler class name, config overrides on SDXL's) matching (name, schedule)."""
    entry = check_comparable_sampler(name)
    check_comparable_schedule(schedule)
    cls = entry.diffusers
    if schedule == "karras":
        if not entry.karras:
            raise InputError(f"{name} cannot be compared with the karras schedule: "
                             f"{cls} has no karras sigmas")
        overrides = {"timestep_spacing": karras_spacing, "use_karras_sigmas": True}
    else:
        overrides = {"timestep_spacing": schedule}
    if final_sigma != "zero":
        if not entry.final_sigmas_type:
            raise InputError(f"{cls} has no final_sigmas_type")
        overrides["final_sigmas_type"] = final_sigma
    return cls, overrides


def diffusers_scheduler_config(name: str, schedule: str = "leading", **kwargs) -> Dict:
    """SDXL's scheduler config turned into the one for (name, schedule); JSON-ready."""
    cls, overrides = diffusers_scheduler_spec(name, schedule, **kwargs)
    return {**SDXL_SCHEDULER_CONFIG, "_class_name": cls, **overrides}
