"""Per-module tensors of the reference, streamed to one file as they are produced.

A capture is a zip of `.npy` members (numpy's `.npz` format), written member by member while
the reference runs, so a full-size UNet's hundreds of module inputs and outputs never sit in
memory together; reading it back loads one module at a time (`np.load` of an `.npz` is lazy).
Members are named `<index>/<tensor>`: the index is the module's place in execution order
(when its forward returned), tensors are `x`, `context`, `temb` (inputs) and `out`. A tensor
equal to one already written is stored once (a block's input is its first layer's input, one
layer's output the next one's input, the text context every cross-attention's): the index
names the member that holds it.
"""
from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import numpy as np

from .module_pairs import ModulePair


@dataclass
class CaptureIndex:
    """What a capture holds: the reference modules in execution order (as `ModulePair`s whose
    port side is filled in when a port is paired with them) and, per module, its tensors."""

    stage: str
    pairs: List[ModulePair] = field(default_factory=list)
    members: List[Dict[str, str]] = field(default_factory=list)  # per pair: tensor -> zip member
    sampler: str = ""
    step: int = 0
    containers: List[str] = field(default_factory=list)  # the reference's plain containers

    def to_dict(self) -> Dict:
        return {"stage": self.stage, "sampler": self.sampler, "step": self.step,
                "containers": self.containers,
                "modules": [{**p.to_dict(), "tensors": m} for p, m in zip(self.pairs, self.members)]}

    @classmethod
    def from_dict(cls, d: Dict) -> "CaptureIndex":
        return cls(stage=d["stage"], sampler=d.get("sampler", ""), step=int(d.get("step", 0)),
                   pairs=[ModulePair.from_dict(m) for m in d["modules"]],
                   members=[m.get("tensors", {}) for m in d["modules"]],
                   containers=list(d["containers"]) if "containers" in d
                   else _containers_above(d["modules"]))

    def kinds(self) -> Dict[str, str]:
        """Captured reference module -> kind, in capture order."""
        return {p.reference: p.kind for p in self.pairs}


def _containers_above(modules: List[Dict]) -> List[str]:
    """For a capture recorded before containers were stored: the names above captured modules
    that are not captured themselves (ModuleLists, Sequentials, blocks of no kind)."""
    captured = {m["reference"] for m in modules}
    out = set()
    for name in captured:
        parent = name.rpartition(".")[0]
        while parent and "/" in parent and parent not in captured:
            out.add(parent)
            parent = parent.rpartition(".")[0]
    return sorted(out)


class CaptureWriter:
    """Appends one module's tensors at a time; `close` finishes the zip."""

    def __init__(self, path: Path, index: CaptureIndex):
        self.path, self.index = Path(path), index
        self._zip = zipfile.ZipFile(self.path, "w", compression=zipfile.ZIP_STORED,
                                    allowZip64=True)
        self._written: Dict[str, str] = {}  # content digest -> member

    def add(self, pair: ModulePair, tensors: Dict[str, np.ndarray]) -> None:
        i = len(self.index.pairs)
        members = {}
        for name, array in tensors.items():
            array = np.ascontiguousarray(array)
            digest = hashlib.sha256(str((array.dtype, array.shape)).encode()
                                    + array.tobytes()).hexdigest()
            member = self._written.get(digest)
            if member is None:
                member = self._written[digest] = f"{i}/{name}"
                with self._zip.open(member + ".npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, array, allow_pickle=False)
            members[name] = member
        self.index.pairs.append(pair)
        self.index.members.append(members)

    def close(self) -> None:
        self._zip.close()


class CaptureReader:
    """One module's recorded tensors at a time."""

    def __init__(self, path: Path, index: CaptureIndex):
        self.path, self.index = Path(path), index
        self._npz = np.load(self.path, allow_pickle=False)

    def __len__(self) -> int:
        return len(self.index.pairs)

    def tensors(self, i: int) -> Dict[str, np.ndarray]:
        return {name: self._npz[member] for name, member in self.index.members[i].items()}

    def tensor(self, i: int, name: str) -> np.ndarray:
        return self._npz[self.index.members[i][name]]

    def close(self) -> None:
        self._npz.close()
