"""The case matrix of a sweep: its axes, its cases and their ids.

The matrix is the product of the list keys (`AXES`) less the `[[exclude]]` entries. Every case
is one `RunSpec` with one sampler, plus the policy, port, stages and truth it is checked with;
its id is a readable prefix and a hash of exactly that, so a rerun finds its finished cases and
two different cases never share a folder. `sweep_file` reads a file into these.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from sdxl_common.errors import InputError

from ..recording import DEFAULT_PROMPT, RunSpec

# list key in the file -> the case field it varies, and its default (`sdxl-parity run`'s)
AXES: Dict[str, Tuple[str, list]] = {
    "prompts": ("prompt", [DEFAULT_PROMPT]),
    "negative_prompts": ("negative_prompt", [""]),
    "seeds": ("seed", [0]),
    "samplers": ("sampler", ["euler", "euler_a"]),
    "schedules": ("schedule", ["leading"]),
    "steps": ("steps", [4]),
    "guidance": ("guidance", [5.0]),
    "dtypes": ("dtype", ["float32"]),
    "sizes": ("size", [None]),
}
FIELD_AXIS = {f: key for key, (f, _) in AXES.items()}
class SweepError(InputError):
    """A sweep file that cannot be run as written."""


@dataclass(frozen=True)
class Resources:
    """What one record or check task asks of a Ray cluster (`[resources.record]`)."""

    num_cpus: float = 1
    num_gpus: float = 0
    memory: Optional[int] = None  # bytes
    custom: Dict[str, float] = field(default_factory=dict)  # e.g. {"NPU": 1}

    def ray_options(self) -> Dict[str, Any]:
        options: Dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory:
            options["memory"] = self.memory
        if self.custom:
            options["resources"] = dict(self.custom)
        return options


@dataclass(frozen=True)
class Case:
    """One parity case: record the reference for `run`, then check the port against it."""

    run: RunSpec
    policy: str  # as the file names it (resolved for loading in `Sweep.policy_path`)
    port: str
    stages: Tuple[str, ...]
    truth: bool

    @property
    def sampler(self) -> str:
        return self.run.samplers[0]

    def spec(self) -> Dict[str, Any]:
        """The JSON form written to case.json and sweep.json, and hashed into the id."""
        return {**asdict(self.run), "samplers": list(self.run.samplers),
                "cond_original_size": list(self.run.cond_original_size),
                "cond_crop": list(self.run.cond_crop), "policy": self.policy,
                "port": self.port, "stages": list(self.stages), "truth": self.truth}

    @property
    def id(self) -> str:
        return case_id(self.spec())

    def field(self, name: str) -> Any:
        """The value of matrix field `name` (an `AXES` field) in this case."""
        if name == "sampler":
            return self.sampler
        if name == "size":
            return None if self.run.height is None else f"{self.run.height}x{self.run.width}"
        if name == "negative_prompt":
            return self.run.negative_prompt or ""
        return getattr(self.run, name)


def case_id(spec: Dict[str, Any]) -> str:
    """`<sampler>-<schedule>-seed<seed>-<12 hex of sha256(canonical JSON)>`: readable, and
    the same spec always gives the same id."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]
    prefix = f"{'+'.join(spec['samplers'])}-{spec['schedule']}-seed{spec['seed']}"
    return f"{re.sub(r'[^A-Za-z0-9_+.-]', '_', prefix)}-{digest}"


@dataclass
class Sweep:
    """A validated sweep: its cases in matrix order and what their tasks need."""

    source: str
    cases: List[Case]
    policy_path: str  # what load_policy takes, resolved against the file's folder
    port_path: str  # MODULE:FACTORY, a .py path resolved against the file's folder
    resources: Dict[str, Resources]
    excluded: int = 0

    def varying(self) -> List[str]:
        """The matrix fields whose value differs between cases (the report's row labels)."""
        return [f for f in FIELD_AXIS if len({repr(c.field(f)) for c in self.cases}) > 1]


def expand(axes: Dict[str, list], excludes: List[Dict[str, list]],
           make_case: Callable[[Dict[str, Any]], Case]) -> Tuple[List[Case], int]:
    """(the cases, how many the excludes dropped): `make_case` of every combination of the
    axes' values, in matrix order, that no exclude matches in all of its fields."""
    cases, excluded = [], 0
    for values in itertools.product(*axes.values()):
        fields = {AXES[key][0]: v for key, v in zip(axes, values)}
        if any(all(fields[f] in want for f, want in ex.items()) for ex in excludes):
            excluded += 1
            continue
        cases.append(make_case(fields))
    return cases, excluded
