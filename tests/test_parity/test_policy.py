"""parity.policy: loading, validation errors, and warn/fail boundaries."""
import dataclasses
import importlib.resources
import re

import numpy as np
import pytest

from parity.metrics import compare, compare_exact, image_metrics
from parity.policy import (DTYPES, TORCH_TOLERANCES, PolicyError, Verdict, load_policy,
                           parse_policy)
from parity.results import STAGES

GOOD = """
schema_version = 1
name = "t"

[stage.unet.float32]
rtol = 1e-3
atol = 1e-4
rel_l2 = { warn = 1e-6, fail = 1e-5 }
cosine_min = { warn = 0.999, fail = 0.99 }
mismatch_ratio = { warn = 1e-4, fail = 1e-3 }

[stage.tokens.float32]
exact = true

[stage.image.float32]
max_abs_255 = 2
"""


def _write(tmp_path, text):
    p = tmp_path / "p.toml"
    p.write_text(text)
    return p


@pytest.fixture
def policy(tmp_path):
    return load_policy(_write(tmp_path, GOOD))


def _metrics(policy, **values):
    """TensorMetrics of a clean comparison with chosen metric values substituted."""
    x = np.linspace(1, 2, 10)
    m = compare(x, x, **policy.tolerances("unet", "float32"))
    return dataclasses.replace(m, **values)


def test_default_policy_covers_every_stage_and_dtype():
    p = load_policy()
    assert p.name == "default" and p.schema_version == 1
    assert list(p.stages) == list(STAGES)
    for stage in STAGES:
        assert set(p.stages[stage]) == set(DTYPES)
    assert p.tolerances("unet", "float32") == {"rtol": 1e-3, "atol": 1e-4}
    assert p.limits("unet", "float32")["rel_l2"] == {"warn": 7e-6, "fail": 1e-5}  # calibrated
    assert p.limits("unet", "float16")["rel_l2"]["fail"] == 5e-2  # mindone fp16
    assert p.limits("image", "float16")["psnr_db_min"]["fail"] == 35  # Apple
    # A table without rtol/atol falls back to torch.testing's defaults.
    rtol, atol = TORCH_TOLERANCES["float16"]
    assert p.tolerances("trajectory", "float16") == {"rtol": rtol, "atol": atol}
    assert load_policy("default").stages == p.stages


def test_every_default_threshold_is_commented():
    text = importlib.resources.files("parity").joinpath("policies/default.toml").read_text()
    in_stage = False
    for line in text.splitlines():
        if line.startswith("[stage."):
            in_stage = True
            continue
        if in_stage and "=" in line and not line.lstrip().startswith("#"):
            assert "#" in line, f"uncommented threshold: {line}"


@pytest.mark.parametrize("text, message", [
    (GOOD.replace("[stage.unet.float32]", "[stage.unett.float32]"), "unknown stage 'unett'"),
    (GOOD.replace("[stage.unet.float32]", "[stage.unet.fp32]"), "unknown dtype 'fp32'"),
    (GOOD.replace("rel_l2 =", "rel_l3 ="), "unknown metric 'rel_l3'"),
    (GOOD.replace("cosine_min =", "cosine ="), "write 'cosine_min'"),
    (GOOD.replace("rel_l2 =", "rel_l2_min ="), "upper-bound metric"),
    (GOOD.replace("warn = 1e-6, fail = 1e-5", "warn = 1e-4, fail = 1e-5"), "looser than fail"),
    (GOOD.replace("warn = 1e-6, fail = 1e-5", "warn = 1e-6"), "'warn' optional"),
    (GOOD.replace("max_abs_255 = 2", 'max_abs_255 = "2"'), "expected a number"),
    (GOOD.replace("exact = true", "exact = false"), "exact = true"),
    (GOOD.replace("schema_version = 1", "schema_version = 2"), "schema_version must be 1"),
    (GOOD.replace('name = "t"', ""), "'name' must be"),
    ("extra = 1\n" + GOOD, "unknown top-level keys"),
    (GOOD.replace("rel_l2 = {", "rel_l2 = {{"), "invalid TOML"),
    ('schema_version = 1\nname = "x"\n', "no [stage"),
    ('schema_version = 1\nname = "x"\n[stage.unet.float32]\nrtol = 1e-3\n', "no bounds"),
])
def test_malformed_policies_raise_one_line_errors(tmp_path, text, message):
    with pytest.raises(PolicyError, match=re.escape(message)) as info:
        load_policy(_write(tmp_path, text))
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_files_and_names(tmp_path):
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_policy(tmp_path / "nope.toml")
    with pytest.raises(PolicyError, match="no packaged policy named 'nope'"):
        load_policy("nope")


def test_bare_number_is_a_fail_bound(policy):
    (bound,) = policy.stages["image"]["float32"].bounds
    assert (bound.metric, bound.warn, bound.fail) == ("max_abs_255", 2.0, 2.0)


def test_judge_boundaries(policy):
    j = policy.judge("unet", "float32", _metrics(policy, rel_l2=1e-6))
    assert j.verdict == Verdict.PASS and j.reasons == []  # equal to the warn bound passes
    j = policy.judge("unet", "float32", _metrics(policy, rel_l2=2e-6))
    assert j == (Verdict.WARN, ["rel_l2 2.00e-06 > warn 1e-06"])
    j = policy.judge("unet", "float32", _metrics(policy, rel_l2=1e-5))
    assert j.verdict == Verdict.WARN  # equal to the fail bound does not fail
    j = policy.judge("unet", "float32", _metrics(policy, rel_l2=3.2e-5))
    assert j == (Verdict.FAIL, ["rel_l2 3.20e-05 > fail 1e-05"])


def test_judge_lower_bounds_and_reason_order(policy):
    j = policy.judge("unet", "float32", _metrics(policy, cosine=0.995, rel_l2=1e-4))
    assert j.verdict == Verdict.FAIL
    assert j.reasons == ["rel_l2 1.00e-04 > fail 1e-05", "cosine 0.995 < warn 0.999"]
    j = policy.judge("unet", "float32", _metrics(policy, cosine=0.98))
    assert j == (Verdict.FAIL, ["cosine 0.98 < fail 0.99"])


def test_nan_and_nonfinite_always_fail(policy):
    j = policy.judge("unet", "float32", _metrics(policy, rel_l2=float("nan")))
    assert j == (Verdict.FAIL, ["rel_l2 is nan"])
    ref = np.ones(4)
    port = ref.copy()
    port[1] = np.inf
    j = policy.judge("unet", "float32", compare(ref, port, **policy.tolerances("unet", "float32")))
    assert j.verdict == Verdict.FAIL
    assert j.reasons[0] == "port has 1 non-finite values (NaN/Inf)"


def test_real_fp32_noise_passes_and_a_bug_fails(policy):
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 4, 8, 8))
    tol = policy.tolerances("unet", "float32")
    noise = ref.astype(np.float32).astype(np.float64)  # fp32 rounding: rel_l2 ~ 3e-8
    assert policy.judge("unet", "float32", compare(ref, noise, **tol)).verdict == Verdict.PASS
    bug = ref.copy()
    bug[:, :, 0, :] = 0  # one zeroed row of every map, e.g. a padding bug
    verdict, reasons = policy.judge("unet", "float32", compare(ref, bug, **tol))
    assert verdict == Verdict.FAIL and reasons[0].startswith("rel_l2 ")


def test_exact_tokens_and_images(policy):
    ids = np.array([49406, 320, 49407])
    assert policy.judge("tokens", "float32", compare_exact(ids, ids)).verdict == Verdict.PASS
    j = policy.judge("tokens", "float32", compare_exact(ids, np.array([49406, 321, 49407])))
    assert j == (Verdict.FAIL, ["mismatches 1 > fail 0"])
    img = np.full((16, 16, 3), 100, np.uint8)
    assert policy.judge("image", "float32", image_metrics(img, img + 2)).verdict == Verdict.PASS
    j = policy.judge("image", "float32", image_metrics(img, img + 3))
    assert j == (Verdict.FAIL, ["max_abs_255 3 > fail 2"])


def test_judge_refuses_what_it_cannot_judge(policy):
    m = _metrics(policy)
    with pytest.raises(PolicyError, match="no bounds for stage 'decode'"):
        policy.judge("decode", "float32", m)
    with pytest.raises(PolicyError, match="dtype 'float16'"):
        policy.judge("unet", "float16", m)
    with pytest.raises(PolicyError, match="no bound on any metric of ImageMetrics"):
        img = np.zeros((16, 16))
        policy.judge("unet", "float32", image_metrics(img, img))
    with pytest.raises(PolicyError, match="use policy.tolerances"):
        policy.judge("unet", "float32", compare(np.ones(3), np.ones(3), rtol=1.3e-6, atol=1e-5))


def test_tensor_and_stage_results_take_the_worst(policy):
    t_pass = policy.tensor_result("unet", "float32", "eps", _metrics(policy), step=0)
    t_warn = policy.tensor_result("unet", "float32", "eps", _metrics(policy, rel_l2=2e-6), step=1)
    stage = policy.stage_result("unet", "float32", [t_pass, t_warn])
    assert stage.verdict == Verdict.WARN and stage.first_failure is None
    assert stage.limits["rel_l2"] == {"warn": 1e-6, "fail": 1e-5}
    assert stage.per_step == {"eps.rel_l2": [0.0, 2e-6]}


def test_parse_policy_from_dict():
    p = parse_policy({"schema_version": 1, "name": "d",
                      "stage": {"decode": {"float16": {"rel_l2": 0.05}}}})
    assert p.limits("decode", "float16") == {"rel_l2": {"warn": 0.05, "fail": 0.05}}


def test_device_tables_apply_to_their_device_and_to_cross_device_goldens():
    from parity.policy import parse_policy_text

    text = """schema_version = 1
name = "devices"
[stage.unet.float16]
rel_l2 = { warn = 5e-3, fail = 5e-2 }
cosine_min = 0.99
[stage.unet.float16.device.ascend]
rel_l2 = { warn = 1e-2, fail = 8e-2 }
[stage.unet.float16.device.cross]
rel_l2 = { warn = 2e-2, fail = 1e-1 }
"""
    p = parse_policy_text(text, "t")
    fail = lambda q: q.limits("unet", "float16")["rel_l2"]["fail"]  # noqa: E731
    assert fail(p) == 5e-2
    assert fail(p.for_devices("cpu", "cpu")) == 5e-2
    assert fail(p.for_devices("ascend", "ascend")) == 8e-2
    assert fail(p.for_devices("ascend", "cuda")) == 1e-1  # cross-device wins over the device
    assert p.for_devices("ascend", "ascend").limits("unet", "float16")["cosine_min"]["fail"] == 0.99
    with pytest.raises(PolicyError, match="unknown device 'tpu'"):
        parse_policy_text(text.replace("device.cross", "device.tpu"), "t")


def test_module_truth_bounds_by_kind_with_their_floor():
    from parity.policy import parse_policy_text

    text = """schema_version = 1
name = "modules"
[stage.unet.float16]
rel_l2 = 5e-2
[module_truth.float16]
truth_floor = 1e-6
default = 2.0
GroupNorm = 1.25
"""
    p = parse_policy_text(text, "t")
    assert p.module_truth_bound("GroupNorm", "float16") == (1.25, 1e-6)
    assert p.module_truth_bound("Conv2d", "float16") == (2.0, 1e-6)
    assert p.module_truth_bound("GroupNorm", "float32") is None  # not judged without a table
    with pytest.raises(PolicyError, match=r"module_truth: unknown dtype 'float8'"):
        parse_policy_text(text.replace("module_truth.float16", "module_truth.float8"), "t")
    with pytest.raises(PolicyError, match=r"module_truth.float16.GroupNorm must be > 0"):
        parse_policy_text(text.replace("GroupNorm = 1.25", "GroupNorm = 0"), "t")
    shipped = load_policy()
    assert shipped.module_truth_bound("GroupNorm", "float16")[0] < \
        shipped.module_truth_bound("Linear", "float16")[0]
