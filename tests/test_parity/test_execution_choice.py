"""The harness picks the built-in port's execution mode from measured costs: the calls it
counts are the calls a check makes, the estimate is compile plus calls times per-call time,
the committed costs are the committed benchmark baselines', and the report says which mode
ran and why."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from conftest import REPO_ROOT
from parity.recording import Recording
from parity.runner import check
from parity.stage_calls import network_calls
from parity.stages import STAGES
from sdxl_ms import execution_costs, runtime
from sdxl_ms.execution_costs import ModeCost, choose

GOLDEN = REPO_ROOT / "fixtures" / "golden" / "tiny-default"


@pytest.fixture(scope="module")
def golden():
    return Recording.load(GOLDEN)


@pytest.fixture
def undecided():
    """The jit setting as a fresh process has it (no setter, no SDXL_MS_JIT), restored after."""
    before = runtime.settings.jit_state()
    runtime.settings.restore_jit(("off", "default", False, {}))
    yield runtime.settings
    runtime.settings.restore_jit(before)


@pytest.mark.parametrize("stages", [STAGES, ("unet",), ("conditioner", "decode"), ("image",)])
def test_network_calls_are_the_calls_a_check_makes(golden, stages, tmp_path, monkeypatch):
    from parity.recording import resolve_checkpoint
    from sdxl_ms import load_pipeline

    port = load_pipeline(resolve_checkpoint(golden.spec, None,
                                            golden.meta.get("checkpoint_generator_version")))
    made = Counter()
    for method, network in (("encode_prompt", "text"), ("unet", "unet"), ("decode", "vae")):
        def counted(*args, _real=getattr(port, method), _network=network, **kwargs):
            made[_network] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(port, method, counted)
    check(golden, tmp_path, port=port, stages=stages)
    assert network_calls(golden, stages) == {n: made[n] for n in ("text", "unet", "vae")}
    assert sum(made.values()) > 0


def _costs(**per_mode):
    """One network ('unet', tiny 64x64 float32) with (compile_s, call_s) per jit mode."""
    return tuple(ModeCost("tiny", 64, 64, "float32", "unet", jit, *cost)
                 for jit, cost in per_mode.items())


def test_the_choice_is_the_least_compile_plus_calls():
    costs = _costs(off=(0.0, 0.10), blocks=(5.0, 0.05), model=(30.0, 0.02))
    # 10 calls: off 1.0 s, blocks 5.5 s, model 30.2 s; 1000 calls: 100, 55, 50 s
    few = choose("tiny", 64, 64, "float32", {"unet": 10}, costs)
    many = choose("tiny", 64, 64, "float32", {"unet": 1000}, costs)
    assert (few.jit, many.jit) == ("off", "model")
    assert few.estimates_s == pytest.approx({"off": 1.0, "blocks": 5.5, "model": 30.2})
    assert many.estimates_s == pytest.approx({"off": 100.0, "blocks": 55.0, "model": 50.0})
    assert "measured" in few.reason and "scaled" not in few.reason


def test_networks_whose_cheapest_modes_differ_each_get_their_own():
    """The UNet cheapest in blocks, the VAE in PyNative (as sdxl-base at 1024x1024): each
    network runs in its own mode when that beats every single mode, and says so."""
    costs = _costs(off=(0.0, 1.0), blocks=(5.0, 0.5)) + tuple(
        ModeCost("tiny", 64, 64, "float32", "vae", jit, *cost)
        for jit, cost in {"off": (0.0, 1.0), "blocks": (2.0, 1.2)}.items())
    # unet x20: off 20, blocks 15; vae x3: off 3, blocks 5.6 -> one mode: off 23, blocks 20.6
    got = choose("tiny", 64, 64, "float32", {"unet": 20, "vae": 3}, costs)
    assert got.networks == {"unet": "blocks", "vae": "off"}
    assert got.jit == "blocks"  # the costlier network's mode
    assert got.estimates_s == pytest.approx({"off": 23.0, "blocks": 20.6})
    assert "per network (unet blocks, vae off) 18.0 s; one mode for all: blocks 20.6 s" \
        in got.reason
    assert got.to_dict()["networks"] == {"unet": "blocks", "vae": "off"}
    # where one mode is cheapest for every network, nothing is split
    same = choose("tiny", 64, 64, "float32", {"unet": 2, "vae": 3}, costs)
    assert (same.jit, same.networks) == ("off", {})


def test_an_unmeasured_size_scales_the_call_time_by_pixels_and_says_so():
    costs = _costs(off=(0.0, 0.10), blocks=(5.0, 0.05), model=(30.0, 0.02))
    got = choose("tiny", 128, 128, "float32", {"unet": 10}, costs)  # 4x the pixels
    assert got.estimates_s == pytest.approx({"off": 4.0, "blocks": 7.0, "model": 30.8})
    assert got.jit == "off" and "scaled" in got.reason


def test_reduced_precision_and_unmeasured_presets_run_pynative():
    costs = _costs(off=(0.0, 1.0), blocks=(0.0, 0.1), model=(0.0, 0.1))
    assert choose("tiny", 64, 64, "float16", {"unet": 10}, costs).jit == "off"
    other = choose("small", 256, 256, "float32", {"unet": 10}, costs)
    assert other.jit == "off" and "no measured costs for preset 'small'" in other.reason


def test_one_measured_mode_is_kept_and_said_to_have_nothing_to_compare_with():
    costs = tuple(c for c in _costs(off=(0.0, 1.0), blocks=(0.0, 0.1), model=(0.0, 0.1))
                  if c.jit == "blocks")
    got = choose("tiny", 64, 64, "float32", {"unet": 10}, costs)
    assert got.jit == "off" and got.estimates_s == pytest.approx({"blocks": 1.0})
    assert "only blocks measured for preset 'tiny'" in got.reason


def test_committed_costs_are_derived_from_the_committed_baselines():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "execution_costs_tool", REPO_ROOT / "tools" / "execution_costs.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    committed = json.loads(execution_costs.COSTS_FILE.read_text())
    assert committed["costs"] == tool.derive(tool.BASELINES)["costs"]
    assert {c["preset"] for c in committed["costs"]} >= {"tiny", "sdxl-base"}


def test_the_report_says_which_mode_ran_and_why(golden, tmp_path, undecided):
    picked = check(golden, tmp_path / "picked", stages=("unet",))
    execution = picked.meta["execution"]
    assert execution["jit_reason"].startswith("picked: least estimated time")
    calls = network_calls(golden, ("unet",))
    want = choose(golden.spec.preset, golden.meta["height"], golden.meta["width"],
                  golden.spec.dtype, calls)
    assert execution["jit"] == want.jit
    assert execution["jit_reason"] == f"picked: {want.reason}"
    # the next check in the same process is picked for its own calls, not left at this one
    text_only = check(golden, tmp_path / "text", stages=("conditioner",))
    want_text = choose(golden.spec.preset, golden.meta["height"], golden.meta["width"],
                       golden.spec.dtype, network_calls(golden, ("conditioner",)))
    assert want_text.reason != want.reason
    assert text_only.meta["execution"]["jit_reason"] == f"picked: {want_text.reason}"

    from parity.builtin_port import set_jit

    set_jit("blocks")
    forced = check(golden, tmp_path / "forced", stages=("unet",))
    assert (forced.meta["execution"]["jit"], forced.meta["execution"]["jit_reason"]) == \
        ("blocks", "--jit")
