"""Shared fixtures: seeded tiny checkpoints (made once per session, torch-free) and helpers."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# names and shapes of the public sd_xl_base_1.0.safetensors, committed with the repo
REFERENCE_KEYS = REPO_ROOT / "fixtures" / "reference" / "sgm_sdxl_base_1.0_keys.txt"


def rel_l2(port, ref) -> float:
    """The harness's one rel L2 (`parity.metrics.rel_l2`, itself tested against hand-computed
    values in test_metrics.py), port first, shapes required equal."""
    from parity.metrics import rel_l2 as harness_rel_l2

    assert np.shape(port) == np.shape(ref), (np.shape(port), np.shape(ref))
    return harness_rel_l2(ref, port)


def read_reference_keys(prefix: str = "") -> Dict[str, Tuple[int, ...]]:
    """{name: shape} of the public SDXL-base-1.0 checkpoint, in its file order; only the names
    starting with `prefix` when one is given."""
    out = {}
    for line in REFERENCE_KEYS.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, shape = line.partition(":")
        if not name.startswith(prefix):
            continue
        out[name] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """The tiny preset, seed 0, in the three formats (same weights)."""
    from sdxl_ms.config import TINY
    from sdxl_ms.weights.synthetic import make_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    return {"diffusers": make_checkpoint(TINY, 0, root / "tiny-diffusers", "diffusers"),
            "sgm": make_checkpoint(TINY, 0, root / "tiny.safetensors", "sgm"),
            "mindspore": make_checkpoint(TINY, 0, root / "tiny.ckpt", "mindspore")}


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Cached checkpoints and tokenizers go to a per-session folder, never the user's cache."""
    root = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("SDXL_PARITY_CACHE", str(root))
    yield root
    mp.undo()
