"""parity.metrics against numbers computed by hand (and torch where it has the same notion)."""
import math

import numpy as np
import pytest

from parity.metrics import (MSPROBE_COLUMNS, ExactMetrics, ImageMetrics, TensorMetrics, compare,
                            compare_exact, format_value, image_metrics, metrics_from_dict, ssim)


def test_hand_computed_vector():
    ref = np.array([1.0, 2.0, 2.0])  # ||ref|| = 3
    port = np.array([1.0, 2.0, 3.0])  # d = [0, 0, 1]
    m = compare(ref, port, rtol=0.0, atol=0.5)
    assert m.shape == (3,) and m.numel == 3
    assert m.max_abs == 1.0
    assert m.mean_abs == pytest.approx(1 / 3, rel=1e-15)
    assert m.rel_l2 == pytest.approx(1 / 3, rel=1e-15)
    assert m.cosine == pytest.approx(11 / (3 * math.sqrt(14)), rel=1e-15)
    # peak 2, RMSE sqrt(1/3): 20 log10(2 sqrt 3)
    assert m.psnr_db == pytest.approx(20 * math.log10(2 * math.sqrt(3)), rel=1e-14)
    assert m.psnr_db == pytest.approx(10.7918, abs=1e-4)
    assert m.max_rel == pytest.approx(0.5, rel=1e-15)  # 1 / |2|
    assert m.mismatches == 1 and m.mismatch_ratio == pytest.approx(1 / 3)
    assert m.ratio_rel_err_le_1e3 == pytest.approx(2 / 3)
    assert m.nonfinite_port == 0 and m.nonfinite_ref == 0


def test_identical_and_zero_tensors():
    x = np.linspace(-1, 1, 50).reshape(5, 10)
    m = compare(x, x.copy(), rtol=0, atol=0)
    assert (m.max_abs, m.rel_l2, m.cosine, m.mismatch_ratio) == (0.0, 0.0, 1.0, 0.0)
    assert m.psnr_db == math.inf

    z = np.zeros(4)
    both_zero = compare(z, z, rtol=0, atol=0)
    assert both_zero.rel_l2 == 0.0 and both_zero.cosine == 1.0 and both_zero.psnr_db == math.inf
    ref_zero = compare(z, np.array([0.0, 0.0, 0.0, 1e-3]), rtol=0, atol=0)
    assert ref_zero.rel_l2 == math.inf and ref_zero.cosine == 0.0
    assert ref_zero.psnr_db == -math.inf


def test_guarded_relative_error_floor():
    # |ref| = 0 at the second element: plain |d|/|ref| would be inf. Floor = 1e-3 * 1000 = 1.
    m = compare(np.array([1000.0, 0.0]), np.array([1000.0, 0.5]), rtol=0, atol=0)
    assert m.max_rel == pytest.approx(0.5)
    # Above the floor the denominator is |ref| itself.
    m = compare(np.array([1000.0, 10.0]), np.array([1000.0, 10.04]), rtol=0, atol=0)
    assert m.max_rel == pytest.approx(0.004)
    assert m.ratio_rel_err_le_1e3 == 0.5 and m.ratio_rel_err_le_5e3 == 1.0


def test_float64_accumulation_sees_one_ulp():
    ref = np.ones(1000, dtype=np.float32)
    port = ref.copy()
    port[0] = np.nextafter(np.float32(1), np.float32(2))  # 1 + 2**-23
    m = compare(ref, port, rtol=0, atol=0)
    assert m.max_abs == 2.0 ** -23
    assert m.rel_l2 == pytest.approx(2.0 ** -23 / math.sqrt(1000), rel=1e-12)


def test_nonfinite_counted_and_excluded():
    ref = np.array([1.0, 2.0, np.inf, 4.0])
    port = np.array([1.0, np.nan, np.inf, 4.0])
    m = compare(ref, port, rtol=1e-6, atol=1e-6)
    assert m.nonfinite_port == 2 and m.nonfinite_ref == 1
    assert m.max_abs == 0.0 and m.rel_l2 == 0.0  # over the two elements finite on both sides
    assert m.mismatches == 1  # NaN mismatches; equal infinities match (torch.testing rule)


def test_mismatch_count_matches_torch_isclose():
    import torch
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((8, 64))
    port = ref + rng.standard_normal(ref.shape) * 1e-3
    m = compare(ref, port, rtol=1e-3, atol=1e-4)
    close = torch.isclose(torch.from_numpy(port), torch.from_numpy(ref), rtol=1e-3, atol=1e-4)
    assert m.mismatches == int((~close).sum())
    assert 0 < m.mismatches < ref.size
    cos = torch.nn.functional.cosine_similarity(torch.from_numpy(ref).ravel(),
                                                torch.from_numpy(port).ravel(), dim=0)
    assert m.cosine == pytest.approx(float(cos), abs=1e-14)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"shape mismatch: ref \(2, 3\) vs port \(3, 2\)"):
        compare(np.zeros((2, 3)), np.zeros((3, 2)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="shape mismatch"):
        compare_exact(np.zeros(3, int), np.zeros(4, int))
    with pytest.raises(ValueError, match="shape mismatch"):
        image_metrics(np.zeros((8, 8, 3)), np.zeros((8, 8)))


def test_msprobe_aliases():
    ref = np.array([1.0, 2.0, 2.0])
    m = compare(ref, np.array([1.0, 2.0, 3.0]), rtol=0, atol=0)
    ms = m.msprobe()
    assert tuple(ms) == MSPROBE_COLUMNS == ("Cosine", "MaxAbsErr", "MaxRelativeErr",
                                            "One Thousandth Err Ratio",
                                            "Five Thousandths Err Ratio")
    assert ms["Cosine"] == m.cosine and ms["MaxAbsErr"] == 1.0 and ms["MaxRelativeErr"] == 0.5
    assert ms["One Thousandth Err Ratio"] == pytest.approx(2 / 3)  # share within 1e-3


def test_compare_exact_tokens():
    ids = np.array([[49406, 320, 1929, 49407, 49407]])
    same = compare_exact(ids, ids.copy())
    assert same.mismatches == 0 and same.first_mismatch is None
    other = ids.copy()
    other[0, 3] = 0
    m = compare_exact(ids, other)
    assert (m.mismatches, m.mismatch_ratio) == (1, 0.2)
    assert m.first_mismatch == [3, 49407, 0]


def test_metrics_round_trip():
    t = compare(np.arange(6.0).reshape(2, 3), np.arange(6.0).reshape(2, 3), rtol=1e-5, atol=0)
    e = compare_exact(np.arange(3), np.array([0, 1, 3]))
    i = image_metrics(np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16, 3), np.uint8))
    for m, cls in ((t, TensorMetrics), (e, ExactMetrics), (i, ImageMetrics)):
        d = m.to_dict()
        assert d["kind"] == cls.kind
        back = metrics_from_dict(d)
        assert isinstance(back, cls) and back == m
    assert t.to_dict()["psnr_db"] == "inf"  # strict JSON: no bare Infinity


def _brute_ssim_gray(x, y, size=11, sigma=1.5, L=255.0):
    """Direct window-by-window SSIM with explicit 2-D Gaussian weights."""
    ax = np.arange(size) - (size - 1) / 2
    w = np.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * sigma ** 2))
    w /= w.sum()
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    vals = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            a, b = x[i:i + size, j:j + size], y[i:i + size, j:j + size]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
            cov = (w * (a - ma) * (b - mb)).sum()
            vals.append((2 * ma * mb + c1) * (2 * cov + c2)
                        / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_direct_window_computation():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (15, 17)).astype(np.float64)
    y = np.clip(x + rng.normal(0, 20, x.shape), 0, 255)
    assert ssim(x, y) == pytest.approx(_brute_ssim_gray(x, y), rel=1e-10)
    # RGB: mean of the per-channel values
    xc = rng.integers(0, 256, (13, 13, 3)).astype(np.float64)
    yc = np.clip(xc + rng.normal(0, 30, xc.shape), 0, 255)
    per_channel = [_brute_ssim_gray(xc[..., c], yc[..., c]) for c in range(3)]
    assert ssim(xc, yc) == pytest.approx(np.mean(per_channel), rel=1e-10)


def test_ssim_constant_images_closed_form():
    a, b = 100.0, 120.0
    c1 = (0.01 * 255) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)  # variances 0: contrast term is 1
    assert ssim(np.full((16, 16), a), np.full((16, 16), b)) == pytest.approx(expected, rel=1e-12)


def test_image_metrics_identical_noise_and_offset():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    same = image_metrics(img, img.copy())
    assert same.ssim == 1.0 and same.psnr_db == math.inf
    assert same.max_abs_255 == 0.0 and same.mean_abs_255 == 0.0

    noisy = image_metrics(img, rng.integers(0, 256, img.shape, dtype=np.uint8))
    assert noisy.ssim < 0.1 and noisy.psnr_db < 15

    base = rng.integers(10, 200, (32, 32, 3), dtype=np.uint8)
    off = image_metrics(base, base + 1)  # every pixel off by one level: MSE 1
    assert off.psnr_db == pytest.approx(20 * math.log10(255), rel=1e-12)  # 48.13 dB
    assert off.max_abs_255 == 1.0 and off.mean_abs_255 == 1.0
    assert 0.99 < off.ssim < 1.0


def test_image_metrics_rejects_wrong_range_and_layout():
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        image_metrics(np.full((16, 16), -0.5), np.zeros((16, 16)))
    with pytest.raises(ValueError, match="channels-last"):
        ssim(np.zeros((3, 16, 16)), np.zeros((3, 16, 16)))


def test_image_metrics_nonfinite_reported():
    x = np.zeros((16, 16))
    y = x.copy()
    y[0, 0] = np.nan
    m = image_metrics(x, y)
    assert m.nonfinite_port == 1 and math.isnan(m.psnr_db)


def test_format_value():
    assert format_value(3.1e-3) == "3.10e-03"
    assert format_value(0.9999987) == "0.9999987"
    assert format_value(35.21) == "35.2"
    assert format_value(float("inf")) == "inf"
