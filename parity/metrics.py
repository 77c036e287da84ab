"""Error metrics between a reference tensor (diffusers/torch) and the port's tensor (MindSpore).

Everything is computed in float64 on numpy arrays, so the metric itself adds no rounding that
could hide a 1e-7 difference. Three kinds of comparison, each returning a frozen dataclass with
`values()` (the numbers a `parity.policy.Policy` judges), `to_dict()` and `kind`:

* `compare(ref, port, rtol=, atol=)` -> `TensorMetrics` for float tensors (embeddings, eps,
  latents, decoded images).
* `compare_exact(ref, port)` -> `ExactMetrics` for integer tensors (token ids): only bitwise
  equality counts.
* `image_metrics(ref, port)` -> `ImageMetrics` for 0-255 images: PSNR (peak 255), SSIM, and
  |diff| in 0-255 units.

Definitions (d = port - ref, over the elements where both sides are finite):

* `max_abs`, `mean_abs`: max and mean of |d|.
* `rel_l2`: ||d|| / ||ref|| (the "relative Frobenius error" of mindone); 0 when both norms are
  0, inf when only ||ref|| is 0.
* `cosine`: <ref, port> / (||ref|| ||port||), clipped to [-1, 1]; 1 when both are all-zero,
  0 when exactly one is.
* `psnr_db`: 20 log10(peak / RMSE(d)) with peak = max|ref| (Apple ml-stable-diffusion); inf
  when identical, -inf when ref is all-zero and port is not.
* `max_rel`: max of the guarded relative error |d| / max(|ref|, floor), with
  floor = `REL_FLOOR_FRACTION` (1e-3) * max|ref| (or the smallest positive float64 when ref is
  all-zero). Plain |d|/|ref| explodes on the many near-zero elements of activations; the floor
  makes an element near zero count by its error relative to the tensor's scale instead.
* `ratio_rel_err_le_1e3` / `ratio_rel_err_le_5e3`: share of elements whose guarded relative error
  is <= 1e-3 / 5e-3 (higher is better). These are msprobe's "One Thousandth Err Ratio" and
  "Five Thousandths Err Ratio", which msprobe defines as the share of elements *within* the
  bound; the only difference is our guarded denominator (msprobe adds the dtype's eps to |ref|).
* `mismatch_ratio` / `mismatches`: elements failing torch.testing's closeness test
  |d| <= atol + rtol * |ref| (over all elements: a NaN, or an inf on one side only, is a
  mismatch; equal infinities match), like assert_close's "Mismatched elements: k / n".
* `nonfinite_port`, `nonfinite_ref`: NaN/Inf counts. The policy fails any comparison with a
  non-finite value, so computing the other metrics on the finite elements hides nothing.

`TensorMetrics.msprobe()` gives the msprobe column names (`Cosine`, `MaxAbsErr`,
`MaxRelativeErr`, `One Thousandth Err Ratio`, `Five Thousandths Err Ratio`) for CSV export.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Dict, Optional, Tuple

import numpy as np

REL_FLOOR_FRACTION = 1e-3

# Direction of every judged metric: "max" = smaller is better (policy key is the metric name),
# "min" = larger is better (policy key is the metric name + "_min").
METRIC_DIRECTIONS: Dict[str, str] = {
    "max_abs": "max",
    "mean_abs": "max",
    "max_rel": "max",
    "rel_l2": "max",
    "mismatch_ratio": "max",
    "mismatches": "max",
    "mean_abs_255": "max",
    "max_abs_255": "max",
    "cosine": "min",
    "psnr_db": "min",
    "ssim": "min",
    "ratio_rel_err_le_1e3": "min",
    "ratio_rel_err_le_5e3": "min",
    "truth_ratio": "max",
}

MSPROBE_COLUMNS = ("Cosine", "MaxAbsErr", "MaxRelativeErr", "One Thousandth Err Ratio",
                   "Five Thousandths Err Ratio")


def _to_numpy(x: Any) -> np.ndarray:
    """numpy view of a numpy array, MindSpore tensor (`asnumpy`) or CPU torch tensor."""
    if hasattr(x, "asnumpy"):
        return x.asnumpy()
    if hasattr(x, "detach"):  # torch, without importing it; numpy has no bfloat16
        x = x.detach().cpu()
        if "bfloat16" in str(x.dtype):
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _check_shapes(ref: np.ndarray, port: np.ndarray) -> None:
    if ref.shape != port.shape:
        raise ValueError(f"shape mismatch: ref {tuple(ref.shape)} vs port {tuple(port.shape)}")


def encode_float(v: float) -> Any:
    """JSON-safe float: non-finite values become the strings 'inf', '-inf', 'nan'."""
    v = float(v)
    if math.isfinite(v):
        return v
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


def decode_float(v: Any) -> float:
    """Inverse of `encode_float`."""
    return float(v)  # float("inf"), float("nan") parse the strings


class _MetricsBase:
    """Shared (de)serialisation: floats round-trip through JSON, shape becomes a list."""

    kind: ClassVar[str] = ""

    def values(self) -> Dict[str, float]:
        """The judged numbers, keyed by the names of `METRIC_DIRECTIONS`."""
        raise NotImplementedError

    def _with_truth(self, values: Dict[str, float]) -> Dict[str, float]:
        """`values` plus the truth ratio, where the comparison had a float64 truth."""
        ratio = getattr(self, "truth_ratio", None)
        return values if ratio is None else {**values, "truth_ratio": ratio}

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"kind": self.kind}
        for k, v in asdict(self).items():
            if k == "shape":
                out[k] = list(v)
            elif isinstance(v, float):
                out[k] = encode_float(v)
            elif isinstance(v, (list, tuple)):
                out[k] = [encode_float(x) if isinstance(x, float) else x for x in v]
            else:
                out[k] = v
        return out

    @classmethod
    def from_dict(cls, d: Dict[str, Any]):
        kw = {}
        for f in fields(cls):
            if f.name not in d and f.default is None:  # optional fields of newer reports
                continue
            v = d[f.name]
            if v is None:
                pass
            elif f.name == "shape":
                v = tuple(int(s) for s in v)
            elif f.type in ("float", float, "Optional[float]"):
                v = decode_float(v)
            elif f.type in ("int", int):
                v = int(v)
            kw[f.name] = v
        return cls(**kw)


@dataclass(frozen=True)
class TensorMetrics(_MetricsBase):
    """Float tensor comparison; see the module docstring for every definition."""

    kind: ClassVar[str] = "tensor"
    shape: Tuple[int, ...]
    numel: int
    max_abs: float
    mean_abs: float
    max_rel: float
    rel_l2: float
    cosine: float
    psnr_db: float
    mismatch_ratio: float
    mismatches: int
    ratio_rel_err_le_1e3: float
    ratio_rel_err_le_5e3: float
    nonfinite_port: int
    nonfinite_ref: int
    rtol: float
    atol: float
    # against the float64 truth (`record --truth`): the reference's own error, the port's, and
    # port_vs_truth / max(ref_vs_truth, truth_floor); None without a truth
    ref_vs_truth: Optional[float] = None
    port_vs_truth: Optional[float] = None
    truth_ratio: Optional[float] = None

    def values(self) -> Dict[str, float]:
        return self._with_truth({k: getattr(self, k) for k in (
            "max_abs", "mean_abs", "max_rel", "rel_l2", "cosine", "psnr_db", "mismatch_ratio",
            "ratio_rel_err_le_1e3", "ratio_rel_err_le_5e3")})

    def msprobe(self) -> Dict[str, float]:
        """The same numbers under msprobe's compare-result column names."""
        return dict(zip(MSPROBE_COLUMNS, (self.cosine, self.max_abs, self.max_rel,
                                          self.ratio_rel_err_le_1e3, self.ratio_rel_err_le_5e3)))


@dataclass(frozen=True)
class ExactMetrics(_MetricsBase):
    """Bitwise comparison (token ids). `first_mismatch` is the flat index of the first
    differing element, with both values, so a report can say where tokenization diverged."""

    kind: ClassVar[str] = "exact"
    shape: Tuple[int, ...]
    numel: int
    mismatches: int
    mismatch_ratio: float
    first_mismatch: Any  # None or [flat_index, ref_value, port_value]
    nonfinite_port: int = 0
    nonfinite_ref: int = 0

    def values(self) -> Dict[str, float]:
        return {"mismatches": self.mismatches, "mismatch_ratio": self.mismatch_ratio}


@dataclass(frozen=True)
class ImageMetrics(_MetricsBase):
    """0-255 image comparison. `ssim` is the mean over channels of the Gaussian-window SSIM
    (Wang et al. 2004) of each channel; see `ssim`."""

    kind: ClassVar[str] = "image"
    shape: Tuple[int, ...]
    numel: int
    psnr_db: float
    ssim: float
    max_abs_255: float
    mean_abs_255: float
    nonfinite_port: int
    nonfinite_ref: int
    # against the float64 truth's image (unrounded, 0-255 units), as TensorMetrics
    ref_vs_truth: Optional[float] = None
    port_vs_truth: Optional[float] = None
    truth_ratio: Optional[float] = None

    def values(self) -> Dict[str, float]:
        return self._with_truth({"psnr_db": self.psnr_db, "ssim": self.ssim,
                                 "max_abs_255": self.max_abs_255,
                                 "mean_abs_255": self.mean_abs_255})


METRIC_KINDS = {c.kind: c for c in (TensorMetrics, ExactMetrics, ImageMetrics)}


def metrics_from_dict(d: Dict[str, Any]):
    """Rebuild any metrics object from its `to_dict()` output."""
    try:
        cls = METRIC_KINDS[d["kind"]]
    except KeyError:
        raise ValueError(f"unknown metrics kind {d.get('kind')!r}") from None
    return cls.from_dict(d)


def guarded_rel_err(ref: np.ndarray, d: np.ndarray) -> np.ndarray:
    """|d| / max(|ref|, REL_FLOOR_FRACTION * max|ref|): relative error that stays meaningful
    for elements of ref near zero (see module docstring)."""
    aref = np.abs(ref)
    peak = float(aref.max()) if aref.size else 0.0
    floor = REL_FLOOR_FRACTION * peak if peak > 0 else np.finfo(np.float64).tiny
    return np.abs(d) / np.maximum(aref, floor)


def compare(ref: Any, port: Any, *, rtol: float, atol: float, truth: Any = None,
            truth_floor: float = 0.0) -> TensorMetrics:
    """Compare two float tensors of the same shape; `rtol`/`atol` define `mismatch_ratio`
    (torch.testing's defaults are in `parity.policy.TORCH_TOLERANCES`). With `truth` (the
    reference computed in float64 on the same inputs) also each side's rel L2 against it and
    `truth_ratio` = port_vs_truth / max(ref_vs_truth, truth_floor): how much worse than the
    reference's own rounding the port is."""
    ref = _to_numpy(ref).astype(np.float64, copy=False)
    port = _to_numpy(port).astype(np.float64, copy=False)
    _check_shapes(ref, port)
    numel = int(ref.size)

    fin_ref, fin_port = np.isfinite(ref), np.isfinite(port)
    nonfinite_ref = int(numel - fin_ref.sum())
    nonfinite_port = int(numel - fin_port.sum())

    # torch.testing closeness over all elements; equal values (incl. equal infinities) match.
    with np.errstate(invalid="ignore", over="ignore"):
        close = (port == ref) | (np.abs(port - ref) <= atol + rtol * np.abs(ref))
    mismatches = int(numel - close.sum())

    both = fin_ref & fin_port
    r, p = (ref, port) if both.all() else (ref[both], port[both])
    n = int(r.size)
    nan = float("nan")
    if n == 0 and numel > 0:  # nothing finite to compare
        stats = dict(max_abs=nan, mean_abs=nan, max_rel=nan, rel_l2=nan, cosine=nan,
                     psnr_db=nan, ratio_rel_err_le_1e3=nan, ratio_rel_err_le_5e3=nan)
    elif n == 0:  # empty tensors are trivially identical
        stats = dict(max_abs=0.0, mean_abs=0.0, max_rel=0.0, rel_l2=0.0, cosine=1.0,
                     psnr_db=math.inf, ratio_rel_err_le_1e3=1.0, ratio_rel_err_le_5e3=1.0)
    else:
        d = p - r
        ad = np.abs(d)
        rel = guarded_rel_err(r, d)
        norm_d = float(np.linalg.norm(d.ravel()))
        norm_r = float(np.linalg.norm(r.ravel()))
        norm_p = float(np.linalg.norm(p.ravel()))
        relative_l2 = rel_l2(r, p)
        if norm_r == 0.0 and norm_p == 0.0:
            cosine = 1.0
        elif norm_r == 0.0 or norm_p == 0.0:
            cosine = 0.0
        else:
            cosine = float(np.clip(np.dot(r.ravel(), p.ravel()) / (norm_r * norm_p), -1.0, 1.0))
        peak = float(np.abs(r).max())
        rmse = norm_d / math.sqrt(n)
        if rmse == 0.0:
            psnr = math.inf
        elif peak == 0.0:
            psnr = -math.inf
        else:
            psnr = 20.0 * math.log10(peak / rmse)
        stats = dict(max_abs=float(ad.max()), mean_abs=float(ad.mean()), max_rel=float(rel.max()),
                     rel_l2=relative_l2, cosine=cosine, psnr_db=psnr,
                     ratio_rel_err_le_1e3=float((rel <= 1e-3).mean()),
                     ratio_rel_err_le_5e3=float((rel <= 5e-3).mean()))
    if truth is not None:
        t = _to_numpy(truth).astype(np.float64, copy=False)
        _check_shapes(t, ref)
        stats.update(against_truth(ref, port, t, truth_floor))
    return TensorMetrics(
        shape=tuple(int(s) for s in ref.shape), numel=numel,
        mismatch_ratio=(mismatches / numel) if numel else 0.0, mismatches=mismatches,
        nonfinite_port=nonfinite_port, nonfinite_ref=nonfinite_ref,
        rtol=float(rtol), atol=float(atol), **stats)


def rel_l2(ref: Any, other: Any) -> float:
    """||other - ref|| / ||ref|| in float64: the one relative L2 of the harness (stages, modules,
    truths, weights). Against an all-zero `ref` it is 0 when `other` is zero too and inf
    otherwise: a relative error against nothing is unbounded, and any bound then fails, where
    the plain norm of the difference would silently change units."""
    ref = np.asarray(ref, np.float64)
    diff = float(np.linalg.norm((np.asarray(other, np.float64) - ref).ravel()))
    norm = float(np.linalg.norm(ref.ravel()))
    if norm > 0:
        return diff / norm
    return 0.0 if diff == 0 else math.inf


def against_truth(ref: Any, port: Any, truth: Any, floor: float) -> Dict[str, float]:
    """Each side's rel L2 against the float64 truth, and port_vs_truth / max(ref_vs_truth,
    floor): how much further from the exact result the port is than the reference."""
    ref_err, port_err = rel_l2(truth, ref), rel_l2(truth, port)
    denom = max(ref_err, floor)
    ratio = port_err / denom if denom > 0 else (0.0 if port_err == 0 else math.inf)
    return {"ref_vs_truth": ref_err, "port_vs_truth": port_err, "truth_ratio": ratio}


def compare_exact(ref: Any, port: Any) -> ExactMetrics:
    """Bitwise comparison for integer tensors (token ids); any difference is a mismatch."""
    ref, port = _to_numpy(ref), _to_numpy(port)
    _check_shapes(ref, port)
    diff = (ref != port).ravel()
    mismatches = int(diff.sum())
    first = None
    if mismatches:
        i = int(np.argmax(diff))
        first = [i, ref.ravel()[i].item(), port.ravel()[i].item()]
    nonfinite = (lambda a: int(a.size - np.isfinite(a).sum())
                 if np.issubdtype(a.dtype, np.floating) else 0)
    return ExactMetrics(shape=tuple(int(s) for s in ref.shape), numel=int(ref.size),
                        mismatches=mismatches,
                        mismatch_ratio=(mismatches / ref.size) if ref.size else 0.0,
                        first_mismatch=first, nonfinite_port=nonfinite(port),
                        nonfinite_ref=nonfinite(ref))


# --------------------------------------------------------------------------------------------
# Images

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _gaussian_window(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter_valid(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable Gaussian filter over the two leading axes, 'valid' region only (no padding),
    as in Wang et al.'s reference implementation."""
    k = g.size
    h, w = img.shape[0] - k + 1, img.shape[1] - k + 1
    rows = sum(g[i] * img[i:i + h] for i in range(k))
    return sum(g[j] * rows[:, j:j + w] for j in range(k))


def ssim(ref: Any, port: Any, data_range: float = 255.0) -> float:
    """Mean SSIM (Wang, Bovik, Sheikh, Simoncelli 2004) with an 11x11 Gaussian window
    (sigma 1.5), K1 = 0.01, K2 = 0.03, population (co)variances, computed per channel over the
    valid region and averaged over channels (and over images for a batch).

    Accepts HxW, HxWxC or NxHxWxC. Images smaller than 11 pixels use the largest odd window
    that fits. This matches scikit-image's
    `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    channel_axis=-1)`.
    """
    x = _to_numpy(ref).astype(np.float64, copy=False)
    y = _to_numpy(port).astype(np.float64, copy=False)
    _check_shapes(x, y)
    if x.ndim == 2:
        x, y = x[None, :, :, None], y[None, :, :, None]
    elif x.ndim == 3:
        if x.shape[-1] not in (1, 3, 4):
            raise ValueError(f"ssim expects channels-last images (HxWxC, C in 1/3/4), got "
                             f"shape {x.shape}")
        x, y = x[None], y[None]
    elif x.ndim != 4:
        raise ValueError(f"ssim expects HxW, HxWxC or NxHxWxC images, got shape {x.shape}")
    size = min(SSIM_WINDOW, x.shape[1], x.shape[2])
    size -= (size + 1) % 2  # largest odd size that fits
    if size < 1:
        raise ValueError(f"image too small for SSIM: {x.shape}")
    g = _gaussian_window(size, SSIM_SIGMA)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    # Channels and images become trailing axes so one filter pass handles them all.
    a = np.moveaxis(x, 0, -1)  # H, W, C, N
    b = np.moveaxis(y, 0, -1)
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    var_a = _filter_valid(a * a, g) - mu_a * mu_a
    var_b = _filter_valid(b * b, g) - mu_b * mu_b
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    smap = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2))
    return float(smap.mean())


def image_metrics(ref: Any, port: Any, truth: Any = None, truth_floor: float = 0.0
                  ) -> ImageMetrics:
    """Compare two images with values in 0..255 (uint8, or float in 0-255 units); with `truth`
    (the float64 free run's image, unrounded), each side's rel L2 against it and their ratio,
    as `compare` does.

    A [-1, 1] image is rejected (negative values); scale [0, 1] images by 255 first.
    """
    r = _to_numpy(ref).astype(np.float64, copy=False)
    p = _to_numpy(port).astype(np.float64, copy=False)
    _check_shapes(r, p)
    nonfinite_ref = int(r.size - np.isfinite(r).sum())
    nonfinite_port = int(p.size - np.isfinite(p).sum())
    nan = float("nan")
    if nonfinite_ref or nonfinite_port:
        return ImageMetrics(shape=tuple(r.shape), numel=int(r.size), psnr_db=nan, ssim=nan,
                            max_abs_255=nan, mean_abs_255=nan, nonfinite_port=nonfinite_port,
                            nonfinite_ref=nonfinite_ref)
    for name, a in (("ref", r), ("port", p)):
        if a.size and (a.min() < 0.0 or a.max() > 255.0):
            raise ValueError(f"{name} image values must lie in [0, 255], got "
                             f"[{a.min():.4g}, {a.max():.4g}]")
    ad = np.abs(p - r)
    mse = float(np.mean(ad * ad)) if ad.size else 0.0
    psnr = math.inf if mse == 0.0 else 10.0 * math.log10(255.0 ** 2 / mse)
    truths = {}
    if truth is not None:
        t = _to_numpy(truth).astype(np.float64, copy=False)
        _check_shapes(t, r)
        truths = against_truth(r, p, t, truth_floor)
    return ImageMetrics(shape=tuple(int(s) for s in r.shape), numel=int(r.size), psnr_db=psnr,
                        ssim=ssim(r, p), max_abs_255=float(ad.max()) if ad.size else 0.0,
                        mean_abs_255=float(ad.mean()) if ad.size else 0.0,
                        nonfinite_port=0, nonfinite_ref=0, **truths)


def format_value(v: float) -> str:
    """Compact human form of a metric value: 3 significant digits, except values just below 1
    (cosine, SSIM) which get enough decimals to show their distance from 1."""
    v = float(v)
    if not math.isfinite(v):
        return str(v)
    if 0.9 < abs(v) < 1.0:
        digits = max(3, math.ceil(-math.log10(1.0 - abs(v))) + 1)
        return f"{v:.{min(digits, 15)}f}".rstrip("0")
    if v != 0.0 and (abs(v) < 1e-2 or abs(v) >= 1e5):
        return f"{v:.2e}"
    return f"{v:.3g}"


def format_bound(b: float) -> str:
    """A policy bound, as short as the TOML file writes it (6 significant digits)."""
    return format(float(b), ".6g")
