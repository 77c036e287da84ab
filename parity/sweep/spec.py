"""A sweep file: which parity cases to run, read strictly and expanded into the case matrix.

The matrix is the product of the list keys (`AXES`) less the `[[exclude]]` entries. Every case
is one `RunSpec` with one sampler, plus the policy, port, stages and truth it is checked with;
its id is a readable prefix and a hash of exactly that, so a rerun finds its finished cases and
two different cases never share a folder. Anything wrong in the file is one `InputError` line
naming the file, the key and the problem, raised before any model work.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from sdxl_common.errors import InputError

from ..recording import DEFAULT_PROMPT, RunSpec

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11: the same parser, published as tomli
    import tomli as tomllib

EXAMPLE = "example"  # the packaged parity/sweeps/example.toml: `sdxl-parity sweep` with no file

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
SCALARS = ("preset", "checkpoint", "checkpoint_seed", "prompt_file", "policy", "port", "truth")
TABLES = ("stages", "exclude", "resources")
KNOWN_KEYS = tuple(AXES) + SCALARS + TABLES
RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory", "resources")
STEPS = ("record", "check")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20,
          "gib": 2**30}


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


def example_path() -> Path:
    import importlib.resources

    return Path(str(importlib.resources.files("parity").joinpath(f"sweeps/{EXAMPLE}.toml")))


def load_sweep(path: Optional[os.PathLike] = None) -> Sweep:
    """Read and validate a sweep file (None: the packaged example)."""
    path = Path(path) if path is not None else example_path()
    if not path.is_file():
        raise SweepError(f"sweep file not found: {path}" if not path.exists()
                         else f"sweep file {path} is not a file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SweepError(f"sweep file {path}: invalid TOML: {e}") from None
    return parse_sweep(data, str(path), path.resolve().parent)


class _Reader:
    """Typed access to the parsed TOML, every problem raised as one line naming the key."""

    def __init__(self, source: str):
        self.source = source

    def error(self, key: str, problem: str) -> SweepError:
        return SweepError(f"sweep file {self.source}: {key}: {problem}")

    def items(self, data: Dict, key: str, kind: str, check) -> Optional[list]:
        if key not in data:
            return None
        value = data[key]
        if not isinstance(value, list):
            raise self.error(key, f"want a list of {kind}, got {_type(value)} "
                                  f"(write {key} = [{_toml(value)}])")
        if not value:
            raise self.error(key, "empty list: name at least one value, or leave the key out")
        out = []
        for item in value:
            try:
                item = check(item)
            except (TypeError, ValueError, InputError) as e:
                raise self.error(key, f"{_toml(item)}: {_why(e, kind)}") from None
            if item in out:
                raise self.error(key, f"{_toml(item)} is listed twice")
            out.append(item)
        return out

    def scalar(self, data: Dict, key: str, types, kind: str, default=None):
        if key not in data:
            return default
        value = data[key]
        if isinstance(value, bool) != (bool in types) or not isinstance(value, types):
            raise self.error(key, f"want {kind}, got {_type(value)}")
        return value


def _hint(key: str, known: Sequence[str]) -> str:
    """` (did you mean 'samplers'?)` for a near miss, else ""."""
    import difflib

    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


def _toml(value) -> str:
    """`value` as it would be written in the file."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (str, list, dict)):
        return json.dumps(value)
    return str(value)


def _show(name: str, value) -> str:
    """A case field's value as the file writes it (a size as "HxW")."""
    if name == "size":
        return "the preset's default size" if value is None else f'"{value[0]}x{value[1]}"'
    return _toml(value)


def _why(e: Exception, kind: str) -> str:
    return str(e) if isinstance(e, InputError) or str(e) else f"want {kind}"


def _int(v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError
    return v


def _number(v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError
    return float(v)


def _text(v) -> str:
    if not isinstance(v, str):
        raise TypeError
    return v


def _size(v) -> Tuple[int, int]:
    """[h, w] or "HxW"."""
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", v)
        if not m:
            raise ValueError('want "HxW" (e.g. "64x64") or [height, width]')
        v = [int(m.group(1)), int(m.group(2))]
    if (not isinstance(v, list) or len(v) != 2
            or any(isinstance(x, bool) or not isinstance(x, int) for x in v)):
        raise ValueError('want "HxW" (e.g. "64x64") or [height, width]')
    from sdxl_ms.pipeline import check_generation_args

    check_generation_args(v[0], v[1], 1, "np")
    return (v[0], v[1])


def _memory(v) -> int:
    if isinstance(v, bool):
        raise TypeError
    if isinstance(v, (int, float)) and v > 0:
        return int(v)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(v))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError('want bytes, or a size such as "4GiB"')
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _axis_checks(r: _Reader) -> Dict[str, Tuple[str, Any]]:
    from sdxl_ms.pipeline import DTYPES, check_guidance

    from ..schedulers import diffusers_scheduler_spec

    def seed(v):
        if _int(v) < 0:
            raise ValueError("a seed must be >= 0")
        return v

    def steps(v):
        if _int(v) < 1:
            raise ValueError("steps must be >= 1")
        return v

    def guidance(v):
        check_guidance(_number(v))
        if v <= 1:
            raise ValueError("guidance must be > 1 for a parity case: at <= 1 diffusers skips "
                             "the unconditional pass the stages compare")
        return float(v)

    def prompt(v):
        if not _text(v).strip():
            raise ValueError("an empty prompt (an empty negative prompt goes in "
                             "negative_prompts)")
        return v

    def sampler(v):
        diffusers_scheduler_spec(_text(v), "leading")  # known, with a diffusers scheduler
        return v

    def schedule(v):
        diffusers_scheduler_spec("euler", _text(v))  # known, with a diffusers config
        return v

    def dtype(v):
        if _text(v) not in DTYPES:
            raise ValueError(f"unknown dtype; choose from {', '.join(sorted(DTYPES))}")
        return v

    return {"prompts": ("strings", prompt), "negative_prompts": ("strings", _text),
            "seeds": ("integers", seed), "samplers": ("sampler names", sampler),
            "schedules": ("schedule names", schedule), "steps": ("integers", steps),
            "guidance": ("numbers", guidance), "dtypes": ("dtype names", dtype),
            "sizes": ('sizes ("HxW" or [height, width])', _size)}


def parse_sweep(data: Dict[str, Any], source: str, base: Path) -> Sweep:
    """Validate the parsed TOML `data` of the file `source` (relative paths in it are taken
    from its folder `base`) and expand it into cases."""
    from sdxl_ms.config import PRESETS

    r = _Reader(source)
    for key in data:
        if key not in KNOWN_KEYS:
            raise r.error(key, f"unknown key{_hint(key, KNOWN_KEYS)}; known keys: "
                               f"{', '.join(KNOWN_KEYS)}")
    preset = r.scalar(data, "preset", (str,), "a preset name", "tiny")
    if preset not in PRESETS:
        raise r.error("preset", f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    checkpoint = r.scalar(data, "checkpoint", (str,), "a path")
    if checkpoint is not None:
        checkpoint = str(_relative(base, checkpoint))
        if not Path(checkpoint).exists():
            raise r.error("checkpoint", f"not found: {checkpoint}")
        from sdxl_ms.weights.loader import preset_name_of

        found = preset_name_of(checkpoint)  # the layout it holds, as `run --checkpoint` reads it
        if found is not None and "preset" in data and found != preset:
            raise r.error("preset", f"{preset!r}, but checkpoint {checkpoint} holds the "
                                    f"{found!r} layout: leave out preset")
        preset = found or preset
    checkpoint_seed = r.scalar(data, "checkpoint_seed", (int,), "an integer", 0)
    if checkpoint is not None and "checkpoint_seed" in data:
        raise r.error("checkpoint_seed", "applies to the seeded checkpoint of a preset, not to "
                                         "a checkpoint file")
    axes: Dict[str, list] = {}
    for key, (kind, check) in _axis_checks(r).items():
        values = r.items(data, key, kind, check)
        axes[key] = values if values is not None else list(AXES[key][1])
    if "prompt_file" in data:
        if "prompts" in data:
            raise r.error("prompt_file", "give prompts or prompt_file, not both")
        axes["prompts"] = _prompt_file(r, base, r.scalar(data, "prompt_file", (str,), "a path"))
    policy, policy_path = _policy(r, data, base)
    port, port_path = _port(r, data, base)
    stages = _stages(r, data)
    truth = r.scalar(data, "truth", (bool,), "true or false")
    resources = _resources(r, data.get("resources", {}))
    for dtype in axes["dtypes"]:
        _dtype_usable(r, dtype, stages, policy_path)
    excludes = _excludes(r, data.get("exclude", []), axes)
    cases, excluded = [], 0
    for values in itertools.product(*axes.values()):
        fields = {AXES[key][0]: v for key, v in zip(axes, values)}
        if any(all(_matches(fields[f], want) for f, want in ex.items()) for ex in excludes):
            excluded += 1
            continue
        cases.append(_case(r, fields, preset, checkpoint, checkpoint_seed, policy, port,
                           stages, truth))
    if not cases:
        every = "the only case" if excluded == 1 else f"all {excluded} cases"
        raise r.error("exclude", f"excludes {every} of the matrix; nothing to run")
    return Sweep(source=source, cases=cases, policy_path=policy_path, port_path=port_path,
                 resources=resources, excluded=excluded)


def _relative(base: Path, path: str) -> Path:
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else base / p


def _prompt_file(r: _Reader, base: Path, path: str) -> List[str]:
    from sdxl_common.validate import read_prompt_file

    try:
        prompts = read_prompt_file(_relative(base, path))
    except InputError as e:
        raise r.error("prompt_file", str(e)) from None
    if not prompts:
        raise r.error("prompt_file", f"{path} holds no prompt")
    return list(dict.fromkeys(prompts))


def _policy(r: _Reader, data: Dict, base: Path) -> Tuple[str, str]:
    from ..policy import load_policy

    policy = r.scalar(data, "policy", (str,), "a policy name or path", "default")
    named = not policy.endswith(".toml") and "/" not in policy and os.sep not in policy
    path = policy if named else str(_relative(base, policy))
    try:
        load_policy(path)
    except InputError as e:
        raise r.error("policy", str(e)) from None
    return policy, path


def _port(r: _Reader, data: Dict, base: Path) -> Tuple[str, str]:
    from ..ports import BUILTIN, PortSpec

    port = r.scalar(data, "port", (str,), '"MODULE:FACTORY"', BUILTIN)
    try:
        spec = PortSpec.parse(port)
        if spec.module.endswith(".py"):
            spec = PortSpec(str(_relative(base, spec.module)), spec.factory)
        spec.resolve()  # importable, the factory found: before any work
    except InputError as e:
        raise r.error("port", str(e).replace("--port ", "")) from None
    return port, str(spec)


def _stages(r: _Reader, data: Dict) -> Tuple[str, ...]:
    from ..stages import STAGES

    chosen = r.items(data, "stages", "stage names", _text)
    if chosen is None:
        return tuple(STAGES)
    bad = [s for s in chosen if s not in STAGES]
    if bad:
        raise r.error("stages", f"unknown stage(s) {', '.join(bad)}; choose from "
                                f"{', '.join(STAGES)}")
    return tuple(s for s in STAGES if s in chosen)


def _dtype_usable(r: _Reader, dtype: str, stages: Sequence[str], policy_path: str) -> None:
    """The port can compute `dtype` here and the policy has bounds for it."""
    from ..policy import load_policy
    from ..ports import refuse_unsupported_dtype

    try:
        refuse_unsupported_dtype(dtype)
        load_policy(policy_path).check_covers(stages, dtype)
    except InputError as e:
        raise r.error("dtypes", str(e)) from None


def _resources(r: _Reader, table) -> Dict[str, Resources]:
    if not isinstance(table, dict):
        raise r.error("resources", f"want a table ([resources.record], [resources.check]), "
                                   f"got {_type(table)}")
    out = {}
    for step in table:
        if step not in STEPS:
            raise r.error(f"resources.{step}", f"unknown table; known: {', '.join(STEPS)}")
    for step in STEPS:
        entry = table.get(step, {})
        key = f"resources.{step}"
        if not isinstance(entry, dict):
            raise r.error(key, f"want a table, got {_type(entry)}")
        for k in entry:
            if k not in RESOURCE_KEYS:
                raise r.error(f"{key}.{k}", f"unknown key; known: {', '.join(RESOURCE_KEYS)}")
        values: Dict[str, Any] = {}
        for k in ("num_cpus", "num_gpus"):
            if k in entry:
                v = entry[k]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                    raise r.error(f"{key}.{k}", f"want a number >= 0, got {_toml(v)}")
                values[k] = v
        if "memory" in entry:
            try:
                values["memory"] = _memory(entry["memory"])
            except (TypeError, ValueError) as e:
                raise r.error(f"{key}.memory", str(e) or "want bytes, or a size such as "
                                                         '"4GiB"') from None
        custom = entry.get("resources", {})
        if not isinstance(custom, dict) or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0
                for v in custom.values()):
            raise r.error(f"{key}.resources", "want a table of resource name = amount "
                                              "(e.g. {NPU = 1})")
        out[step] = Resources(**values, custom={str(k): float(v) for k, v in custom.items()})
    return out


def _excludes(r: _Reader, entries, axes: Dict[str, list]) -> List[Dict[str, Any]]:
    """Each `[[exclude]]` table as {field: wanted value or list of values}; every key a
    matrix field and every value one of that axis's."""
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise r.error("exclude", "want a list of tables ([[exclude]] entries or "
                                 "exclude = [{sampler = \"euler_a\"}])")
    out = []
    for i, entry in enumerate(entries):
        key = f"exclude[{i}]"
        if not entry:
            raise r.error(key, "an empty exclude would drop every case")
        parsed = {}
        for name, want in entry.items():
            if name not in FIELD_AXIS:
                raise r.error(f"{key}.{name}", f"unknown key{_hint(name, FIELD_AXIS)}; an "
                                               f"exclude names case fields: "
                                               f"{', '.join(FIELD_AXIS)}")
            axis = FIELD_AXIS[name]
            # a list is "any of these" (for size: a list of sizes, not one [height, width])
            several = isinstance(want, list) and (name != "size" or all(
                isinstance(w, (str, list)) for w in want))
            wants = want if several else [want]
            if not wants:
                raise r.error(f"{key}.{name}", "an empty list matches nothing")
            values = []
            for w in wants:
                if name == "size":
                    try:
                        w = _size(w)
                    except (TypeError, ValueError, InputError) as e:
                        raise r.error(f"{key}.{name}", str(e)) from None
                if isinstance(w, int) and not isinstance(w, bool) and name == "guidance":
                    w = float(w)
                if w not in axes[axis]:
                    raise r.error(f"{key}.{name}", f"{_show(name, w)} is not in {axis}: the "
                                                   "exclude would match nothing")
                values.append(w)
            parsed[name] = values
        out.append(parsed)
    return out


def _matches(value, wanted: list) -> bool:
    return value in wanted


def _case(r: _Reader, fields: Dict[str, Any], preset: str, checkpoint: Optional[str],
          checkpoint_seed: int, policy: str, port: str, stages: Tuple[str, ...],
          truth: Optional[bool]) -> Case:
    size = fields["size"]
    run = RunSpec(preset=preset, checkpoint=checkpoint, checkpoint_seed=checkpoint_seed,
                  prompt=fields["prompt"], negative_prompt=fields["negative_prompt"] or None,
                  seed=fields["seed"], samplers=(fields["sampler"],),
                  schedule=fields["schedule"], steps=fields["steps"],
                  guidance=fields["guidance"], height=size and size[0],
                  width=size and size[1], dtype=fields["dtype"])
    try:
        run.validate()
    except InputError as e:
        where = ", ".join(f"{k} {_show(k, v)}" for k, v in fields.items()
                          if k in ("sampler", "schedule"))
        raise r.error("samplers/schedules", f"the case ({where}) cannot be compared: {e} "
                                            "(drop it with an [[exclude]] entry)") from None
    return Case(run=run, policy=policy, port=port, stages=stages,
                truth=truth if truth is not None else fields["dtype"] != "float32")
