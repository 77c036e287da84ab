"""What one benchmark measurement runs: a component of one side, built and fed like the other.

Both sides expose the same stage contract (`encode_prompt`, `unet`, `decode`, `__call__`), so a
workload is "build the side's pipeline with the weights this component needs, then call one
stage on fixed seeded inputs". Only the modules the component uses get real weights; the rest
stay unallocated (the port builds with `no_init_parameters`) or live on torch's meta device,
so each measurement's peak memory is the component's, and a full-size UNet benchmark never
holds the 3 GB of text encoders beside it.

Imports are lazy: a port measurement never imports torch, a reference one never MindSpore.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from sdxl_common.dtypes import DTYPES

from . import flops as flops_mod

COMPONENTS = flops_mod.COMPONENTS
SIDES = ("port", "reference")
PROMPT = "a photograph of an astronaut riding a horse on the moon, highly detailed"
NEGATIVE = "blurry, low quality, watermark"
GUIDANCE_SCALE = 5.0
TIMESTEP = 501.0  # a mid-schedule timestep for the single UNet step

# sgm prefixes (port) and diffusers modules (reference) each component needs
PORT_PREFIXES = {"text": ("conditioner.",), "unet": ("model.diffusion_model.",),
                 "vae": ("first_stage_model.",)}
PORT_PREFIXES["pipeline"] = sum(PORT_PREFIXES.values(), ())
REFERENCE_MODULES = {"text": ("text_encoder", "text_encoder_2"), "unet": ("unet",),
                     "vae": ("vae",)}
REFERENCE_MODULES["pipeline"] = sum(REFERENCE_MODULES.values(), ())
ALL_REFERENCE_MODULES = REFERENCE_MODULES["pipeline"]


# ---- execution modes -----------------------------------------------------------------------

@dataclass(frozen=True)
class Mode:
    """How a side executes. `compiles`: the first call builds a graph, so the runner reports
    its excess over the steady state as `compile_s`. `prepare` runs before the model is built
    (e.g. `ms.set_context(mode=ms.GRAPH_MODE)`); `wrap` may replace the built pipeline (e.g.
    one whose cells are `ms.jit`-compiled)."""

    name: str
    compiles: bool = False
    prepare: Callable[[], None] = lambda: None
    wrap: Callable[[Any], Any] = lambda pipe: pipe


def _pynative() -> None:
    import mindspore as ms

    ms.set_context(mode=ms.PYNATIVE_MODE)


def _jit(mode: str) -> Callable[[], None]:
    def prepare() -> None:
        from sdxl_ms.runtime import settings

        _pynative()
        settings.set_jit(mode)
    return prepare


# "graph": each network's forward compiled whole by ms.jit (`sdxl_ms.runtime.settings.set_jit("model")`);
# "graph-blocks": one shared graph per block signature (`settings.set_jit("blocks")`). Both compile on
# the first call, which the runner reports apart as compile_s.
PORT_MODES: Dict[str, Mode] = {"pynative": Mode("pynative", prepare=_pynative),
                               "graph": Mode("graph", compiles=True, prepare=_jit("model")),
                               "graph-blocks": Mode("graph-blocks", compiles=True,
                                                    prepare=_jit("blocks"))}
REFERENCE_MODES: Dict[str, Mode] = {"eager": Mode("eager")}


def modes_for(side: str) -> Dict[str, Mode]:
    return PORT_MODES if side == "port" else REFERENCE_MODES


# ---- the measurement spec ------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    """Everything one measurement needs; JSON round-trips so it can cross a process boundary."""

    component: str
    side: str
    mode: str
    preset: str = "tiny"
    height: int = 64
    width: int = 64
    dtype: str = "float32"
    steps: int = 4
    warmup: int = 1
    rounds: int = 5
    checkpoint: Optional[str] = None  # None: seeded random weights (see `weights_note`)
    seed: int = 0
    device: Optional[str] = None  # reference: "cpu"/"cuda"; port: MindSpore target or None
    threads: Optional[int] = None  # CPU threads of either framework; None: its default

    def __post_init__(self):
        if self.component not in COMPONENTS:
            raise ValueError(f"unknown component {self.component!r}; choose from {', '.join(COMPONENTS)}")
        if self.side not in SIDES:
            raise ValueError(f"unknown side {self.side!r}; choose from {', '.join(SIDES)}")
        if self.mode not in modes_for(self.side):
            raise ValueError(f"the {self.side} has no mode {self.mode!r}; "
                             f"available: {', '.join(modes_for(self.side))}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        if self.rounds < 1 or self.warmup < 0 or self.steps < 1:
            raise ValueError("need rounds >= 1, warmup >= 0 and steps >= 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be >= 1")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Spec":
        return cls(**json.loads(text))

    @property
    def reference_device(self) -> str:
        return self.device or "cpu"

    def weights_note(self) -> str:
        if self.checkpoint:
            return f"checkpoint {self.checkpoint} (both sides, same weights)"
        return ("random: port seeded random_init, reference diffusers' default init; the "
                "weights differ, which does not matter for timing")

    def flops(self) -> int:
        from sdxl_ms.config import get_preset

        return flops_mod.component_flops(get_preset(self.preset), self.component, self.height,
                                         self.width, self.steps)


@dataclass
class Workload:
    call: Callable[[], Any]
    info: Dict[str, Any]  # framework versions, device, what was materialised


# ---- inputs (identical on both sides) ------------------------------------------------------

def inputs(spec: Spec) -> Dict[str, np.ndarray]:
    from sdxl_ms.config import get_preset

    cfg = get_preset(spec.preset)
    rng = np.random.default_rng(spec.seed)
    f = cfg.vae.downsample_factor
    lat = (cfg.unet.in_channels, spec.height // f, spec.width // f)
    h, w = spec.height, spec.width
    return {
        "sample": rng.standard_normal((2,) + lat, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, cfg.unet.context_dim), dtype=np.float32),
        "text_embeds": rng.standard_normal((2, cfg.conditioner.pooled_dim), dtype=np.float32),
        "time_ids": np.array([[h, w, 0, 0, h, w]] * 2, dtype=np.float32),
        "latents": rng.standard_normal((1,) + lat, dtype=np.float32),
    }


def stage_call(spec: Spec, pipe) -> Callable[[], Any]:
    """The benchmarked call on either side's pipeline (they share the stage contract)."""
    x = inputs(spec)
    size = (spec.height, spec.width)
    if spec.component == "text":
        return lambda: pipe.encode_prompt(PROMPT, NEGATIVE, original_size=size, target_size=size)
    if spec.component == "unet":
        return lambda: pipe.unet(x["sample"], TIMESTEP, x["encoder_hidden_states"],
                                 x["text_embeds"], x["time_ids"])
    if spec.component == "vae":
        return lambda: pipe.decode(x["latents"])
    kwargs = dict(height=spec.height, width=spec.width, num_inference_steps=spec.steps,
                  guidance_scale=GUIDANCE_SCALE, latents=x["latents"])
    if spec.side == "port":
        kwargs["progress"] = False
    return lambda: pipe(PROMPT, NEGATIVE, **kwargs)


# ---- building each side --------------------------------------------------------------------

def build(spec: Spec) -> Workload:
    mode = modes_for(spec.side)[spec.mode]
    mode.prepare()
    threads = set_threads(spec.side, spec.threads)
    pipe, info = (build_port if spec.side == "port" else build_reference)(spec)
    pipe = mode.wrap(pipe)
    return Workload(stage_call(spec, pipe), {**info, "threads": threads})


_port_threads: Optional[int] = None


def set_threads(side: str, threads: Optional[int]) -> int:
    """Apply a CPU thread count (the runner also sets OMP_NUM_THREADS for the new process);
    returns the count in effect. Equal counts on both sides keep the comparison fair, and on a
    loaded machine fewer threads than cores avoids OpenMP spin-wait collapse."""
    global _port_threads
    if side == "port":
        import mindspore as ms

        if threads and _port_threads is None:  # MindSpore accepts it once per process
            try:
                from mindspore.device_context.cpu.op_tuning import threads_num
            except ImportError:  # older MindSpore
                ms.set_context(runtime_num_threads=threads)
            else:
                threads_num(threads)
            _port_threads = threads
        return _port_threads or int(ms.get_context("runtime_num_threads"))
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def build_port(spec: Spec) -> Tuple[Any, Dict[str, Any]]:
    import mindspore as ms

    if spec.device:
        ms.set_device(spec.device)
    from sdxl_ms.runtime import init_runtime
    from sdxl_ms.config import get_preset
    from sdxl_ms.models.sdxl import build_sdxl
    from sdxl_ms.nn.precision import cast
    from sdxl_ms.pipeline import SDXLPipeline, load_pipeline, random_pipeline, resolve_dtype
    from sdxl_ms.weights.random_init import random_tensor
    from sdxl_ms.weights.state import layout, set_weights

    init_runtime()
    prefixes = PORT_PREFIXES[spec.component]
    info = {"framework": f"mindspore {ms.__version__}",
            "device": ms.get_context("device_target"), "materialised": list(prefixes)}
    if spec.component == "pipeline":  # the real entry points
        pipe = (load_pipeline(spec.checkpoint, spec.dtype) if spec.checkpoint
                else random_pipeline(spec.preset, spec.seed, spec.dtype))
        return pipe, info
    if spec.checkpoint:
        model = _port_model_from_checkpoint(Path(spec.checkpoint), spec.dtype, prefixes)
    else:
        model = cast(build_sdxl(get_preset(spec.preset)), resolve_dtype(spec.dtype))
        # random_pipeline's numbers (drawn by full sgm name), for this component only
        set_weights(model, ((n, random_tensor(spec.seed, n, s))
                            for n, s in layout(model).items() if n.startswith(prefixes)))
    return SDXLPipeline(model, source=spec.checkpoint or f"random:{spec.preset}:{spec.seed}"), info


def _port_model_from_checkpoint(path: Path, dtype: str, prefixes: Tuple[str, ...]):
    """`load_pipeline` restricted to the parameters under `prefixes` (others stay unallocated)."""
    from sdxl_ms.models.sdxl import build_sdxl
    from sdxl_ms.nn.precision import cast
    from sdxl_ms.pipeline import resolve_dtype
    from sdxl_ms.weights.checkpoint import SGM, open_checkpoint
    from sdxl_ms.weights.keymap import convert_to_sgm, pipeline_rules
    from sdxl_ms.weights.keymap_text import sgm_only_tensor
    from sdxl_ms.weights.loader import check_layout, infer_preset
    from sdxl_ms.weights.state import layout, set_weights

    ckpt = open_checkpoint(path)
    cfg = infer_preset(ckpt)
    check_layout(ckpt, cfg)
    model = cast(build_sdxl(cfg), resolve_dtype(dtype))
    wanted = [n for n in layout(model) if n.startswith(prefixes)]
    if ckpt.format == SGM:
        set_weights(model, ((n, ckpt.get(n)) for n in wanted))
        return model
    rules = [r for r in pipeline_rules(cfg) if all(n.startswith(prefixes) for n in r.sgm)]
    set_weights(model, convert_to_sgm(rules, ckpt.get))
    covered = {n for r in rules for n in r.sgm}
    set_weights(model, ((n, sgm_only_tensor(n.rpartition(".")[2]))
                        for n in wanted if n not in covered))
    return model


@contextlib.contextmanager
def _default_dtype(torch, dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def reference_module(name: str, cfg, device: str, dtype):
    """A diffusers/transformers module of the preset, randomly initialised by its own
    constructor (on `device="meta"`: shapes and config only, no memory)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdxl_ms.weights.diffusers_configs import pipeline_configs

    config = pipeline_configs(cfg)[name]
    makers = {"unet": lambda: UNet2DConditionModel.from_config(config),
              "vae": lambda: AutoencoderKL.from_config(config),
              "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**config)),
              "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**config))}
    with torch.device(device), _default_dtype(torch, dtype):
        module = makers[name]()
    return module.eval()


def check_reference_device(device: str) -> None:
    """A clear one-line ValueError, before anything loads, for a device torch cannot use."""
    if device == "cpu":
        return
    if not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ValueError(f"--reference-device {device!r}: use cpu or cuda[:N]")
    try:
        import torch
    except ImportError:
        raise ValueError(f"--reference-device {device}: torch is not installed") from None
    if not torch.cuda.is_available():
        raise ValueError(f"--reference-device {device}: torch.cuda is not available on this "
                         f"machine (torch {torch.__version__}); use --reference-device cpu")


def build_reference(spec: Spec) -> Tuple[Any, Dict[str, Any]]:
    import torch

    from parity.reference import (ReferencePipeline, configure_torch_determinism,
                                  diffusers_folder_for, load_reference)
    from sdxl_ms.config import get_preset

    device = spec.reference_device
    check_reference_device(device)
    configure_torch_determinism(torch)
    import diffusers

    needed = REFERENCE_MODULES[spec.component]
    info = {"framework": f"torch {torch.__version__}, diffusers {diffusers.__version__}",
            "device": device, "materialised": list(needed)}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    if spec.component == "pipeline" and spec.checkpoint:
        return load_reference(spec.checkpoint, spec.dtype, device), info

    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tdtype = getattr(torch, spec.dtype)
    cfg = get_preset(spec.preset)  # the runner read it off the checkpoint (that needs MindSpore)
    skeletons = {n: reference_module(n, cfg, "meta", tdtype)
                 for n in ALL_REFERENCE_MODULES if n not in needed}
    if spec.checkpoint:
        pipe = StableDiffusionXLPipeline.from_pretrained(
            str(diffusers_folder_for(Path(spec.checkpoint))), local_files_only=True, torch_dtype=tdtype, **skeletons)
    else:
        from sdxl_ms.tokenizer import load_tokenizer
        from sdxl_ms.weights.diffusers_configs import SDXL_SCHEDULER_CONFIG

        torch.manual_seed(spec.seed)
        modules = {n: reference_module(n, cfg, "cpu", tdtype) for n in needed}
        pipe = StableDiffusionXLPipeline(
            **modules, **skeletons,
            tokenizer=load_tokenizer(cfg.conditioner.clip_l.pad_token),
            tokenizer_2=load_tokenizer(cfg.conditioner.clip_g.pad_token),
            scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
            force_zeros_for_empty_prompt=True)
    for n in needed:
        getattr(pipe, n).to(device)
    pipe.set_progress_bar_config(disable=True)
    return ReferencePipeline(pipe, device), info


def import_framework(side: str) -> None:
    if side == "port":
        import mindspore  # noqa: F401
    else:
        import diffusers  # noqa: F401
        import torch  # noqa: F401


# ---- memory ----------------------------------------------------------------------------------

def device_peak_bytes(side: str, device: Optional[str]) -> Optional[int]:
    """The framework allocator's peak on an accelerator; None on CPU (no such allocator)."""
    if side == "port":
        import mindspore as ms

        if ms.get_context("device_target") == "CPU":
            return None
        return int(ms.runtime.max_memory_allocated())
    if (device or "cpu").startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated())
    return None
