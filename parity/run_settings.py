"""The rules a parity run's settings obey, each written once.

`check_run` applies them all to a `RunSpec` (`sdxl-parity run`/`record`); a sweep file applies
each to every value of its list, so its message can name the key. Every rule raises one
`InputError` line naming the problem.
"""
from __future__ import annotations

from typing import Optional, Sequence

from sdxl_common import validate
from sdxl_common.dtypes import DTYPES
from sdxl_common.errors import InputError
from sdxl_common.validate import check_choice, check_existing, check_steps

# rules kept elsewhere, named here so `check_run` and a sweep file read all of them from here:
# a sweep checks samplers and schedules one by one, then each case's pair with `check_run`
from .schedulers import (check_comparable_sampler, check_comparable_schedule,  # noqa: F401
                         diffusers_scheduler_spec)


def check_preset(name: str) -> str:
    from sdxl_ms.config import PRESETS

    return check_choice(name, tuple(PRESETS), "preset")


def check_checkpoint(path: str) -> str:
    check_existing(path, "checkpoint")
    return path


def check_prompt(prompt: str) -> str:
    if not prompt.strip():
        raise InputError("the prompt is empty; only the negative prompt may be")
    return prompt


def check_seed(seed: int) -> int:
    """numpy seeds the noise (`record.noise_for`) and takes no negative seed."""
    if seed < 0:
        raise InputError(f"seed must be >= 0, got {seed}")
    return seed


def check_size(height: Optional[int], width: Optional[int]) -> None:
    """None: the preset's size, always valid."""
    validate.check_size(height or 8, width or 8)


def check_guidance(scale: float) -> float:
    """At <= 1 diffusers runs no unconditional pass, which the stages compare."""
    validate.check_guidance(scale)
    if scale <= 1:
        raise InputError(f"guidance must be > 1 for a parity run, got {scale:g}: at <= 1 "
                         "diffusers skips the unconditional pass the stages compare")
    return float(scale)


def check_dtype(dtype: str) -> str:
    return check_choice(dtype, DTYPES, "dtype")


def check_samplers(samplers: Sequence[str], schedule: str) -> None:
    """Each sampler comparable with diffusers on `schedule`."""
    if not samplers:
        raise InputError("--sampler names no sampler")
    for s in samplers:
        diffusers_scheduler_spec(s, schedule)


def check_run(spec) -> None:
    """Every rule, on a `RunSpec`, before anything loads."""
    check_preset(spec.preset)
    check_prompt(spec.prompt)
    check_seed(spec.seed)
    check_samplers(spec.samplers, spec.schedule)
    check_size(spec.height, spec.width)
    check_steps(spec.steps)
    check_guidance(spec.guidance)
    check_dtype(spec.dtype)
    if spec.checkpoint:
        check_checkpoint(spec.checkpoint)

