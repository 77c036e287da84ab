"""What each stage feeds the networks, defined once.

Every side runs the same calls: the reference while it is recorded, its float64 truth, the port
in `check`, and the module capture of `locate`. A call knows its inputs (from the spec, or
teacher-forced from a recording) and the recording key of its output, and runs on anything that
answers the stage contract (`encode_prompt`, `unet`, `decode`), as Polygraphy runs every backend
through one runner interface. A stage that changes what it feeds changes it here, for all sides.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .contract import ENCODE_OUTPUTS, TOKENIZE_OUTPUTS, cfg_batch
from .recording import (Recording, RunSpec, call_key, conditioner_key, probe_key, sampler_key,
                        tokens_key)

Size = Tuple[int, int]


@dataclass(frozen=True)
class EncodeCall:
    """One `encode_prompt`: `variant` names it in the recording (`conditioner/<variant>/...`)."""

    variant: str
    prompt: str
    negative: Optional[str]
    original_size: Size
    crop: Size
    target_size: Size

    def run(self, side) -> Dict[str, np.ndarray]:
        return side.encode_prompt(self.prompt, self.negative, original_size=self.original_size,
                                  crops_coords_top_left=self.crop, target_size=self.target_size)

    def key(self, output: str) -> str:
        return conditioner_key(self.variant, output)


def judged_encodes(spec: RunSpec, size: Size) -> List[EncodeCall]:
    """The conditioner stage's two encodes: no negative (SDXL's zeroed uncond) and a text
    negative, with the spec's size and crop conditioning (non-default on purpose, so a port
    that ignores them fails)."""
    return [EncodeCall(variant, spec.prompt, negative, spec.cond_original_size, spec.cond_crop,
                       size)
            for variant, negative in (("neg_none", None), ("neg_text", spec.cond_negative))]


def ids_encode(spec: RunSpec, size: Size) -> EncodeCall:
    """The judged encode whose prompts are the recorded ids' rows, [prompt, cond_negative]:
    what module capture runs the text encoders on."""
    return judged_encodes(spec, size)[1]


def prompt_then_negative(get, key: str) -> np.ndarray:
    """`key` for both prompts of an encode, stacked as the ids' rows are (prompt first):
    `get(name)` reads one output."""
    return np.concatenate([np.asarray(get(key), np.float32),
                           np.asarray(get("negative_" + key), np.float32)])


def generation_encode(spec: RunSpec, size: Size) -> EncodeCall:
    """The encode generation uses (the pipeline's defaults: original size = target, no crop):
    its outputs, recorded, are the conditioning every UNet call gets."""
    return EncodeCall("generation", spec.prompt, spec.negative_prompt, size, (0, 0), size)


def generation_batch(rec: Recording) -> Dict[str, np.ndarray]:
    """The reference's recorded generation conditioning as the UNet's CFG batch."""
    return cfg_batch({key: rec.get(conditioner_key("generation", key))
                      for key in ENCODE_OUTPUTS})


def token_ids(rec: Recording) -> Dict[str, np.ndarray]:
    """The recorded ids of [prompt, cond_negative]: what the text encoders run on."""
    return {key: rec.get(tokens_key(key)) for key in TOKENIZE_OUTPUTS}


@dataclass(frozen=True)
class UNetCall:
    """The k-th UNet evaluation of `sampler` in the reference's run, teacher-forced: the
    reference's recorded x_in and timestep, with the recorded generation conditioning."""

    sampler: str
    k: int

    def key(self, what: str) -> str:
        return call_key(self.sampler, self.k, what)

    def inputs(self, rec: Recording) -> Dict[str, np.ndarray]:
        return {"sample": rec.get(self.key("x_in")), "timestep": rec.get(self.key("timestep")),
                **generation_batch(rec)}

    def run(self, side, rec: Recording) -> np.ndarray:
        return side.unet(**self.inputs(rec))


def unet_calls(rec: Recording, sampler: Optional[str] = None) -> List[UNetCall]:
    """Every recorded UNet call, sampler by sampler (or of `sampler` alone)."""
    return [UNetCall(s, k) for s in ([sampler] if sampler else rec.spec.samplers)
            for k in range(rec.unet_calls(s))]


@dataclass(frozen=True)
class DecodeCall:
    """One `decode`: a sampler's final recorded latents, or the low-amplitude probe."""

    name: str  # the sampler, or "probe"

    @property
    def key(self) -> str:
        return probe_key("decoded") if self.name == "probe" else sampler_key(self.name, "decoded")

    def latents(self, rec: Recording) -> np.ndarray:
        if self.name == "probe":
            return rec.get(probe_key("latents"))
        return rec.get(sampler_key(self.name, "latents"))[-1]

    def run(self, side, rec: Recording) -> np.ndarray:
        return side.decode(self.latents(rec))


def decode_calls(rec: Recording) -> List[DecodeCall]:
    """Each sampler's final latents, then the probe."""
    return [DecodeCall(s) for s in rec.spec.samplers] + [DecodeCall("probe")]


# ---- the networks of one stage, for module-level work (locate, module truths) -------------------

def network_inputs(rec: Recording, stage: str, sampler: str, step: int) -> Dict[str, np.ndarray]:
    """What the networks of `stage` run on when modules are captured: the text encoders on the
    recorded ids, the UNet on call `step` of `sampler`, the VAE on that sampler's final
    latents."""
    if stage == "conditioner":
        return token_ids(rec)
    if stage == "unet":
        return UNetCall(sampler, step).inputs(rec)
    return {"latents": DecodeCall(sampler).latents(rec)}


def network_outputs(rec: Recording, stage: str, sampler: str, step: int) -> Dict[str, np.ndarray]:
    """The reference's outputs of the networks on `network_inputs`, from the recording: the ids
    are [prompt, cond_negative], so the conditioner's are its neg_text encode, both rows."""
    if stage == "conditioner":
        call = ids_encode(rec.spec, (rec.meta["height"], rec.meta["width"]))
        return {key: prompt_then_negative(lambda name: rec.get(call.key(name)), key)
                for key in ("prompt_embeds", "pooled_prompt_embeds")}
    if stage == "unet":
        return {"eps": rec.get(UNetCall(sampler, step).key("eps"))}
    return {"decoded": rec.get(DecodeCall(sampler).key)}


def network_calls(rec: Recording, stages: Sequence[str]) -> Dict[str, int]:
    """How many calls of each network (text encoders, UNet, VAE) a check of `stages` makes on
    the port: what an execution mode's per-call cost is multiplied by."""
    spec, size = rec.spec, (rec.meta["height"], rec.meta["width"])
    free_run = any(s in stages for s in ("trajectory", "image"))  # the image reuses its run
    return {"text": len(judged_encodes(spec, size)) * ("conditioner" in stages) + free_run,
            "unet": len(unet_calls(rec)) * (("unet" in stages) + free_run),
            "vae": len(decode_calls(rec)) * ("decode" in stages)
            + len(spec.samplers) * free_run}
