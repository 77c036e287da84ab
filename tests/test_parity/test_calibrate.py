"""`sdxl-parity calibrate`: floors in, bounds out, each with its measured source."""
from __future__ import annotations

import pytest

from parity.calibrate import derive_policy, nice_up
from parity.policy import parse_policy_text, read_policy_text

FLOORS = {
    "setup": {"preset": "tiny", "seeds": [0, 1], "prompts": ["a", "b"]},
    "device": {"port": "cpu"},
    "cases": [{}] * 8,
    "dtypes": {
        "float32": {"unet": {"rel_l2": 2.66e-6}, "sampler": {"rel_l2": 0.0},
                    "conditioner": {"rel_l2": 4e-6}},
        "float16": {"unet": {"rel_l2": 6e-3, "ref_vs_truth": 4.4e-3, "truth_ratio": 1.3},
                    "decode": {"rel_l2": 2e-6, "ref_vs_truth": 1.8e-6, "truth_ratio": 0.02}},
    },
}


def test_nice_up_rounds_up_to_a_readable_bound():
    assert [nice_up(x) for x in (5.3e-6, 1.38e-6, 2e-6, 6.9e-7)] == [7e-6, 1.5e-6, 2e-6, 7e-7]


def test_the_derived_policy_loads_and_carries_the_measured_floors():
    text = derive_policy(read_policy_text("default")[1], FLOORS)
    policy = parse_policy_text(text, "derived")
    assert policy.name == "calibrated"
    unet32 = policy.limits("unet", "float32")["rel_l2"]
    assert unet32 == {"warn": 5e-6, "fail": 1e-5}  # 1.5 x 2.66e-6 rounded up; the target stays
    cond32 = policy.limits("conditioner", "float32")["rel_l2"]
    assert cond32 == {"warn": 7e-6, "fail": 1e-5}  # 1.5x 4e-6 rounded up; 2x is under the target
    assert "fail moved up" not in text
    moved = derive_policy(read_policy_text("default")[1], {**FLOORS, "dtypes": {"float32": {"unet": {"rel_l2": 6e-6}}}})
    assert parse_policy_text(moved, "m").limits("unet", "float32")["rel_l2"] == {"warn": 1e-5, "fail": 1.5e-5}
    assert "fail moved up from the 1e-5 target to 2x the floor" in moved  # and says so
    # an exact match says nothing of noise: the base's line is kept
    assert policy.limits("sampler", "float32")["rel_l2"] == {"warn": 1e-6, "fail": 1e-5}
    assert policy.limits("unet", "float16")["truth_ratio"] == {"warn": 1.62, "fail": 1.95}
    # a ratio under 1 comes from the floor: k x 1
    assert policy.limits("decode", "float16")["truth_ratio"] == {"warn": 1.25, "fail": 1.5}
    line = next(ln for ln in text.splitlines() if ln.startswith("truth_ratio = { warn = 1.62"))
    assert "[calibrated] faithful port's largest truth_ratio 1.3" in line
    assert "8 cases" not in line and "4 cases" in line  # per dtype


def test_calibrate_rejects_a_bad_dtype_before_any_work(tmp_path):
    from parity.cli import main

    assert main(["calibrate", "--dtype", "float8", "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()
