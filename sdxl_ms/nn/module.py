"""`Module`: a Cell whose forward takes its weights by name, so one compiled graph can serve
every layer of the same structure.

Every network module writes its math as `forward(self, p, *inputs)`, where `p` holds its own
weights by name (`p["weight"]`), and calls its sub-modules with that same `p`:
`x = self.attn1(p, self.norm1(p, x)) + x`. A sub-module looks itself up as `p[self.key]`, its
name in its parent (`"norm1"`; `"transformer_blocks.0"` for a list entry; `"in_layers.0"` for
a layer of a `Sequential`, which has no weights of its own). In PyNative `p` is the module
itself (`module["norm1"]` is its attribute), so the code reads like sgm's and runs on the
Parameters directly.

In the "blocks" graph mode (`runtime.settings.set_jit("blocks")`) the modules marked
`graph_unit` (ResBlock, SpatialTransformer, text layers, VAE blocks) run through one ms.jit
graph per structure: the graph traces the first such module's `forward` with its weights as an input
(plain Tensors, `weight_inputs`), so every layer with the same structure and
shapes reuses it (*measured*: Parameters as ms.jit inputs key a fresh ~1 s compile per layer).
A structure is the module tree's classes, their `forward`s and the constants the graph bakes in
(every plain attribute: widths, norm epsilons and groups, activation functions, head counts),
so a patched layer (a mutant test) compiles its own graph instead of being silently ignored. List entries and a
Sequential's layers sit in the parent's dict as `"name.i"`, which keeps the tree shallow
(ms.jit took at most 6 levels of nested dict input, *measured*: 7 raised).

Calls skip nn.Cell's per-call machinery in PyNative (*measured* several times the cost of a
plain function call on CPU); graph mode parses `construct`, which does the same lookup.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import mindspore as ms
from mindspore import Tensor, nn

from ..runtime import init_runtime, jit_enabled, model_graphs_enabled

_unit_graphs: Dict[Tuple, Any] = {}
# id(module) -> ([pre-hooks], [forward hooks]), each (hook_fn, with_kwargs): the observer slot
_OBSERVERS: Dict[int, Tuple[List, List]] = {}


class ObserverHandle:
    """What `register_forward_(pre_)hook` returns: `remove()` takes the hook off."""

    def __init__(self, module, which: int, entry):
        self._key, self._which, self._entry = id(module), which, entry

    def remove(self) -> None:
        hooks = _OBSERVERS.get(self._key)
        if hooks is None or self._entry not in hooks[self._which]:
            return
        hooks[self._which].remove(self._entry)
        if not any(hooks):
            del _OBSERVERS[self._key]
        Module.observing = bool(_OBSERVERS)


def observed(module) -> bool:
    """Whether `module` has hooks (the slot's one check)."""
    return bool(_OBSERVERS) and id(module) in _OBSERVERS


def _observe(module, which: int, hook_fn, with_kwargs: bool, prepend: bool) -> ObserverHandle:
    entry = (hook_fn, with_kwargs)
    hooks = _OBSERVERS.setdefault(id(module), ([], []))[which]
    hooks.insert(0, entry) if prepend else hooks.append(entry)
    Module.observing = True
    return ObserverHandle(module, which, entry)


def _observed_call(module, p, inputs):
    """A hooked module's call: its pre-hooks, its own forward (eagerly: observing is a PyNative
    matter), its forward hooks."""
    pre, post = _OBSERVERS[id(module)]
    args = (p,) + tuple(inputs)
    for hook, with_kwargs in list(pre):
        hook(module, args, {}) if with_kwargs else hook(module, args)
    return _forward_hooks(module, post, args, module.forward(p[module.key], *inputs))


def _forward_hooks(module, post, args, out):
    """`out` through the forward hooks: a hook that returns a value replaces the output, as a
    MindSpore Cell's forward hook does (the harness teacher-forces a projection this way)."""
    for hook, with_kwargs in list(post):
        got = hook(module, args, {}, out) if with_kwargs else hook(module, args, out)
        if got is not None:
            out = got
    return out
_changes = [0]  # bumped by every attribute set on a Module: cached signatures are then stale
_CELL_ATTRIBUTES = frozenset(nn.Cell().__dict__) | {"key"}  # MindSpore's own, and the name


class Module(nn.Cell):
    """Base of every network module: `forward(self, p, *inputs)` with `p` its own weights."""

    key = ""  # the name under which the parent holds this module (set when it is assigned)
    graph_unit = False  # one shared graph per structure in "blocks" mode
    # True while any module has a hook: code that graph mode compiles (the Linear's layout
    # entry points) tests this class constant, which the compiler folds away when False
    observing = False

    def __setattr__(self, name, value):
        if isinstance(value, (Module, nn.CellList)):
            _set_key(value, name)
        _changes[0] += 1
        super().__setattr__(name, value)

    def __getitem__(self, key):
        """`module["norm1"]`, `module["transformer_blocks.0"]`, `module[0]` (a Sequential's
        layer): what a parent's `p[...]` finds in PyNative."""
        obj = self
        for part in str(key).split("."):
            obj = obj._cells[part] if part.isdigit() else getattr(obj, part)
        return obj

    def __call__(self, p, *inputs):
        if isinstance(p, Tensor):  # called alone, as a stock Cell is: on its own weights
            return self.forward(self, p, *inputs)
        if _OBSERVERS and id(self) in _OBSERVERS:
            return _observed_call(self, p, inputs)
        if self.graph_unit and jit_enabled():
            return run_unit(self, *inputs)
        return self.forward(p[self.key], *inputs)

    # MindSpore's forward hooks fire in `Cell.__call__`, which a Module skips: the same two
    # methods, served by the observer slot above (one dict check per call while none is set)

    def register_forward_pre_hook(self, hook_fn, *, prepend: bool = False,
                                  with_kwargs: bool = False) -> "ObserverHandle":
        """`hook_fn(module, args[, kwargs])` before the module runs; `args` are its call's
        (the parent's weights `p`, then the inputs)."""
        return _observe(self, 0, hook_fn, with_kwargs, prepend)

    def register_forward_hook(self, hook_fn, *, prepend: bool = False,
                              with_kwargs: bool = False,
                              always_call: bool = False) -> "ObserverHandle":
        """`hook_fn(module, args[, kwargs], output)` after the module returns."""
        return _observe(self, 1, hook_fn, with_kwargs, prepend)

    def notify_input(self, p, *inputs) -> None:
        """For an entry point beside `__call__` (`Linear.transposed_out`, ...): its pre-hooks
        see the plain call's arguments it stands for."""
        if observed(self):
            for hook, with_kwargs in _OBSERVERS[id(self)][0]:
                hook(self, (p,) + inputs, {}) if with_kwargs else hook(self, (p,) + inputs)

    def notify_output(self, p, inputs: tuple, out):
        """For an entry point beside `__call__`: its forward hooks see `out` (in the plain
        call's layout) and may replace it; the output to go on with."""
        if not observed(self):
            return out
        return _forward_hooks(self, _OBSERVERS[id(self)][1], (p,) + tuple(inputs), out)

    def construct(self, p, *inputs):
        return self.forward(p[self.key], *inputs)

    def optional(self, p, name: str):
        """`p[name]`, or None where this module has no such weight (a bias-free Linear)."""
        return None if getattr(self, name) is None else p[name]


class Network(Module):
    """A network's entry point (UNet, VAE, text encoders): called with its inputs alone, its
    weights are its own (`forward` starts from `p = self`). Building one sets the runtime up
    (`init_runtime`) before any of its ops can run: *measured*, a tiny VAE decoded before the
    set-up left every later PyNative op ~13x slower for the rest of the process (a tiny parity
    check 2.6 s -> 34 s), as the launch queue and thread pool were already running."""

    dtype = ms.float32  # its weights' dtype, which it casts its inputs to (`precision.cast`)

    def __init__(self, *args, **kwargs):
        init_runtime()
        super().__init__(*args, **kwargs)

    def __call__(self, *inputs):
        return self.construct(*inputs)


class Sequential(Module):
    """sgm's `nn.Sequential` (names `in_layers.0.weight`, ...): runs its layers in order. It
    holds no weights of its own, so it hands its parent's `p` on, and its layers are keyed in
    it as `"in_layers.0"`."""

    def __init__(self, layers: Sequence[Module]):
        super().__init__()
        self.layer_names = tuple(str(i) for i in range(len(layers)))
        for name, layer in zip(self.layer_names, layers):
            setattr(self, name, layer)

    def __call__(self, p, *inputs):
        return self.forward(p, *inputs)

    def construct(self, p, *inputs):
        return self.forward(p, *inputs)

    def __getitem__(self, index):
        """The layer at `index` (sgm's `to_out[0]`)."""
        return self._cells[str(index)]

    def forward(self, p, x):
        for name in self.layer_names:
            x = getattr(self, name)(p, x)
        return x


def submodule(model, path: str):
    """The module at a dotted sgm path ("input_blocks.4.1"): numbered parts index a list."""
    obj = model
    for part in path.split("."):
        obj = obj._cells[part] if part.isdigit() else getattr(obj, part)
    return obj


def _set_key(module, key: str) -> None:
    """`module` is held as `key` by its parent; a list's entries and a Sequential's layers
    are keyed through it (`"input_blocks.1.0"`)."""
    if isinstance(module, Module):
        object.__setattr__(module, "key", key)
    if isinstance(module, (Sequential, nn.CellList)):
        for name, child in module._cells.items():
            _set_key(child, f"{key}.{name}")


def run_unit(module, *inputs):
    """`module.forward(weights, *inputs)` through the graph shared by its structure.

    The weights enter the graph as one flat tuple and the graph rebuilds the named dict `p`
    from the layout (constant keys) it was traced with: *measured* (tiny UNet, CPU) a nested
    dict as the graph input costs ~0.2 ms more per unit call in MindSpore's argument handling,
    19% of a graph-blocks UNet step."""
    key = signature(module)
    layout, flat = weight_inputs(module)
    mine = module.__dict__.get("_sdxl_unit_graph")
    if mine is not None and mine[0] is key and mine[1] is layout:  # unchanged: no hashing
        return mine[2](flat, *inputs)
    graph = _unit_graphs.get((key, layout))
    if graph is None:
        template = module

        def traced(weights, *args):
            return template.forward(_named(weights, layout), *args)
        traced.__name__ = f"{type(module).__name__}_graph"  # MindSpore names graphs by it
        graph = _unit_graphs[(key, layout)] = ms.jit(traced)
    object.__setattr__(module, "_sdxl_unit_graph", (key, layout, graph))
    return graph(flat, *inputs)


def _named(weights, layout):
    """The nested dict `p` of a unit, from its flat weights and layout (traced in the graph:
    the keys are constants, the loop unrolls)."""
    p = {}
    for i in range(0, len(layout), 2):
        name, entry = layout[i], layout[i + 1]
        if isinstance(entry, tuple):
            p[name] = _named(weights, entry)
        else:
            p[name] = weights[entry]
    return p


def run_model(module, fn, *args):
    """`fn(*args)` (a network's `forward`): compiled as one graph per network, structure
    (`signature`) and input signature in "model" mode, else called directly.

    The signature keys the graph cache so that a patched layer compiles a new graph; it stays
    on the Python side: handing it to the graph as an argument made ms.jit recompile on every
    call (*measured*: 31 s per tiny UNet call)."""
    if not model_graphs_enabled():
        return fn(*args)
    graphs = module.__dict__.setdefault("_sdxl_model_graphs", {})
    key = (fn.__name__, signature(module))
    graph = graphs.get(key)
    if graph is None:
        # One PyNative call first: *measured* (tiny UNet, CPU) a graph compiled before the
        # model ever ran eagerly runs 6x slower on every call (290 ms against 44 ms).
        fn(*args)

        def traced(*inputs):  # a new function object: a new compile for a new signature
            return fn(*inputs)
        graph = graphs[key] = ms.jit(traced)
    return graph(*args)


def signature(module) -> Tuple:
    """What a graph traced from `module` bakes in: per sub-module its class, `forward` and
    plain attributes (widths, epsilons, activations, ...), the unit's own name excluded.

    Cached until an attribute of any Module is set or a class's `forward` is replaced (what
    patches and mutant tests do), so a call does not walk every sub-module's attributes."""
    cells = _cells(module)
    classes = module.__dict__.get("_sdxl_classes")
    if classes is None:
        classes = tuple({type(cell): None for _, cell in cells})
        object.__setattr__(module, "_sdxl_classes", classes)
    forwards = tuple(getattr(cls, "forward", None) for cls in classes)
    cached = module.__dict__.get("_sdxl_signature")
    if cached is not None and cached[0] == _changes[0] and cached[1] == forwards:
        return cached[2]
    value = tuple((name, type(cell), getattr(type(cell), "forward", None), _constants(cell))
                  for name, cell in cells)
    object.__setattr__(module, "_sdxl_signature", (_changes[0], forwards, value))
    return value


def _cells(module) -> Tuple:
    """(name, cell) of the module's tree, itself first: fixed once the module is built."""
    cells = module.__dict__.get("_sdxl_cells")
    if cells is None:
        cells = tuple(module.cells_and_names())
        object.__setattr__(module, "_sdxl_cells", cells)
    return cells


def _constants(cell) -> Tuple:
    return tuple((k, v if _hashable(v) else id(v)) for k, v in cell.__dict__.items()
                 if k not in _CELL_ATTRIBUTES and not k.startswith("_"))


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def weight_inputs(module) -> Tuple[Tuple, Any]:
    """(layout, weights): the module's weights as a flat tuple of plain Tensors, marked
    `ms.mutable` (a graph input, not constants), and the layout that names them, nested as the
    modules are, names and entries alternating so that a level of modules is one level of
    tuples (ms.jit allows 6): `("norm1", ("weight", 0, "bias", 1), ...)`, a list entry or a
    Sequential's layer as `"name.i"`. Cached on the module until a Parameter's storage
    changes (`set_data` replaces it); the layout object stays the same across refreshes, so the graph cache hits."""
    params = module.__dict__.get("_sdxl_params")
    if params is None:
        params = tuple(p for _, p in module.parameters_and_names())
        object.__setattr__(module, "_sdxl_params", params)
    key = tuple(p.data_ptr() for p in params)
    cached = module.__dict__.get("_sdxl_weight_inputs")
    if cached is None or cached[0] != key:
        flat: list = []
        layout = _layout(module, flat)
        if cached is not None and cached[1] == layout:
            layout = cached[1]
        cached = (key, layout, ms.mutable(tuple(flat)))
        object.__setattr__(module, "_sdxl_weight_inputs", cached)
    return cached[1], cached[2]


def _layout(cell, flat: list) -> Tuple:
    out = []
    for name, p in cell._params.items():
        if p is not None:
            out += (name, len(flat))
            flat.append(Tensor(p))
    for name, child in cell._cells.items():
        _add_child(out, name, child, flat)
    return tuple(out)


def _add_child(out: list, key: str, child, flat: list) -> None:
    if isinstance(child, (Sequential, nn.CellList)):  # keyed through: "in_layers.0"
        for name, grandchild in child._cells.items():
            _add_child(out, f"{key}.{name}", grandchild, flat)
    elif child is not None:
        out += (key, _layout(child, flat))
