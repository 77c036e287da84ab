"""The outside port's root model, its stage-contract adapter and its factories.

    sdxl-parity make-checkpoint --preset tiny --seed 0 --format mindspore --out tiny.ckpt
    sdxl-parity check --golden fixtures/golden/tiny-default --checkpoint tiny.ckpt \
        --port tests/outside_port/port.py:make

`make` is the faithful port; each `make_<defect>` carries exactly one bug (see the package
docstring for what the harness says of each). The factory takes the checkpoint path and the
golden's dtype ("float32" or "float16"; bfloat16 is refused).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from . import sampler as own_sampler
from .checkpoint import load_into
from .config import TINY, TinyConfig
from .layers import F16, F32, FAITHFUL, Defects, sinusoid_frequencies, timestep_embedding
from .text import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder2
from .unet import UNetModel
from .vae import AutoencoderKL

__version__ = "outside-port 1.0"


class ConcatTimestepEmbedderND(nn.Cell):
    """Each scalar of (B, n) -> a `outdim` sinusoid, concatenated: (B, n * outdim), float32."""

    def __init__(self, outdim: int):
        super().__init__()
        self.outdim = outdim
        self.freqs = sinusoid_frequencies(outdim)

    def construct(self, x):
        return timestep_embedding(x.reshape(-1), self.outdim, self.freqs).reshape(x.shape[0], -1)


class GeneralConditioner(nn.Cell):
    """sgm's conditioner for SDXL: CLIP-L, bigG, then original size, crop and target size."""

    def __init__(self, cfg: TinyConfig, defects: Defects):
        super().__init__()
        self.embedders = nn.CellList([
            FrozenCLIPEmbedder(cfg.clip_l, 0 if defects.fp16_clip_softmax else -1),
            FrozenOpenCLIPEmbedder2(cfg.clip_g),
            ConcatTimestepEmbedderND(cfg.size_embed_dim),
            ConcatTimestepEmbedderND(cfg.size_embed_dim),
            ConcatTimestepEmbedderND(cfg.size_embed_dim)])

    def encode_text(self, ids, ids_2):
        """(crossattn (B, 77, 96), pooled (B, 64))."""
        hidden_l = self.embedders[0](ids)
        hidden_g, pooled = self.embedders[1](ids_2)
        return ops.cat([hidden_l, hidden_g.astype(hidden_l.dtype)], axis=-1), pooled

    def vector(self, pooled, time_ids):
        """The UNet's y: pooled text, then the three size pairs' sinusoids (diffusers:
        concat(text_embeds, add_time_proj(time_ids)) cast to the UNet's dtype)."""
        sizes = [self.embedders[2 + i](time_ids[:, 2 * i:2 * i + 2]) for i in range(3)]
        return ops.cat([pooled, ops.cat(sizes, axis=-1).astype(pooled.dtype)], axis=-1)


class DiffusionWrapper(nn.Cell):
    """sgm's OpenAIWrapper: puts the UNet at `model.diffusion_model`."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet


class SDXL(nn.Cell):
    """The root: `model.diffusion_model`, `conditioner.embedders.*`, `first_stage_model`."""

    def __init__(self, cfg: TinyConfig = TINY, defects: Defects = FAITHFUL):
        super().__init__()
        self.model = DiffusionWrapper(UNetModel(cfg.unet, defects))
        self.conditioner = GeneralConditioner(cfg, defects)
        self.first_stage_model = AutoencoderKL(cfg.vae, defects.fp16_vae_attention)
        for name, param in self.parameters_and_names():
            param.name = name  # what load_param_into_net matches on: the full sgm path


def _cpu_runtime() -> None:
    """CPU settings MindSpore needs to run this fast, before the first op: oneDNN capped at
    AVX2 (its AVX-512 NCHW float32 convolution is a reference kernel) and ops launched
    synchronously (PyNative's asynchronous queue spins against the kernel threads)."""
    if ms.get_context("device_target") != "CPU":
        return
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
    ms.runtime.launch_blocking()


def _round_to(net: nn.Cell, dtype: str, keep_float32: bool) -> None:
    """Parameters rounded to `dtype`; held in float32 when `keep_float32` (the upcast VAE)."""
    for _, p in net.parameters_and_names():
        a = p.asnumpy().astype(np.float16)
        if keep_float32:
            p.set_data(Tensor(a.astype(np.float32)))
        else:  # set_data converts to the parameter's dtype: change the dtype first
            p.set_dtype(F16)
            p.set_data(Tensor(a))
        if p.dtype != (F32 if keep_float32 else F16):
            raise RuntimeError(f"{p.name}: still {p.dtype}")


class OutsidePort:
    """The stage contract over `SDXL`, plus this port's own `guide` and `sample`.
    The BPE tokenizers are the only thing taken from sdxl_ms (`sdxl_ms.tokenizer`: the CLIP
    vocabulary built offline); the networks, loader and sampler are this package's own."""

    version = __version__

    def __init__(self, checkpoint, dtype: str = "float32", defects: Defects = FAITHFUL,
                 cfg: TinyConfig = TINY):
        if dtype not in ("float32", "float16"):
            raise ValueError(f"this port computes in float32 or float16, not {dtype}")
        _cpu_runtime()
        from sdxl_ms.tokenizer import load_tokenizer

        self.cfg, self.dtype, self.defects = cfg, dtype, defects
        self.compute = F16 if dtype == "float16" else F32
        self.rounding = own_sampler.Rounding(dtype == "float16")
        self.root = SDXL(cfg, defects)
        self.mapping = load_into(self.root, checkpoint)
        if dtype == "float16":
            _round_to(self.root.model, dtype, keep_float32=False)
            _round_to(self.root.conditioner, dtype, keep_float32=False)
            _round_to(self.root.first_stage_model, dtype, keep_float32=True)
            self.root.model.diffusion_model.compute_dtype = F16
        self.root.set_train(False)
        self.tokenizers = (load_tokenizer(cfg.clip_l.pad_token),
                           load_tokenizer(cfg.clip_g.pad_token))

    # ---- the stage contract ----------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str]) -> Dict[str, np.ndarray]:
        from sdxl_ms.tokenizer import tokenize

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return {"input_ids": tokenize(self.tokenizers[0], prompts),
                "input_ids_2": tokenize(self.tokenizers[1], prompts)}

    def _encode_text(self, texts: List[str]) -> Tuple[np.ndarray, np.ndarray]:
        ids = self.tokenize(texts)
        crossattn, pooled = self.root.conditioner.encode_text(
            Tensor(ids["input_ids"].astype(np.int32)), Tensor(ids["input_ids_2"].astype(np.int32)))
        return crossattn.astype(F32).asnumpy(), pooled.astype(F32).asnumpy()

    def encode_prompt(self, prompt: str, negative_prompt: Optional[str] = None, *,
                      original_size: Tuple[int, int], crops_coords_top_left: Tuple[int, int],
                      target_size: Tuple[int, int]) -> Dict[str, np.ndarray]:
        """diffusers' SDXL-base semantics: a None negative gives zeros
        (force_zeros_for_empty_prompt), "" is encoded like any prompt."""
        zeros = negative_prompt is None
        crossattn, pooled = self._encode_text([prompt] if zeros else [negative_prompt, prompt])
        if zeros:
            neg_c, neg_p = np.zeros_like(crossattn), np.zeros_like(pooled)
        else:
            (neg_c, crossattn), (neg_p, pooled) = np.split(crossattn, 2), np.split(pooled, 2)
        time_ids = np.array([tuple(original_size) + tuple(crops_coords_top_left)
                             + tuple(target_size)], np.float32)
        return {"prompt_embeds": crossattn, "pooled_prompt_embeds": pooled,
                "negative_prompt_embeds": neg_c, "negative_pooled_prompt_embeds": neg_p,
                "add_time_ids": time_ids, "negative_add_time_ids": time_ids.copy()}

    def unet(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids) -> np.ndarray:
        b = sample.shape[0]
        t = np.broadcast_to(np.asarray(timestep, np.float32).reshape(-1), (b,)).copy()
        y = self.root.conditioner.vector(
            Tensor(np.asarray(text_embeds, np.float32)).astype(self.compute),
            Tensor(np.asarray(time_ids, np.float32)))
        eps = self.root.model.diffusion_model(
            Tensor(np.asarray(sample, np.float32)), Tensor(t),
            Tensor(np.asarray(encoder_hidden_states, np.float32)), y)
        return eps.astype(F32).asnumpy()

    def decode(self, latents) -> np.ndarray:
        """vae.decode(latents / 0.13025) in float32 (the VAE is float32 in every run)."""
        z = np.asarray(latents, np.float32) / np.float32(self.cfg.vae.scale_factor)
        return self.root.first_stage_model.decode(Tensor(z)).astype(F32).asnumpy()

    def guide(self, eps, scale):
        return own_sampler.guide(eps, scale, self.rounding)

    def sample(self, run, eps, callback):
        return own_sampler.sample(run, eps, callback, self.rounding)

    # ---- for module-level work -------------------------------------------------------------

    def cells(self) -> Dict[str, List[Tuple[str, nn.Cell]]]:
        """The Cells that compute each stage, under their full sgm paths."""
        embedders = self.root.conditioner.embedders
        return {"conditioner": [("conditioner.embedders.0", embedders[0]),
                                ("conditioner.embedders.1", embedders[1])],
                "unet": [("model.diffusion_model", self.root.model.diffusion_model)],
                "decode": [("first_stage_model", self.root.first_stage_model)]}


# ---- factories: `--port tests/outside_port/port.py:NAME` ----------------------------------------

def make(checkpoint, dtype="float32"):
    """The faithful port."""
    return OutsidePort(checkpoint, dtype)


def make_exp32_timestep(checkpoint, dtype="float32"):
    """UNet time embedding frequencies from MindSpore's float32 ops.exp."""
    return OutsidePort(checkpoint, dtype, Defects(exp32_timestep=True))


def make_fp16_vae_attention(checkpoint, dtype="float32"):
    """first_stage_model.decoder.mid.attn_1 computing in float16."""
    return OutsidePort(checkpoint, dtype, Defects(fp16_vae_attention=True))


def make_ln_eps_1e6(checkpoint, dtype="float32"):
    """input_blocks.4.1.transformer_blocks.0.norm1 with eps 1e-6 instead of 1e-5."""
    return OutsidePort(checkpoint, dtype, Defects(ln_eps_1e6=True))


def make_tanh_geglu(checkpoint, dtype="float32"):
    """Every GEGLU's gate through the tanh-approximate GELU."""
    return OutsidePort(checkpoint, dtype, Defects(tanh_geglu=True))


def make_fp16_clip_softmax(checkpoint, dtype="float32"):
    """CLIP-L (embedders.0) layer 0's attention softmax in float16."""
    return OutsidePort(checkpoint, dtype, Defects(fp16_clip_softmax=True))


def make_half_scores(checkpoint, dtype="float32"):
    """The UNet's attention scores from the compute dtype's BatchMatMul (rounded to float16 in
    a float16 run before the float32 softmax): a common MindSpore idiom, 1.73-1.89x torch's
    core error with SDXL's 64-wide heads, 1.24-1.58x with tiny's 16-wide ones (measured by
    tools/attention_core_idioms.py)."""
    return OutsidePort(checkpoint, dtype, Defects(half_scores=True))


class RenamedPort(OutsidePort):
    """The same port declaring its networks under names of its own ("unet", "vae", "clip_l",
    "clip_g"), as a port that does not follow sgm's tree above the networks would: pairing
    needs a mapping (`--module-names`, or `sgm_name` on the port)."""

    def cells(self) -> Dict[str, List[Tuple[str, nn.Cell]]]:
        embedders = self.root.conditioner.embedders
        return {"conditioner": [("clip_l", embedders[0]), ("clip_g", embedders[1])],
                "unet": [("unet", self.root.model.diffusion_model)],
                "decode": [("vae", self.root.first_stage_model)]}


class SelfRenamingPort(RenamedPort):
    """The renamed port that says how its names map (the contract's optional `sgm_name`)."""

    SGM = {"clip_l": "conditioner.embedders.0", "clip_g": "conditioner.embedders.1",
           "unet": "model.diffusion_model", "vae": "first_stage_model"}

    def sgm_name(self, name: str) -> str:
        head, dot, rest = name.partition(".")
        return self.SGM.get(head, head) + dot + rest


def make_renamed(checkpoint, dtype="float32"):
    """Networks under names of the port's own, with GEGLU in tanh (a defect to be named)."""
    return RenamedPort(checkpoint, dtype, Defects(tanh_geglu=True))


def make_self_renaming(checkpoint, dtype="float32"):
    """As `make_renamed`, with the port's own `sgm_name`."""
    return SelfRenamingPort(checkpoint, dtype, Defects(tanh_geglu=True))
