"""The reference's side of module-level work: every reference module that is compared on its own
(`module_kinds`), its inputs and output on the stage's recorded inputs, streamed to a file
(`module_capture`) with forward hooks, so that `locate` runs later, without torch, and for any
port: which port module is its counterpart is decided when a port is paired with the capture.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict

import numpy as np

from .module_capture import CaptureIndex, CaptureWriter
from .module_kinds import ATTENTION_PARTS, CORE_TENSORS
from .module_pairs import (ModulePair, captured_kinds, reference_containers, reference_inputs,
                           reference_module_table)
from .recording import Recording
from .stage_calls import network_inputs


def capture_reference(ref, rec: Recording, stage: str, sampler: str, step: int, path: Path,
                      log: Callable[[str], None] = lambda s: None,
                      truth: bool = False) -> CaptureIndex:
    """Run the reference's networks of `stage` on the recorded inputs (`network_inputs`) with a
    forward hook on every module of a known kind; each module's inputs (x, context, temb) and
    output go to `path` as it returns, the first call only (CLIP-L's layers run once per
    encode).

    `truth`: each module's float64 twin (`float64_twin`) also runs on exactly the arguments the
    reference module got, upcast, so every module has its own truth ("truth"): in reduced
    precision a module's own error is judged against the reference module's own error, as
    stages are.

    An attention whose q, k, v and output projections are children (`ATTENTION_PARTS`) also
    keeps its core: the projections' outputs ("q", "k", "v") and the out projection's input
    ("core"), and with `truth` the float64 core on those q, k, v ("core_truth"), so the core
    between the projections can be judged on its own (`parity.locate`)."""
    import torch

    from .reference import to_numpy

    modules = reference_module_table(ref, stage)
    kinds = captured_kinds(modules)
    index = CaptureIndex(stage=stage, sampler=sampler, step=step,
                         containers=reference_containers(modules))
    writer = CaptureWriter(path, index)
    handles = []
    cores = CoreTaps(modules, kinds)

    def hook_for(name: str):
        fired = []
        entry = ModulePair("", name, kinds[name], "")

        def hook(module, args, kwargs, output):
            if fired:
                return
            fired.append(True)
            got = reference_inputs(args, kwargs, output)
            core = cores.take(name)
            got.update(core)
            if truth:
                twin = float64_twin(module)
                exact = twin(*_float64(args), **_float64(kwargs))
                got["truth"] = reference_inputs(args, kwargs, exact)["out"]
                if core:
                    got["core_truth"] = core_truth(twin, cores.parts[name], core, args, kwargs)
            writer.add(entry, {k: to_numpy(v) for k, v in got.items()})
        return hook

    try:
        handles += cores.attach()
        for name in kinds:
            handles.append(modules[name].register_forward_hook(hook_for(name), with_kwargs=True))
        log(f"reference: capturing {len(kinds)} modules of stage {stage}")
        inputs = network_inputs(rec, stage, sampler, step)
        with torch.no_grad():
            if stage == "conditioner":
                for key, encoder in (("input_ids", ref.pipe.text_encoder),
                                     ("input_ids_2", ref.pipe.text_encoder_2)):
                    encoder(torch.from_numpy(np.asarray(inputs[key], np.int64)).to(ref.device),
                            output_hidden_states=True)
            elif stage == "unet":
                ref.unet(**inputs)
            else:
                ref.decode(inputs["latents"])
    finally:
        for h in handles:
            h.remove()
        writer.close()
    return index


class CoreTaps:
    """The attention cores of the captured modules (`module_kinds.ATTENTION_PARTS`): hooks on
    each attention's q, k, v projections keep their outputs and one on its output projection
    keeps its input, the core's output, until the attention's own hook takes them."""

    def __init__(self, modules: Dict[str, object], kinds: Dict[str, str]):
        self.modules = modules
        self.parts = {name: ATTENTION_PARTS[kind] for name, kind in kinds.items()
                      if kind in ATTENTION_PARTS
                      and all(f"{name}.{child}" in modules for child in ATTENTION_PARTS[kind])}
        self._held: Dict[str, Dict[str, object]] = {}

    def attach(self) -> list:
        handles = []
        for name, children in self.parts.items():
            for role, child in zip(CORE_TENSORS, children):
                module = self.modules[f"{name}.{child}"]
                if role == "core":
                    handles.append(module.register_forward_pre_hook(self._keep_input(name)))
                else:
                    handles.append(module.register_forward_hook(self._keep_output(name, role)))
        return handles

    def _keep_output(self, name: str, role: str):
        def hook(module, args, output):
            self._held.setdefault(name, {})[role] = output
        return hook

    def _keep_input(self, name: str):
        def hook(module, args):
            self._held.setdefault(name, {})["core"] = args[0]
        return hook

    def take(self, name: str) -> Dict[str, object]:
        """q, k, v and core of the attention `name`'s call that just returned ({} for none)."""
        held = self._held.pop(name, {})
        return held if all(role in held for role in CORE_TENSORS) else {}


def core_truth(twin, children, core: Dict[str, object], args, kwargs):
    """The float64 core on exactly the reference's own q, k and v: the attention's float64
    `twin` run with its projections' outputs replaced by them (upcast; a float16 run's values
    are exact in float64), its output projection's input taken as it starts."""
    import torch

    got = {}
    handles = []
    for role, child in zip(CORE_TENSORS, children):
        module = twin.get_submodule(child)
        if role == "core":
            handles.append(module.register_forward_pre_hook(
                lambda m, a: got.setdefault("core", a[0])))
        else:
            forced = core[role].to(torch.float64)
            handles.append(module.register_forward_hook(lambda m, a, o, forced=forced: forced))
    try:
        twin(*_float64(args), **_float64(kwargs))
    finally:
        for h in handles:
            h.remove()
    return got["core"]


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


def float64_twin(module):
    """A float64 copy of a reference module, without its hooks: the module's truth on exactly
    its own weights (a float16 module's weights upcast are the rounded weights the truth of a
    float16 run computes on, `reference_run.round_weights`). Made from the module itself, one
    at a time, so no float64 copy of the whole pipeline (28 GB at sdxl-base) is ever resident."""
    import copy
    from collections import OrderedDict

    import torch

    # torch's own `to`: diffusers' override warns about keep-in-float32 modules on every copy
    twin = torch.nn.Module.to(copy.deepcopy(module), torch.float64)
    for sub in twin.modules():
        for attr in _HOOK_DICTS:
            if hasattr(sub, attr):
                setattr(sub, attr, OrderedDict())
    return twin


def _float64(value):
    """A hook's arguments for the float64 twin: float tensors upcast, the rest unchanged."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(torch.float64) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_float64(v) for v in value)
    if isinstance(value, dict):
        return {k: _float64(v) for k, v in value.items()}
    return value


def capture_to(ref, rec: Recording, stage: str, sampler: str, step: int, work_dir: Path,
               log: Callable[[str], None] = lambda s: None, truth: bool = False) -> tuple:
    """(index, path): `capture_reference` into `work_dir/modules-<stage>.npz`."""
    path = Path(work_dir) / f"modules-{stage}.npz"
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    return capture_reference(ref, rec, stage, sampler, step, path, log=log, truth=truth), path
