"""The port's text-to-image pipeline and its stage contract (numpy in, numpy out).

The stage methods (`tokenize`, `encode_prompt`, `unet`, `decode`) have the same signatures and
semantics as `parity.reference.ReferencePipeline`, so parity suites drive both sides alike.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import mindspore as ms
import numpy as np
from mindspore import Tensor

from .backend import init_runtime
from .config import SDXLConfig, get_preset
from .models.sdxl import SDXL, build_sdxl

DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


def resolve_dtype(dtype: Union[str, "ms.dtype"]):
    if isinstance(dtype, str):
        try:
            return DTYPES[dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}") from None
    return dtype


def _f32(t: Tensor) -> np.ndarray:
    return t.astype(ms.float32).asnumpy()


class SDXLPipeline:
    def __init__(self, model: SDXL, source: Optional[str] = None):
        from .tokenizer import load_tokenizer

        self.model = model
        self.cfg: SDXLConfig = model.cfg
        self.dtype = model.dtype
        self.source = source
        self.tokenizer = load_tokenizer(self.cfg.conditioner.clip_l.pad_token)
        self.tokenizer_2 = load_tokenizer(self.cfg.conditioner.clip_g.pad_token)
        self.model.set_train(False)

    @property
    def vae_scale_factor(self) -> int:
        return self.cfg.vae.downsample_factor

    # ---- stage contract --------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str]) -> Dict[str, np.ndarray]:
        from .tokenizer import tokenize

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return {"input_ids": tokenize(self.tokenizer, prompts),
                "input_ids_2": tokenize(self.tokenizer_2, prompts)}

    def _encode_text(self, prompts: List[str]) -> Tuple[np.ndarray, np.ndarray]:
        ids = self.tokenize(prompts)
        crossattn, pooled = self.model.conditioner.encode_text(
            Tensor(ids["input_ids"]), Tensor(ids["input_ids_2"]))
        return _f32(crossattn), _f32(pooled)

    def encode_prompt(self, prompt: str, negative_prompt: Optional[str] = None, *,
                      original_size: Optional[Tuple[int, int]] = None,
                      crops_coords_top_left: Tuple[int, int] = (0, 0),
                      target_size: Optional[Tuple[int, int]] = None,
                      force_zeros_for_empty_prompt: bool = True) -> Dict[str, np.ndarray]:
        """diffusers' SDXL semantics: with `negative_prompt=None` (and SDXL-base's
        force_zeros_for_empty_prompt) the negative embeddings are zeros; `""` is encoded."""
        size = (self.cfg.default_size, self.cfg.default_size)
        original_size = tuple(original_size or size)
        target_size = tuple(target_size or size)
        zero_negative = negative_prompt is None and force_zeros_for_empty_prompt
        texts = [prompt] if zero_negative else [negative_prompt or "", prompt]
        crossattn, pooled = self._encode_text(texts)
        if zero_negative:
            neg_c, neg_p = np.zeros_like(crossattn), np.zeros_like(pooled)
        else:
            (neg_c, crossattn), (neg_p, pooled) = np.split(crossattn, 2), np.split(pooled, 2)
        time_ids = np.array([original_size + tuple(crops_coords_top_left) + target_size],
                            dtype=np.float32)
        return {"prompt_embeds": crossattn, "pooled_prompt_embeds": pooled,
                "negative_prompt_embeds": neg_c, "negative_pooled_prompt_embeds": neg_p,
                "add_time_ids": time_ids, "negative_add_time_ids": time_ids.copy()}

    def unet(self, sample: np.ndarray, timestep, encoder_hidden_states: np.ndarray,
             text_embeds: np.ndarray, time_ids: np.ndarray) -> np.ndarray:
        """eps = UNet(sample, t, context, vector); `vector` = pooled text + size embeddings."""
        b = sample.shape[0]
        t = np.broadcast_to(np.asarray(timestep, dtype=np.float32).reshape(-1), (b,))
        vector = self.model.conditioner.vector(Tensor(np.asarray(text_embeds, np.float32)),
                                               Tensor(np.asarray(time_ids, np.float32)))
        eps = self.model.unet(Tensor(np.asarray(sample, np.float32)), Tensor(t.copy()),
                              Tensor(np.asarray(encoder_hidden_states, np.float32)), vector)
        return _f32(eps)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """vae.decode(latents / scale_factor): float32 (B,3,H,W) in about [-1, 1], unclipped."""
        z = Tensor(np.asarray(latents, np.float32) / np.float32(self.cfg.vae.scale_factor))
        return _f32(self.model.first_stage_model.decode(z.astype(self.dtype)))


def load_pipeline(path: Union[str, Path], dtype: str = "float32") -> SDXLPipeline:
    """Load a diffusers folder or an sgm single `.safetensors` file (detected), validating the
    whole layout first and streaming weights in one tensor at a time."""
    from .weights.checkpoint import open_checkpoint
    from .weights.loader import infer_preset, load_weights

    init_runtime()
    ckpt = open_checkpoint(Path(path))
    cfg = infer_preset(ckpt)
    model = build_sdxl(cfg, resolve_dtype(dtype))
    load_weights(model, ckpt)
    return SDXLPipeline(model, source=str(path))


def random_pipeline(preset: str = "tiny", seed: int = 0, dtype: str = "float32") -> SDXLPipeline:
    """The port with seeded random weights, no checkpoint file (same numbers as
    `make-checkpoint --seed`)."""
    from .weights.state import randomize

    init_runtime()
    model = build_sdxl(get_preset(preset), resolve_dtype(dtype))
    randomize(model, seed)
    return SDXLPipeline(model, source=f"random:{preset}:{seed}")
