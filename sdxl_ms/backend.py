"""The one switch between the native convolution kernels and an im2col (unfold + MatMul)
lowering, and the runtime settings each backend needs.

`conv_impl()` is "native" on every backend by default. *Measured* on MindSpore 2.10 CPU (2
cores): once ops launch synchronously (`init_runtime`), the native 3x3 Conv2D runs at 0.4-1.5x
PyTorch's time at SDXL shapes (`benchmarks.profile_port convs`), while the im2col lowering costs
0.5-2.6x and more than native at nearly every shape (its unfold copy is as slow as the GEMM). The "700x slower" native CPU convolution was an artefact of the
asynchronous launch queue. Set ``SDXL_MS_CONV=native|im2col`` to force either path; results
agree to fp32 rounding.
"""
from __future__ import annotations

import inspect
import os

import mindspore as ms

from .errors import InputError

_CHOICES = ("auto", "native", "im2col")
_runtime_ready = False


def conv_impl() -> str:
    choice = os.environ.get("SDXL_MS_CONV", "auto").lower()
    if choice not in _CHOICES:
        raise InputError(f"SDXL_MS_CONV must be one of {', '.join(_CHOICES)}, got {choice!r}")
    return "native" if choice == "auto" else choice


def is_cpu() -> bool:
    return ms.get_context("device_target") == "CPU"


def cpu_threads() -> int:
    """Kernel threads for the CPU backend: `SDXL_MS_THREADS`, else the cores this process may use."""
    env = os.environ.get("SDXL_MS_THREADS")
    if env:
        if not env.strip().isdigit():
            raise InputError(f"SDXL_MS_THREADS must be a whole number of threads, got {env!r}")
        return max(1, int(env))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def init_runtime() -> None:
    """On CPU: launch ops synchronously (*measured* on 2 cores, PyNative's asynchronous launch
    queue spins against the compute threads and makes small ops 10-60x slower) and size the
    kernel thread pool to the cores (*measured*: left unset, the Python thread computes beside
    the pool's workers, 3 threads on 2 cores, ~1.7x the CPU time for the same MatMul)."""
    global _runtime_ready
    if _runtime_ready:
        return
    conv_impl(), jit_mode()  # a bad SDXL_MS_CONV / SDXL_MS_JIT fails here, before any work
    if is_cpu():
        ms.runtime.launch_blocking()
        from mindspore.device_context.cpu.op_tuning import RuntimeConf

        if os.environ.get("SDXL_MS_THREADS") != "0" and \
                not RuntimeConf.get_instance().is_op_threads_num_configured():
            ms.device_context.cpu.op_tuning.threads_num(cpu_threads())
    _runtime_ready = True


def execution_summary() -> dict:
    """What this process runs on and how, as resolved (for reports): MindSpore's device
    target, the graph mode, the convolution path and the CPU kernel threads."""
    threads = None
    if is_cpu():
        threads = "mindspore default" if os.environ.get("SDXL_MS_THREADS") == "0" else cpu_threads()
    return {"device_target": ms.get_context("device_target"), "jit": jit_mode(),
            "conv": conv_impl(), "threads": threads}


JIT_MODES = ("off", "blocks", "model")
_jit_mode = None  # None: read SDXL_MS_JIT on first use
_graphs = {}


def jit_mode() -> str:
    """"off" (PyNative), "blocks" or "model": `set_jit`, else the SDXL_MS_JIT environment
    variable (0/off, 1/blocks, model)."""
    global _jit_mode
    if _jit_mode is None:
        _jit_mode = _mode_from_env()
    return _jit_mode


def _mode_from_env() -> str:
    # its own function: ms.jit parses `jit_mode` (called inside graphs) and rejects `try`
    try:
        return _parse_mode(os.environ.get("SDXL_MS_JIT", "off"))
    except ValueError as err:
        raise InputError(f"SDXL_MS_JIT: {err}") from None


def jit_enabled() -> bool:
    """Whether blocks run as shared compiled graphs ("blocks" mode)."""
    return jit_mode() == "blocks"


def set_jit(mode) -> None:
    """Graph mode for the UNet, VAE and text encoders: "off" (False, PyNative, the default),
    "blocks" (True) or "model".

    "blocks": every block (ResBlock, spatial transformer, VAE resnet block, text-encoder layer)
    is a function of its inputs and weights, compiled by ms.jit once per input signature and
    shared by every layer with that signature (sdxl-base's six width-1280 spatial transformers
    share one graph); a few seconds of compiles, and no model-sized memory overhead.
    "model": each network's whole forward is one graph per model and input shape: the lowest
    per-call overhead (small shapes, e.g. the tiny preset: *measured* tiny UNet call 69 ms
    against ~260 ms in PyNative, after a 25 s compile), but long compiles at full size
    (*measured* ~90 s for the sdxl-base UNet) and ~1 GB more peak memory there.
    Both remove MindSpore's ~0.15 ms per-op PyNative dispatch; results equal PyNative's.
    """
    global _jit_mode
    _jit_mode = _parse_mode(mode)


def _parse_mode(mode) -> str:
    if mode is True:
        return "blocks"
    if mode is False or mode is None:
        return "off"
    name = str(mode).strip().lower()
    name = {"0": "off", "false": "off", "no": "off", "": "off", "1": "blocks", "true": "blocks",
            "yes": "blocks", "on": "blocks"}.get(name, name)
    if name not in JIT_MODES:
        raise InputError(f"jit mode must be one of {', '.join(JIT_MODES)}, got {mode!r}")
    return name


def run_model(cell, fn, *args):
    """`fn(*args)` (a model's forward, e.g. `cell._forward`): compiled as one graph per model,
    function and input signature in "model" mode, else called directly.

    A graph freezes the Python it traced, so the graph cache is keyed on a guard: the layers'
    `GUARDED` attributes (norm epsilons and groups, activation functions) and their classes'
    `construct`. Changing one (a patched layer, a mutant test) compiles a new graph instead of
    being silently ignored. The guard stays on the Python side: handing it to the graph as an
    argument made ms.jit recompile on every call (*measured*: 31 s per tiny UNet call)."""
    if jit_mode() != "model":
        return fn(*args)
    state = cell.__dict__.setdefault("_sdxl_model_graphs", {})
    if "guarded" not in state:
        cells = [c for _, c in cell.cells_and_names()]
        state["guarded"] = [c for c in cells if any(a in c.__dict__ for a in GUARDED)]
        state["classes"] = sorted({type(c) for c in cells}, key=lambda t: t.__qualname__)
    key = (fn.__name__,
           tuple(c.__dict__.get(a) for c in state["guarded"] for a in GUARDED),
           tuple(t.construct for t in state["classes"]))
    graph = state.get(key)
    if graph is None:
        # One PyNative call first: *measured* (tiny UNet, CPU) a graph compiled before the
        # model ever ran eagerly runs 6x slower on every call (290 ms against 44 ms).
        fn(*args)

        def traced(*inputs):  # a new function object: a new compile for a new guard
            return fn(*inputs)
        graph = state[key] = ms.jit(traced)
    return graph(*args)


GUARDED = ("eps", "num_groups", "act")


def run_graph(fn, *args):
    """`fn(*args)`: eagerly in PyNative, or through its ms.jit graph when jit is enabled.

    Tensors and tuples of Tensors (weights) are the graph's inputs; Python scalars, strings and
    None are compile-time constants (a new value compiles a new graph). A leading Python
    function (an activation) is bound into the graph, one graph per function: handed to ms.jit
    as an argument it recompiled the graph on every call (*measured*: 27.6 s per sdxl-base text
    encoding, one compile per layer)."""
    if not jit_enabled():
        return fn(*args)
    bound = args[0] if args and inspect.isfunction(args[0]) else None
    graph = _graphs.get((fn, bound))
    if graph is None:
        graph = _graphs[(fn, bound)] = ms.jit(fn if bound is None else _bind_first(fn, bound))
    return graph(*(_as_input(a) for a in (args[1:] if bound is not None else args)))


def _bind_first(fn, first):
    def bound(*rest):
        return fn(first, *rest)
    bound.__name__ = f"{fn.__name__}_{first.__name__}"  # MindSpore names (and warns) by it
    return bound


def _as_input(arg):
    """Mark a (nested) tuple of Tensors mutable: ms.jit otherwise folds it into the graph as
    constants (and compiles a new graph for every layer's weights)."""
    return ms.mutable(arg) if isinstance(arg, tuple) and arg and _all_tensors(arg) else arg


def _all_tensors(items) -> bool:
    return all(_all_tensors(a) if isinstance(a, tuple) else isinstance(a, ms.Tensor)
               for a in items)
