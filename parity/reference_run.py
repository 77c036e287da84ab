"""Run the diffusers reference once and record everything the stages compare against.

The UNet's inputs and outputs are captured with a forward hook, the latents after each step
with diffusers' `callback_on_step_end`; initial and per-step noise are drawn here with numpy and
fed to diffusers, so the port can be given the very same arrays.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from sdxl_common.progress import bar as progress_bar

from . import eta
from .contract import to_image_units, to_images
from .recording import (Recording, RunSpec, call_key, checkpoint_sha256, probe_key,
                        sampler_key, tokens_key, truth_key)
from .sampler_registry import sampler_entry, unet_calls_per_sampler
from .stage_calls import (decode_calls, generation_encode, judged_encodes, unet_calls)


def noise_for(spec: RunSpec, sampler_index: int, shape) -> Dict[str, np.ndarray]:
    """Initial and per-step N(0,1) draws for one sampler, from the run seed alone."""
    rng = np.random.default_rng([spec.seed, sampler_index])
    initial = rng.standard_normal(shape, dtype=np.float32)
    steps = rng.standard_normal((spec.steps,) + tuple(shape), dtype=np.float32)
    return {"initial_noise": initial, "step_noise": steps}


# The probe's latent side is at most this (a 256x256 decode). The probe asks how the decoder's
# normalisations behave on a low-amplitude input (their epsilons are then not negligible); the
# per-group statistics of an i.i.d. draw do not depend on the map's size, so a larger probe
# says nothing more, and at 1024x1024 a full-size probe cost a full decode on each side
# (65 s reference, about 100 s port, measured). The decode stage's sampler latents keep
# checking the decoder at the run's own size.
PROBE_MAX_SIDE = 32


def probe_shape(latent_shape) -> Tuple[int, ...]:
    """The probe's latent shape for a run whose latents are `latent_shape` (B, C, h, w): the
    same up to `PROBE_MAX_SIDE` per side, so every run at 256x256 or less is unchanged."""
    *lead, h, w = latent_shape
    return tuple(lead) + (min(h, PROBE_MAX_SIDE), min(w, PROBE_MAX_SIDE))


def full_step_latents(sampler: str, callback_latents: List[np.ndarray], sigmas: np.ndarray,
                      steps: int) -> np.ndarray:
    """Latents after each of the `steps` sampler steps, in the port's variance-exploding
    parametrisation (see `SamplerEntry.full_step_indices` and `vp_latents`)."""
    entry = sampler_entry(sampler)
    if len(callback_latents) != entry.unet_calls(steps):
        raise RuntimeError(f"{sampler}: {len(callback_latents)} recorded scheduler steps, "
                           f"expected {entry.unet_calls(steps)} for {steps} steps")
    out = np.stack([callback_latents[i] for i in entry.full_step_indices(steps)]).astype(np.float32)
    if entry.vp_latents:
        after = np.asarray(sigmas[1:steps + 1], np.float64)
        out = (out * np.sqrt(1.0 + after ** 2).reshape(-1, 1, 1, 1, 1)).astype(np.float32)
    return out


@dataclass
class SampledRun:
    """One sampler's run of a reference side: each UNet call's (x_in, t, eps), the latents
    after each full step (`full_step_latents`), the final latents and the schedule used."""

    calls: List[Tuple[np.ndarray, float, np.ndarray]]
    latents: np.ndarray
    final: np.ndarray
    schedule: Dict


def sample(side, spec: RunSpec, sampler: str, index: int, size, on_call=lambda k: None,
           noise: Optional[Dict[str, np.ndarray]] = None) -> SampledRun:
    """Run diffusers' own denoising loop of `sampler` on `side` (the reference, or its float64
    truth) from the run's noise (`noise_for`, or `noise`), keeping what each UNet call got and
    gave (a forward hook) and the latents after each step (diffusers' step callback)."""
    from .reference import to_numpy

    height, width = size
    shape = (1, 4, height // side.pipe.vae_scale_factor, width // side.pipe.vae_scale_factor)
    noise = noise or noise_for(spec, index, shape)
    calls, step_latents = [], []

    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        calls.append((to_numpy(x), float(np.asarray(to_numpy(t)).reshape(-1)[0]),
                      to_numpy(output.sample if hasattr(output, "sample") else output[0])))
        on_call(len(calls))

    def on_step(pipe, i, t, kwargs):
        step_latents.append(to_numpy(kwargs["latents"]))
        return kwargs

    handle = side.pipe.unet.register_forward_hook(hook, with_kwargs=True)
    try:
        final = side(spec.prompt, spec.negative_prompt, height=height, width=width,
                     num_inference_steps=spec.steps, guidance_scale=spec.guidance,
                     sampler=sampler, schedule=spec.schedule, latents=noise["initial_noise"],
                     step_noise=list(noise["step_noise"]), output_type="latent",
                     callback=on_step)
    finally:
        handle.remove()
    sched = side.pipe.scheduler
    sigmas = sched.sigmas.float().cpu().numpy()
    return SampledRun(calls=calls, latents=full_step_latents(sampler, step_latents, sigmas,
                                                            spec.steps),
                      final=final,
                      schedule={"scheduler": type(sched).__name__,
                                "timesteps": [c[1] for c in calls],
                                "sigmas": [float(s) for s in sigmas],
                                "init_noise_sigma": float(sched.init_noise_sigma)})


class recorded_unet:
    """While active, `side`'s UNet answers its k-th call with `eps(k)` instead of computing:
    diffusers' own loop then replays recorded UNet outputs (the sampler stage's truth)."""

    def __init__(self, side, eps: Callable[[int], np.ndarray]):
        self.unet, self.eps, self.calls = side.pipe.unet, eps, 0

    def _forward(self, sample, *args, return_dict: bool = True, **kwargs):
        import torch
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        out = torch.from_numpy(np.asarray(self.eps(self.calls), np.float32)).to(
            sample.device, sample.dtype)
        self.calls += 1
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    def __enter__(self):
        self.unet.forward = self._forward  # an instance attribute shadows the class's forward
        return self

    def __exit__(self, *exc):
        del self.unet.forward
        return False


def record(spec: RunSpec, checkpoint, reference=None, progress=None) -> Recording:
    """Record the reference for `spec` on `checkpoint` (a path)."""
    from .reference import load_reference

    ref = reference or load_reference(checkpoint, dtype=spec.dtype)
    default = ref.pipe.default_sample_size * ref.pipe.vae_scale_factor
    height, width = spec.resolved_size(default)
    tensors: Dict[str, np.ndarray] = {}
    tick = progress or (lambda what: None)

    tick("tokens")
    for key, ids in ref.tokenize([spec.prompt, spec.cond_negative]).items():
        tensors[tokens_key(key)] = ids
    tick("conditioner")
    for call in judged_encodes(spec, (height, width)) + [generation_encode(spec, (height, width))]:
        tensors.update({call.key(k): v for k, v in call.run(ref).items()})

    shape = (1, 4, height // ref.pipe.vae_scale_factor, width // ref.pipe.vae_scale_factor)
    schedules = {}
    # diffusers' Heun runs 2n-1 scheduler steps (see full_step_latents)
    bar = progress_bar(total=sum(unet_calls_per_sampler(s, spec.steps) for s in spec.samplers),
                       desc="reference: sampling", unit="call")
    for index, sampler in enumerate(spec.samplers):
        tick(f"sampling with {sampler}")

        def on_call(done, sampler=sampler):
            bar.update(1)
            eta.unet_done()
            tick(f"{sampler}: UNet call {done} of {unet_calls_per_sampler(sampler, spec.steps)}")

        noise = noise_for(spec, index, shape)
        run = sample(ref, spec, sampler, index, (height, width), on_call, noise)
        for k, (x_in, t, eps) in enumerate(run.calls):
            tensors[call_key(sampler, k, "x_in")] = x_in
            tensors[call_key(sampler, k, "timestep")] = np.array([t], np.float32)
            tensors[call_key(sampler, k, "eps")] = eps
        tensors[sampler_key(sampler, "initial_noise")] = noise["initial_noise"]
        tensors[sampler_key(sampler, "step_noise")] = noise["step_noise"]
        tensors[sampler_key(sampler, "latents")] = run.latents
        decoded = ref.decode(run.final)
        eta.decode_done()
        tensors[sampler_key(sampler, "decoded")] = decoded
        tensors[sampler_key(sampler, "image")] = to_images(decoded)
        schedules[sampler] = run.schedule

    bar.close()
    tick("decode probe")
    probe = (0.1 * ref.pipe.vae.config.scaling_factor
             * np.random.default_rng([spec.seed, 99]).standard_normal(probe_shape(shape),
                                                                      dtype=np.float32))
    tensors[probe_key("latents")] = probe.astype(np.float32)
    tensors[probe_key("decoded")] = ref.decode(probe)
    eta.decode_done()
    from sdxl_ms.weights.synthetic import GENERATOR_VERSION

    meta = {"reference": reference_versions(ref), "height": height, "width": width,
            "checkpoint": spec.checkpoint_source(),
            "checkpoint_sha256": checkpoint_sha256(checkpoint)}
    if spec.checkpoint is None:  # seeded: `check` regenerates it, so pin what the seed meant
        meta["checkpoint_generator_version"] = GENERATOR_VERSION
    return Recording(spec=spec, tensors=tensors, schedules=schedules, meta=meta)


def record_truth(rec: Recording, checkpoint, truth=None, progress=None) -> None:
    """Add the float64 truth to `rec`, for every stage that computes in floating point:
      - teacher-forced (the reference in float64 on exactly the inputs each stage feeds both
        sides): every conditioner output, UNet call and decode;
      - sampler: diffusers' loop in float64 replaying the recorded UNet outputs
        (`recorded_unet`) from the same noise: each call's x_in and timestep, each step's
        latents (`<sampler>/replay_latents`);
      - trajectory and image: the float64 pipeline's own free run from the same noise, its
        latents per step and its final image, decoded, in 0-255 units unquantised.
    Stored as float32 (its rounding, 6e-8, is far below any dtype's error here). diffusers'
    Euler-type schedulers compute their step in float32 whatever the latents' dtype, so the
    sampler's truth is float32 arithmetic on float64 inputs: 6e-8, as far below float16's
    4.9e-4 as the storage."""
    tick = progress or (lambda what: None)
    if truth is None:
        tick("float64 truth: loading")
        truth = load_truth(checkpoint, rec.spec.dtype)
    spec, size = rec.spec, (rec.meta["height"], rec.meta["width"])
    tick("float64 truth: conditioner")
    for call in judged_encodes(spec, size):
        rec.tensors.update({truth_key(call.key(k)): v for k, v in call.run(truth).items()})
    eta.set_cost(eta.TRUTH_COST)
    tick("float64 truth: UNet calls")
    for call in unet_calls(rec):
        rec.tensors[truth_key(call.key("eps"))] = call.run(truth, rec)
        eta.unet_done()
    for call in decode_calls(rec):
        tick(f"float64 truth: decode ({call.name})")
        rec.tensors[truth_key(call.key)] = call.run(truth, rec)
        eta.decode_done()
    for index, sampler in enumerate(spec.samplers):
        tick(f"float64 truth: {sampler} replaying the recorded UNet outputs")
        noise = {"initial_noise": rec.get(sampler_key(sampler, "initial_noise")),
                 "step_noise": rec.get(sampler_key(sampler, "step_noise"))}
        with recorded_unet(truth, lambda k: rec.get(call_key(sampler, k, "eps"))):
            replay = sample(truth, spec, sampler, index, size, noise=noise)
        for k, (x_in, t, _) in enumerate(replay.calls):
            rec.tensors[truth_key(call_key(sampler, k, "x_in"))] = x_in
            rec.tensors[truth_key(call_key(sampler, k, "timestep"))] = np.array([t], np.float32)
        rec.tensors[truth_key(sampler_key(sampler, "replay_latents"))] = replay.latents
        tick(f"float64 truth: {sampler} free run")
        free = sample(truth, spec, sampler, index, size, noise=noise,
                      on_call=lambda done: eta.unet_done())
        rec.tensors[truth_key(sampler_key(sampler, "latents"))] = free.latents
        rec.tensors[truth_key(sampler_key(sampler, "image"))] = to_image_units(
            truth.decode(free.final))
        eta.decode_done()
    eta.set_cost(1.0)
    rec.meta["truth"] = {"dtype": "float64", "device": str(truth.device),
                         "stages": ["conditioner", "unet", "sampler", "trajectory", "decode",
                                    "image"]}


def load_truth(checkpoint, dtype: str):
    """The reference in float64 on the weights a `dtype` run holds (`round_weights`)."""
    from .reference import load_reference

    truth = load_reference(checkpoint, dtype="float64")
    if dtype != "float32":
        round_weights(truth, dtype)
    return truth


def round_weights(ref, dtype: str) -> None:
    """Round a float64 reference's weights through `dtype` (kept in float64): the truth of a
    reduced-precision run computes exactly on the weights both sides hold, so the reference's
    error against it is its arithmetic alone. Unrounded weights would add an error both sides
    share (*measured*, tiny fp16 UNet: ref-vs-truth 3e-3 with unrounded weights), which hides
    a port's own arithmetic bugs under it."""
    torch = ref.torch
    with torch.no_grad():
        for name in ("text_encoder", "text_encoder_2", "unet", "vae"):
            for p in getattr(ref.pipe, name).parameters():
                p.copy_(p.to(getattr(torch, dtype)).to(p.dtype))


def reference_versions(ref) -> Dict[str, object]:
    import diffusers
    import transformers

    return {"torch": ref.torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "device": str(ref.device),
            "dtype": str(ref.dtype).replace("torch.", ""),
            "threads": ref.torch.get_num_threads()}
