"""How many CPU threads a network computes with, one rule for the port and the reference.

`SDXL_MS_THREADS=N` sets it (0: leave each framework's own default); unset, it is the cores
this process may run on. The reference needs the rule as much as the port: *measured*,
importing MindSpore sets OMP_NUM_THREADS=1 in the C environment of the process, which the
harness's spawned reference process then inherits, and torch reads it, so the reference
ran on one thread of two (the sdxl-base 1024x1024 VAE decode 120 s instead of 49 s) unless
its thread count is set explicitly.
"""
from __future__ import annotations

import os
from typing import Optional

from .errors import InputError

THREADS_ENV = "SDXL_MS_THREADS"


def available_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def configured_threads() -> Optional[int]:
    """The thread count `SDXL_MS_THREADS` asks for (the cores when unset), or None for the
    framework's own default (0); a value that is not a whole number is bad input."""
    env = os.environ.get(THREADS_ENV, "").strip()
    if not env:
        return available_cores()
    if env.isdigit():
        return int(env) or None
    raise InputError(f"{THREADS_ENV} must be a whole number of threads, got "
                     f"{os.environ[THREADS_ENV]!r}")
