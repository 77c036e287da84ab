"""A sweep file: which parity cases to run, read strictly and validated before any model work.

Each list key is one axis of the case matrix (`matrix.AXES`); every value is checked with the
rule `parity.run_settings` holds for that setting, and anything wrong in the file is one
`SweepError` line naming the file, the key and the problem.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from sdxl_common.errors import InputError

from .. import run_settings
from ..recording import RunSpec
from .matrix import AXES, FIELD_AXIS, Case, Resources, Sweep, SweepError, expand

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11: the same parser, published as tomli
    import tomli as tomllib

EXAMPLE = "example"  # the packaged parity/sweeps/example.toml: `sdxl-parity sweep` with no file

SCALARS = ("preset", "checkpoint", "checkpoint_seed", "prompt_file", "policy", "port", "truth")
TABLES = ("stages", "exclude", "resources")
KNOWN_KEYS = tuple(AXES) + SCALARS + TABLES
RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory", "resources")
STEPS = ("record", "check")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20,
          "gib": 2**30}


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
    run_settings.check_size(v[0], v[1])
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


def _axis_checks() -> Dict[str, Tuple[str, Any]]:
    """list key -> (what its values are, the check of one value): the TOML type here, the
    rule from `run_settings`."""
    rules = run_settings
    return {"prompts": ("strings", lambda v: rules.check_prompt(_text(v))),
            "negative_prompts": ("strings", _text),
            "seeds": ("integers", lambda v: rules.check_seed(_int(v))),
            "samplers": ("sampler names", lambda v: rules.check_comparable_sampler(_text(v)).name),
            "schedules": ("schedule names", lambda v: rules.check_comparable_schedule(_text(v))),
            "steps": ("integers", lambda v: rules.check_steps(_int(v))),
            "guidance": ("numbers", lambda v: rules.check_guidance(_number(v))),
            "dtypes": ("dtype names", lambda v: rules.check_dtype(_text(v))),
            "sizes": ('sizes ("HxW" or [height, width])', _size)}


def parse_sweep(data: Dict[str, Any], source: str, base: Path) -> Sweep:
    """Validate the parsed TOML `data` of the file `source` (relative paths in it are taken
    from its folder `base`) and expand it into cases."""
    r = _Reader(source)
    for key in data:
        if key not in KNOWN_KEYS:
            raise r.error(key, f"unknown key{_hint(key, KNOWN_KEYS)}; known keys: "
                               f"{', '.join(KNOWN_KEYS)}")
    preset = r.scalar(data, "preset", (str,), "a preset name", "tiny")
    _check(r, "preset", run_settings.check_preset, preset)
    checkpoint = r.scalar(data, "checkpoint", (str,), "a path")
    if checkpoint is not None:
        checkpoint = str(_relative(base, checkpoint))
        _check(r, "checkpoint", run_settings.check_checkpoint, checkpoint)
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
    for key, (kind, check) in _axis_checks().items():
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
    cases, excluded = expand(axes, excludes, lambda fields: _case(
        r, fields, preset, checkpoint, checkpoint_seed, policy, port, stages, truth))
    if not cases:
        every = "the only case" if excluded == 1 else f"all {excluded} cases"
        raise r.error("exclude", f"excludes {every} of the matrix; nothing to run")
    return Sweep(source=source, cases=cases, policy_path=policy_path, port_path=port_path,
                 resources=resources, excluded=excluded)


def _check(r: _Reader, key: str, rule, value) -> None:
    try:
        rule(value)
    except InputError as e:
        raise r.error(key, str(e)) from None


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
