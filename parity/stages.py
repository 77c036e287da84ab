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

from .contract import (ENCODE_OUTPUTS, STAGES, TOKENIZE_OUTPUTS, SamplerRun, cfg_batch, guide,
                       to_images)
from .metrics import compare, compare_exact, image_metrics
from .policy import Policy
from .recording import Recording, sampler_key, tokens_key
from .results import StageResult, TensorResult
from .stage_calls import (decode_calls, generation_encode, judged_encodes, unet_calls)

__all__ = ["STAGES", "STAGE_FUNCTIONS", "StageContext", "sampler_run"]


@dataclass
class StageContext:
    port: object  # anything with the stage contract (parity.contract), behind a PortGuard
    rec: Recording
    policy: Policy
    out_dir: Path
    dtype: str = "float32"
    port_images: Dict[str, np.ndarray] = field(default_factory=dict)  # filled by trajectory
    notes: Dict[str, List[str]] = field(default_factory=dict)  # per stage, shown in the report
    rename: Optional[Callable[[str], str]] = None  # `--module-names`: port names -> sgm's

    def judge(self, stage: str, name: str, ref, port, step: Optional[int] = None,
              truth=None) -> TensorResult:
        """`truth`: the float64 reference on the same inputs, where the recording has it."""
        m = compare(ref, port, **self.policy.tolerances(stage, self.dtype), truth=truth,
                    truth_floor=self.policy.truth_floor(stage, self.dtype))
        return self.policy.tensor_result(stage, self.dtype, name, m, step=step)

    @property
    def size(self):
        return self.rec.meta["height"], self.rec.meta["width"]

    def note(self, stage: str, text: str) -> None:
        if text not in self.notes.setdefault(stage, []):
            self.notes[stage].append(text)

    def result(self, stage: str, tensors, **kwargs) -> StageResult:
        notes = kwargs.pop("notes", []) + self.notes.get(stage, [])
        return self.policy.stage_result(stage, self.dtype, tensors, notes=notes, **kwargs)


# ---- how the harness drives a port's optional methods ------------------------------------------


def port_guide(ctx: StageContext, stage: str, eps: np.ndarray, scale: float) -> np.ndarray:
    """The port's own CFG combination when it offers `guide`, else the reference's."""
    if hasattr(ctx.port, "guide"):
        return ctx.port.guide(eps, scale)
    ctx.note(stage, "the port offers no guide(): eps_guided uses the reference's CFG")
    return guide(eps, scale)


def sampler_run(rec: Recording, sampler: str) -> SamplerRun:
    """The reference's run of `sampler`, for the port's sampler to repeat."""
    spec, schedule = rec.spec, rec.schedules.get(sampler, {})
    sigmas = np.asarray(schedule.get("sigmas", []), np.float32)
    init = schedule.get("init_noise_sigma")
    if init is None and len(sigmas):  # recordings before init_noise_sigma was stored
        s0 = float(sigmas[0])
        init = (s0 ** 2 + 1) ** 0.5 if spec.schedule == "leading" else s0
    return SamplerRun(sampler=sampler, schedule=spec.schedule, steps=spec.steps,
                      guidance=spec.guidance,
                      initial_noise=rec.get(sampler_key(sampler, "initial_noise")),
                      step_noise=rec.get(sampler_key(sampler, "step_noise")),
                      sigmas=sigmas, timesteps=np.asarray(schedule.get("timesteps", []),
                                                          np.float32),
                      init_noise_sigma=float(init or 1.0))


def run_port_sampler(ctx: StageContext, stage: str, sampler: str, eps) -> List[np.ndarray]:
    """Latents after each step of the port's own sampler (`sample`), or of the built-in one
    when the port offers none (said so in the report)."""
    run = sampler_run(ctx.rec, sampler)
    latents: List[np.ndarray] = []
    collect = lambda i, x: latents.append(np.array(x, np.float32))  # noqa: E731
    if hasattr(ctx.port, "sample"):
        ctx.port.sample(run, eps, collect)
    else:
        from .builtin_port import builtin_sample

        ctx.note(stage, "the port offers no sample(): the built-in sdxl_ms sampler was used")
        builtin_sample(run, eps, collect)
    return latents


# ---- stages ------------------------------------------------------------------------------


def stage_tokens(ctx: StageContext) -> StageResult:
    spec = ctx.rec.spec
    got = ctx.port.tokenize([spec.prompt, spec.cond_negative])
    tensors = []
    for key in TOKENIZE_OUTPUTS:
        m = compare_exact(ctx.rec.get(tokens_key(key)), got[key])
        tensors.append(ctx.policy.tensor_result("tokens", ctx.dtype, key, m))
    return ctx.result("tokens", tensors)


def stage_conditioner(ctx: StageContext) -> StageResult:
    tensors = []
    for call in judged_encodes(ctx.rec.spec, ctx.size):
        got = call.run(ctx.port)
        for key in ENCODE_OUTPUTS:
            want = ctx.rec.get(call.key(key))
            name = f"{call.variant}/{key}"
            if not np.any(want):  # zeroed negatives: exactly zero, judged like ids (exact)
                m = compare_exact(want, got[key])
                tensors.append(ctx.policy.tensor_result("tokens", ctx.dtype, name, m))
            else:
                tensors.append(ctx.judge("conditioner", name, want, got[key],
                                         truth=ctx.rec.truth(call.key(key))))
    return ctx.result("conditioner", tensors)


def stage_unet(ctx: StageContext) -> StageResult:
    scale = ctx.rec.spec.guidance
    tensors = []
    for call in unet_calls(ctx.rec):
        want, truth = ctx.rec.get(call.key("eps")), ctx.rec.truth(call.key("eps"))
        got = call.run(ctx.port, ctx.rec)
        for name, w, g, t in (
                ("eps_uncond", want[:1], got[:1], None if truth is None else truth[:1]),
                ("eps_cond", want[1:], got[1:], None if truth is None else truth[1:]),
                ("eps_guided", guide(want, scale), port_guide(ctx, "unet", got, scale),
                 None if truth is None else guide(truth, scale))):
            tensors.append(ctx.judge("unet", f"{call.sampler}/{name}", w, g, step=call.k,
                                     truth=t))
    return ctx.result("unet", tensors)


@dataclass
class PassedInputs:
    """What a port's sampler passed to `eps` at each call: (x_in, t)."""

    calls: List[tuple] = field(default_factory=list)


def _replay(ctx: StageContext, sampler: str, passed: PassedInputs):
    """An `eps` that answers the k-th call with the reference's recorded UNet output and keeps
    what the port's sampler passed in (its x_in and t), to compare with the reference's
    recorded UNet inputs of that call."""
    calls = iter(unet_calls(ctx.rec, sampler))

    def eps(x_in, t):
        call = next(calls, None)
        if call is None:
            raise RuntimeError(f"{sampler}: the port's sampler asked for more UNet calls than "
                               "the reference made")
        want = ctx.rec.get(call.key("x_in"))
        got = np.array(x_in, np.float32)
        if got.shape != want.shape:
            raise RuntimeError(f"{sampler}: the port's sampler passed x_in of shape "
                               f"{got.shape} at UNet call {call.k}; the reference's UNet got "
                               f"{want.shape} (the CFG batch, uncond first)")
        passed.calls.append((got, np.asarray(t, np.float32).reshape(-1)[:1]))
        return ctx.rec.get(call.key("eps"))

    return eps


def stage_sampler(ctx: StageContext) -> StageResult:
    """The port's sampler replaying the reference's recorded UNet outputs (teacher-forced):
    what it passes to the UNet at each call (x_in: the input scaling c_in; t: the timestep
    conditioning) against the reference's recorded UNet inputs, and its latents after each
    step. A wrong c_in or timestep fails here, at its call, not later as accumulated error."""
    tensors = []
    for sampler in ctx.rec.spec.samplers:
        passed = PassedInputs()
        got = run_port_sampler(ctx, "sampler", sampler, _replay(ctx, sampler, passed))
        want = ctx.rec.get(sampler_key(sampler, "latents"))
        if len(got) != len(want):
            raise RuntimeError(f"{sampler}: the port ran {len(got)} steps, the reference {len(want)}")
        for call, (x_in, t) in zip(unet_calls(ctx.rec, sampler), passed.calls):
            tensors += [ctx.judge("sampler", f"{sampler}/{what}", ctx.rec.get(call.key(what)),
                                  value, step=call.k, truth=ctx.rec.truth(call.key(what)))
                        for what, value in (("x_in", x_in), ("timestep", t))]
        truths = ctx.rec.truth(sampler_key(sampler, "replay_latents"))
        tensors += [ctx.judge("sampler", f"{sampler}/latents", w, g, step=i,
                              truth=None if truths is None else truths[i])
                    for i, (w, g) in enumerate(zip(want, got))]
    return ctx.result("sampler", tensors)


def stage_trajectory(ctx: StageContext) -> StageResult:
    """The port's own loop from the same noise: its conditioning, UNet and sampler; its final
    latents decoded feed the image stage."""
    spec = ctx.rec.spec
    batch = cfg_batch(generation_encode(spec, ctx.size).run(ctx.port))

    def eps(x_in, t):
        return ctx.port.unet(x_in, t, **batch)

    tensors = []
    for sampler in spec.samplers:
        latents = run_port_sampler(ctx, "trajectory", sampler, eps)
        want = ctx.rec.get(sampler_key(sampler, "latents"))
        truths = ctx.rec.truth(sampler_key(sampler, "latents"))
        tensors += [ctx.judge("trajectory", f"{sampler}/latents", w, g, step=i,
                              truth=None if truths is None else truths[i])
                    for i, (w, g) in enumerate(zip(want, latents))]
        ctx.port_images[sampler] = to_images(ctx.port.decode(latents[-1]))
    return ctx.result("trajectory", tensors)


def stage_decode(ctx: StageContext) -> StageResult:
    """Teacher-forced: each sampler's final recorded latents, and the probe."""
    tensors = [ctx.judge("decode", f"{call.name}/decoded", ctx.rec.get(call.key),
                         call.run(ctx.port, ctx.rec), truth=ctx.rec.truth(call.key))
               for call in decode_calls(ctx.rec)]
    return ctx.result(
        "decode", tensors,
        notes=["probe: a 0.1-amplitude latent (at most 32x32), where normalisation epsilons are "
               "not negligible"])


def stage_image(ctx: StageContext) -> StageResult:
    from .reports import write_image_triplet

    if not ctx.port_images:
        stage_trajectory(ctx)
    tensors, images = [], {}
    for sampler in ctx.rec.spec.samplers:
        want, got = ctx.rec.get(sampler_key(sampler, "image"))[0], ctx.port_images[sampler][0]
        truth = ctx.rec.truth(sampler_key(sampler, "image"))
        m = image_metrics(want, got, truth=None if truth is None else truth[0],
                          truth_floor=ctx.policy.truth_floor("image", ctx.dtype))
        tensors.append(ctx.policy.tensor_result("image", ctx.dtype, f"{sampler}/image", m))
        for role, path in write_image_triplet(want, got, ctx.out_dir, stem=sampler).items():
            images[f"{sampler} {role}"] = path
    return ctx.result("image", tensors, images=images)


STAGE_FUNCTIONS: Dict[str, Callable[[StageContext], StageResult]] = {
    "tokens": stage_tokens, "conditioner": stage_conditioner, "unet": stage_unet,
    "sampler": stage_sampler, "trajectory": stage_trajectory, "decode": stage_decode,
    "image": stage_image,
}
