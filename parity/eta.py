"""How much of a parity run is done, and about how long the rest will take.

A run's time goes almost entirely into UNet evaluations and VAE decodes, on both sides
(reference, its float64 truth when asked, then the port). `RunPlan` counts them from the spec
before any work; `RunClock` is told each one as it finishes and projects the remaining time from
the rate so far. Decodes are weighed against UNet calls by `DECODE_COST`, the float64 truth by
`TRUTH_COST`; both are estimates from the measured sdxl-base runs below, and the projection
corrects itself as work completes, because it always divides by the time actually taken.

Measured on a 2-core CPU, sdxl-base at 1024x1024, 2 Euler steps (README, "Full size on one
machine"): the port's teacher-forced UNet stage took 262 s for 2 batch-2 calls and its decode
stage 205 s for 2 decodes, so a decode costs ~0.8 UNet calls. The float64 truth runs the same
networks at twice the bytes per value; CPU float64 matmuls run at about half the float32 rate.

The clock is process-global (`start`, `unet_done`, `decode_done`, `summary`) so the places
that call the networks report work without threading an object through every stage; with no
clock started they do nothing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

from .sampler_registry import unet_calls_per_sampler

DECODE_COST = 0.8  # one VAE decode, in UNet-call units (sdxl-base 1024x1024, measured above)
TRUTH_COST = 2.0  # a float64 network call, in float32 calls of the same network (estimate)


@dataclass(frozen=True)
class RunPlan:
    """The work of a run in UNet-call units, per side."""

    reference: float
    truth: float
    port: float

    @property
    def total(self) -> float:
        return self.reference + self.truth + self.port

    @classmethod
    def for_run(cls, samplers: Sequence[str], steps: int, *, truth: bool = False,
                stages: Optional[Sequence[str]] = None) -> "RunPlan":
        calls = sum(unet_calls_per_sampler(s, steps) for s in samplers)
        decodes = len(samplers) + 1  # each sampler's final latents, and the probe
        reference = calls + DECODE_COST * decodes
        # the truth's teacher-forced calls and decodes, then its own free run per sampler
        free_run = calls + DECODE_COST * len(samplers)
        truth_units = TRUTH_COST * (reference + free_run) if truth else 0.0
        chosen = set(stages) if stages is not None else {"unet", "trajectory", "decode"}
        port = 0.0
        if "unet" in chosen:  # teacher-forced calls
            port += calls
        if chosen & {"trajectory", "image"}:  # the port's own loop, and its decode
            port += calls + DECODE_COST * len(samplers)
        if "decode" in chosen:
            port += DECODE_COST * decodes
        return cls(reference=reference, truth=truth_units, port=port)


class RunClock:
    """Elapsed time and a projection of the remaining time of one run."""

    def __init__(self, total: float, done: float = 0.0, elapsed: float = 0.0,
                 cost: float = 1.0):
        self.total = max(float(total), 1e-9)
        self.done = float(done)
        self.cost = cost  # units one call of the current side is worth
        self._origin = time.perf_counter() - float(elapsed)

    def advance(self, units: float) -> None:
        self.done = min(self.total, self.done + units * self.cost)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._origin

    def remaining(self) -> Optional[float]:
        """Seconds left at the rate so far; None before any work has been measured."""
        if self.done <= 0:
            return None
        return self.elapsed * (self.total - self.done) / self.done

    def summary(self) -> str:
        left = self.remaining()
        text = f"{_clock(self.elapsed)} elapsed, {100 * self.done / self.total:.0f}% of the run"
        return text + ("" if left is None else f", about {_clock(left)} left")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return (f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours
            else f"{rest // 60}:{rest % 60:02d}")


_clock_now: Optional[RunClock] = None


def start(clock: Optional[RunClock]) -> None:
    """Make `clock` the one the networks' callers report to (None: stop reporting)."""
    global _clock_now
    _clock_now = clock


def current() -> Optional[RunClock]:
    return _clock_now


def set_cost(cost: float) -> None:
    """The units one network call is worth from now on (TRUTH_COST while the truth runs)."""
    if _clock_now is not None:
        _clock_now.cost = cost


def unet_done(calls: int = 1) -> None:
    if _clock_now is not None:
        _clock_now.advance(calls)


def decode_done(decodes: int = 1) -> None:
    if _clock_now is not None:
        _clock_now.advance(DECODE_COST * decodes)


def summary() -> str:
    """" (...)" with the run's elapsed and remaining time, or "" with no clock."""
    return "" if _clock_now is None else f" ({_clock_now.summary()})"
