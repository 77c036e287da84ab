"""pytest-benchmark suite settings: `pytest benchmarks/ --benchmark-json out.json [--sdxl-...]`.

The default test run (`python -m pytest`, testpaths = tests) never collects this folder. Here
both frameworks share one process, so peak RSS figures are cumulative (`rss_isolated: false`);
`sdxl-bench` runs each measurement in a fresh process for clean peaks.
"""
from __future__ import annotations

import pytest

from benchmarks.flops import COMPONENTS
from benchmarks.runner import PRESET_NAMES


def pytest_addoption(parser):
    g = parser.getgroup("sdxl-bench", "SDXL port vs reference benchmarks")
    g.addoption("--sdxl-preset", default="tiny", choices=PRESET_NAMES)
    g.addoption("--sdxl-size", type=int, default=None, help="height = width (default: preset's)")
    g.addoption("--sdxl-dtype", default="float32")
    g.addoption("--sdxl-components", default=",".join(COMPONENTS))
    g.addoption("--sdxl-steps", type=int, default=4)
    g.addoption("--sdxl-warmup", type=int, default=1)
    g.addoption("--sdxl-rounds", type=int, default=5)
    g.addoption("--sdxl-threads", type=int, default=None)
    g.addoption("--sdxl-reference-device", default="cpu")


def pytest_generate_tests(metafunc):
    if {"component", "side", "mode"} <= set(metafunc.fixturenames):
        from benchmarks.workloads import PORT_MODES, REFERENCE_MODES

        wanted = metafunc.config.getoption("--sdxl-components").split(",")
        cases = [(c, "port", m) for c in COMPONENTS if c in wanted for m in PORT_MODES]
        cases += [(c, "reference", m) for c in COMPONENTS if c in wanted for m in REFERENCE_MODES]
        cases.sort(key=lambda t: COMPONENTS.index(t[0]))
        metafunc.parametrize(("component", "side", "mode"), cases,
                             ids=[f"{c}-{s}-{m}" for c, s, m in cases])


@pytest.fixture(scope="session")
def spec_for(request):
    """component, side, mode -> workloads.Spec from the --sdxl-* options."""
    from benchmarks.workloads import Spec
    from sdxl_ms.config import get_preset

    opt = request.config.getoption
    preset = opt("--sdxl-preset")
    size = opt("--sdxl-size") or get_preset(preset).default_size
    checkpoint = None
    if preset == "tiny":
        from sdxl_ms.weights.synthetic import cached_checkpoint

        checkpoint = str(cached_checkpoint("tiny", 0))

    def make(component: str, side: str, mode: str) -> Spec:
        return Spec(component, side, mode, preset=preset, height=size, width=size,
                    dtype=opt("--sdxl-dtype"), steps=opt("--sdxl-steps"),
                    warmup=opt("--sdxl-warmup"), rounds=opt("--sdxl-rounds"),
                    checkpoint=checkpoint, threads=opt("--sdxl-threads"),
                    device=opt("--sdxl-reference-device") if side == "reference" else None)

    return make


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Add the port/reference ratios of this session to the JSON pytest-benchmark writes."""
    from benchmarks.report import compute_ratios

    output_json["ratios"] = compute_ratios(output_json.get("benchmarks", []))
