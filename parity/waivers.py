"""Known deviations a porting team accepts, each with a reason, an owner and an expiry.

A waiver file (TOML, `--waivers FILE` on run/check/sweep, `--sdxl-waivers` in the pytest
plugin) lists entries that match failing tensors by stage, tensor, step and module (globs).
A matching failure within the waiver's looser bound becomes verdict `waived`: shown apart in
every report, and not a failure of the run. Loosening the whole policy would hide the next
regression in the same stage; a waiver covers one named deviation, up to a stated bound, until
a date:

    schema_version = 1

    [[waiver]]
    id = "fp16-decoder-attention"        # optional: default "waiver #N" (its place in the file)
    stage = "decode"                     # glob over stage names
    tensor = "probe/decoded"             # glob over tensor names (default "*")
    step = "*"                           # a step number, or "*" (default)
    module = "*"                         # glob over the located module, or a module/<name>
                                         # tensor's module (default "*": any, or none)
    device = "cpu"                       # cpu, ascend, cuda or cross (default: every device)
    reason = "VAE mid-block attention in float16 until the fused kernel lands"
    owner = "vae-team"
    expires = 2027-06-30
    bound = { rel_l2 = 1e-3 }            # looser fail bounds (default: 10x the policy's upper
                                         # bounds, its lower bounds unchanged)

The run fails, saying which, when a waiver has expired, matches nothing that failed (stale:
remove it), or is exceeded (the tensor is over the waiver's own bound). Nothing is waived
without a bound: "anything goes" cannot be written.
"""
from __future__ import annotations

import datetime as _dt
import fnmatch
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from sdxl_common.errors import InputError
from sdxl_common.validate import check_existing

from .metrics import format_value
from .results import StageResult, TensorResult, Verdict

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - declared as a dependency below 3.11
    import tomli as tomllib

SCHEMA_VERSION = 1
DEVICES = ("cpu", "ascend", "cuda", "cross")
DEFAULT_LOOSENING = 10.0  # a waiver without `bound`: the policy's upper fail bounds times this
_KEYS = {"id", "stage", "tensor", "step", "module", "device", "reason", "owner", "expires",
         "bound"}


class WaiverError(InputError):
    """A waiver file that cannot be read: bad input, exit 2, before any work."""


@dataclass(frozen=True)
class Waiver:
    id: str
    stage: str
    reason: str
    owner: str
    expires: _dt.date
    tensor: str = "*"
    step: str = "*"
    module: str = "*"
    device: Optional[str] = None
    bound: Tuple[Tuple[str, float], ...] = ()  # (policy metric key, looser fail bound)

    def applies_on(self, context: Iterable[str]) -> bool:
        """Whether the waiver is for this run's devices (`Policy.context`: the port's device,
        and "cross" for a golden from another device)."""
        return self.device is None or self.device in tuple(context)

    def matches(self, stage: str, tensor: TensorResult, module: Optional[str]) -> bool:
        if not fnmatch.fnmatchcase(stage, self.stage):
            return False
        if not fnmatch.fnmatchcase(tensor.name, self.tensor):
            return False
        if self.step != "*" and str(tensor.step) != self.step:
            return False
        if self.module != "*":
            name = tensor.name[len("module/"):] if tensor.name.startswith("module/") else module
            return name is not None and fnmatch.fnmatchcase(name, self.module)
        return True

    def describe(self) -> str:
        return f"waiver '{self.id}' ({self.owner}, until {self.expires.isoformat()})"


@dataclass
class WaiverFile:
    path: Path
    waivers: List[Waiver] = field(default_factory=list)


def load_waivers(path) -> WaiverFile:
    """Read and validate a waiver file; any problem is one line (`WaiverError`, exit 2)."""
    path = check_existing(path, "waiver file")
    try:
        data = tomllib.loads(Path(path).read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise WaiverError(f"waiver file {path} is not valid TOML: {e}") from None
    if data.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise WaiverError(f"waiver file {path} has schema_version {data['schema_version']!r}; "
                          f"this tool reads {SCHEMA_VERSION}")
    unknown = set(data) - {"schema_version", "waiver"}
    if unknown:
        raise WaiverError(f"waiver file {path}: unknown top-level key(s) "
                          f"{', '.join(sorted(unknown))} (write entries as [[waiver]] tables)")
    entries = data.get("waiver", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise WaiverError(f"waiver file {path}: write each entry as a [[waiver]] table")
    waivers = [_parse(entry, i + 1, path) for i, entry in enumerate(entries)]
    ids = [w.id for w in waivers]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise WaiverError(f"waiver file {path}: id(s) used twice: {', '.join(dupes)}")
    return WaiverFile(Path(path), waivers)


def _parse(entry: Dict[str, Any], number: int, path: Path) -> Waiver:
    where = f"waiver file {path}, waiver #{number}"
    unknown = set(entry) - _KEYS
    if unknown:
        raise WaiverError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: "
                          f"{', '.join(sorted(_KEYS))})")
    for key in ("stage", "reason", "owner", "expires"):
        if key not in entry:
            raise WaiverError(f"{where}: '{key}' is required (every waiver names its stage, "
                              "why it is accepted, who owns it and when it expires)")
    for key in ("id", "stage", "tensor", "module", "reason", "owner"):
        if key in entry and (not isinstance(entry[key], str) or not entry[key].strip()):
            raise WaiverError(f"{where}: '{key}' must be a non-empty string")
    expires = entry["expires"]
    if isinstance(expires, _dt.datetime):
        expires = expires.date()
    if not isinstance(expires, _dt.date):
        raise WaiverError(f"{where}: 'expires' must be a TOML date (expires = 2027-06-30), "
                          f"got {expires!r}")
    step = entry.get("step", "*")
    if isinstance(step, bool) or not (step == "*" or (isinstance(step, int) and step >= 0)):
        raise WaiverError(f"{where}: 'step' must be a step number >= 0 or \"*\", got {step!r}")
    device = entry.get("device")
    if device is not None and device not in DEVICES:
        raise WaiverError(f"{where}: 'device' must be one of {', '.join(DEVICES)}, got "
                          f"{device!r}")
    bound = entry.get("bound", {})
    if not isinstance(bound, dict):
        raise WaiverError(f"{where}: 'bound' must be a table, e.g. bound = {{ rel_l2 = 1e-3 }}")
    for key, value in bound.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise WaiverError(f"{where}: bound {key} must be a number, got {value!r}")
    return Waiver(id=entry.get("id", f"waiver #{number}"), stage=entry["stage"],
                  reason=" ".join(entry["reason"].split()), owner=entry["owner"],
                  expires=expires, tensor=entry.get("tensor", "*"), step=str(step),
                  module=entry.get("module", "*"), device=device,
                  bound=tuple((k, float(v)) for k, v in sorted(bound.items())))


# ---- applying them ---------------------------------------------------------------------------

@dataclass
class WaiverOutcome:
    """What the waivers did to one run: the tensors they waived, and the problems that fail
    the run (expired, stale or exceeded waivers), each one line."""

    file: str
    applied: List[Dict[str, Any]] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return {"file": self.file, "applied": self.applied, "problems": self.problems}


def apply_waivers(results: Dict[str, StageResult], waivers: WaiverFile, policy, dtype: str,
                  modules: Optional[Dict[str, str]] = None,
                  today: Optional[_dt.date] = None) -> WaiverOutcome:
    """Waive the failing tensors of `results` (stage -> result, changed in place) that a
    waiver of `waivers` matches and whose metrics are within its bound. `modules` maps a stage
    to its located first divergent module (`--locate`), which `module` globs match."""
    today = today or _dt.date.today()
    modules = modules or {}
    outcome = WaiverOutcome(file=str(waivers.path))
    live = [w for w in waivers.waivers if w.applies_on(policy.context)]
    for w in live:
        if w.expires < today:
            outcome.problems.append(f"{w.describe()} expired on {w.expires.isoformat()}: renew "
                                    f"or remove it ({waivers.path})")
    valid = [w for w in live if w.expires >= today]
    used = set()
    for name, stage in results.items():
        if stage.verdict not in (Verdict.FAIL, Verdict.WARN):
            continue  # skipped, errored (a raising port is never waived) or passing
        changed = False
        for t in stage.tensors:
            if t.verdict != Verdict.FAIL:
                continue
            w = next((w for w in valid if w.matches(name, t, modules.get(name))), None)
            if w is None:
                continue
            used.add(w.id)
            over = _over_waiver_bound(w, t, policy, name, dtype)
            where = f"stage '{name}', tensor '{t.name}'" + (
                "" if t.step is None else f", step {t.step}")
            if over:
                t.reasons.insert(0, f"{over} (exceeded: {w.describe()})")
                outcome.problems.append(f"{w.describe()} exceeded at {where}: {over}")
                continue
            t.verdict = Verdict.WAIVED
            t.reasons.insert(0, f"waived by {w.describe()}: {w.reason}")
            outcome.applied.append({"waiver": w.id, "stage": name, "tensor": t.name,
                                    "step": t.step, "reason": w.reason, "owner": w.owner,
                                    "expires": w.expires.isoformat()})
            changed = True
        if changed:
            results[name] = _rebuilt(stage)
    ran = {n for n, s in results.items() if s.verdict != Verdict.SKIP}
    for w in valid:
        if w.id not in used and any(fnmatch.fnmatchcase(s, w.stage) for s in ran):
            outcome.problems.append(f"{w.describe()} is stale: it matches no failing tensor "
                                    f"of stage '{w.stage}' (remove it from {waivers.path})")
    return outcome


def _over_waiver_bound(w: Waiver, t: TensorResult, policy, stage: str,
                       dtype: str) -> Optional[str]:
    """The first of the waiver's bounds the tensor is over (None when within all): its own
    `bound`, else the policy's upper fail bounds loosened `DEFAULT_LOOSENING` times."""
    values = t.metrics.values()
    for side in ("port", "ref"):
        if getattr(t.metrics, f"nonfinite_{side}", 0):
            return f"{side} has non-finite values, which no waiver covers"
    bounds = list(w.bound)
    if not bounds:
        from .policy import TRUTH_REPLACES

        limits = policy.limits(stage, dtype)
        if "truth_ratio" in values and "truth_ratio" in limits:  # as the policy judges it
            limits = {k: v for k, v in limits.items() if k not in TRUTH_REPLACES}
        bounds = [(key, lim["fail"] if key.endswith("_min") else lim["fail"] * DEFAULT_LOOSENING)
                  for key, lim in limits.items()]
    checked = 0
    for key, bound in bounds:
        metric, lower = (key[:-4], True) if key.endswith("_min") else (key, False)
        if metric not in values:
            continue
        checked += 1
        value = values[metric]
        within = value >= bound if lower else value <= bound
        if not within:
            sign = "<" if lower else ">"
            return (f"{metric} {format_value(value)} {sign} waiver bound "
                    f"{format_value(bound)}")
    if not checked:
        return (f"the waiver bounds none of this tensor's metrics "
                f"({', '.join(values)}); give one in `bound`")
    return None


def _rebuilt(stage: StageResult) -> StageResult:
    """The stage with its verdict and first failure recomputed from its (re-judged) tensors."""
    out = StageResult.build(stage.name, stage.tensors, per_step=stage.per_step,
                            images=stage.images, notes=stage.notes, limits=stage.limits)
    return out


def located_modules(localisation: List[Dict[str, Any]]) -> Dict[str, str]:
    """stage -> the first divergent module's name, from `--locate`'s localisation."""
    return {loc["stage"]: loc["first_divergent_module"]["module"] for loc in localisation
            if loc.get("first_divergent_module")}
