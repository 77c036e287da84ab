"""The run clock's plan counts exactly the network calls each side makes, so its percentages
and remaining-time projection rest on the real amount of work."""
from __future__ import annotations


import pytest

from parity import eta
from parity.recording import Recording, resolve_checkpoint
from parity.runner import check
from conftest import REPO_ROOT

GOLDEN = REPO_ROOT / "fixtures" / "golden" / "tiny-default"


def test_plan_counts_calls_and_decodes():
    """euler + heun at 3 steps: 3 + 5 UNet calls; 3 decodes (two finals and the probe)."""
    plan = eta.RunPlan.for_run(["euler", "heun"], 3, truth=True)
    decode = eta.DECODE_COST
    assert plan.reference == pytest.approx(8 + 3 * decode)
    # truth: the same teacher-forced calls and decodes, then its own free run per sampler
    # (8 calls, 2 decodes; the sampler replay calls no network)
    assert plan.truth == pytest.approx(eta.TRUTH_COST * ((8 + 3 * decode) + (8 + 2 * decode)))
    # port: teacher-forced calls, its own loop with a decode per sampler, the decode stage
    assert plan.port == pytest.approx(8 + (8 + 2 * decode) + 3 * decode)
    only_unet = eta.RunPlan.for_run(["euler"], 3, stages=["tokens", "unet"])
    assert only_unet.port == 3


def test_clock_projects_from_the_rate_so_far():
    clock = eta.RunClock(10.0, done=4.0, elapsed=20.0)
    assert clock.remaining() == pytest.approx(30.0, abs=0.5)  # 20 s for 4 units, 6 to go
    assert eta.RunClock(10.0).remaining() is None
    assert "40% of the run, about 0:30 left" in clock.summary()
    clock.cost = eta.TRUTH_COST
    clock.advance(1)
    assert clock.done == pytest.approx(4.0 + eta.TRUTH_COST)


def test_no_clock_reports_nothing():
    eta.start(None)
    eta.unet_done()
    assert eta.summary() == ""


def test_check_counts_exactly_the_planned_port_work(tmp_path):
    """Every port UNet call and decode of a real check goes through the clock, and their sum is
    the plan: the plan is not a guess about how many calls a stage makes."""
    from sdxl_ms import load_pipeline

    golden = Recording.load(GOLDEN)
    ckpt = resolve_checkpoint(golden.spec, None, golden.meta.get("checkpoint_generator_version"))
    plan = eta.RunPlan.for_run(golden.spec.samplers, golden.spec.steps)
    clock = eta.RunClock(plan.port)
    eta.start(clock)
    try:
        check(golden, tmp_path, port=load_pipeline(ckpt))
    finally:
        eta.start(None)
    assert clock.done == pytest.approx(plan.port)
    assert clock.elapsed > 0 and clock.remaining() == pytest.approx(0.0, abs=1e-6)


def test_recording_counts_exactly_the_planned_reference_and_truth(tmp_path, monkeypatch):
    from parity.reference_process import record_to_folder
    from parity.recording import RunSpec

    started = []
    real_start = eta.start
    monkeypatch.setattr(eta, "start", lambda c: (started.append(c), real_start(c)))
    spec = RunSpec(samplers=("euler", "heun"), steps=2)
    lines = []
    record_to_folder(spec, resolve_checkpoint(spec), tmp_path / "rec", truth=True,
                     log=lines.append)
    clock = started[0]
    plan = eta.RunPlan.for_run(spec.samplers, spec.steps, truth=True)
    assert clock.total == pytest.approx(plan.reference + plan.truth)
    assert clock.done == pytest.approx(clock.total)
    assert any("left)" in line for line in lines), lines
    assert eta.current() is None  # stopped once the recording is written
