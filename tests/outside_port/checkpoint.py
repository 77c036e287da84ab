"""Loading a MindSpore `.ckpt` of SDXL (sgm names) into this port, loudly.

The port's parameter names are sgm's with MindSpore's spellings: stock `nn.LayerNorm` and
`nn.GroupNorm` hold `gamma`/`beta`, `nn.Embedding` holds `embedding_table`, where the
checkpoint (`sdxl-parity make-checkpoint --format mindspore`) writes PyTorch's `weight`/`bias`.
`checkpoint_name` is the whole mapping; a checkpoint already in MindSpore spellings (mindone's
conversion writes those) loads as it is. Missing or unexpected names and shape mismatches
raise before anything is loaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

# the port's (MindSpore) leaf name -> the checkpoint's (PyTorch) leaf name
MS_TO_TORCH = {"gamma": "weight", "beta": "bias", "embedding_table": "weight"}


def checkpoint_name(param_name: str) -> str:
    """`...layer_norm1.gamma` -> `...layer_norm1.weight`, `...token_embedding.embedding_table`
    -> `...token_embedding.weight`; every other name is the same on both sides."""
    head, _, leaf = param_name.rpartition(".")
    return f"{head}.{MS_TO_TORCH[leaf]}" if leaf in MS_TO_TORCH else param_name


class CheckpointMismatch(ValueError):
    pass


def _summary(names, limit: int = 5) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_into(net: nn.Cell, path) -> Dict[str, str]:
    """Load `path` into `net` (float32). Returns {port name: checkpoint name}."""
    path = Path(path)
    if path.suffix != ".ckpt" or not path.is_file():
        raise CheckpointMismatch(
            f"{path}: this port reads MindSpore .ckpt files only; make one with `sdxl-parity "
            "make-checkpoint --preset tiny --seed 0 --format mindspore --out tiny.ckpt` and "
            "pass it with --checkpoint")
    raw = ms.load_checkpoint(str(path))
    params = dict(net.parameters_and_names())
    wanted = {name: checkpoint_name(name) for name in params}
    mapping, renamed = {}, {}
    for name, ck in wanted.items():
        key = name if name in raw else ck  # MindSpore spelling in the file, else PyTorch's
        if key in raw:
            mapping[name] = key
            renamed[name] = raw[key]
    missing = [wanted[n] for n in params if n not in mapping]
    unexpected = set(raw) - set(mapping.values())
    if missing or unexpected:
        raise CheckpointMismatch(
            f"{path} does not fit this port: {len(missing)} missing"
            f"{' (' + _summary(missing) + ')' if missing else ''}, {len(unexpected)} unexpected"
            f"{' (' + _summary(unexpected) + ')' if unexpected else ''}")
    bad = [f"{mapping[n]} {tuple(renamed[n].shape)} vs {tuple(p.shape)}"
           for n, p in params.items() if tuple(renamed[n].shape) != tuple(p.shape)]
    if bad:
        raise CheckpointMismatch(f"{path}: shapes differ from this port's (tiny preset): "
                                 f"{_summary(bad)}")
    for name, value in renamed.items():
        if value.dtype != ms.float32:
            renamed[name] = ms.Parameter(Tensor(value.asnumpy().astype(np.float32)), name=name)
    not_loaded, unused = ms.load_param_into_net(net, renamed, strict_load=True)
    if not_loaded or unused:
        raise CheckpointMismatch(f"load_param_into_net left {_summary(not_loaded)} unloaded and "
                                 f"{_summary(unused)} unused")
    return mapping
