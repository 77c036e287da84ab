"""Parity policy: per-stage, per-dtype warn/fail bounds on metrics, loaded from a versioned TOML.

File format (`schema_version = 1`, see `parity/policies/default.toml`)::

    schema_version = 1
    name = "default"
    description = "..."            # optional

    [stage.unet.float32]           # stage in parity.results.STAGES, dtype float32/float16/bfloat16
    rtol = 1e-3                    # optional: closeness test behind mismatch_ratio
    atol = 1e-4                    #   (default: torch.testing's rtol/atol for the dtype)
    rel_l2 = { warn = 1e-6, fail = 1e-5 }   # upper bound: metric name
    cosine_min = { warn = 0.999, fail = 0.99 }  # lower bound: metric name + "_min"
    max_abs = 1e-3                 # a bare number is a fail bound (warn = fail)

    [stage.tokens.float32]
    exact = true                   # bitwise equality: mismatches = { warn = 0, fail = 0 }

Metric names are those of `parity.metrics.METRIC_DIRECTIONS`. A value beyond `fail` fails,
beyond `warn` warns; a value equal to a bound passes it. `warn` must be at least as strict as
`fail`. Besides the file's bounds, every judgement fails on NaN/Inf in either tensor and on a
NaN metric. A bound applies to the metrics objects that define that metric; judging metrics to
which no bound of the stage applies is an error, so nothing passes by having no gate.
"""
from __future__ import annotations

import importlib.resources
import math
import os
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Tuple, Union

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11: the same parser, published as tomli
    import tomli as tomllib

from sdxl_common.dtypes import DTYPES
from sdxl_common.errors import InputError

from parity.metrics import METRIC_DIRECTIONS, TensorMetrics, format_bound, format_value
from parity.results import STAGES, StageResult, TensorResult, Verdict

__all__ = ["DTYPES", "TORCH_TOLERANCES", "Bound", "Judgement", "Policy", "PolicyError",
           "StagePolicy", "Verdict", "load_policy"]

SCHEMA_VERSION = 1
# bounds a truth_ratio bound replaces when the recording holds the float64 truth
TRUTH_REPLACES: Tuple[str, ...] = ("rel_l2", "mismatch_ratio")
# torch.testing.assert_close defaults (rtol, atol).
TORCH_TOLERANCES: Dict[str, Tuple[float, float]] = {
    "float32": (1.3e-6, 1e-5), "float16": (1e-3, 1e-5), "bfloat16": (1.6e-2, 1e-5)}


class PolicyError(InputError):
    """A malformed policy file, or a judgement the policy cannot make."""


class Judgement(NamedTuple):
    """Verdict plus the violated bounds, fail bounds first ("rel_l2 3.20e-05 > fail 1e-05")."""

    verdict: Verdict
    reasons: List[str]


@dataclass(frozen=True)
class Bound:
    """warn/fail bounds on one metric; `direction` "max" (upper bound) or "min" (lower)."""

    metric: str
    direction: str
    warn: float
    fail: float

    @property
    def key(self) -> str:
        """The name used in the TOML file."""
        return self.metric if self.direction == "max" else f"{self.metric}_min"

    def check(self, value: float) -> Tuple[Verdict, Optional[str]]:
        value = float(value)
        if math.isnan(value):
            return Verdict.FAIL, f"{self.metric} is nan"
        op, beyond = (">", lambda b: value > b) if self.direction == "max" else (
            "<", lambda b: value < b)
        for verdict, level, b in ((Verdict.FAIL, "fail", self.fail),
                                  (Verdict.WARN, "warn", self.warn)):
            if beyond(b):
                return verdict, (f"{self.metric} {format_value(value)} {op} {level} "
                                 f"{format_bound(b)}")
        return Verdict.PASS, None


@dataclass(frozen=True)
class StagePolicy:
    bounds: Tuple[Bound, ...]
    rtol: float
    atol: float
    truth_floor: float = 0.0  # the smallest reference error a truth_ratio divides by
    # [stage.<s>.<dtype>.device.<name>]: the same table with these keys replaced, for a port on
    # that device (cpu, cuda, ascend) or for a golden from another device than the port's (cross)
    devices: Dict[str, "StagePolicy"] = field(default_factory=dict)


@dataclass
class Policy:
    """A loaded policy; `judge` is the only place verdicts come from."""

    name: str
    stages: Dict[str, Dict[str, StagePolicy]]
    description: str = ""
    source: str = ""
    schema_version: int = SCHEMA_VERSION
    modules: Dict[str, Dict[str, float]] = None  # dtype -> module kind (or "default") -> own rel_l2 bound
    # dtype -> module kind (or "default") -> truth_ratio bound, and "truth_floor"
    module_truths: Dict[str, Dict[str, float]] = None
    context: Tuple[str, ...] = ()  # device keys in effect (`for_devices`), later ones win

    def for_devices(self, port: str, reference: str) -> "Policy":
        """This policy for a port on device `port` checked against a golden recorded on
        `reference`: their device tables apply, and the `cross` table when they differ."""
        context = (port,) + (("cross",) if port != reference else ())
        return dataclasses.replace(self, context=context)

    def module_bound(self, kind: str, dtype: str) -> float:
        """The own-error bound (rel L2) of one module of `kind` (a port class name) at `dtype`,
        for `sdxl-parity locate`: `[module.<dtype>]` in the policy file."""
        table = (self.modules or {}).get(dtype)
        if not table:
            raise PolicyError(f"policy '{self.name}' has no [module.{dtype}] bounds, which "
                              "locate needs")
        if kind in table:
            return table[kind]
        if "default" not in table:
            raise PolicyError(f"policy '{self.name}': [module.{dtype}] has no bound for {kind!r} "
                              "and no 'default'")
        return table["default"]

    def module_truth_bound(self, kind: str, dtype: str) -> Optional[Tuple[float, float]]:
        """(truth_ratio bound, truth_floor) of one module of `kind` at `dtype`, from
        `[module_truth.<dtype>]`; None where the policy has no such table (the module is then
        judged by its own rel L2 alone, and only by `locate`)."""
        table = (self.module_truths or {}).get(dtype)
        if not table:
            return None
        bound = table.get(kind, table.get("default"))
        if bound is None:
            raise PolicyError(f"policy '{self.name}': [module_truth.{dtype}] has no bound for "
                              f"{kind!r} and no 'default'")
        return bound, table.get("truth_floor", 0.0)

    def judge_module(self, kind: str, dtype: str, *, own: Optional[float] = None,
                     truth_ratio: Optional[float] = None, raised: str = "") -> Judgement:
        """Verdict of one module of `kind` run on the reference's recorded inputs: it raised
        (broken there, whatever its numbers), else its truth ratio where `[module_truth.<dtype>]`
        bounds it and the module has a truth, else its own rel L2 against `[module.<dtype>]`."""
        if raised:
            return Judgement(Verdict.FAIL, [f"raised {raised}"])
        truth = self.module_truth_bound(kind, dtype)
        if truth is not None and truth_ratio is not None:
            bound = Bound("truth_ratio", "max", truth[0], truth[0])
            value = truth_ratio
        elif own is not None:
            bound = Bound("rel_l2", "max", *(2 * [self.module_bound(kind, dtype)]))
            value = own
        else:
            return Judgement(Verdict.PASS, [])  # nothing measured: no verdict to give
        verdict, reason = bound.check(value)
        return Judgement(verdict, [f"{reason} ({kind})"] if reason else [])

    def _get(self, stage: str, dtype: str) -> StagePolicy:
        if stage not in self.stages:
            raise PolicyError(f"policy '{self.name}' has no bounds for stage {stage!r} "
                              f"(it covers: {', '.join(self.stages) or 'nothing'})")
        if dtype not in self.stages[stage]:
            raise PolicyError(f"policy '{self.name}' has no bounds for stage {stage!r} with "
                              f"dtype {dtype!r} (it covers: {', '.join(self.stages[stage])})")
        base = sp = self.stages[stage][dtype]
        for device in self.context:  # the last table that exists wins (cross over a device)
            sp = base.devices.get(device, sp)
        return sp

    def check_covers(self, stages: Iterable[str], dtype: str) -> None:
        """Bounds exist for every stage to run at `dtype` (the conditioner judges its zeroed
        negatives with the tokens bounds); a `PolicyError` before any work otherwise."""
        stages = set(stages)
        if "conditioner" in stages:
            stages.add("tokens")
        for stage in STAGES:
            if stage in stages:
                self._get(stage, dtype)

    def tolerances(self, stage: str, dtype: str) -> Dict[str, float]:
        """`{"rtol": ..., "atol": ...}` to pass to `parity.metrics.compare` for this stage."""
        sp = self._get(stage, dtype)
        return {"rtol": sp.rtol, "atol": sp.atol}

    def truth_floor(self, stage: str, dtype: str) -> float:
        """The absolute floor under the reference's own error in `truth_ratio`."""
        return self._get(stage, dtype).truth_floor

    def limits(self, stage: str, dtype: str) -> Dict[str, Dict[str, float]]:
        """Bounds as `{toml_key: {"warn": w, "fail": f}}` (stored in StageResult for plots)."""
        return {b.key: {"warn": b.warn, "fail": b.fail} for b in self._get(stage, dtype).bounds}

    def judge(self, stage: str, dtype: str, metrics: Any) -> Judgement:
        """Verdict of one comparison (any metrics object of `parity.metrics`)."""
        sp = self._get(stage, dtype)
        values = metrics.values()
        fails: List[str] = []
        warns: List[str] = []
        for side in ("port", "ref"):
            n = getattr(metrics, f"nonfinite_{side}", 0)
            if n:
                fails.append(f"{side} has {n} non-finite values (NaN/Inf)")
        applied = [b for b in sp.bounds if b.metric in values]
        if "truth_ratio" in values and any(b.metric == "truth_ratio" for b in applied):
            # measured against the float64 truth, "no worse than the reference itself"
            # replaces the port-vs-reference error bounds (both sides round; which is nearer
            # to the truth is what separates a bug from precision)
            applied = [b for b in applied if b.metric not in TRUTH_REPLACES]
        if not applied:
            raise PolicyError(
                f"policy '{self.name}' stage {stage!r} ({dtype}) has no bound on any metric of "
                f"{type(metrics).__name__} ({', '.join(values)})")
        if isinstance(metrics, TensorMetrics) and any(b.metric == "mismatch_ratio"
                                                      for b in applied):
            if not (math.isclose(metrics.rtol, sp.rtol, rel_tol=1e-9)
                    and math.isclose(metrics.atol, sp.atol, rel_tol=1e-9)):
                raise PolicyError(
                    f"metrics computed with rtol={metrics.rtol:g}, atol={metrics.atol:g} but "
                    f"policy '{self.name}' bounds mismatch_ratio of stage {stage!r} ({dtype}) "
                    f"with rtol={sp.rtol:g}, atol={sp.atol:g}; use policy.tolerances()")
        for b in applied:
            verdict, reason = b.check(values[b.metric])
            if verdict == Verdict.FAIL:
                fails.append(reason)
            elif verdict == Verdict.WARN:
                warns.append(reason)
        verdict = Verdict.FAIL if fails else (Verdict.WARN if warns else Verdict.PASS)
        return Judgement(verdict, fails + warns)

    def tensor_result(self, stage: str, dtype: str, name: str, metrics: Any,
                      step: Optional[int] = None) -> TensorResult:
        """Judge `metrics` and wrap them as a `TensorResult`."""
        verdict, reasons = self.judge(stage, dtype, metrics)
        return TensorResult(name=name, step=step, metrics=metrics, verdict=verdict,
                            reasons=reasons)

    def stage_result(self, stage: str, dtype: str, tensors: Iterable[TensorResult],
                     **kwargs) -> StageResult:
        """`StageResult.build` with this policy's bounds recorded as the stage's limits."""
        kwargs.setdefault("limits", self.limits(stage, dtype))
        return StageResult.build(stage, tensors, **kwargs)


# --------------------------------------------------------------------------------------------
# Loading

_TOP_KEYS = {"schema_version", "name", "description", "stage", "module", "module_truth"}


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PolicyError(f"{where}: expected a number, got {value!r}")
    value = float(value)
    if math.isnan(value):
        raise PolicyError(f"{where}: bound is nan")
    return value


def _parse_bound(key: str, value: Any, where: str) -> Bound:
    if key.endswith("_min") and key[:-4] in METRIC_DIRECTIONS:
        metric, direction = key[:-4], "min"
        if METRIC_DIRECTIONS[metric] != "min":
            raise PolicyError(f"{where}: {metric!r} is an upper-bound metric; write {metric!r}, "
                              f"not {key!r}")
    elif key in METRIC_DIRECTIONS:
        metric, direction = key, "max"
        if METRIC_DIRECTIONS[metric] != "max":
            raise PolicyError(f"{where}: {metric!r} is a lower-bound metric; write "
                              f"'{metric}_min', not {key!r}")
    else:
        known = sorted(m if d == "max" else f"{m}_min" for m, d in METRIC_DIRECTIONS.items())
        raise PolicyError(f"{where}: unknown metric {key!r} (known: {', '.join(known)}, "
                          f"rtol, atol, exact)")
    if isinstance(value, dict):
        extra = set(value) - {"warn", "fail"}
        if extra or "fail" not in value:
            raise PolicyError(f"{where}: bound must be {{ warn = ..., fail = ... }} "
                              f"('warn' optional), got keys {sorted(value)}")
        fail = _number(value["fail"], f"{where}.fail")
        warn = _number(value.get("warn", fail), f"{where}.warn")
    else:
        fail = warn = _number(value, where)
    if (direction == "max" and warn > fail) or (direction == "min" and warn < fail):
        raise PolicyError(f"{where}: warn {format_bound(warn)} is looser than fail "
                          f"{format_bound(fail)}")
    return Bound(metric=metric, direction=direction, warn=warn, fail=fail)


DEVICES = ("cpu", "cuda", "ascend", "cross")


def _parse_stage_dtype(table: Any, dtype: str, where: str) -> StagePolicy:
    if not isinstance(table, dict):
        raise PolicyError(f"{where}: expected a table")
    overrides = table.get("device", {})
    if not isinstance(overrides, dict):
        raise PolicyError(f"{where}.device: expected [..device.<name>] tables")
    table = {k: v for k, v in table.items() if k != "device"}
    devices = {}
    for name, override in overrides.items():
        if name not in DEVICES:
            raise PolicyError(f"{where}.device: unknown device {name!r} (known: {', '.join(DEVICES)})")
        if not isinstance(override, dict):
            raise PolicyError(f"{where}.device.{name}: expected a table")
        devices[name] = _parse_stage_dtype({**table, **override}, dtype, f"{where}.device.{name}")
    rtol, atol = TORCH_TOLERANCES[dtype]
    truth_floor = 0.0
    bounds: List[Bound] = []
    for key, value in table.items():
        kw = f"{where}.{key}"
        if key == "truth_floor":
            truth_floor = _number(value, kw)
        elif key == "rtol":
            rtol = _number(value, kw)
        elif key == "atol":
            atol = _number(value, kw)
        elif key == "exact":
            if value is not True:
                raise PolicyError(f"{kw}: only 'exact = true' is meaningful, got {value!r}")
            bounds.append(Bound("mismatches", "max", 0.0, 0.0))
        else:
            bounds.append(_parse_bound(key, value, kw))
    if not bounds:
        raise PolicyError(f"{where}: no bounds")
    if rtol < 0 or atol < 0:
        raise PolicyError(f"{where}: rtol and atol must be >= 0")
    metrics = [b.metric for b in bounds]
    dup = {m for m in metrics if metrics.count(m) > 1}
    if dup:
        raise PolicyError(f"{where}: metric bounded twice: {', '.join(sorted(dup))}")
    return StagePolicy(bounds=tuple(bounds), rtol=rtol, atol=atol, truth_floor=truth_floor,
                       devices=devices)


def parse_policy(data: Dict[str, Any], source: str = "<dict>") -> Policy:
    """Validate a parsed TOML document and build the `Policy`."""
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise PolicyError(f"{source}: unknown top-level keys {sorted(unknown)} "
                          f"(allowed: {sorted(_TOP_KEYS)})")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise PolicyError(f"{source}: schema_version must be {SCHEMA_VERSION}, got "
                          f"{data.get('schema_version')!r}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise PolicyError(f"{source}: 'name' must be a non-empty string")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise PolicyError(f"{source}: 'description' must be a string")
    stages_in = data.get("stage")
    if not isinstance(stages_in, dict) or not stages_in:
        raise PolicyError(f"{source}: no [stage.<name>.<dtype>] tables")
    stages: Dict[str, Dict[str, StagePolicy]] = {}
    for stage, per_dtype in stages_in.items():
        if stage not in STAGES:
            raise PolicyError(f"{source}: unknown stage {stage!r} (known: {', '.join(STAGES)})")
        if not isinstance(per_dtype, dict) or not per_dtype:
            raise PolicyError(f"{source}: stage.{stage} must hold [stage.{stage}.<dtype>] tables")
        stages[stage] = {}
        for dtype, table in per_dtype.items():
            if dtype not in DTYPES:
                raise PolicyError(f"{source}: stage.{stage}: unknown dtype {dtype!r} "
                                  f"(known: {', '.join(DTYPES)})")
            stages[stage][dtype] = _parse_stage_dtype(table, dtype,
                                                      f"{source}: stage.{stage}.{dtype}")
    ordered = {s: stages[s] for s in STAGES if s in stages}
    return Policy(name=name, stages=ordered, description=description, source=source,
                  modules=_parse_modules(data.get("module", {}), source, "module"),
                  module_truths=_parse_modules(data.get("module_truth", {}), source,
                                               "module_truth"))


def _parse_modules(table: Any, source: str, section: str) -> Dict[str, Dict[str, float]]:
    """`[module.<dtype>]`: module kind (or "default") -> own-error rel L2 bound;
    `[module_truth.<dtype>]`: module kind (or "default") -> truth_ratio bound, and
    `truth_floor`."""
    if not isinstance(table, dict):
        raise PolicyError(f"{source}: '{section}' must hold [{section}.<dtype>] tables")
    out: Dict[str, Dict[str, float]] = {}
    for dtype, bounds in table.items():
        if dtype not in DTYPES:
            raise PolicyError(f"{source}: {section}: unknown dtype {dtype!r} (known: "
                              f"{', '.join(DTYPES)})")
        if not isinstance(bounds, dict):
            raise PolicyError(f"{source}: {section}.{dtype} must map module kinds to bounds")
        out[dtype] = {}
        for kind, value in bounds.items():
            bound = _number(value, f"{source}: {section}.{dtype}.{kind}")
            if not bound > 0:
                raise PolicyError(f"{source}: {section}.{dtype}.{kind} must be > 0, got "
                                  f"{value!r}")
            out[dtype][kind] = bound
    return out


def load_policy(path: Union[str, os.PathLike, None] = None) -> Policy:
    """Load a policy file. `None` loads the packaged `default` policy; a bare name without a
    path separator or ".toml" suffix (e.g. "default") loads the packaged policy of that name."""
    source, text = read_policy_text(path)
    return parse_policy_text(text, source)


def read_policy_text(path: Union[str, os.PathLike, None] = None) -> Tuple[str, str]:
    """(source, TOML text) of a policy named as `load_policy` takes it."""
    if path is None:
        path = "default"
    text_path = os.fspath(path)
    if not text_path.endswith(".toml") and os.sep not in text_path and "/" not in text_path:
        resource = importlib.resources.files("parity").joinpath(f"policies/{text_path}.toml")
        if not resource.is_file():
            raise PolicyError(f"no packaged policy named {text_path!r}")
        source, raw = f"policies/{text_path}.toml", resource.read_bytes()
    else:
        try:
            raw = Path(text_path).read_bytes()
        except OSError as e:
            raise PolicyError(f"cannot read policy file {text_path}: {e.strerror or e}") from None
        source = text_path
    try:
        return source, raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PolicyError(f"{source}: invalid TOML: {e}") from None


def parse_policy_text(text: str, source: str) -> Policy:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"{source}: invalid TOML: {e}") from None
    return parse_policy(data, source)
