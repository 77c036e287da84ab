"""Run the diffusers reference once and record everything the stages compare against.

The UNet's inputs and outputs are captured with a forward hook, the latents after each step
with diffusers' `callback_on_step_end`; initial and per-step noise are drawn here with numpy and
fed to diffusers, so the port can be given the very same arrays.
"""
from __future__ import annotations

import platform
from typing import Dict, List

import numpy as np

from sdxl_common.progress import bar as progress_bar

from . import eta
from .contract import to_images
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
    for call in judged_encodes(spec, (height, width)) + [generation_encode(spec, (height, width))]:
        tensors.update({call.key(k): v for k, v in call.run(ref).items()})

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
