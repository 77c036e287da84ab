"""Noise levels: the 1000 training sigmas, the per-sampler inference grids, sigma -> timestep maps.

Everything is in the "VE" (k-diffusion) parametrisation: `x = x0 + sigma * eps`, and the network
gets `x / sqrt(sigma**2 + 1)` with a timestep. A `Schedule` holds the `n + 1` sigmas a sampler
walks (the last is 0, or sigma_min when asked), the timestep the network gets at each of the `n`
grid points, and the std of the starting latent (`init_noise_sigma`).

Each diffusers scheduler builds its own grid from (spacing, n), so the grid is a function of the
sampler too. Two grid families exist in diffusers 0.42.1:

| grid     | schedulers                           | "leading", n=4     | karras sigma range      |
|----------|--------------------------------------|--------------------|-------------------------|
| "euler"  | Euler, EulerAncestral, Heun, LMS     | 751, 501, 251, 1   | ends of the spaced grid |
| "dpm"    | DPMSolverMultistep                   | 801, 601, 401, 201 | training sigma ends     |

Further differences between the two, all reproduced here: "euler" timesteps are float32 (the
"linspace" spacing gives non-integers), karras timesteps are log-sigma interpolated floats;
"dpm" timesteps are integers (karras timesteps rounded), its "linspace" grid has n+1 points with
the last dropped, and its scheduler works in VP space with `init_noise_sigma = 1`, which is
`sqrt(sigma_0**2 + 1)` here in VE space whatever the spacing. The "euler" grid's
`init_noise_sigma` is `sqrt(sigma_max**2 + 1)` for "leading" but `sigma_max` for "trailing" and
"linspace" (a diffusers convention, kept for parity).

sgm's `LegacyDDPMDiscretization` ("sgm" schedule) uses the training sigmas at the integer
timesteps `linspace(999, 0, n, endpoint=False)` truncated, a final 0, and `sqrt(1 + sigma_0**2)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012

SPACINGS = ("leading", "trailing", "linspace")
SCHEDULES = SPACINGS + ("karras", "sgm")
GRIDS = ("euler", "dpm")
FINAL_SIGMAS = ("zero", "sigma_min")


def _choice(kind: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid choices: {', '.join(map(str, valid))}")


def _check_steps(num_steps: int) -> None:
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")


# ---------------------------------------------------------------------------------------------
# training sigmas


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(..., dtype=float32)` on CPU, bit for bit (measured on torch 2.x with AVX2,
    and on torch 2.13.0 with AVX-512).

    torch computes a float32 step, fills the first half as `start + step*i` and the second half
    as `end - step*(steps-1-i)`, each a fused multiply-add rounded once to float32. numpy's
    linspace rounds differently in 307 of the 1000 betas' square roots.
    """
    f32 = np.float32
    start32, end32 = f32(start), f32(end)
    step = f32((end32 - start32) / f32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    low = np.float64(start32) + np.float64(step) * i  # exact product, one rounding (fma)
    high = np.float64(end32) - np.float64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, low, high).astype(f32)


def alphas_cumprod(reference: str = "diffusers") -> np.ndarray:
    """Cumulative alpha products for the SDXL betas `linspace(sqrt(b0), sqrt(b1), 1000)**2`.

    "diffusers": float32 like torch (betas and alphas in float32, the cumulative product
    accumulated in float64 and stored as float32, as torch's CPU cumprod does).
    "sgm" / "float64": float64 throughout, as sgm's `make_beta_schedule` and `np.cumprod`. Not
    bit for bit: numpy's float64 linspace differs from sgm's torch one in the last bit of 276 of
    the 1000 betas, which moves 22 products and 16 ratios `(1 - acp) / acp` by 1 ulp (2.2e-16
    relative); the float32 ratios that `training_sigmas("sgm")` roots are identical.
    """
    _choice("reference", reference, ("diffusers", "sgm", "float64"))
    if reference == "diffusers":
        betas = _torch_linspace_f32(BETA_START**0.5, BETA_END**0.5, NUM_TRAIN_TIMESTEPS) ** 2
        alphas = np.float32(1.0) - betas
        return np.cumprod(alphas.astype(np.float64)).astype(np.float32)
    betas = np.linspace(BETA_START**0.5, BETA_END**0.5, NUM_TRAIN_TIMESTEPS, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def training_sigmas(reference: str = "diffusers") -> np.ndarray:
    """The 1000 sigmas `sqrt((1 - acp) / acp)`, index = training timestep (ascending).

    "diffusers": float32 math like diffusers with a correctly rounded square root. The float32
    ratio equals diffusers' bit for bit; the root may not, because torch takes float32 roots on
    CPU through MKL, whose rounding depends on the instruction set it dispatches to.
    "sgm": the float64 ratio cast to float32 (bitwise the one sgm's `LegacyDDPMDiscretization`
    and `DiscreteDenoiser` root), then a correctly rounded float32 root. sgm's own float32
    `** 0.5` is that same torch/MKL root, so it is not always correctly rounded.
    Measured (torch 2.13.0+cpu, MKL 2024.2), entries of 1000 one ulp off the reference, never
    more: AVX-512 (default there) sgm 9, diffusers 6; AVX2 0 and 0; SSE4.2 172 and 187. Another
    machine gave 177 and 190. See docs/porting-notes.md, section 6.
    "float64": the float64 ratio and root (for formula checks). sgm and diffusers values differ
    by up to 1.3e-5 relative, largest at small sigmas (cumulative float32 rounding in diffusers).
    """
    acp = alphas_cumprod(reference)
    ratio = (1 - acp) / acp
    if reference == "sgm":
        return np.sqrt(ratio.astype(np.float32))
    return np.sqrt(ratio)


# ---------------------------------------------------------------------------------------------
# sigma -> timestep maps


class LogSigmaInterp:
    """diffusers' `_sigma_to_t`: a fractional timestep, linear in log sigma between neighbours.

    Used for karras grids and for sigmas off the grid. Under numpy 1.x (this project's pin)
    diffusers' mix of a float64 query with float32 log sigmas runs in float32, so the weight is
    computed in float32 here too and, given the same training sigmas, the timesteps match
    bitwise (see `training_sigmas` for when the computed sigmas are not diffusers').
    """

    def __init__(self, sigmas: Optional[np.ndarray] = None):
        sigmas = training_sigmas("diffusers") if sigmas is None else np.asarray(sigmas, np.float32)
        self.log_sigmas = np.log(sigmas).astype(np.float32)

    def __call__(self, sigma: float) -> float:
        log_sigma = np.float32(np.log(np.maximum(np.float64(sigma), 1e-10)))
        last = len(self.log_sigmas) - 2
        low_idx = int(np.clip(np.searchsorted(self.log_sigmas, log_sigma, side="right") - 1, 0, last))
        low, high = self.log_sigmas[low_idx], self.log_sigmas[low_idx + 1]
        w = np.clip((low - log_sigma) / (low - high), np.float32(0), np.float32(1))
        return float((np.float32(1) - w) * np.float64(low_idx) + np.float64(w) * (low_idx + 1))


class QuantizedTimesteps:
    """sgm's `DiscreteDenoiser`: snap sigma to the nearest training sigma, feed its index.

    Distances are taken in float64 here, in float32 in sgm.
    """

    def __init__(self, sigmas: Optional[np.ndarray] = None):
        self.sigmas = training_sigmas("sgm") if sigmas is None else np.asarray(sigmas)

    def index(self, sigma: float) -> int:
        return int(np.abs(np.float64(sigma) - self.sigmas.astype(np.float64)).argmin())

    def snap(self, sigma: float) -> np.float32:
        return np.float32(self.sigmas[self.index(sigma)])

    def __call__(self, sigma: float) -> float:
        return float(self.index(sigma))


SigmaToTimestep = Callable[[float], float]


# ---------------------------------------------------------------------------------------------
# schedules


@dataclass(frozen=True)
class Schedule:
    """What a sampler walks: `sigmas` (n+1, descending), `timesteps` (n), starting noise std.

    `timesteps[i]` is what the network gets at `sigmas[i]`; `timestep_map` gives the timestep of
    a sigma off the grid (churn, midpoints). Noise of std 1 is multiplied by `init_noise_sigma`.
    """

    name: str
    sigmas: np.ndarray
    timesteps: np.ndarray
    init_noise_sigma: np.float32
    timestep_map: SigmaToTimestep

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def timestep(self, index: int) -> Optional[float]:
        """The grid timestep of `sigmas[index]`, or None past the grid (let the map decide)."""
        return float(self.timesteps[index]) if index < len(self.timesteps) else None


def _spaced_timesteps(spacing: str, n: int, grid: str, steps_offset: int = 1) -> np.ndarray:
    """The timestep grid of diffusers' `set_timesteps` for the "euler" or "dpm" family."""
    _choice("spacing", spacing, SPACINGS)
    _choice("grid", grid, GRIDS)
    T = NUM_TRAIN_TIMESTEPS
    if grid == "euler":
        if spacing == "linspace":
            return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
        if spacing == "leading":
            return (np.arange(n) * (T // n)).round()[::-1].astype(np.float32) + steps_offset
        return np.arange(T, 0, -T / n).round().astype(np.float32) - 1
    # dpm: one extra point for "linspace"/"leading", dropped at the end; integer timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(n + 1) * (T // (n + 1))).round()[::-1][:-1].astype(np.int64) + steps_offset
    return np.arange(T, 0, -T / n).round().astype(np.int64) - 1


def _final_sigma(final_sigma: str, sigmas: np.ndarray) -> float:
    _choice("final_sigma", final_sigma, FINAL_SIGMAS)
    return 0.0 if final_sigma == "zero" else float(sigmas[0])


def _init_sigma(sigma_max: np.float32, plus_one: bool) -> np.float32:
    s = np.float32(sigma_max)
    return np.float32((s * s + np.float32(1.0)) ** np.float32(0.5)) if plus_one else s


def _train(train_sigmas: Optional[np.ndarray]) -> np.ndarray:
    return training_sigmas("diffusers") if train_sigmas is None else np.asarray(train_sigmas, np.float32)


def spaced_schedule(spacing: str, num_steps: int, grid: str = "euler", final_sigma: str = "zero",
                    steps_offset: int = 1, train_sigmas: Optional[np.ndarray] = None) -> Schedule:
    """diffusers' "leading" / "trailing" / "linspace" grid, sigmas linearly interpolated.

    `train_sigmas` replaces the computed training sigmas, e.g. by a diffusers scheduler's own:
    torch takes float32 square roots through MKL, which may round some of the 1000 sigmas one
    ulp away from the correctly rounded values computed here (6 with AVX-512, 0 with AVX2, 187
    with SSE4.2, measured; see `training_sigmas`).
    """
    _check_steps(num_steps)
    train = _train(train_sigmas)
    timesteps = _spaced_timesteps(spacing, num_steps, grid, steps_offset)
    sigmas = np.interp(timesteps, np.arange(len(train)), train)
    sigmas = np.append(sigmas, _final_sigma(final_sigma, train)).astype(np.float32)
    plus_one = grid == "dpm" or spacing == "leading"
    return Schedule(spacing, sigmas, timesteps.astype(np.float32), _init_sigma(sigmas.max(), plus_one),
                    LogSigmaInterp(train))


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: n sigmas evenly spaced in sigma**(1/rho), float64."""
    ramp = np.linspace(0, 1, num_steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def karras_schedule(num_steps: int, sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
                    rho: float = 7.0, grid: str = "euler", sigma_range: str = "training",
                    spacing: str = "leading", final_sigma: str = "zero",
                    train_sigmas: Optional[np.ndarray] = None) -> Schedule:
    """Karras sigmas; unspecified ends come from `sigma_range`.

    `sigma_range="training"`: the training sigma ends (0.0292, 14.6146; diffusers' DPM-Solver,
    k-diffusion). `sigma_range="grid"`: the ends of the `spacing` grid, which is what diffusers'
    Euler/Heun/LMS do with `use_karras_sigmas` (for SDXL's "leading", 4 steps: sigma(751)..sigma(1)).
    "euler" grid timesteps are log-sigma interpolated floats, "dpm" ones are rounded; with the
    computed training sigmas they may sit one float32 ulp (<= 6.1e-5) from diffusers' (see
    `spaced_schedule` on `train_sigmas`).
    """
    _check_steps(num_steps)
    _choice("sigma_range", sigma_range, ("training", "grid"))
    train = _train(train_sigmas)
    if sigma_range == "grid":
        t = _spaced_timesteps(spacing, num_steps, grid)
        ends = np.interp(t, np.arange(len(train)), train)
        lo, hi = float(ends[-1]), float(ends[0])
    else:
        lo, hi = float(train[0]), float(train[-1])
    lo = lo if sigma_min is None else float(sigma_min)
    hi = hi if sigma_max is None else float(sigma_max)
    sigmas = karras_sigmas(num_steps, lo, hi, rho)
    to_t = LogSigmaInterp(train)
    timesteps = np.array([to_t(s) for s in sigmas])
    if grid == "dpm":
        timesteps = timesteps.round()
    sigmas = np.append(sigmas, _final_sigma(final_sigma, train)).astype(np.float32)
    plus_one = grid == "dpm" or spacing == "leading"
    return Schedule("karras", sigmas, timesteps.astype(np.float32), _init_sigma(sigmas.max(), plus_one), to_t)


def sgm_timesteps(num_steps: int) -> np.ndarray:
    """sgm's `generate_roughly_equally_spaced_steps`, descending: 999, 974, ..., 24 for 40."""
    _check_steps(num_steps)
    if num_steps > NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"the sgm schedule has at most {NUM_TRAIN_TIMESTEPS} steps, got {num_steps}")
    return np.linspace(NUM_TRAIN_TIMESTEPS - 1, 0, num_steps, endpoint=False).astype(int)


def sgm_schedule(num_steps: int) -> Schedule:
    """sgm `LegacyDDPMDiscretization`: training sigmas at integer timesteps, final 0 appended."""
    train = training_sigmas("sgm")
    timesteps = sgm_timesteps(num_steps)
    sigmas = np.append(train[timesteps], np.float32(0.0)).astype(np.float32)
    return Schedule("sgm", sigmas, timesteps.astype(np.float32), _init_sigma(sigmas[0], True),
                    QuantizedTimesteps(train))


def make_schedule(schedule: str, num_steps: int, grid: str = "euler", **options) -> Schedule:
    """Build a schedule by name (see `SCHEDULES`); options go to the builder of that name."""
    _choice("schedule", schedule, SCHEDULES)
    _check_steps(num_steps)
    if schedule == "sgm":
        if options:
            raise ValueError(f"the sgm schedule takes no options, got {sorted(options)}")
        return sgm_schedule(num_steps)
    if schedule == "karras":
        return karras_schedule(num_steps, grid=grid, **options)
    return spaced_schedule(schedule, num_steps, grid=grid, **options)


SCHEDULE_OPTIONS: Tuple[str, ...] = ("final_sigma", "steps_offset", "sigma_min", "sigma_max", "rho",
                                     "sigma_range", "spacing", "train_sigmas")
