"""The one switch between CPU-friendly kernels and the native (Ascend) kernels, and the runtime
settings each backend needs.

MindSpore 2.10's CPU 3x3 convolution is orders of magnitude slower than PyTorch's, so on CPU
the port lowers convolutions to an im2col matmul; on Ascend (and GPU) the native kernel is used.
Set ``SDXL_MS_CONV=native|im2col`` to force either path; results agree to fp32 rounding.
"""
from __future__ import annotations

import os

import mindspore as ms

_CHOICES = ("auto", "native", "im2col")
_runtime_ready = False


def conv_impl() -> str:
    choice = os.environ.get("SDXL_MS_CONV", "auto").lower()
    if choice not in _CHOICES:
        raise ValueError(f"SDXL_MS_CONV must be one of {', '.join(_CHOICES)}, got {choice!r}")
    if choice != "auto":
        return choice
    return "im2col" if is_cpu() else "native"


def is_cpu() -> bool:
    return ms.get_context("device_target") == "CPU"


def init_runtime() -> None:
    """On CPU, launch ops synchronously: *measured* on 2 cores, PyNative's asynchronous launch
    queue spins against the compute threads and makes small ops 10-60x slower."""
    global _runtime_ready
    if _runtime_ready:
        return
    if is_cpu():
        ms.runtime.launch_blocking()
    _runtime_ready = True


_jit = False


def set_jit(enabled: bool) -> None:
    global _jit
    _jit = bool(enabled)


def jit_enabled() -> bool:
    return _jit


def compiled(cell):
    """`cell`'s forward compiled with ms.jit (graph mode), cached on the cell."""
    fn = getattr(cell, "_sdxl_compiled", None)
    if fn is None:
        fn = ms.jit(cell.construct)
        object.__setattr__(cell, "_sdxl_compiled", fn)
    return fn
