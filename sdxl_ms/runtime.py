"""How the port executes: one settings object (graph mode, CPU kernel threads) and the runtime
set-up each backend needs.

`settings` starts from the environment (`SDXL_MS_JIT=off|blocks|model`, `SDXL_MS_THREADS=N`,
0 for MindSpore's own default), read by `init_runtime` before the first model runs; its setters
(`settings.set_jit("blocks")`, `settings.set_threads(2)`) override it from then on. A bad value
fails up front with one line naming the variable.

Convolutions always use MindSpore's native `Conv2D`: *measured* on MindSpore 2.10 CPU (2
cores), once ops launch synchronously it runs at 0.4-1.5x PyTorch's time at SDXL shapes, while
an im2col (unfold + MatMul) lowering cost 0.5-2.6x, more than native at nearly every shape, so
that second path was removed (docs/porting-notes.md, section 4).
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Optional, Union

import mindspore as ms

from sdxl_common.errors import InputError
from sdxl_common.threads import configured_threads

JIT_MODES = ("off", "blocks", "model")


class ExecutionSettings:
    """The port's execution switches in one place.

    `jit`: "off" (PyNative, the default), "blocks" or "model".
    "blocks": every block (ResBlock, spatial transformer, VAE resnet block, text-encoder layer)
    is a function of its inputs and weights, compiled by ms.jit once per input signature and
    shared by every layer with that signature (sdxl-base's six width-1280 spatial transformers
    share one graph); a few seconds of compiles, and no model-sized memory overhead.
    "model": each network's whole forward is one graph per model and input shape: the lowest
    per-call overhead (small shapes, e.g. the tiny preset: *measured* tiny UNet call 69 ms
    against ~260 ms in PyNative, after a 25 s compile), but long compiles at full size
    (*measured* ~90 s for the sdxl-base UNet) and ~1 GB more peak memory there.
    Both remove MindSpore's ~0.15 ms per-op PyNative dispatch; results equal PyNative's.
    `threads`: CPU kernel threads; None leaves MindSpore's own default. Applied by
    `init_runtime`, before the first op runs.
    """

    def __init__(self, jit: str = "off", threads: Optional[int] = None):
        self.jit = parse_jit(jit)
        self.threads = threads
        self._explicit = set()  # names a setter fixed: the environment no longer applies
        self._jit_from_env = False  # SDXL_MS_JIT chose the mode
        self.jit_reason = "default"  # why `jit` is what it is, for reports
        self.network_jit: Dict[str, str] = {}  # per network ("text", "unet", "vae"), if picked
        self._running: Optional[str] = None  # the mode of the network running now

    def read_env(self) -> None:
        """Take SDXL_MS_JIT and SDXL_MS_THREADS, except where a setter already decided."""
        if "jit" not in self._explicit:
            env = os.environ.get("SDXL_MS_JIT", "")
            try:
                self.jit = parse_jit(env)  # unset or empty: off
            except InputError as err:
                raise InputError(f"SDXL_MS_JIT: {err}") from None
            self._jit_from_env = bool(env.strip())
            if self._jit_from_env:
                self.jit_reason = "SDXL_MS_JIT"
        if "threads" not in self._explicit:
            self.threads = configured_threads()

    def set_jit(self, mode: Union[str, bool, None], reason: str = "set") -> None:
        """One mode for every network, from now on."""
        self.jit = parse_jit(mode)
        self.jit_reason = reason
        self.network_jit = {}
        self._explicit.add("jit")

    def jit_state(self) -> tuple:
        """What `restore_jit` puts back: a temporary mode change leaves the choice as it was."""
        return self.jit, self.jit_reason, "jit" in self._explicit, dict(self.network_jit)

    def restore_jit(self, state: tuple) -> None:
        self.jit, self.jit_reason, explicit, self.network_jit = state
        if not explicit:
            self._explicit.discard("jit")

    def pick_jit(self, mode: str, reason: str,
                 networks: Optional[Dict[str, str]] = None) -> None:
        """A mode chosen for one workload (the parity harness's measured choice): unlike
        `set_jit` it decides nothing for the next workload, which is picked afresh.
        `networks`: a mode per network where they differ (`mode` for any other)."""
        self.jit = parse_jit(mode)
        self.jit_reason = reason
        self.network_jit = {name: parse_jit(m) for name, m in (networks or {}).items()}

    def active_jit(self) -> str:
        """The mode in force: the running network's (`running`), else `jit`."""
        return self._running or self.jit

    @contextlib.contextmanager
    def running(self, network: str):
        """`network`'s mode in force while it runs: the pipeline's entry points (never inside
        a graph) wrap each network call in this. Nested, the outer network's mode stays."""
        if self._running is not None:
            yield
            return
        self._running = self.network_jit.get(network, self.jit)
        try:
            yield
        finally:
            self._running = None

    def jit_decided(self) -> bool:
        """Whether a setter or SDXL_MS_JIT chose the mode (a measured choice must not
        override either)."""
        return "jit" in self._explicit or self._jit_from_env

    def set_threads(self, threads: Optional[int]) -> None:
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or threads < 1):
            raise InputError(f"threads must be a whole number >= 1 or None, got {threads!r}")
        self.threads = threads
        self._explicit.add("threads")

    def summary(self) -> dict:
        """What reports record: device target, graph mode (per network where picked so),
        kernel threads."""
        cpu = is_cpu()
        out = {"device_target": ms.get_context("device_target"), "jit": self.jit,
               "jit_reason": self.jit_reason,
               "threads": self.threads if cpu else None,
               "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA") if cpu else None}
        if self.network_jit:
            out["jit_networks"] = dict(self.network_jit)
        return out


def parse_jit(mode) -> str:
    """"off", "blocks" or "model" from a name, a bool or the usual spellings (0/1, on/off)."""
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


def is_cpu() -> bool:
    return ms.get_context("device_target") == "CPU"


settings = ExecutionSettings()
_runtime_ready = False


ONEDNN_ISA_CAP = "AVX2"


def init_runtime() -> None:
    """On CPU: launch ops synchronously (*measured* on 2 cores, PyNative's asynchronous launch
    queue spins against the compute threads and makes small ops 10-60x slower), size the
    kernel thread pool (*measured*: left unset, the Python thread computes beside the pool's
    workers, 3 threads on 2 cores, ~1.7x the CPU time for the same MatMul), and cap oneDNN at
    AVX2 unless `ONEDNN_MAX_CPU_ISA` is set: on AVX-512 hosts MindSpore 2.10's oneDNN picks
    `jit_uni_ncsp:conv+ref:any` for NCHW float32 convolutions, a reference kernel (*measured*:
    4.2 s for one 256-channel 3x3 conv at 64x64, PyTorch 17 ms; `x64:gemm:jit` under the cap,
    32-44 ms; the tiny VAE decode 985 -> 53 ms, the tiny UNet 193 -> 116 ms). oneDNN reads the
    variable at its first primitive, so this runs before any op."""
    global _runtime_ready
    if _runtime_ready:
        return
    settings.read_env()  # a bad SDXL_MS_JIT / SDXL_MS_THREADS fails here, before any work
    threads = settings.threads
    if is_cpu():
        os.environ.setdefault("ONEDNN_MAX_CPU_ISA", ONEDNN_ISA_CAP)
        ms.runtime.launch_blocking()
        from mindspore.device_context.cpu.op_tuning import RuntimeConf

        if threads and not RuntimeConf.get_instance().is_op_threads_num_configured():
            ms.device_context.cpu.op_tuning.threads_num(threads)
    _runtime_ready = True


def jit_enabled() -> bool:
    """Whether blocks run as shared compiled graphs ("blocks" mode)."""
    # a graph that calls a network (a port's ms.jit) evaluates this while tracing: no context
    # manager on this path, only `active_jit`'s attribute reads
    return settings.active_jit() == "blocks"


def model_graphs_enabled() -> bool:
    """Whether each network runs as one compiled graph ("model" mode)."""
    return settings.active_jit() == "model"
