"""One key-map rule: which sgm tensors hold which diffusers tensors, under which transform.
Its own module so that the per-network maps (`keymap_text`, `keymap_unet`, `keymap_vae`) and
the pipeline map that gathers them (`keymap`) import it without importing each other."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

# transform kinds
COPY = "copy"
TRANSPOSE = "transpose"  # sgm (in, out) matrix used as x @ P  <->  Linear weight (out, in)
CONV1X1_TO_LINEAR = "conv1x1_to_linear"  # sgm (O, I, 1, 1)  <->  diffusers Linear (O, I)
SPLIT_QKV = "split_qkv"  # sgm fused in_proj (3C, ...)  <->  q, k, v (C, ...)
KINDS = (COPY, TRANSPOSE, CONV1X1_TO_LINEAR, SPLIT_QKV)


@dataclass(frozen=True)
class KeyRule:
    sgm: Tuple[str, ...]
    diffusers: Tuple[str, ...]
    kind: str = COPY

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown key-map transform {self.kind!r}")
        want = (1, 3) if self.kind == SPLIT_QKV else (1, 1)
        if (len(self.sgm), len(self.diffusers)) != want:
            raise ValueError(f"{self.kind} rule needs {want} names: {self}")


def rule(sgm: str, diffusers: str, kind: str = COPY) -> KeyRule:
    return KeyRule((sgm,), (diffusers,), kind)
