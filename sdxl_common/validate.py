"""Checks of user input that the command lines run before any model loads.

Each raises `InputError` with one sentence that names the problem and what to do, so a bad
argument costs no time and leaves no file behind.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import List, Sequence

from .errors import InputError


def check_existing(path, what: str) -> Path:
    """`path` exists (a file or a folder)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    return path


def _nearest_existing(path: Path) -> Path:
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def _probe_writable(base: Path, target: Path, what: str) -> None:
    """Create and remove a scratch file in `base`: unlike os.access, this also holds for root
    and for read-only or virtual file systems."""
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise InputError(f"cannot write {what} {target}: {base} is not writable "
                         f"({e.strerror or e})") from None


def check_writable_file(path, what: str = "file") -> Path:
    """A file can be created or replaced at `path` (its missing parent folders included)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"cannot write {what} {path}: it is a folder; give a file name")
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise InputError(f"cannot write {what} {path}: {base} is a file, not a folder")
    _probe_writable(base, path, what)
    return path


def check_output_dir(path, what: str = "output folder") -> Path:
    """A folder can be created at `path`, or exists and is writable; not an existing file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {path} is an existing file; give a folder")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise InputError(f"cannot create {what} {path}: {base} is a file, not a folder")
    _probe_writable(base, path, what)
    return path


def read_prompt_file(path) -> List[str]:
    """Prompts from a UTF-8 text file, one per line; blank lines are skipped."""
    path = check_existing(path, "prompt file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"prompt file {path} is not UTF-8 text (byte {e.start}: "
                         f"{e.object[e.start:e.start + 1]!r}); save it as UTF-8") from None
    except IsADirectoryError:
        raise InputError(f"prompt file {path} is a folder") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"prompt file {path} holds no prompt")
    return prompts


def check_finite_number(value: float, name: str, minimum: float = -math.inf) -> float:
    """A finite number not below `minimum`."""
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value}")
    if value < minimum:
        raise InputError(f"{name} must be >= {minimum:g}, got {value:g}")
    return value


def check_size(height: int, width: int, factor: int = 8) -> None:
    """An image size both SDXL pipelines can generate: the VAE scales by `factor`."""
    for name, size in (("height", height), ("width", width)):
        if size <= 0 or size % factor:
            raise InputError(f"{name} must be a positive multiple of {factor}, got {size}")


def check_steps(steps: int) -> int:
    if int(steps) < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    return steps


def check_guidance(scale: float) -> float:
    """A classifier-free guidance scale: finite and >= 0 (<= 1 runs the conditional pass alone)."""
    return check_finite_number(scale, "guidance", minimum=0.0)


def check_choice(value: str, choices: Sequence[str], what: str) -> str:
    if value not in choices:
        raise InputError(f"unknown {what} {value!r}; valid choices: {', '.join(choices)}")
    return value
