"""The built-in port's modules as the parity harness reaches them (`modules()` of the stage
contract): plain attributes, so the harness needs no knowledge of the pipeline's internals."""
from __future__ import annotations

from typing import Dict

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

    def run_stage(self, stage: str, inputs: Dict[str, np.ndarray]) -> None:
        """The networks of `stage` run on its recorded inputs (outputs are observed, not used)."""
        if stage == "conditioner":
            self.root.conditioner.encode_text(Tensor(inputs["input_ids"].astype(np.int32)),
                                              Tensor(inputs["input_ids_2"].astype(np.int32)))
        elif stage == "unet":
            self._pipe.unet(**inputs)
        elif stage == "decode":
            self._pipe.decode(inputs["latents"])
        else:
            raise ValueError(f"no networks to run for stage {stage!r}")
