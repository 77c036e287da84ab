"""What a parity run compares against: the run's spec and the reference's recorded tensors.

On disk a recording is a folder with `manifest.json` (spec, versions, schedule per sampler,
tensor names and shapes, sha256 of the tensor file) and `tensors.safetensors`; one made with
`record --modules` also holds `modules-<stage>.npz`, the reference's per-module inputs and
outputs that `sdxl-parity locate` compares against (`parity.module_capture`). Reading one needs
neither torch nor diffusers, so `sdxl-parity check` runs where only the port is installed.

Tensor names (`<s>` is a sampler name, `<k>` a UNet call, `<i>` a sampler step):
  tokens/input_ids, tokens/input_ids_2              ids of [prompt, cond_negative]
  conditioner/<variant>/<output>                    `neg_none`, `neg_text` (conditioner stage)
                                                    and `generation` (what sampling used)
  <s>/initial_noise, <s>/step_noise                 unscaled N(0,1) draws fed to both sides
  <s>/call<k>/x_in, <s>/call<k>/timestep, <s>/call<k>/eps   UNet inputs and outputs (uncond, cond)
  <s>/latents                                       (steps, B, 4, h, w) after each step, in the
                                                    port's (variance-exploding) parametrisation
  <s>/decoded, <s>/image                            float (B,3,H,W) and uint8 (B,H,W,3)
  decode_probe/latents, decode_probe/decoded        a low-amplitude decode, sensitive to eps bugs
                                                    (at most 32x32 latents: `probe_shape`)
  truth/<key>                                       `record --truth`: the reference in float64 on
                                                    the same inputs, teacher-forced, for the
                                                    conditioner outputs, UNet eps and decodes
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from sdxl_common.atomic import atomic_dir, default_file_mode
from sdxl_common.errors import InputError

SCHEMA_VERSION = 1
MANIFEST, TENSORS = "manifest.json", "tensors.safetensors"
DEFAULT_PROMPT = "a lighthouse on a rocky coast at dusk, volumetric light, highly detailed"
DEFAULT_COND_NEGATIVE = "blurry, low quality, watermark"


def tokens_key(output: str) -> str:
    return f"tokens/{output}"


def conditioner_key(variant: str, output: str) -> str:
    return f"conditioner/{variant}/{output}"


def call_key(sampler: str, call: int, what: str) -> str:
    """what: x_in, timestep or eps of UNet call `call`."""
    return f"{sampler}/call{call}/{what}"


def sampler_key(sampler: str, what: str) -> str:
    """what: initial_noise, step_noise, latents, decoded or image."""
    return f"{sampler}/{what}"


def truth_key(key: str) -> str:
    """The float64 reference's value of recording tensor `key` (`record --truth`)."""
    return f"truth/{key}"


def probe_key(what: str) -> str:
    """what: latents or decoded."""
    return f"decode_probe/{what}"


class RecordingError(InputError):
    """A recording folder that is missing, incomplete, corrupt or of another schema."""


@dataclass
class RunSpec:
    """Everything both sides need to compute the same thing."""

    preset: str = "tiny"
    checkpoint: Optional[str] = None  # None: the seeded checkpoint (preset, checkpoint_seed)
    checkpoint_seed: int = 0
    prompt: str = DEFAULT_PROMPT
    negative_prompt: Optional[str] = None  # for generation; None = zeroed negatives (SDXL-base)
    cond_negative: str = DEFAULT_COND_NEGATIVE  # the conditioner stage's encoded negative
    seed: int = 0
    samplers: Tuple[str, ...] = ("euler", "euler_a")
    schedule: str = "leading"
    steps: int = 4
    guidance: float = 5.0
    height: Optional[int] = None
    width: Optional[int] = None
    dtype: str = "float32"
    # the conditioner stage uses non-square, cropped sizes so a swapped add_time_ids shows
    cond_original_size: Tuple[int, int] = (48, 80)
    cond_crop: Tuple[int, int] = (4, 8)

    def __post_init__(self):
        self.samplers = tuple(self.samplers)
        self.cond_original_size = tuple(self.cond_original_size)
        self.cond_crop = tuple(self.cond_crop)

    def resolved_size(self, default: int) -> Tuple[int, int]:
        return (self.height or default, self.width or default)

    def validate(self) -> None:
        """Everything this spec needs to be recorded and checked, before anything loads."""
        from .run_settings import check_run

        check_run(self)

    def checkpoint_source(self) -> str:
        return self.checkpoint or f"seeded:{self.preset}:{self.checkpoint_seed}"

    @classmethod
    def from_dict(cls, d: Dict) -> "RunSpec":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Recording:
    spec: RunSpec
    tensors: Dict[str, np.ndarray]
    schedules: Dict[str, Dict[str, List[float]]] = field(default_factory=dict)
    meta: Dict = field(default_factory=dict)
    path: Optional[Path] = None
    # stage -> (index dict, file): the reference's per-module tensors (`record --modules`)
    modules: Dict[str, Tuple[Dict, Path]] = field(default_factory=dict)

    def get(self, name: str) -> np.ndarray:
        try:
            return self.tensors[name]
        except KeyError:
            raise RecordingError(f"recording {self.path or ''} has no tensor {name!r}") from None

    def truth(self, key: str) -> Optional[np.ndarray]:
        """The float64 truth of tensor `key`, or None when the recording has none."""
        return self.tensors.get(truth_key(key))

    def unet_calls(self, sampler: str) -> int:
        calls = 0
        while call_key(sampler, calls, "eps") in self.tensors:
            calls += 1
        return calls

    def weights(self) -> Path:
        """The weights this recording was made with, on this machine: the reference for a live
        module capture must run on them, never on the port's checkpoint (a conversion bug in
        that would be on both sides and invisible). Bad input (exit 2) when they are not here
        or differ from the recorded content hash."""
        redo = ("record the golden with --modules where its weights are (sdxl-parity record "
                "--modules), so localisation needs no reference")
        try:
            path = resolve_checkpoint(self.spec, None,
                                      self.meta.get("checkpoint_generator_version"))
        except RecordingError as e:
            raise RecordingError(f"{e}; or {redo}") from None
        if not path.exists():
            raise RecordingError(f"golden {self.path} was recorded on {path}, which is not on "
                                 f"this machine: {redo}")
        recorded = self.meta.get("checkpoint_sha256")
        if recorded and checkpoint_sha256(path) != recorded:
            raise RecordingError(f"golden {self.path} was recorded on {path}, which has changed "
                                 f"since (content sha256 differs): {redo}")
        return path

    def recorded_on(self, checkpoint, weights: Path) -> bool:
        """Whether `checkpoint` holds the weights this recording was made with (`weights`, from
        `weights()`): the same path, or the same content by the recorded sha256."""
        if Path(checkpoint).resolve() == Path(weights).resolve():
            return True
        recorded = self.meta.get("checkpoint_sha256")
        return bool(recorded) and checkpoint_sha256(checkpoint) == recorded

    def save(self, folder: Path) -> Path:
        from safetensors.numpy import save_file

        folder = check_recording_target(folder)
        with atomic_dir(folder, replace=True) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in self.tensors.items()},
                      str(tmp / TENSORS))
            os.chmod(tmp / TENSORS, default_file_mode())  # safetensors creates it 0600
            manifest = {
                "schema_version": SCHEMA_VERSION,
                "spec": asdict(self.spec),
                "schedules": self.schedules,
                "meta": self.meta,
                "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)}
                            for k, v in sorted(self.tensors.items())},
                "tensors_sha256": file_sha256(tmp / TENSORS),
            }
            saved = {}
            for stage, (index, source) in self.modules.items():
                name = module_file(stage)
                if Path(source).resolve() != (tmp / name).resolve():
                    shutil.copyfile(source, tmp / name)
                os.chmod(tmp / name, default_file_mode())
                saved[stage] = {**index, "file": name, "sha256": file_sha256(tmp / name)}
            if saved:
                manifest["modules"] = saved
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        self.modules = {stage: (index, folder / module_file(stage))
                        for stage, (index, _) in self.modules.items()}
        self.path = folder
        return folder

    @classmethod
    def load(cls, folder: Path) -> "Recording":
        from safetensors.numpy import load_file

        folder = Path(folder)
        if not (folder / MANIFEST).is_file():
            raise RecordingError(f"{folder} is not a recording (no {MANIFEST})")
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except json.JSONDecodeError as e:
            raise RecordingError(f"{folder / MANIFEST} is not valid JSON: {e}") from None
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise RecordingError(f"{folder} has schema_version {manifest.get('schema_version')!r}; "
                                 f"this tool reads {SCHEMA_VERSION}: re-record it with this "
                                 "version (sdxl-parity record)")
        if not (folder / TENSORS).is_file():
            raise RecordingError(f"{folder} has no {TENSORS}")
        if file_sha256(folder / TENSORS) != manifest.get("tensors_sha256"):
            try:
                load_file(str(folder / TENSORS))
            except Exception as e:  # safetensors' own error types
                raise RecordingError(f"{folder / TENSORS} is truncated or corrupt ({e}); "
                                     "copy the recording again or re-record it") from None
            raise RecordingError(f"{folder / TENSORS} does not match the sha256 in its "
                                 "manifest: it was modified after recording; re-record it")
        tensors = load_file(str(folder / TENSORS))
        modules = {}
        for stage, index in manifest.get("modules", {}).items():
            path = folder / index["file"]
            if not path.is_file():
                raise RecordingError(f"{folder} lists module captures in {index['file']}, "
                                     "which is missing: copy the recording again")
            modules[stage] = (index, path)
        return cls(spec=RunSpec.from_dict(manifest["spec"]), tensors=tensors,
                   schedules=manifest.get("schedules", {}), meta=manifest.get("meta", {}),
                   path=folder, modules=modules)


def resolve_checkpoint(spec: RunSpec, override: Optional[str] = None,
                       recorded_version: Optional[int] = None) -> Path:
    """An explicit checkpoint, or the seeded one the spec names (made and cached if needed)."""
    if override:
        return Path(override)
    if spec.checkpoint:
        return Path(spec.checkpoint)
    from sdxl_ms.weights.synthetic import GENERATOR_VERSION, cached_checkpoint

    if recorded_version is not None and recorded_version != GENERATOR_VERSION:
        raise RecordingError(f"the recording was made on seeded weights of generator version "
                             f"{recorded_version}; this version makes {GENERATOR_VERSION}: "
                             "re-record it (sdxl-parity record)")
    return cached_checkpoint(spec.preset, spec.checkpoint_seed)


def module_file(stage: str) -> str:
    """The file of a stage's per-module capture inside a recording folder."""
    return f"modules-{stage}.npz"


def check_recording_target(folder) -> Path:
    """`folder` may receive a recording: new, empty, or a recording (which is replaced)."""
    folder = Path(folder)
    if folder.exists() and not (folder / MANIFEST).is_file() and (
            not folder.is_dir() or any(folder.iterdir())):
        raise RecordingError(f"{folder} exists and is not a recording; choose a new folder "
                             "(an existing recording is replaced)")
    return folder


def file_sha256(path: Path) -> str:
    """The sha256 of one file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stored_file_sha256(path: Path) -> str:
    """`file_sha256`, remembered on disk under the cache folder by the file's identity (path,
    device, inode, size, modification time in ns), as make and git trust a file's stat: a
    checkpoint is hashed once, not by every process that asks. sdxl-base's 13 GB took about
    10 s a time in a 1024x1024 run, and `sdxl-parity run` asked twice (the reference's process
    when recording, this one when checking the golden's weights). Where the cache folder cannot
    be written, it hashes each time."""
    from sdxl_common.atomic import atomic_write_text
    from sdxl_common.paths import cache_dir

    path = Path(path).resolve()
    st = path.stat()
    identity = f"{path}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}"
    entry = cache_dir() / "file-sha256" / hashlib.sha256(identity.encode()).hexdigest()
    try:
        known = entry.read_text().strip()
        if len(known) == 64:
            return known
    except OSError:
        pass
    digest = file_sha256(path)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(entry, digest + "\n")
    except OSError:
        pass
    return digest


@functools.lru_cache(maxsize=8)
def _cached_sha256(path: Path, stamp: Tuple) -> str:
    """`stamp`: (file, mtime, size) of every file, sorted; a changed file is a new key."""
    if path.is_file():
        return stored_file_sha256(path)
    h = hashlib.sha256()
    for name, _, _ in stamp:
        f = Path(name)
        h.update(f"{f.relative_to(path).as_posix()}\0{stored_file_sha256(f)}\n".encode())
    return h.hexdigest()


def checkpoint_sha256(path) -> str:
    """A content hash of a checkpoint: its file's sha256, or for a folder (diffusers) one
    sha256 over every file's relative path and sha256, so a golden can tell whether the
    weights on this machine are those it was recorded with."""
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stamp = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    return _cached_sha256(path, stamp)  # each file hashed once: `stored_file_sha256`
