"""Read views of the two checkpoint formats, each in its own namespace.

- `sgm`: one `.safetensors` file with the public single-file names (`model.diffusion_model.*`).
- `diffusers`: a folder with `unet/`, `vae/`, `text_encoder/`, `text_encoder_2/` weight files,
  addressed here as `unet/conv_in.weight` etc.
- `mindspore`: a MindSpore `.ckpt` (protobuf, no pickle) with the sgm names, as mindone's SDXL
  conversion writes it (`mindspore_ckpt.py`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

from .keymap import COMPONENT_FILES, split_component
from .keymap_text import canonical_text_encoder_key
from .mindspore_ckpt import MindSporeCheckpoint, is_mindspore_ckpt
from .safetensors_io import CheckpointError, SafetensorsFile

SGM, DIFFUSERS = "sgm", "diffusers"
MINDSPORE = "mindspore"  # a MindSpore .ckpt with sgm names (mindspore_ckpt.py)
FORMATS = (SGM, DIFFUSERS, MINDSPORE)
SGM_NAMED = (SGM, MINDSPORE)  # formats whose tensors carry the port's own (sgm) names


class SgmCheckpoint:
    format = SGM

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = SafetensorsFile(self.path)
        self.shapes: Dict[str, Tuple[int, ...]] = self._file.shapes

    def get(self, name: str) -> np.ndarray:
        return self._file.get(name)


class DiffusersCheckpoint:
    format = DIFFUSERS

    def __init__(self, path: Path):
        self.path = Path(path)
        self.configs: Dict[str, Dict] = _read_configs(self.path)
        self._files: Dict[str, SafetensorsFile] = {}
        self._file_key: Dict[str, str] = {}  # our spelling -> the key stored in the file
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        self.variant = detect_variant(self.path)
        for component, filename in COMPONENT_FILES.items():
            f = self.path / component / variant_file(filename, self.variant)
            if not f.is_file():
                raise CheckpointError(f"diffusers checkpoint {self.path} has no {component}/"
                                      f"{f.name} (only .safetensors weights are read)")
            self._files[component] = SafetensorsFile(f)
            for key, shape in self._files[component].shapes.items():
                name = f"{component}/{_canonical(component, key)}"
                self._file_key[name] = key
                self.shapes[name] = shape

    def get(self, name: str) -> np.ndarray:
        component, _ = split_component(name)
        return self._files[component].get(self._file_key[name])


def variant_file(filename: str, variant) -> str:
    """`diffusion_pytorch_model.safetensors` -> `diffusion_pytorch_model.fp16.safetensors`."""
    if not variant:
        return filename
    stem, _, ext = filename.rpartition(".")
    return f"{stem}.{variant}.{ext}"


def detect_variant(folder: Path):
    """None when the folder holds the plain weight files, "fp16" when only diffusers'
    `variant="fp16"` files are there (`*.fp16.safetensors`)."""
    plain = all((folder / c / f).is_file() for c, f in COMPONENT_FILES.items())
    if not plain and all((folder / c / variant_file(f, "fp16")).is_file()
                         for c, f in COMPONENT_FILES.items()):
        return "fp16"
    return None


def _read_configs(folder: Path) -> Dict[str, Dict]:
    """Every component's config.json, parsed: the reference (diffusers) builds its networks
    from them and so can the port, so a missing or broken one is reported here, before
    anything loads."""
    configs = {}
    for component in COMPONENT_FILES:
        config = folder / component / "config.json"
        if not config.is_file():
            raise CheckpointError(f"diffusers checkpoint {folder} has no {component}/config.json")
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{config} is not valid JSON ({e}); restore it from the "
                                  "original checkpoint") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{config} is not a JSON object")
        configs[component] = data
    return configs


def pad_tokens(folder: Path) -> Tuple[str, str]:
    """The pad tokens of a diffusers folder's two tokenizers (SDXL's when not stated)."""
    found = []
    for sub, default in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        try:
            pad = json.loads((folder / sub / "special_tokens_map.json").read_text())["pad_token"]
        except (OSError, ValueError, KeyError, TypeError):
            pad = default
        found.append(pad["content"] if isinstance(pad, dict) else str(pad))
    return found[0], found[1]


def _canonical(component: str, key: str) -> str:
    """transformers 5 saves CLIPTextModel without the `text_model.` level that SDXL's published
    folders (and transformers 4) use; both spellings load, the rules use the published one."""
    return canonical_text_encoder_key(key) if component == "text_encoder" else key


def detect_format(path: Path) -> str:
    path = Path(path)
    if path.is_dir():
        if (path / "model_index.json").is_file() or (path / "unet").is_dir():
            return DIFFUSERS
        raise CheckpointError(f"{path} is a folder but not a diffusers pipeline "
                              "(no model_index.json or unet/)")
    if path.is_file():
        if path.suffix == ".ckpt" and is_mindspore_ckpt(path):
            return MINDSPORE
        if path.suffix != ".safetensors":
            if _is_pickle(path):
                raise CheckpointError(
                    f"{path} is a pickled checkpoint; pickles can run code when loaded and are "
                    "never unpickled here: convert it to .safetensors "
                    "(safetensors.torch.save_file, on a machine you trust)")
            raise CheckpointError(f"{path}: not a checkpoint this tool reads; give an sgm "
                                  ".safetensors file, a MindSpore .ckpt or a diffusers folder")
        return SGM
    raise CheckpointError(f"checkpoint not found: {path}")


def _is_pickle(path: Path) -> bool:
    """Sniffed from the first bytes: a pickle protocol >= 2 header, or torch.save's zip."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head[:1] == b"\x80" or head == b"PK\x03\x04"


def open_checkpoint(path: Path):
    fmt = detect_format(path)
    return {SGM: SgmCheckpoint, DIFFUSERS: DiffusersCheckpoint,
            MINDSPORE: MindSporeCheckpoint}[fmt](path)
