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

from sdxl_common.dtypes import DTYPES, TRUTH_DTYPE
from sdxl_common.errors import MissingExtraError
from sdxl_common.threads import configured_threads

TORCH_DTYPES = DTYPES + (TRUTH_DTYPE,)


def require_reference(what: str = "the reference (diffusers)") -> None:
    """A `MissingExtraError` (exit 2) naming the extra to install when torch or diffusers
    cannot be imported; cheap (nothing is imported)."""
    import importlib.util

    for name in ("torch", "diffusers"):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # ValueError: blocked via sys.modules[name] = None
            found = False
        if not found:
            raise MissingExtraError(what, "reference", "torch and diffusers")


def _torch():
    try:
        import torch
    except ImportError:
        raise MissingExtraError("the reference (diffusers)", "reference",
                                "torch and diffusers") from None
    return torch


def set_torch_threads(torch) -> int:
    """The reference computes with the port's thread count (`sdxl_common.threads`), set
    explicitly: a process spawned after MindSpore was imported inherits its
    OMP_NUM_THREADS=1, which torch would otherwise take (one thread of two, measured)."""
    threads = configured_threads()
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def configure_torch_determinism(torch) -> None:
    """fp32 goldens on NVIDIA GPUs need TF32 off (docs/porting-notes.md, section 4)."""
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
        f = to_numpy
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
        return to_numpy(eps)

    def decoding_vae(self):
        """The VAE that decodes: a float16 VAE whose config says `force_upcast` decodes in a
        float32 copy, as StableDiffusionXLPipeline decodes."""
        vae = self.pipe.vae
        if vae.dtype == self.torch.float16 and vae.config.get("force_upcast", False):
            return self._upcast_vae()
        return vae

    def decode(self, latents) -> np.ndarray:
        torch = self.torch
        vae = self.decoding_vae()
        z = np.asarray(latents, np.float32) / np.float32(vae.config.scaling_factor)
        with torch.no_grad():
            img = vae.decode(torch.from_numpy(z).to(self.device, vae.dtype)).sample
        return to_numpy(img)

    def _upcast_vae(self):
        """A float32 copy of the float16 VAE (its weights cast up), made once."""
        vae = self.__dict__.get("_vae_float32")
        if vae is None:
            import copy

            vae = self._vae_float32 = copy.deepcopy(self.pipe.vae).float()
        return vae

    # ---- text to image ----------------------------------------------------------------------

    def use_sampler(self, sampler: str, schedule: str = "leading") -> None:
        """Swap in the diffusers scheduler that the port's `sampler`/`schedule` matches."""
        import diffusers
        from .schedulers import diffusers_scheduler_spec

        cls_name, overrides = diffusers_scheduler_spec(sampler, schedule)
        cls = getattr(diffusers, cls_name)
        self.pipe.scheduler = cls.from_config(self.pipe.scheduler.config, **overrides)

    def __call__(self, prompt: str, negative_prompt: Optional[str] = None, *, height: int,
                 width: int, num_inference_steps: int, guidance_scale: float = 5.0,
                 sampler: str = "euler", schedule: str = "leading", latents: np.ndarray,
                 step_noise: Optional[Sequence[np.ndarray]] = None, output_type: str = "np",
                 callback=None):
        """diffusers generation from unscaled `latents`; `step_noise` replaces every per-step
        draw of ancestral schedulers, in order. `callback(pipe, step, t, kwargs)` is diffusers'
        `callback_on_step_end`. Returns (B,H,W,3) float32 in [0,1] or latents."""
        torch = self.torch
        self.use_sampler(sampler, schedule)
        lat = torch.from_numpy(np.ascontiguousarray(latents, np.float32)).to(self.device, self.dtype)
        with shared_step_noise(self.pipe.scheduler, step_noise, self.device), torch.no_grad():
            out = self.pipe(prompt, negative_prompt=negative_prompt, height=height, width=width,
                            num_inference_steps=num_inference_steps,
                            guidance_scale=guidance_scale, latents=lat,
                            output_type="latent" if output_type == "latent" else "np",
                            callback_on_step_end=callback)
        images = out.images
        if output_type == "latent":
            return to_numpy(images)
        return np.asarray(images, dtype=np.float32)

    # ---- helpers --------------------------------------------------------------------------

    def _t(self, arr, keep_fp32: bool = False):
        t = self.torch.from_numpy(np.ascontiguousarray(np.asarray(arr, np.float32)))
        return t.to(self.device) if keep_fp32 else t.to(self.device, self.dtype)



def to_numpy(t) -> np.ndarray:
    """A torch tensor as a float32 numpy array (on the CPU)."""
    return t.detach().float().cpu().numpy()


def load_reference(path: Union[str, Path], dtype: str = "float32", device: str = "cpu",
                   scheduler: Optional[str] = None) -> ReferencePipeline:
    """diffusers `StableDiffusionXLPipeline` for a diffusers folder (plain or fp16-variant
    files), an sgm single file (diffusers' own single-file loader, with configs written
    from this package, so nothing is fetched) or a MindSpore .ckpt (converted through the
    key maps to a cached diffusers folder: diffusers cannot read it)."""
    torch = _torch()
    from diffusers import StableDiffusionXLPipeline

    from sdxl_ms.weights.checkpoint import SGM, detect_format, detect_variant

    if dtype not in TORCH_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(TORCH_DTYPES)}")
    configure_torch_determinism(torch)
    set_torch_threads(torch)
    quiet_loading_bars()
    path = Path(path)
    with warnings.catch_warnings():  # newer diffusers renamed torch_dtype; both still load
        warnings.simplefilter("ignore", FutureWarning)
        if path.is_file() and detect_format(path) == SGM:
            pipe = StableDiffusionXLPipeline.from_single_file(
                str(path), config=str(single_file_configs(path)), local_files_only=True,
                torch_dtype=getattr(torch, dtype))
        else:
            folder = diffusers_folder_for(path)
            pipe = StableDiffusionXLPipeline.from_pretrained(
                str(folder), local_files_only=True, torch_dtype=getattr(torch, dtype),
                variant=detect_variant(folder))
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "float16 cannot run on cpu": torch 2.13's can
    try:
        pipe = pipe.to(device)
    finally:
        diffusers_logging.set_verbosity(level)
    pipe.set_progress_bar_config(disable=True)
    return ReferencePipeline(pipe, device)


def quiet_loading_bars() -> None:
    """No per-component loading bars from diffusers and transformers: the harness reports
    its own progress, and a bar per load buries it (calibrate loads dozens of pipelines)."""
    import transformers
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def single_file_configs(path: Path) -> Path:
    """The weight-free diffusers folder (configs, tokenizers) of the preset an sgm file holds,
    written once into the cache, for `from_single_file(config=...)`."""
    from sdxl_common.paths import cache_dir
    from sdxl_ms.weights.checkpoint import open_checkpoint
    from sdxl_ms.weights.loader import infer_preset
    from sdxl_ms.weights.synthetic import GENERATOR_VERSION, write_config_folder

    cfg = infer_preset(open_checkpoint(path))
    out = cache_dir() / "configs" / f"{cfg.name}-v{GENERATOR_VERSION}"
    if not (out / "model_index.json").is_file():
        write_config_folder(cfg, out)
    return out


def diffusers_folder_for(path: Path) -> Path:
    """The path itself for a diffusers folder; for an sgm file or a MindSpore .ckpt (sgm
    names), a cached converted folder."""
    from sdxl_ms.weights.checkpoint import DIFFUSERS, detect_format

    if detect_format(path) == DIFFUSERS:
        return path
    from sdxl_common.paths import cache_dir

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "converted" / f"{path.stem}-{key}"
    if not out.exists():
        convert_sgm_file_to_diffusers(path, out)
    return out


def convert_sgm_file_to_diffusers(path: Path, out: Path) -> Path:
    """Write the diffusers folder holding the same weights as an sgm-named single file
    (`.safetensors` or MindSpore `.ckpt`), tensor by tensor."""
    from sdxl_ms.weights.checkpoint import open_checkpoint
    from sdxl_ms.weights.loader import infer_preset
    from sdxl_ms.weights.synthetic import write_diffusers_folder

    ckpt = open_checkpoint(path)
    cfg = infer_preset(ckpt)
    write_diffusers_folder(cfg, ckpt.get, out, np.float32,
                           {"converted_from": str(path), "preset": cfg.name})
    return out


class shared_step_noise:
    """Make a diffusers scheduler draw its per-step noise from given arrays, in order.

    Ancestral schedulers call `randn_tensor` from their own module; no torch generator agrees
    with numpy's, so parity runs feed both sides the same arrays (docs/porting-notes.md,
    section 2).
    """

    def __init__(self, scheduler, arrays: Optional[Sequence[np.ndarray]], device: str = "cpu"):
        import sys

        self.module = sys.modules[type(scheduler).__module__]
        self.arrays = None if arrays is None else list(arrays)
        self.device = device
        self.used = 0

    def _draw(self, shape, generator=None, device=None, dtype=None, **_):
        torch = _torch()
        if self.used >= len(self.arrays):
            raise RuntimeError(f"the scheduler asked for noise draw {self.used + 1}, "
                               f"only {len(self.arrays)} were given")
        arr = np.asarray(self.arrays[self.used], np.float32)
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"step noise {self.used} has shape {arr.shape}, scheduler wants {tuple(shape)}")
        self.used += 1
        return torch.from_numpy(arr.copy()).to(device or self.device, dtype or torch.float32)

    def __enter__(self):
        if self.arrays is not None and hasattr(self.module, "randn_tensor"):
            self._saved = self.module.randn_tensor
            self.module.randn_tensor = self._draw
        return self

    def __exit__(self, *exc):
        if getattr(self, "_saved", None) is not None:
            self.module.randn_tensor = self._saved
            self._saved = None
        return False
