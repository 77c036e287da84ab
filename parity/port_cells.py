"""Any port's modules as the harness runs them: the MindSpore Cells that the contract's `cells()`
names per stage, observed in the stage's free run with MindSpore's own forward hooks
(`register_forward_pre_hook` / `register_forward_hook`) and run one at a time on the
reference's recorded inputs. Nothing here knows a port's classes: a port whose modules are not
stock Cells (the built-in port's module system) offers the same hook methods on them.

The free run goes through the stage contract itself (`encode_prompt`, `unet`, `decode` on the
recorded inputs of `stage_calls`), so what is observed is what `check` ran.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import numpy as np

from sdxl_common.errors import InputError

from .module_pairs import LOCATABLE_STAGES
from .recording import Recording
from .stage_calls import DecodeCall, UNetCall, ids_encode, prompt_then_negative

Roots = List[Tuple[str, object]]  # (sgm path, cell) per network of a stage


def _roots_of(port) -> Dict[str, Roots]:
    """`port.cells()` checked: {stage: [(sgm path, cell), ...]} for the localisable stages."""
    found = port.cells()
    if not isinstance(found, dict):
        raise InputError(f"{type(port).__name__}.cells() must return a dict of stage -> "
                         f"[(sgm path, cell), ...], got {type(found).__name__}")
    out: Dict[str, Roots] = {}
    for stage, roots in found.items():
        if stage not in LOCATABLE_STAGES:
            raise InputError(f"{type(port).__name__}.cells(): unknown stage {stage!r} "
                             f"(expected {', '.join(LOCATABLE_STAGES)})")
        checked = []
        for item in roots:
            if not (isinstance(item, (tuple, list)) and len(item) == 2
                    and isinstance(item[0], str) and hasattr(item[1], "cells_and_names")):
                raise InputError(f"{type(port).__name__}.cells()[{stage!r}]: each entry must be "
                                 f"(sgm path, cell), got {item!r:.80}")
            checked.append((item[0].rstrip("."), item[1]))
        out[stage] = checked
    return out


class PortCells:
    """A port's Cells per stage, its free runs, and its modules one at a time."""

    def __init__(self, port):
        self.port = port
        self._roots = _roots_of(port)

    def roots(self, stage: str) -> Roots:
        return self._roots.get(stage, [])

    def module(self, path: str):
        """The cell at a full sgm path ("model.diffusion_model.input_blocks.1.0")."""
        from .module_pairs import cell_at

        for stage_roots in self._roots.values():
            for prefix, root in stage_roots:
                if path == prefix:
                    return root
                if path.startswith(prefix + "."):
                    return cell_at(root, path[len(prefix) + 1:])
        raise KeyError(f"no port module at {path!r}")

    def parameters(self, stage: str) -> Iterator[Tuple[str, object]]:
        """(full sgm name, parameter) of the stage's networks."""
        for prefix, root in self.roots(stage):
            for name, param in root.parameters_and_names():
                yield f"{prefix}.{name}", param

    @contextlib.contextmanager
    def eager(self) -> Iterator[None]:
        """MindSpore's PyNative mode (a port set to GRAPH_MODE is switched for as long as this
        lasts: hooks fire only outside compiled graphs), and the port's own `eager()` where it
        offers one (a port that compiles parts of itself with ms.jit says how to stop)."""
        import mindspore as ms

        mode = ms.get_context("mode")
        if mode != ms.PYNATIVE_MODE:
            ms.set_context(mode=ms.PYNATIVE_MODE)
        own = getattr(self.port, "eager", None)
        try:
            with (own() if callable(own) else contextlib.nullcontext()):
                yield
        finally:
            if mode != ms.PYNATIVE_MODE:
                ms.set_context(mode=mode)

    @contextlib.contextmanager
    def observe(self, modules: Sequence[object],
                on_input: Callable[[int, tuple, dict], None],
                on_output: Callable[[int, object], None]) -> Iterator[None]:
        """Within it (eagerly), the first call of `modules[i]` hands its arguments to
        `on_input(i, args, kwargs)` as it starts and its output to `on_output(i, out)` as it
        returns; nothing is kept (a full-size UNet has hundreds of modules)."""
        handles = []
        started, done = set(), set()

        def pre(i):
            def hook(cell, args, kwargs):
                if i not in started:
                    started.add(i)
                    on_input(i, tuple(args), dict(kwargs or {}))
            return hook

        def post(i):
            def hook(cell, args, kwargs, output):
                if i not in done:
                    done.add(i)
                    on_output(i, output)
            return hook

        with self.eager():
            try:
                for i, module in enumerate(modules):
                    handles.append(module.register_forward_pre_hook(pre(i), with_kwargs=True))
                    handles.append(module.register_forward_hook(post(i), with_kwargs=True))
                yield
            finally:
                for handle in handles:
                    handle.remove()

    @staticmethod
    def call(module, args: tuple, kwargs: dict):
        """One module's own computation."""
        return module(*args, **kwargs)

    def run_stage(self, stage: str, rec: Recording, sampler: str, step: int) -> Dict[str, np.ndarray]:
        """The stage's networks run through the contract on the recorded inputs the module
        capture ran the reference on; their outputs, named as `stage_calls.network_outputs`
        names the reference's."""
        if stage == "conditioner":
            got = ids_encode(rec.spec, (rec.meta["height"], rec.meta["width"])).run(self.port)
            return {key: prompt_then_negative(got.__getitem__, key)
                    for key in ("prompt_embeds", "pooled_prompt_embeds")}
        if stage == "unet":
            return {"eps": np.asarray(UNetCall(sampler, step).run(self.port, rec), np.float32)}
        return {"decoded": np.asarray(DecodeCall(sampler).run(self.port, rec), np.float32)}


def has_cells(port) -> bool:
    """Whether `port` declares its modules (the contract's optional `cells()`)."""
    return callable(getattr(port, "cells", None))


# ---- one port module on the reference's inputs ---------------------------------------------------

INPUT_SOURCES = ("x", "context", "temb")  # what a reference module's capture holds as inputs


def is_tensor(value) -> bool:
    return hasattr(value, "asnumpy") or isinstance(value, np.ndarray)


def to_numpy(value) -> np.ndarray:
    """A port tensor as numpy (floats as float32, ids as they are)."""
    if isinstance(value, (tuple, list)):
        value = next(v for v in value if is_tensor(v))
    if hasattr(value, "asnumpy"):
        a = value.asnumpy()
    else:
        a = np.asarray(value)
    return a.astype(np.float32) if a.dtype.kind == "f" else a


def as_argument(value: np.ndarray, template: Tuple[bool, object]):
    """A recorded value as the port passed that argument: a MindSpore Tensor or numpy array,
    of its dtype (recorded float32 holds a float16 run's values exactly; ids are whole)."""
    is_ms, dtype = template
    if not is_ms:
        return np.ascontiguousarray(value.astype(dtype))
    from mindspore import Tensor

    return Tensor(np.ascontiguousarray(value)).astype(dtype)


class CallPlan:
    """How the port called one module in its free run, to call it again on the reference's
    recorded inputs: each tensor argument that matched a recorded input (`module_layouts.match`)
    is replaced by it, laid out and typed as the port passed it; everything else (the port's
    own objects, integers, tensors that match nothing, such as masks) is passed as it was.
    `x_error`/`x_layout`/`x_port`: the argument that matched the reference's main input, how
    far it was from it, and its value (for the caller to read at once and drop)."""

    def __init__(self, args: tuple, kwargs: dict, recorded: Dict[str, np.ndarray],
                 kind: str = "", reversed_batch: bool = False):
        from .module_layouts import FAR, match

        self.args, self.kwargs = list(args), dict(kwargs)
        self.layouts: Dict[object, object] = {}  # position or keyword -> Layout
        self.templates: Dict[object, Tuple[bool, object]] = {}
        self.x_error = self.x_layout = self.x_port = None
        self.reversed_batch = reversed_batch
        sources = [s for s in INPUT_SOURCES if s in recorded]
        for key, value in list(enumerate(self.args)) + list(self.kwargs.items()):
            if not is_tensor(value):
                continue
            got = to_numpy(value)
            found = match(recorded, got, sources, kind, reversed_batch)
            if found is None:  # matches no recorded input: passed as the port passed it
                _place(self.args, self.kwargs, key,
                       value.copy() if hasattr(value, "copy") else value)
                continue
            layout, distance = found
            self.layouts[key] = layout
            self.templates[key] = (hasattr(value, "asnumpy"), value.dtype)
            _place(self.args, self.kwargs, key, None)
            if layout.source == "x" and self.x_layout is None:
                self.x_layout, self.x_error, self.x_port = layout, distance, got
            if layout.reversed and distance <= FAR:  # seen clearly: the port's batch order
                self.reversed_batch = True

    def call_args(self, recorded: Dict[str, np.ndarray]) -> Tuple[tuple, dict]:
        """The module's arguments with the reference's recorded inputs in place."""
        args, kwargs = list(self.args), dict(self.kwargs)
        for key, layout in self.layouts.items():
            _place(args, kwargs, key, as_argument(layout.to_port(recorded[layout.source]),
                                                   self.templates[key]))
        return tuple(args), kwargs


def _place(args: list, kwargs: dict, key, value) -> None:
    """Set a positional (int key) or keyword argument."""
    if isinstance(key, int):
        args[key] = value
    else:
        kwargs[key] = value


def plain_call(module, recorded: Dict[str, np.ndarray], kind: str) -> Tuple[tuple, dict]:
    """Arguments for a module the free run never called: the reference's recorded inputs as
    the reference laid them out (x, then context and temb where recorded), in the dtype of the
    module's weights; token ids as int32."""
    import mindspore as ms

    from .module_kinds import TOKEN_ID_KINDS

    weight = next(iter(module.get_parameters()), None)
    dtype = ms.float32 if weight is None else weight.dtype
    return tuple(as_argument(recorded[name], (True, ms.int32 if name == "x" and kind in
                                               TOKEN_ID_KINDS else dtype))
                 for name in INPUT_SOURCES if name in recorded), {}
