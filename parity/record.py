"""Run the diffusers reference once and record everything the stages compare against.

The UNet's inputs and outputs are captured with a forward hook, the latents after each step
with diffusers' `callback_on_step_end`; initial and per-step noise are drawn here with numpy and
fed to diffusers, so the port can be given the very same arrays.
"""
from __future__ import annotations

import platform
from typing import Dict, List, Optional

import numpy as np

from sdxl_common.progress import bar as progress_bar

from . import eta
from .contract import ENCODE_OUTPUTS, cfg_batch, to_images
from .eta import unet_calls_per_sampler
from .recording import (Recording, RunSpec, call_key, checkpoint_sha256, conditioner_key,
                        probe_key, sampler_key, tokens_key, truth_key)

# schedulers whose latents live in another parametrisation than the port's variance-exploding x
_VP_LATENTS = {"dpmpp_2m"}


def noise_for(spec: RunSpec, sampler_index: int, shape) -> Dict[str, np.ndarray]:
    """Initial and per-step N(0,1) draws for one sampler, from the run seed alone."""
    rng = np.random.default_rng([spec.seed, sampler_index])
    initial = rng.standard_normal(shape, dtype=np.float32)
    steps = rng.standard_normal((spec.steps,) + tuple(shape), dtype=np.float32)
    return {"initial_noise": initial, "step_noise": steps}


def full_step_latents(sampler: str, callback_latents: List[np.ndarray], sigmas: np.ndarray,
                      steps: int) -> np.ndarray:
    """Latents after each of the `steps` sampler steps, in the port's parametrisation.

    Heun's diffusers loop runs 2n-1 scheduler steps: the corrected states sit at the odd
    indices, the final Euler step last. DPM-Solver stores x / sqrt(1 + sigma^2).
    """
    lat = callback_latents
    if sampler == "heun":
        lat = [lat[i] for i in range(1, 2 * steps - 2, 2)] + [lat[-1]]
    if len(lat) != steps:
        raise RuntimeError(f"{sampler}: {len(lat)} recorded steps, expected {steps}")
    out = np.stack(lat).astype(np.float32)
    if sampler in _VP_LATENTS:
        after = np.asarray(sigmas[1:steps + 1], np.float64)
        out = (out * np.sqrt(1.0 + after ** 2).reshape(-1, 1, 1, 1, 1)).astype(np.float32)
    return out


def record(spec: RunSpec, checkpoint, reference=None, progress=None) -> Recording:
    """Record the reference for `spec` on `checkpoint` (a path)."""
    from .reference import load_reference, to_numpy

    ref = reference or load_reference(checkpoint, dtype=spec.dtype)
    default = ref.pipe.default_sample_size * ref.pipe.vae_scale_factor
    height, width = spec.resolved_size(default)
    tensors: Dict[str, np.ndarray] = {}
    tick = progress or (lambda what: None)

    tick("tokens")
    for key, ids in ref.tokenize([spec.prompt, spec.cond_negative]).items():
        tensors[tokens_key(key)] = ids
    tick("conditioner")
    for variant, negative in (("neg_none", None), ("neg_text", spec.cond_negative)):
        out = ref.encode_prompt(spec.prompt, negative, original_size=spec.cond_original_size,
                                crops_coords_top_left=spec.cond_crop, target_size=(height, width))
        tensors.update({conditioner_key(variant, k): v for k, v in out.items()})
    out = ref.encode_prompt(spec.prompt, spec.negative_prompt, original_size=(height, width),
                            target_size=(height, width))  # exactly what generation uses
    tensors.update({conditioner_key("generation", k): v for k, v in out.items()})

    shape = (1, 4, height // ref.pipe.vae_scale_factor, width // ref.pipe.vae_scale_factor)
    schedules = {}
    # diffusers' Heun runs 2n-1 scheduler steps (see full_step_latents)
    bar = progress_bar(total=sum(unet_calls_per_sampler(s, spec.steps) for s in spec.samplers),
                       desc="reference: sampling", unit="call")
    for index, sampler in enumerate(spec.samplers):
        tick(f"sampling with {sampler}")
        noise = noise_for(spec, index, shape)
        calls, step_latents = [], []

        def hook(module, args, kwargs, output):
            sample = args[0] if args else kwargs["sample"]
            t = args[1] if len(args) > 1 else kwargs["timestep"]
            calls.append((to_numpy(sample), float(np.asarray(to_numpy(t)).reshape(-1)[0]),
                          to_numpy(output.sample if hasattr(output, "sample") else output[0])))
            bar.update(1)
            eta.unet_done()
            tick(f"{sampler}: UNet call {len(calls)} of "
                 f"{unet_calls_per_sampler(sampler, spec.steps)}")

        def on_step(pipe, i, t, kwargs):
            step_latents.append(to_numpy(kwargs["latents"]))
            return kwargs

        handle = ref.pipe.unet.register_forward_hook(hook, with_kwargs=True)
        try:
            final = ref(spec.prompt, spec.negative_prompt, height=height, width=width,
                        num_inference_steps=spec.steps, guidance_scale=spec.guidance,
                        sampler=sampler, schedule=spec.schedule, latents=noise["initial_noise"],
                        step_noise=list(noise["step_noise"]), output_type="latent",
                        callback=on_step)
        finally:
            handle.remove()
        sched = ref.pipe.scheduler
        sigmas = sched.sigmas.float().cpu().numpy()
        for k, (x_in, t, eps) in enumerate(calls):
            tensors[call_key(sampler, k, "x_in")] = x_in
            tensors[call_key(sampler, k, "timestep")] = np.array([t], np.float32)
            tensors[call_key(sampler, k, "eps")] = eps
        tensors[sampler_key(sampler, "initial_noise")] = noise["initial_noise"]
        tensors[sampler_key(sampler, "step_noise")] = noise["step_noise"]
        tensors[sampler_key(sampler, "latents")] = full_step_latents(sampler, step_latents, sigmas,
                                                                     spec.steps)
        decoded = ref.decode(final)
        eta.decode_done()
        tensors[sampler_key(sampler, "decoded")] = decoded
        tensors[sampler_key(sampler, "image")] = to_images(decoded)
        schedules[sampler] = {"scheduler": type(sched).__name__,
                              "timesteps": [c[1] for c in calls],
                              "sigmas": [float(s) for s in sigmas],
                              "init_noise_sigma": float(sched.init_noise_sigma)}

    bar.close()
    tick("decode probe")
    probe = (0.1 * ref.pipe.vae.config.scaling_factor
             * np.random.default_rng([spec.seed, 99]).standard_normal(shape, dtype=np.float32))
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
    """Add the float64 truth to `rec`: the reference in float64 on exactly the inputs each
    stage feeds both sides (teacher-forced), for every conditioner output, UNet call and
    decode. Stored as float32 (its rounding, 6e-8, is far below any dtype's error here)."""
    tick = progress or (lambda what: None)
    if truth is None:
        tick("float64 truth: loading")
        truth = load_truth(checkpoint, rec.spec.dtype)
    spec, size = rec.spec, (rec.meta["height"], rec.meta["width"])
    tick("float64 truth: conditioner")
    for variant, negative in (("neg_none", None), ("neg_text", spec.cond_negative)):
        out = truth.encode_prompt(spec.prompt, negative, original_size=spec.cond_original_size,
                                  crops_coords_top_left=spec.cond_crop, target_size=size)
        rec.tensors.update({truth_key(conditioner_key(variant, k)): v for k, v in out.items()})
    batch = cfg_batch({k: rec.get(conditioner_key("generation", k)) for k in ENCODE_OUTPUTS})
    eta.set_cost(eta.TRUTH_COST)
    for sampler in spec.samplers:
        tick(f"float64 truth: UNet calls and decode of {sampler}")
        for k in range(rec.unet_calls(sampler)):
            rec.tensors[truth_key(call_key(sampler, k, "eps"))] = truth.unet(
                rec.get(call_key(sampler, k, "x_in")), rec.get(call_key(sampler, k, "timestep")),
                **batch)
            eta.unet_done()
        rec.tensors[truth_key(sampler_key(sampler, "decoded"))] = truth.decode(
            rec.get(sampler_key(sampler, "latents"))[-1])
        eta.decode_done()
    tick("float64 truth: decode probe")
    rec.tensors[truth_key(probe_key("decoded"))] = truth.decode(rec.get(probe_key("latents")))
    eta.decode_done()
    eta.set_cost(1.0)
    rec.meta["truth"] = {"dtype": "float64", "device": str(truth.device),
                         "stages": ["conditioner", "unet", "decode"]}


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


def reference_versions(ref) -> Dict[str, str]:
    import diffusers
    import transformers

    return {"torch": ref.torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "device": str(ref.device),
            "dtype": str(ref.dtype).replace("torch.", "")}
