"""The seven stages: each compares the port against a recording of the reference.

Teacher forcing keeps the stages apart: the `unet` stage feeds the port's UNet the reference's
x_t, timestep and conditioning; the `sampler` stage replays the reference's UNet outputs through
the port's sampler; only `trajectory` and `image` let the port run free, so per-step error and
accumulated error are told apart.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from .metrics import compare, compare_exact, image_metrics
from .policy import Policy
from .recording import Recording
from .results import StageResult, TensorResult

STAGES = ("tokens", "conditioner", "unet", "sampler", "trajectory", "decode", "image")
ENCODE_OUTPUTS = ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
                  "negative_pooled_prompt_embeds", "add_time_ids", "negative_add_time_ids")


@dataclass
class StageContext:
    port: object  # sdxl_ms.SDXLPipeline (or anything with its stage contract)
    rec: Recording
    policy: Policy
    out_dir: Path
    dtype: str = "float32"
    port_images: Dict[str, np.ndarray] = field(default_factory=dict)  # filled by trajectory

    def judge(self, stage: str, name: str, ref, port, step: Optional[int] = None) -> TensorResult:
        m = compare(ref, port, **self.policy.tolerances(stage, self.dtype))
        return self.policy.tensor_result(stage, self.dtype, name, m, step=step)

    @property
    def size(self):
        return self.rec.meta["height"], self.rec.meta["width"]


# ---- stages ------------------------------------------------------------------------------


def stage_tokens(ctx: StageContext) -> StageResult:
    spec = ctx.rec.spec
    got = ctx.port.tokenize([spec.prompt, spec.cond_negative])
    tensors = []
    for key in ("input_ids", "input_ids_2"):
        m = compare_exact(ctx.rec.get(f"tokens/{key}"), got[key])
        tensors.append(ctx.policy.tensor_result("tokens", ctx.dtype, key, m))
    return ctx.policy.stage_result("tokens", ctx.dtype, tensors)


def stage_conditioner(ctx: StageContext) -> StageResult:
    spec = ctx.rec.spec
    tensors = []
    for variant, negative in (("neg_none", None), ("neg_text", spec.cond_negative)):
        got = ctx.port.encode_prompt(spec.prompt, negative, original_size=spec.cond_original_size,
                                     crops_coords_top_left=spec.cond_crop, target_size=ctx.size)
        for key in ENCODE_OUTPUTS:
            want = ctx.rec.get(f"conditioner/{variant}/{key}")
            if not np.any(want):  # zeroed negatives: exactly zero, judged like ids (exact)
                m = compare_exact(want, got[key])
                tensors.append(ctx.policy.tensor_result("tokens", ctx.dtype, f"{variant}/{key}", m))
            else:
                tensors.append(ctx.judge("conditioner", f"{variant}/{key}", want, got[key]))
    return ctx.policy.stage_result("conditioner", ctx.dtype, tensors)


def _generation_cond(ctx: StageContext):
    """The reference's conditioning for generation, batched uncond then cond."""
    c = lambda k: ctx.rec.get(f"conditioner/generation/{k}")  # noqa: E731
    return {"encoder_hidden_states": np.concatenate([c("negative_prompt_embeds"), c("prompt_embeds")]),
            "text_embeds": np.concatenate([c("negative_pooled_prompt_embeds"),
                                           c("pooled_prompt_embeds")]),
            "time_ids": np.concatenate([c("negative_add_time_ids"), c("add_time_ids")])}


def stage_unet(ctx: StageContext) -> StageResult:
    from sdxl_ms.sampling import VanillaCFG

    cond = _generation_cond(ctx)
    guider = VanillaCFG(ctx.rec.spec.guidance)
    tensors = []
    for sampler in ctx.rec.spec.samplers:
        for k in range(ctx.rec.unet_calls(sampler)):
            x_in = ctx.rec.get(f"{sampler}/call{k}/x_in")
            t = ctx.rec.get(f"{sampler}/call{k}/timestep")
            want = ctx.rec.get(f"{sampler}/call{k}/eps")
            got = ctx.port.unet(x_in, t, cond["encoder_hidden_states"], cond["text_embeds"],
                                cond["time_ids"])
            for name, w, g in (("eps_uncond", want[:1], got[:1]), ("eps_cond", want[1:], got[1:]),
                               ("eps_guided", _guide(want, ctx.rec.spec.guidance), guider.combine(got))):
                tensors.append(ctx.judge("unet", f"{sampler}/{name}", w, g, step=k))
    return ctx.policy.stage_result("unet", ctx.dtype, tensors)


def _guide(eps: np.ndarray, scale: float) -> np.ndarray:
    """The reference's CFG arithmetic (diffusers: u + s (c - u)), written out independently."""
    u, c = eps[:1], eps[1:]
    return u + np.float32(scale) * (c - u)


def _replay_network(ctx: StageContext, sampler: str):
    """A 'network' that answers the k-th call with the reference's recorded eps."""
    calls = iter(range(ctx.rec.unet_calls(sampler)))

    def network(x_in, t, cond):
        k = next(calls, None)
        if k is None:
            raise RuntimeError(f"{sampler}: the port's sampler asked for more UNet calls than "
                               "the reference made")
        return ctx.rec.get(f"{sampler}/call{k}/eps")

    return network


def _run_port_sampler(ctx: StageContext, sampler: str, network) -> List[np.ndarray]:
    from sdxl_ms.sampling import Denoiser, GivenNoise, GuidedDenoiser, VanillaCFG, make_sampler

    spec = ctx.rec.spec
    plan = make_sampler(sampler, spec.steps, spec.schedule)
    noise = GivenNoise(ctx.rec.get(f"{sampler}/initial_noise"), list(ctx.rec.get(f"{sampler}/step_noise")))
    denoise = GuidedDenoiser(network, Denoiser.for_schedule(plan.schedule),
                             VanillaCFG(spec.guidance), cond={}, uncond={})
    latents: List[np.ndarray] = []
    plan(denoise, noise, ctx.rec.get(f"{sampler}/initial_noise").shape,
         callback=lambda i, x, d: latents.append(np.array(x, np.float32)))
    return latents


def stage_sampler(ctx: StageContext) -> StageResult:
    tensors = []
    for sampler in ctx.rec.spec.samplers:
        got = _run_port_sampler(ctx, sampler, _replay_network(ctx, sampler))
        want = ctx.rec.get(f"{sampler}/latents")
        if len(got) != len(want):
            raise RuntimeError(f"{sampler}: the port ran {len(got)} steps, the reference {len(want)}")
        tensors += [ctx.judge("sampler", f"{sampler}/latents", w, g, step=i)
                    for i, (w, g) in enumerate(zip(want, got))]
    return ctx.policy.stage_result("sampler", ctx.dtype, tensors)


def stage_trajectory(ctx: StageContext) -> StageResult:
    """The port's own pipeline from the same noise; its final images feed the image stage."""
    from sdxl_ms.pipeline import to_uint8
    from sdxl_ms.sampling import GivenNoise

    spec = ctx.rec.spec
    height, width = ctx.size
    tensors = []
    for sampler in spec.samplers:
        latents: List[np.ndarray] = []
        noise = GivenNoise(ctx.rec.get(f"{sampler}/initial_noise"),
                           list(ctx.rec.get(f"{sampler}/step_noise")))
        final = ctx.port(spec.prompt, spec.negative_prompt, height=height, width=width,
                         num_inference_steps=spec.steps, guidance_scale=spec.guidance,
                         sampler=sampler, schedule=spec.schedule, noise=noise,
                         output_type="latent", progress=False,
                         callback=lambda i, x, d: latents.append(np.array(x, np.float32)))
        want = ctx.rec.get(f"{sampler}/latents")
        tensors += [ctx.judge("trajectory", f"{sampler}/latents", w, g, step=i)
                    for i, (w, g) in enumerate(zip(want, latents))]
        decoded = ctx.port.decode(final)
        ctx.port_images[sampler] = to_uint8(np.clip(decoded / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1))
    return ctx.policy.stage_result("trajectory", ctx.dtype, tensors)


def stage_decode(ctx: StageContext) -> StageResult:
    tensors = []
    for sampler in ctx.rec.spec.samplers:
        # teacher-forced: the reference's final latents are the last recorded step
        final = ctx.rec.get(f"{sampler}/latents")[-1]
        tensors.append(ctx.judge("decode", f"{sampler}/decoded", ctx.rec.get(f"{sampler}/decoded"),
                                 ctx.port.decode(final)))
    probe = ctx.rec.get("decode_probe/latents")
    tensors.append(ctx.judge("decode", "probe/decoded", ctx.rec.get("decode_probe/decoded"),
                             ctx.port.decode(probe)))
    return ctx.policy.stage_result(
        "decode", ctx.dtype, tensors,
        notes=["probe: a 0.1-amplitude latent, where normalisation epsilons are not negligible"])


def stage_image(ctx: StageContext) -> StageResult:
    from .reports import write_image_triplet

    if not ctx.port_images:
        stage_trajectory(ctx)
    tensors, images = [], {}
    for sampler in ctx.rec.spec.samplers:
        want, got = ctx.rec.get(f"{sampler}/image")[0], ctx.port_images[sampler][0]
        m = image_metrics(want, got)
        tensors.append(ctx.policy.tensor_result("image", ctx.dtype, f"{sampler}/image", m))
        for role, path in write_image_triplet(want, got, ctx.out_dir, stem=sampler).items():
            images[f"{sampler} {role}"] = path
    return ctx.policy.stage_result("image", ctx.dtype, tensors, images=images)


STAGE_FUNCTIONS: Dict[str, Callable[[StageContext], StageResult]] = {
    "tokens": stage_tokens, "conditioner": stage_conditioner, "unet": stage_unet,
    "sampler": stage_sampler, "trajectory": stage_trajectory, "decode": stage_decode,
    "image": stage_image,
}
