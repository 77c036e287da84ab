"""The built-in port's modules as the parity harness reaches them (`modules()` of the stage
contract): plain attributes, so the harness needs no knowledge of the pipeline's internals."""
from __future__ import annotations

from typing import Dict

import mindspore as ms
import numpy as np
from mindspore import Tensor

from .nn.module import submodule

_VAE_PREFIX = "first_stage_model."


class ModuleAccess:
    """`root`, `config`, `module(path)` and `run_stage(stage, inputs)` of one pipeline."""

    def __init__(self, pipe):
        self._pipe = pipe
        self.root = pipe.model
        self.config = pipe.cfg

    def module(self, path: str):
        """The module at sgm `path` that computes: the VAE's from the one that decodes (its
        float32 copy in a float16 run), as the reference's side does."""
        if path.startswith(_VAE_PREFIX):
            return submodule(self._pipe.decoding_vae(), path[len(_VAE_PREFIX):])
        return submodule(self.root, path)

    def run_stage(self, stage: str, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """The networks of `stage` run on its recorded inputs; their outputs by the contract's
        names (the conditioner's crossattn as `prompt_embeds` for every prompt in the batch)."""
        if stage == "conditioner":
            crossattn, pooled = self.root.conditioner.encode_text(
                Tensor(inputs["input_ids"].astype(np.int32)),
                Tensor(inputs["input_ids_2"].astype(np.int32)))
            return {"prompt_embeds": crossattn.astype(ms.float32).asnumpy(),
                    "pooled_prompt_embeds": pooled.astype(ms.float32).asnumpy()}
        if stage == "unet":
            return {"eps": self._pipe.unet(**inputs)}
        if stage == "decode":
            return {"decoded": self._pipe.decode(inputs["latents"])}
        raise ValueError(f"no networks to run for stage {stage!r}")
