"""The stage contract: what a port (and the reference) answers, numpy in and numpy out, with
diffusers' semantics. Any MindSpore SDXL that implements `StageContract` can be checked;
`SamplingContract` is optional and lets the harness test the port's own sampler loop.

Shapes (B images, 77 tokens, h = H/8, w = W/8; dtypes as returned):

    tokenize(prompts)                         -> {"input_ids", "input_ids_2"}: int64 (B, 77)
    encode_prompt(prompt, negative_prompt=None, *, original_size, crops_coords_top_left,
                  target_size)                -> ENCODE_OUTPUTS: float32
          prompt_embeds (1, 77, C), pooled_prompt_embeds (1, P), negative_* alike,
          add_time_ids / negative_add_time_ids (1, 6); a `None` negative gives zeros
          (SDXL-base's force_zeros_for_empty_prompt), `""` is encoded
    unet(sample, timestep, encoder_hidden_states, text_embeds, time_ids)
                                              -> eps float32 (B, 4, h, w); timestep a float
                                                 (or (B,)), the UNet's input already scaled
    decode(latents)                           -> float32 (B, 3, H, W) in about [-1, 1]:
                                                 vae.decode(latents / scaling_factor)
    guide(eps, scale)          (optional)     -> float32 (B, 4, h, w) from eps (2B, ...),
                                                 uncond first: the port's CFG combination
    sample(run, eps, callback) (optional)     -> final latents float32 (B, 4, h, w); see
                                                 `SamplingContract`
    describe()                 (optional)     -> dict the report records: "version", and
                                                 "execution" (how the port runs: compiled
                                                 parts, threads)
    cells()                    (optional)     -> {stage: [(sgm path, cell), ...]}: the
                                                 networks that compute each of "conditioner",
                                                 "unet", "decode", for `--locate` and the
                                                 per-module truths (`CellContract`)
    eager()                    (optional)     -> a context manager in which the port runs
                                                 every module's own call (no compiled graph
                                                 over it), so forward hooks fire

Capabilities are what a port declares, never guessed from its attributes: a port without
`cells()` gets stage verdicts, and `--locate` says in one line that it cannot go further.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import (Callable, Dict, List, Optional, Protocol, Sequence, Tuple,
                    runtime_checkable)

import numpy as np

STAGES: Tuple[str, ...] = ("tokens", "conditioner", "unet", "sampler", "trajectory", "decode",
                           "image")
TOKENIZE_OUTPUTS = ("input_ids", "input_ids_2")
ENCODE_OUTPUTS = ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
                  "negative_pooled_prompt_embeds", "add_time_ids", "negative_add_time_ids")
MAX_TOKENS = 77

EpsFn = Callable[[np.ndarray, float], np.ndarray]  # (x_in (2B,4,h,w), t) -> eps (2B,4,h,w)
StepCallback = Callable[[int, np.ndarray], None]  # (step index, latents after the step)


@runtime_checkable
class StageContract(Protocol):
    """The four stage methods every port answers (see the module docstring for shapes)."""

    def tokenize(self, prompts: Sequence[str]) -> Dict[str, np.ndarray]: ...

    def encode_prompt(self, prompt: str, negative_prompt: Optional[str] = None, *,
                      original_size: Tuple[int, int], crops_coords_top_left: Tuple[int, int],
                      target_size: Tuple[int, int]) -> Dict[str, np.ndarray]: ...

    def unet(self, sample: np.ndarray, timestep, encoder_hidden_states: np.ndarray,
             text_embeds: np.ndarray, time_ids: np.ndarray) -> np.ndarray: ...

    def decode(self, latents: np.ndarray) -> np.ndarray: ...


@dataclass
class SamplerRun:
    """One sampling run as the reference made it: the port's sampler repeats it.

    `initial_noise` is the unscaled N(0,1) starting draw (B, 4, h, w); `step_noise` holds the
    per-step draws (steps, B, 4, h, w) that ancestral samplers use, in order. `sigmas` (n + 1,
    ending in 0), `timesteps` (n) and `init_noise_sigma` are the reference scheduler's, for a
    port that takes its grid from the reference rather than building its own.
    """

    sampler: str
    schedule: str
    steps: int
    guidance: float
    initial_noise: np.ndarray
    step_noise: np.ndarray
    sigmas: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    timesteps: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    init_noise_sigma: float = 1.0


@runtime_checkable
class SamplingContract(Protocol):
    """A port that runs its own sampler loop.

    `sample(run, eps, callback)` starts from `run.initial_noise` (scaled as its sampler scales
    it), calls `eps(x_in, t)` once per network evaluation with the classifier-free-guidance
    batch (uncond first, then cond, inputs already scaled by 1/sqrt(sigma^2 + 1)), combines
    the two halves with guidance `run.guidance`, takes its step (drawing `run.step_noise[i]`
    where it needs noise), calls `callback(i, latents)` after step i, and returns the final
    latents. The harness feeds `eps` with the reference's recorded UNet outputs (the sampler
    stage) or the port's own UNet (the trajectory stage).
    """

    def sample(self, run: SamplerRun, eps: EpsFn, callback: StepCallback) -> np.ndarray: ...


@runtime_checkable
class CellContract(Protocol):
    """A port that names its modules, for localisation and module truths.

    `cells()` returns, per stage ("conditioner", "unet", "decode"), the MindSpore Cells that
    compute it with the sgm path each stands at: `[("conditioner.embedders.0", clip_l),
    ("conditioner.embedders.1", big_g)]`, `[("model.diffusion_model", unet)]`,
    `[("first_stage_model", vae)]` (the VAE that decodes: its float32 copy in a float16 run).
    Below them, parameter names are sgm's (MindSpore's gamma/beta/embedding_table spellings
    are read as torch's), which is how each module is paired with its reference counterpart;
    names that differ further take `--module-names FILE`. The harness observes the modules with
    MindSpore's forward hooks in the stage's free run (through the contract's own methods) and
    calls each the way the free run called it, with the reference's inputs in place. A port
    whose modules are not stock Cells offers `register_forward_pre_hook` and
    `register_forward_hook` on them with MindSpore's signatures (the built-in port does).
    """

    def cells(self) -> Dict[str, List[Tuple[str, object]]]: ...


REQUIRED_METHODS = ("tokenize", "encode_prompt", "unet", "decode")
_REQUIRED_ARGS = {
    "tokenize": ("prompts",),
    "encode_prompt": ("prompt", "negative_prompt", "original_size", "crops_coords_top_left",
                      "target_size"),
    "unet": ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"),
    "decode": ("latents",),
    "sample": ("run", "eps", "callback"),
    "guide": ("eps", "scale"),
    "describe": (),
    "cells": (),
    "eager": (),
}


def signature_problems(port) -> List[str]:
    """What keeps `port` from the contract: missing methods or argument names."""
    problems = []
    for name in REQUIRED_METHODS + tuple(m for m in ("sample", "guide", "describe", "cells",
                                             "eager") if hasattr(port, m)):
        method = getattr(port, name, None)
        if not callable(method):
            problems.append(f"no method {name}()")
            continue
        try:
            params = inspect.signature(method).parameters
        except (TypeError, ValueError):
            continue  # a builtin or C callable: nothing to check
        if any(p.kind == p.VAR_KEYWORD for p in params.values()):
            continue
        missing = [a for a in _REQUIRED_ARGS[name] if a not in params]
        if missing:
            problems.append(f"{name}() lacks argument(s) {', '.join(missing)}")
    return problems


def output_problems(port, height: int = 64, width: int = 64) -> List[str]:
    """Call each stage method once on small inputs and check names, shapes and dtypes."""
    problems: List[str] = []
    ids = port.tokenize(["a red cube", "blurry"])
    for key in TOKENIZE_OUTPUTS:
        arr = np.asarray(ids.get(key)) if key in ids else None
        if arr is None or arr.shape != (2, MAX_TOKENS) or arr.dtype != np.int64:
            problems.append(f"tokenize()[{key!r}]: want int64 (2, {MAX_TOKENS}), got "
                            f"{None if arr is None else (arr.dtype, arr.shape)}")
    cond = port.encode_prompt("a red cube", "blurry", original_size=(height, width),
                              crops_coords_top_left=(0, 0), target_size=(height, width))
    for key in ENCODE_OUTPUTS:
        arr = cond.get(key)
        if arr is None or np.asarray(arr).dtype != np.float32 or np.asarray(arr).shape[0] != 1:
            problems.append(f"encode_prompt()[{key!r}]: want float32 (1, ...), got "
                            f"{None if arr is None else (np.asarray(arr).dtype, np.shape(arr))}")
    if problems:
        return problems
    batch = cfg_batch(cond)
    latents = np.random.default_rng(0).standard_normal(
        (2, 4, height // 8, width // 8)).astype(np.float32)
    eps = np.asarray(port.unet(latents, 500.0, **batch))
    if eps.shape != latents.shape or eps.dtype != np.float32:
        problems.append(f"unet(): want float32 {latents.shape}, got {eps.dtype} {eps.shape}")
    image = np.asarray(port.decode(latents[:1]))
    if image.shape != (1, 3, height, width) or image.dtype != np.float32:
        problems.append(f"decode(): want float32 (1, 3, {height}, {width}), got "
                        f"{image.dtype} {image.shape}")
    return problems


def cfg_batch(cond: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """`encode_prompt`'s outputs as the UNet's classifier-free-guidance batch, uncond first:
    the keyword arguments of `unet` besides sample and timestep."""
    both = lambda neg, pos: np.concatenate([cond[neg], cond[pos]])  # noqa: E731
    return {"encoder_hidden_states": both("negative_prompt_embeds", "prompt_embeds"),
            "text_embeds": both("negative_pooled_prompt_embeds", "pooled_prompt_embeds"),
            "time_ids": both("negative_add_time_ids", "add_time_ids")}


def guide(eps: np.ndarray, scale: float) -> np.ndarray:
    """The reference's CFG arithmetic (diffusers: u + s (c - u)) on an uncond-first batch."""
    u, c = np.split(np.asarray(eps, np.float32), 2)
    return u + np.float32(scale) * (c - u)


def to_image_units(decoded: np.ndarray) -> np.ndarray:
    """Decoded float (B, 3, H, W) in about [-1, 1] -> float32 (B, H, W, 3) in 0-255 units,
    before rounding: what an image's float64 truth is kept as."""
    unit = np.clip(np.asarray(decoded, np.float64) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    return (unit * 255).astype(np.float32)


def to_images(decoded: np.ndarray) -> np.ndarray:
    """Decoded float (B, 3, H, W) in about [-1, 1] -> uint8 (B, H, W, 3), rounded as diffusers
    rounds (x 255, not the seed tutorial's 225)."""
    from sdxl_common.images import to_uint8

    return to_uint8(np.clip(np.asarray(decoded, np.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1))
