"""Which execution mode finishes a workload first, from measured costs.

A mode's cost for a workload is, per network, its compile time (the first call's excess over
a steady call: 0 in PyNative) plus its per-call time times the calls the workload makes. The
costs are measured by `sdxl-bench` (`benchmarks/baselines/`, one folder per preset and size)
and committed in `assets/execution-costs.json`, which `tools/execution_costs.py` derives from
those results (a test holds the two together). At a size without a measurement, each mode's
per-call time of the UNet and the VAE is scaled from the nearest measured size by the pixel
count: that keeps the modes' ratio, so it overstates what compiling saves at larger sizes,
where PyNative's per-op launch cost is a smaller share; the choice then says "scaled".

Only float32 is chosen by measurement: in float16 and bfloat16 MindSpore's compiled graphs
round differently from PyNative (*measured* 7.5e-4 to 1.0e-3 rel L2 on the tiny text encoders,
the size of the port-vs-reference error itself), so a compiled mode would change the figures a
parity check reports; those dtypes run in PyNative.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

COSTS_FILE = Path(__file__).resolve().parent / "assets" / "execution-costs.json"
NETWORKS = ("text", "unet", "vae")
SCALES_WITH_PIXELS = ("unet", "vae")  # the text encoders' work does not depend on the size
# sdxl-bench's names of the port's modes -> `runtime.settings.set_jit` modes
BENCH_MODES = {"pynative": "off", "graph-blocks": "blocks", "graph": "model"}


@dataclass(frozen=True)
class ModeCost:
    """One network of one preset at one size in one mode, as measured."""

    preset: str
    height: int
    width: int
    dtype: str
    network: str
    jit: str
    compile_s: float
    call_s: float


@dataclass(frozen=True)
class Choice:
    """The mode picked for a workload, with every mode's estimated seconds and why.
    `networks`: a mode per network where the networks' cheapest modes differ (`jit` is then
    the mode of the network that costs most)."""

    jit: str
    estimates_s: Dict[str, float]
    reason: str
    networks: Dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, object]:
        out = {"jit": self.jit, "reason": self.reason,
               "estimates_s": {k: round(v, 2) for k, v in self.estimates_s.items()}}
        if self.networks:
            out["networks"] = dict(self.networks)
        return out


@lru_cache(maxsize=None)
def measured_costs(path: Path = COSTS_FILE) -> Tuple[ModeCost, ...]:
    data = json.loads(Path(path).read_text())
    return tuple(ModeCost(**entry) for entry in data["costs"])


def _nearest(costs, preset: str, dtype: str, network: str, jit: str,
             pixels: int) -> Optional[ModeCost]:
    found = [c for c in costs if (c.preset, c.dtype, c.network, c.jit) == (preset, dtype,
                                                                          network, jit)]
    return min(found, key=lambda c: abs(c.height * c.width - pixels), default=None)


def network_estimates(preset: str, height: int, width: int, dtype: str,
                      calls: Mapping[str, int], costs: Optional[Tuple[ModeCost, ...]] = None
                      ) -> Tuple[Dict[str, Dict[str, float]], bool]:
    """{network: {mode: estimated seconds}} for each network the workload calls, in each mode
    measured for it (its compile plus its calls), and whether any per-call time was scaled
    from another size."""
    costs = measured_costs() if costs is None else costs
    pixels, scaled, out = height * width, False, {}
    for network, n in calls.items():
        if not n:
            continue
        out[network] = {}
        for jit in BENCH_MODES.values():
            cost = _nearest(costs, preset, dtype, network, jit, pixels)
            if cost is None:
                continue
            factor = 1.0
            if network in SCALES_WITH_PIXELS and cost.height * cost.width != pixels:
                factor, scaled = pixels / (cost.height * cost.width), True
            out[network][jit] = cost.compile_s + n * cost.call_s * factor
    return out, scaled


def _one_mode_for_all(per_network: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    """The estimated seconds of the whole workload per mode, for the modes measured for every
    network it calls."""
    modes = [jit for jit in BENCH_MODES.values()
             if all(jit in modes for modes in per_network.values())]
    return {jit: sum(modes[jit] for modes in per_network.values()) for jit in modes}


def choose(preset: str, height: int, width: int, dtype: str, calls: Mapping[str, int],
           costs: Optional[Tuple[ModeCost, ...]] = None) -> Choice:
    """The mode with the least estimated time; PyNative where nothing was measured or the
    dtype is not float32 (see the module docstring)."""
    if dtype != "float32":
        return Choice("off", {}, f"{dtype}: compiled graphs round differently from PyNative, "
                                 "so reduced-precision checks run in PyNative")
    per_network, scaled = network_estimates(preset, height, width, dtype, calls, costs)
    estimates = _one_mode_for_all(per_network)
    if not estimates:
        return Choice("off", estimates, f"no measured costs for preset '{preset}' in "
                                        f"{dtype}: PyNative")
    if len(estimates) < 2:
        only = next(iter(estimates))
        return Choice("off", estimates, f"only {only} measured for preset '{preset}' in "
                                        f"{dtype}, nothing to compare it with: PyNative")
    best = min(estimates, key=estimates.get)
    size = "scaled by pixels from the nearest measured size" if scaled else "measured"
    listed = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(estimates.items(), key=lambda kv: kv[1]))
    cheapest = {net: min(modes, key=modes.get) for net, modes in per_network.items() if modes}
    mixed = sum(per_network[net][mode] for net, mode in cheapest.items())
    if len(set(cheapest.values())) > 1 and mixed < estimates[best]:
        # each network in its own cheapest mode: networks compile and run independently
        costliest = max(cheapest, key=lambda net: per_network[net][cheapest[net]])
        modes = ", ".join(f"{net} {mode}" for net, mode in cheapest.items())
        return Choice(cheapest[costliest], estimates,
                      f"least estimated time ({size}, compile included): per network "
                      f"({modes}) {mixed:.1f} s; one mode for all: {listed}", cheapest)
    return Choice(best, estimates, f"least estimated time ({size}, compile included): {listed}")


def costs_from_bench(results: List[dict]) -> List[Dict[str, object]]:
    """`execution-costs.json` entries from `sdxl-bench` results.json documents: each port
    measurement of a network, its median call and its compile time."""
    out = []
    for doc in results:
        for bench in doc["benchmarks"]:
            info = bench["extra_info"]
            if info["side"] != "port" or info["component"] not in NETWORKS \
                    or info["mode"] not in BENCH_MODES:
                continue
            out.append({"preset": info["preset"], "height": info["height"],
                        "width": info["width"], "dtype": info["dtype"],
                        "network": info["component"], "jit": BENCH_MODES[info["mode"]],
                        "compile_s": round(info.get("compile_s") or 0.0, 3),
                        "call_s": round(bench["stats"]["median"], 5)})
    return sorted(out, key=lambda e: (e["preset"], e["height"], e["network"], e["jit"]))
