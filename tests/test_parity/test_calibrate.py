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
    base = parse_policy_text(read_policy_text("default")[1], "base")
    assert policy.limits("sampler", "float32")["rel_l2"] == base.limits("sampler", "float32")["rel_l2"]
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


MODULE_FLOORS = {
    **FLOORS,
    "setup": {**FLOORS["setup"], "preset": "tiny,small", "sizes": [32, 256]},
    "modules": {
        "float32": {"LayerNorm": {"own_rel_l2": 1.1e-7, "own_rel_l2_at": "unet:a.norm"},
                    "GroupNorm": {"own_rel_l2": 2.4e-6},
                    "Embedding": {"own_rel_l2": 0.0},  # exact: says nothing, base line kept
                    "NewKind": {"own_rel_l2": 4e-7}},
        "float16": {"CLIPAttention": {"truth_ratio": 1.38, "truth_ratio_at": "conditioner:x"},
                    "GroupNorm": {"truth_ratio": 1.0},
                    "Decoder": {"truth_ratio": 0.4},  # under 1: k x 1
                    "Conv2d": {"truth_ratio": 1.61}},
    },
}


def test_module_bounds_are_derived_from_the_module_floors():
    from parity.calibrate import MODULE_FACTOR, MODULE_TRUTH_FACTOR

    text = derive_policy(read_policy_text("default")[1], MODULE_FLOORS)
    policy = parse_policy_text(text, "derived")
    assert policy.module_bound("LayerNorm", "float32") == nice_up(MODULE_FACTOR * 1.1e-7)
    assert policy.module_bound("GroupNorm", "float32") == nice_up(MODULE_FACTOR * 2.4e-6)
    assert policy.module_bound("NewKind", "float32") == nice_up(MODULE_FACTOR * 4e-7)  # added
    base = parse_policy_text(read_policy_text("default")[1], "base")
    assert policy.module_bound("Embedding", "float32") == base.module_bound("Embedding", "float32")
    # kinds no line names get the loosest calibrated bound of the table
    assert policy.module_bound("Unmeasured", "float32") == nice_up(MODULE_FACTOR * 2.4e-6)
    ratio = lambda kind: policy.module_truth_bound(kind, "float16")[0]  # noqa: E731
    assert ratio("CLIPAttention") == round(MODULE_TRUTH_FACTOR * 1.38, 2)
    assert ratio("Conv2d") == round(MODULE_TRUTH_FACTOR * 1.61, 2)
    assert ratio("Decoder") == MODULE_TRUTH_FACTOR
    assert ratio("Unmeasured") == ratio("Conv2d")
    assert policy.module_truth_bound("GroupNorm", "float16")[1] == \
        base.module_truth_bound("GroupNorm", "float16")[1]  # the truth floor is the base's
    truth_table = text.split("[module_truth.float16]")[1]
    line = next(ln for ln in truth_table.splitlines() if ln.startswith("CLIPAttention = "))
    assert "[calibrated] faithful port's largest truth ratio 1.38 at conditioner:x" in line
    assert "tiny,small at 32/256 px" in line
    # an added kind lands inside its own table, before the next one starts
    lines = text.splitlines()
    assert lines.index(next(ln for ln in lines if ln.startswith("NewKind ="))) < \
        lines.index("[module_truth.float16]")


def test_module_floors_keep_the_largest_value_and_where():
    from parity.module_floors import merge_floors, merge_into

    floors = {}
    merge_into(floors, "Linear", {"own_rel_l2": 2e-7, "truth_ratio": 1.2}, where="unet:a")
    merge_into(floors, "Linear", {"own_rel_l2": 3e-7, "truth_ratio": 1.1}, where="unet:b")
    merge_into(floors, "Linear", {"own_rel_l2": float("nan"), "truth_ratio": None}, where="c")
    assert floors["Linear"] == {"own_rel_l2": 3e-7, "own_rel_l2_at": "unet:b",
                                "truth_ratio": 1.2, "truth_ratio_at": "unet:a"}
    merge_floors(floors, {"Linear": {"truth_ratio": 1.5, "truth_ratio_at": "decode:z"},
                          "Conv2d": {"own_rel_l2": 1e-7}})
    assert floors["Linear"]["truth_ratio"] == 1.5
    assert floors["Linear"]["truth_ratio_at"] == "decode:z"
    assert floors["Conv2d"] == {"own_rel_l2": 1e-7}


def test_calibrate_rejects_an_unknown_preset_size_sampler_or_steps_before_any_work(tmp_path):
    from parity.cli import main

    assert main(["calibrate", "--preset", "tiny,huge", "--out", str(tmp_path / "c")]) == 2
    assert main(["calibrate", "--size", "30", "--out", str(tmp_path / "c")]) == 2
    assert main(["calibrate", "--sampler", "euler,heun9", "--out", str(tmp_path / "c")]) == 2
    assert main(["calibrate", "--steps", "0", "--out", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()


def test_floors_of_several_calibrations_combine_into_their_largest():
    from parity.calibrate import combine_floors

    small = {"setup": {"preset": "small", "sizes": [], "seeds": [0, 1], "prompts": ["a"]},
             "cases": [{}] * 2,
             "dtypes": {"float16": {"unet": {"truth_ratio": 1.2, "rel_l2": 4e-3}}},
             "modules": {"float16": {"Linear": {"truth_ratio": 1.51}}}}
    both = combine_floors([MODULE_FLOORS, small])
    assert both["dtypes"]["float16"]["unet"] == {"rel_l2": 6e-3, "ref_vs_truth": 4.4e-3,
                                                 "truth_ratio": 1.3}
    assert both["modules"]["float16"]["Linear"] == {"truth_ratio": 1.51}
    assert both["modules"]["float16"]["Conv2d"]["truth_ratio"] == 1.61
    assert both["setup"]["preset"] == "tiny,small" and both["setup"]["sizes"] == [32, 256]
    assert len(both["cases"]) == 10
    text = derive_policy(read_policy_text("default")[1], both)
    assert parse_policy_text(text, "both").module_truth_bound("Linear", "float16")[0] == 1.89


@pytest.mark.parametrize("name", ["default", "small"])
def test_a_shipped_policy_is_its_derivation_from_its_shipped_floors(name):
    """The packaged policies are calibrate's output on the floors that ship beside them (the
    default derived onto itself, `small` onto the default): a bound edited by hand, or floors
    re-measured without regenerating the policy, fails here."""
    import json
    from importlib.resources import files

    from parity.calibrate import derive_policy

    floors = json.loads(files("parity").joinpath(f"policies/{name}-floors.json").read_text())
    shipped = read_policy_text(name)[1]
    derived = derive_policy(read_policy_text("default")[1], floors, name)
    keep = lambda text: [ln for ln in text.splitlines()  # noqa: E731
                         if ln and not ln.startswith(("#", "description ="))]
    assert keep(derived) == keep(shipped)


def test_each_dtypes_bounds_cite_the_cases_that_measured_it():
    """float32 calibrated at 32 and 64 px, float16 at 64 only and with other samplers, combined:
    each line names the sizes, samplers, steps and case count of its own dtype, not the
    union."""
    from parity.calibrate import combine_floors

    def run(dtype, sizes, ratio, samplers, steps):
        cases = [{"preset": "tiny", "size": z, "dtype": dtype, "seed": s, "prompt": p}
                 for z in sizes for s in (0, 1) for p in ("a", "b")]
        stage = {"rel_l2": 2e-6} if dtype == "float32" else {"truth_ratio": ratio,
                                                              "ref_vs_truth": 1e-3}
        return {"setup": {"preset": "tiny", "sizes": sizes, "seeds": [0, 1], "steps": steps,
                          "samplers": samplers, "prompts": ["a", "b"]},
                "device": {"port": "cpu"}, "cases": cases,
                "dtypes": {dtype: {"unet": stage}}}

    text = derive_policy(read_policy_text("default")[1],
                         combine_floors([run("float32", [32, 64], None, ["euler"], 2),
                                         run("float16", [64], 1.3, ["euler", "euler_a"], 4)]))
    policy = parse_policy_text(text, "combined")
    assert policy.limits("unet", "float16")["truth_ratio"] == {"warn": 1.62, "fail": 1.95}
    f32 = next(ln for ln in text.splitlines() if ln.startswith("rel_l2 = { warn = 3e-06"))
    f16 = next(ln for ln in text.splitlines() if ln.startswith("truth_ratio = { warn = 1.62"))
    assert "(tiny at 32/64 px, euler x 2 steps, 8 cases (seeds [0, 1], 2 prompts), port on " \
        "cpu)" in f32
    assert "(tiny at 64 px, euler+euler_a x 4 steps, 4 cases (seeds [0, 1], 2 prompts), port " \
        "on cpu;" in f16
