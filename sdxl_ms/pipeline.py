"""The port's text-to-image pipeline and its stage contract (numpy in, numpy out).

The stage methods (`tokenize`, `encode_prompt`, `unet`, `decode`) have the same signatures and
semantics as `parity.reference.ReferencePipeline`, so parity suites drive both sides alike.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import mindspore as ms
import numpy as np
from mindspore import Tensor

from sdxl_common.errors import InputError
from sdxl_common.images import to_uint8
from sdxl_common.progress import bar as progress_bar
from sdxl_common.validate import check_choice, check_finite_number

from .runtime import init_runtime, settings
from .config import SDXLConfig, get_preset
from .models.sdxl import SDXL, build_sdxl
from .nn.module import submodule
from .nn.precision import cast

DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


def resolve_dtype(dtype: Union[str, "ms.dtype"]):
    if isinstance(dtype, str):
        return DTYPES[check_choice(dtype, tuple(DTYPES), "dtype")]
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
        with settings.running("text"):
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
        with settings.running("unet"):
            eps = self.model.unet(Tensor(np.asarray(sample, np.float32)), Tensor(t.copy()),
                                  Tensor(np.asarray(encoder_hidden_states, np.float32)), vector)
        return _f32(eps)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """vae.decode(latents / scale_factor): float32 (B,3,H,W) in about [-1, 1], unclipped.
        A float16 model decodes with `decoding_vae()` (float32)."""
        z = Tensor(np.asarray(latents, np.float32) / np.float32(self.cfg.vae.scale_factor))
        vae = self.decoding_vae()
        with settings.running("vae"):
            return _f32(vae.decode(z.astype(vae.dtype)))

    def decoding_vae(self):
        """The VAE that decodes. For float16 a float32 copy of the float16 weights, made once:
        SDXL's VAE overflows in float16 activations, so diffusers upcasts it (its VAE config's
        `force_upcast`, true for SDXL) and the port does the same (docs/porting-notes.md,
        section 4). bfloat16 has float32's range and decodes as it is."""
        vae = self.model.first_stage_model
        if self.dtype != ms.float16:
            return vae
        upcast = self.__dict__.get("_vae_float32")
        if upcast is None:
            from mindspore.nn.utils import no_init_parameters

            from .models.autoencoder import AutoencoderKL
            from .weights.state import set_weights

            with no_init_parameters():
                upcast = AutoencoderKL(vae.cfg)  # built in float32
            set_weights(upcast, ((n, p.asnumpy().astype(np.float32))
                                 for n, p in vae.parameters_and_names()))
            upcast.set_train(False)
            self._vae_float32 = upcast
        return upcast

    def cells(self) -> Dict[str, List[Tuple[str, object]]]:
        """The networks of each stage at their sgm paths, for the parity harness's module-level
        work (`parity.contract.CellContract`); the VAE is the one that decodes."""
        embedders = submodule(self.model, "conditioner.embedders")
        return {"conditioner": [(f"conditioner.embedders.{i}", submodule(embedders, str(i)))
                                for i in range(2)],
                "unet": [("model.diffusion_model", self.model.model.diffusion_model)],
                "decode": [("first_stage_model", self.decoding_vae())]}

    @contextlib.contextmanager
    def eager(self):
        """PyNative, no graph units, for as long as it lasts: every module's own call runs,
        so the harness's hooks see it."""
        before = settings.jit_state()
        settings.set_jit("off")
        try:
            yield
        finally:
            settings.restore_jit(before)

    def describe(self) -> Dict[str, object]:
        """What a parity report records about this port: its version and how it executes
        (which parts are compiled, kernel threads, the oneDNN ISA cap)."""
        from importlib import metadata

        return {"version": metadata.version("sdxl-parity"), "execution": settings.summary()}

    def guide(self, eps: np.ndarray, scale: float) -> np.ndarray:
        """Classifier-free guidance of an uncond-first eps batch (the sampler's own CFG)."""
        from .sampling import VanillaCFG

        return VanillaCFG(float(scale)).combine(np.asarray(eps, np.float32))

    def sample(self, run, eps: Callable, callback: Callable) -> np.ndarray:
        """The port's sampler repeating a run (parity.contract.SamplingContract): its own
        schedule for (run.sampler, run.steps, run.schedule), the run's noise, `eps` as the
        network."""
        return sample_with_builtin_sampler(run, eps, callback)


    # ---- text to image ----------------------------------------------------------------------

    def __call__(self, prompt: Union[str, Sequence[str]], negative_prompt: Optional[str] = None, *,
                 height: Optional[int] = None, width: Optional[int] = None,
                 num_inference_steps: int = 30, guidance_scale: float = 5.0,
                 sampler: str = "euler", schedule: str = "leading", seed: Optional[int] = None,
                 latents: Optional[np.ndarray] = None, noise=None, output_type: str = "np",
                 callback: Optional[Callable] = None, progress: bool = True,
                 guide: str = "eps", sampler_options: Optional[Dict] = None):
        """Text to image.

        `latents` is unscaled N(0,1) noise (B,4,H/8,W/8), multiplied by the sampler's initial
        sigma as diffusers multiplies user latents. `noise` (a `sampling.NoiseSource`) supplies
        the initial and every per-step draw instead, so two frameworks can share them.
        `callback(step, latents, denoised)` runs after every step.
        Returns (B,H,W,3) float32 in [0,1] for "np", PIL images for "pil", latents for "latent".
        """
        from .sampling import (Denoiser, GuidedDenoiser, IdentityGuider, SeededNoise,
                               VanillaCFG, make_sampler)

        height = self.cfg.default_size if height is None else int(height)
        width = self.cfg.default_size if width is None else int(width)
        check_generation_args(height, width, num_inference_steps, output_type,
                              self.vae_scale_factor)
        check_guidance(guidance_scale)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        plan = make_sampler(sampler, int(num_inference_steps), schedule, **(sampler_options or {}))
        shape = (len(prompts), self.cfg.unet.in_channels,
                 height // self.vae_scale_factor, width // self.vae_scale_factor)
        if noise is None:
            seeded = SeededNoise(0 if seed is None else int(seed))
            noise = seeded if latents is None else _WithInitial(np.asarray(latents, np.float32), seeded)
        elif latents is not None:
            raise ValueError("pass either latents or noise, not both")

        conds = [self.encode_prompt(p, negative_prompt, original_size=(height, width),
                                    target_size=(height, width)) for p in prompts]
        cond = {"encoder_hidden_states": np.concatenate([c["prompt_embeds"] for c in conds]),
                "text_embeds": np.concatenate([c["pooled_prompt_embeds"] for c in conds]),
                "time_ids": np.concatenate([c["add_time_ids"] for c in conds])}
        uncond = {"encoder_hidden_states": np.concatenate([c["negative_prompt_embeds"] for c in conds]),
                  "text_embeds": np.concatenate([c["negative_pooled_prompt_embeds"] for c in conds]),
                  "time_ids": np.concatenate([c["negative_add_time_ids"] for c in conds])}
        do_cfg = guidance_scale > 1.0  # diffusers' rule: guidance <= 1 runs the cond pass alone
        guider = VanillaCFG(float(guidance_scale), guide) if do_cfg else IdentityGuider()

        def network(x_in, t, c):
            return self.unet(x_in, t, c["encoder_hidden_states"], c["text_embeds"], c["time_ids"])

        denoise = GuidedDenoiser(network, Denoiser.for_schedule(plan.schedule), guider,
                                 cond=cond, uncond=uncond if do_cfg else None)
        bar = progress_bar(total=plan.schedule.num_steps, desc="sampling", unit="step",
                           show=progress)

        def on_step(i, x, denoised):
            bar.update(1)
            if callback is not None:
                callback(i, x, denoised)

        try:
            out = plan(denoise, noise, shape, callback=on_step)
        finally:
            bar.close()
        if output_type == "latent":
            return out
        images = np.clip(self.decode(out) / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
        images = np.ascontiguousarray(images, dtype=np.float32)
        return to_pil(images) if output_type == "pil" else images


def sample_with_builtin_sampler(run, eps: Callable, callback: Callable) -> np.ndarray:
    """Run the built-in sampler for `run` (a parity.contract.SamplerRun): the grid it builds for
    (run.sampler, run.steps, run.schedule), the run's initial and per-step noise, CFG at
    run.guidance on `eps(x_in, t)` (uncond-first batch); `callback(i, latents)` per step."""
    from .sampling import Denoiser, GivenNoise, GuidedDenoiser, VanillaCFG, make_sampler

    plan = make_sampler(run.sampler, int(run.steps), run.schedule)
    noise = GivenNoise(np.asarray(run.initial_noise, np.float32), list(run.step_noise))
    denoise = GuidedDenoiser(lambda x_in, t, _cond: eps(x_in, t),
                             Denoiser.for_schedule(plan.schedule), VanillaCFG(float(run.guidance)),
                             cond={}, uncond={})
    return plan(denoise, noise, np.shape(run.initial_noise),
                callback=lambda i, x, denoised: callback(i, x))


OUTPUT_TYPES = ("np", "pil", "latent")


def check_generation_args(height: int, width: int, steps: int, output_type: str,
                          factor: int = 8) -> None:
    """Size, step count and output type a generation can use (`InputError` otherwise)."""
    for name, size in (("height", height), ("width", width)):
        if size <= 0 or size % factor:
            raise InputError(f"{name} must be a positive multiple of {factor}, got {size}")
    if int(steps) < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    check_choice(output_type, OUTPUT_TYPES, "output_type")


def check_guidance(scale: float) -> float:
    """A classifier-free guidance scale: finite and >= 0 (<= 1 runs the conditional pass alone)."""
    return check_finite_number(scale, "guidance", minimum=0.0)


def to_pil(images: np.ndarray):
    from PIL import Image

    return [Image.fromarray(im) for im in to_uint8(images)]


class _WithInitial:
    """User-given initial latents; per-step draws (ancestral samplers) from `rest`."""

    def __init__(self, initial: np.ndarray, rest):
        self._initial, self._rest = initial, rest

    def initial(self, shape):
        if tuple(self._initial.shape) != tuple(shape):
            raise ValueError(f"latents have shape {tuple(self._initial.shape)}, expected {tuple(shape)}")
        return self._initial

    def step(self, index, shape):
        return self._rest.step(index, shape)


def load_pipeline(path: Union[str, Path], dtype: str = "float32") -> SDXLPipeline:
    """Load a diffusers folder or an sgm single `.safetensors` file (detected), validating the
    whole layout first and streaming weights in one tensor at a time."""
    from .weights.checkpoint import open_checkpoint
    from .weights.loader import infer_preset, load_weights

    init_runtime()
    ckpt = open_checkpoint(Path(path))
    cfg = infer_preset(ckpt)
    model = cast(build_sdxl(cfg), resolve_dtype(dtype))
    load_weights(model, ckpt)
    return SDXLPipeline(model, source=str(path))


def random_pipeline(preset: str = "tiny", seed: int = 0, dtype: str = "float32") -> SDXLPipeline:
    """The port with seeded random weights, no checkpoint file (same numbers as
    `make-checkpoint --seed`)."""
    from .weights.state import randomize

    init_runtime()
    model = cast(build_sdxl(get_preset(preset)), resolve_dtype(dtype))
    randomize(model, seed)
    return SDXLPipeline(model, source=f"random:{preset}:{seed}")
