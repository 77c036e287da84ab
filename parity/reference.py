"""The reference side: diffusers' `StableDiffusionXLPipeline` behind the port's stage contract.

`load_reference(path)` accepts the same checkpoints as `sdxl_ms.load_pipeline`: a diffusers
folder directly, or an sgm single file, which is first converted (streaming, through the same
tested key maps) into a cached diffusers folder. Everything runs offline.
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

TORCH_DTYPES = ("float32", "float16", "bfloat16")


def _torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - exercised only without the `reference` extra
        raise RuntimeError("the reference needs torch and diffusers: "
                           "pip install 'sdxl-parity[reference]'") from None
    return torch


def configure_torch_determinism(torch) -> None:
    """fp32 goldens on NVIDIA GPUs need TF32 off (GUIDE section 3)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


class ReferencePipeline:
    def __init__(self, pipe, device: str = "cpu"):
        self.torch = _torch()
        self.pipe = pipe
        self.device = device
        self.dtype = pipe.unet.dtype

    # ---- stage contract (numpy in, numpy out) ------------------------------------------------

    def tokenize(self, prompts: Sequence[str]) -> Dict[str, np.ndarray]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        out = {}
        for key, tok in (("input_ids", self.pipe.tokenizer), ("input_ids_2", self.pipe.tokenizer_2)):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length,
                      truncation=True, return_tensors="np").input_ids
            out[key] = np.asarray(ids, dtype=np.int64)
        return out

    def encode_prompt(self, prompt: str, negative_prompt: Optional[str] = None, *,
                      original_size: Optional[Tuple[int, int]] = None,
                      crops_coords_top_left: Tuple[int, int] = (0, 0),
                      target_size: Optional[Tuple[int, int]] = None) -> Dict[str, np.ndarray]:
        torch = self.torch
        size = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        original_size = tuple(original_size or (size, size))
        target_size = tuple(target_size or (size, size))
        with torch.no_grad():
            pe, npe, ppe, nppe = self.pipe.encode_prompt(
                prompt, device=self.device, num_images_per_prompt=1,
                do_classifier_free_guidance=True, negative_prompt=negative_prompt)
            proj = self.pipe.text_encoder_2.config.projection_dim
            tids = self.pipe._get_add_time_ids(original_size, tuple(crops_coords_top_left),
                                               target_size, dtype=pe.dtype,
                                               text_encoder_projection_dim=proj)
        f = self._np
        return {"prompt_embeds": f(pe), "pooled_prompt_embeds": f(ppe),
                "negative_prompt_embeds": f(npe), "negative_pooled_prompt_embeds": f(nppe),
                "add_time_ids": f(tids), "negative_add_time_ids": f(tids)}

    def unet(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids) -> np.ndarray:
        torch = self.torch
        b = sample.shape[0]
        t = np.broadcast_to(np.asarray(timestep, dtype=np.float32).reshape(-1), (b,)).copy()
        with torch.no_grad():
            eps = self.pipe.unet(self._t(sample), self._t(t, keep_fp32=True),
                                 encoder_hidden_states=self._t(encoder_hidden_states),
                                 added_cond_kwargs={"text_embeds": self._t(text_embeds),
                                                    "time_ids": self._t(time_ids)}).sample
        return self._np(eps)

    def decode(self, latents) -> np.ndarray:
        torch = self.torch
        vae = self.pipe.vae
        z = np.asarray(latents, np.float32) / np.float32(vae.config.scaling_factor)
        with torch.no_grad():
            img = vae.decode(torch.from_numpy(z).to(self.device, vae.dtype)).sample
        return self._np(img)

    # ---- helpers --------------------------------------------------------------------------

    def _t(self, arr, keep_fp32: bool = False):
        t = self.torch.from_numpy(np.ascontiguousarray(np.asarray(arr, np.float32)))
        return t.to(self.device) if keep_fp32 else t.to(self.device, self.dtype)

    @staticmethod
    def _np(t) -> np.ndarray:
        return t.detach().float().cpu().numpy()


def load_reference(path: Union[str, Path], dtype: str = "float32", device: str = "cpu",
                   scheduler: Optional[str] = None) -> ReferencePipeline:
    """diffusers `StableDiffusionXLPipeline` for a diffusers folder or an sgm single file."""
    torch = _torch()
    from diffusers import StableDiffusionXLPipeline

    if dtype not in TORCH_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(TORCH_DTYPES)}")
    configure_torch_determinism(torch)
    folder = diffusers_folder_for(Path(path))
    with warnings.catch_warnings():  # newer diffusers renamed torch_dtype; both still load
        warnings.simplefilter("ignore", FutureWarning)
        pipe = StableDiffusionXLPipeline.from_pretrained(
            str(folder), local_files_only=True, torch_dtype=getattr(torch, dtype))
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return ReferencePipeline(pipe, device)


def diffusers_folder_for(path: Path) -> Path:
    """The path itself for a diffusers folder; for an sgm file, a cached converted folder."""
    from sdxl_ms.weights.checkpoint import DIFFUSERS, detect_format

    if detect_format(path) == DIFFUSERS:
        return path
    from sdxl_ms.weights.synthetic import cache_dir

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "converted" / f"{path.stem}-{key}"
    if not out.exists():
        convert_sgm_file_to_diffusers(path, out)
    return out


def convert_sgm_file_to_diffusers(path: Path, out: Path) -> Path:
    """Write the diffusers folder holding the same weights as an sgm single file."""
    from sdxl_ms.weights.checkpoint import SgmCheckpoint
    from sdxl_ms.weights.loader import infer_preset
    from sdxl_ms.weights.synthetic import write_diffusers_folder

    ckpt = SgmCheckpoint(path)
    cfg = infer_preset(ckpt)
    write_diffusers_folder(cfg, ckpt.get, out, np.float32,
                           {"converted_from": str(path), "preset": cfg.name})
    return out
