"""What transformation turns one array into another: the classifier behind `diff-weights` and
the explanation of a wiring bug's first divergent input.

Porting bugs that live in the weight conversion or between modules rarely produce noise: they
produce the reference's own numbers, moved. A Linear stored untransposed, a conv kernel
flipped, q/k/v rows in another order, a concatenation in the other order, GroupNorm
gamma/beta swapped, a latent multiplied instead of divided by the VAE scale, the output of
another layer taken. `explain(ref, port)` tries these cheapest first and names the first that
reproduces `port` from `ref` within `tol` (relative L2); only when none does is the
difference "unexplained", with its size.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

import numpy as np

from .metrics import rel_l2

# unit roundoff of each dtype: a tensor equal to the reference up to a cast into `dtype`
# differs by at most this, relatively, element by element (so its rel_l2 is at most this)
ROUNDING = {"float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
# scalars a port applies by mistake, named when a scale factor matches one of them
VAE_SCALE = 0.13025
KNOWN_FACTORS = {VAE_SCALE: "the VAE scale 0.13025", 1 / VAE_SCALE: "1 / 0.13025",
                 VAE_SCALE ** 2: "0.13025^2", 1 / VAE_SCALE ** 2: "1 / 0.13025^2",
                 0.18215: "SD 1.x's VAE scale 0.18215", 0.13025 / 0.18215: "0.13025 / 0.18215",
                 0.18215 / 0.13025: "0.18215 / 0.13025", -1.0: "-1 (sign flipped)"}


@dataclass(frozen=True)
class Explanation:
    """`kind` is machine-readable (equal, rounding, transposed, flipped, rotated, permuted,
    rolled, reversed, scaled, swapped, equals_other, fresh_init, shape, unexplained); `text`
    completes "the port's tensor is ..."; `rel_l2` is the plain difference's size."""

    kind: str
    text: str
    rel_l2: float
    detail: Dict = field(default_factory=dict)

    @property
    def equal(self) -> bool:
        return self.kind in ("equal", "rounding")

    def to_dict(self) -> Dict:
        return {"kind": self.kind, "text": self.text, "rel_l2": self.rel_l2, **self.detail}


def explain(ref, port, *, dtype: str = "float32", tol: Optional[float] = None,
            siblings: Optional[Dict[str, np.ndarray]] = None,
            others: Optional[Callable[[np.ndarray], Optional[str]]] = None,
            channel_axis: Optional[int] = None) -> Explanation:
    """Explain `port` as a transformation of `ref`.

    `dtype`: the precision the port holds (a cast into it is "equal up to rounding"); `tol`:
    the rel_l2 within which a transformation counts as reproducing `port` (default: the
    dtype's rounding, for weights; pass ~1e-3 for activations, which carry compute noise);
    `siblings`: other tensors of the same module (name -> array) a swap may have taken;
    `others(port)`: the name of another tensor of the set equal to `port`, or None;
    `channel_axis`: the axis along which activations concatenate (1 for NCHW), tried first for
    block orders."""
    if np.shape(ref) == np.shape(port) and np.array_equal(ref, port):  # the common case,
        return Explanation("equal", "equal", 0.0)  # before any float64 copy of a large tensor
    ref = np.asarray(ref, np.float64)
    port = np.asarray(port, np.float64)
    rounding = ROUNDING.get(dtype, ROUNDING["float32"])
    tol = max(rounding, 1e-7) if tol is None else tol
    size = rel_l2(ref, port) if ref.shape == port.shape else math.inf
    if ref.shape == port.shape and size <= max(rounding, 1e-7) and np.all(np.isfinite(port)):
        return Explanation("rounding", f"equal up to {dtype} rounding", size)
    for kind, text, candidate, detail in _candidates(ref, port, channel_axis):
        if candidate.shape == port.shape and rel_l2(candidate, port) <= tol:
            return Explanation(kind, text, size, detail)
    if ref.shape == port.shape:
        scaled = _scale(ref, port, tol)
        if scaled is not None:
            return Explanation("scaled", *scaled[:1], size, scaled[1])
    for name, sibling in (siblings or {}).items():
        sibling = np.asarray(sibling, np.float64)
        if sibling.shape == port.shape and rel_l2(sibling, port) <= tol:
            return Explanation("swapped", f"the reference's {name} (swapped with it)", size,
                               {"with": name})
    if others is not None:
        found = others(port)
        if found is not None:
            return Explanation("equals_other", f"equal to the reference's {found}", size,
                               {"equals": found})
    fresh = fresh_init(port, ref)
    if fresh is not None:
        return Explanation("fresh_init", fresh, size)
    if ref.shape != port.shape:
        return Explanation("shape", f"of shape {port.shape}, not the reference's {ref.shape}",
                           size)
    return Explanation("unexplained", "different, no simple transformation of the reference",
                       size)


def _candidates(ref: np.ndarray, port: np.ndarray, channel_axis: Optional[int]
                ) -> Iterator[Tuple[str, str, np.ndarray, Dict]]:
    """(kind, text, transformed reference, detail), cheapest first."""
    if ref.ndim == 2:
        yield "transposed", "transposed", ref.T, {}
    if ref.ndim == 4:  # conv kernels (out, in, kh, kw)
        yield "rotated", "its kernel rotated by 180 degrees", ref[:, :, ::-1, ::-1], {}
        yield "flipped", "its kernel flipped vertically", ref[:, :, ::-1, :], {}
        yield "flipped", "its kernel flipped horizontally", ref[:, :, :, ::-1], {}
        yield "transposed", "its kernel transposed (kh and kw swapped)", ref.swapaxes(2, 3), {}
        yield "transposed", "in and out channels swapped", ref.swapaxes(0, 1), {}
    if ref.ndim >= 2 and ref.shape[-1] == ref.shape[-2] and ref.ndim > 2:
        yield "transposed", "transposed in its last two axes", ref.swapaxes(-1, -2), {}
    if ref.ndim >= 2 and ref.shape[-1] != ref.shape[-2]:
        yield ("transposed", "transposed in its last two axes and reshaped back to its shape "
                             "(a reshape where a transpose was meant)",
               np.ascontiguousarray(ref.swapaxes(-1, -2)).reshape(ref.shape), {})
    if ref.ndim >= 2 and ref.shape != port.shape and ref.shape[::-1] == port.shape:
        yield "transposed", "transposed", ref.T, {}
    if ref.shape != port.shape:
        return
    axes = list(range(ref.ndim))
    if channel_axis is not None and channel_axis in axes:
        axes.remove(channel_axis)
        axes.insert(0, channel_axis)
    for axis in axes:
        if ref.shape[axis] > 1:
            yield ("reversed", f"reversed along axis {axis}", np.flip(ref, axis),
                   {"axis": axis})
    for axis in axes:
        shift = _roll(ref, port, axis)
        if shift:  # a concatenation in the other order, blocks of any sizes
            n = ref.shape[axis]
            text = (f"its two halves along axis {axis} swapped" if 2 * shift == n else
                    f"its first {shift} and last {n - shift} entries along axis {axis} swapped "
                    "(concatenated in the other order)")
            yield "rolled", text, np.roll(ref, -shift, axis), {"axis": axis, "split": shift}
        for parts in (2, 3, 4):
            n = ref.shape[axis]
            if n % parts or n == parts:
                continue
            blocks = np.split(ref, parts, axis=axis)
            for order in itertools.permutations(range(parts)):
                if order == tuple(range(parts)):
                    continue
                text = (f"its {parts} equal blocks along axis {axis} in the order "
                        f"{tuple(i + 1 for i in order)}")
                if parts == 2:
                    text = f"its two halves along axis {axis} swapped"
                yield ("permuted", text, np.concatenate([blocks[i] for i in order], axis),
                       {"axis": axis, "order": list(order)})


def _roll(ref: np.ndarray, port: np.ndarray, axis: int) -> int:
    """The shift k for which `port` may be `ref` with its first k entries along `axis` moved
    to the end (a concatenation in the other order, blocks of any sizes), or 0."""
    n = ref.shape[axis]
    if n < 2:
        return 0
    first = np.take(port, 0, axis=axis).ravel()
    rows = np.moveaxis(ref, axis, 0).reshape(n, -1)
    distance = np.linalg.norm(rows - first, axis=1)
    k = int(np.argmin(distance))
    return k if 0 < k and distance[k] <= 1e-3 * (np.linalg.norm(first) + 1e-30) else 0


def _scale(ref: np.ndarray, port: np.ndarray, tol: float) -> Optional[Tuple[str, Dict]]:
    """`port` = s * ref for a scalar s != 1: its text and {"factor": s}."""
    denom = float(np.vdot(ref, ref))
    if denom == 0:
        return None
    s = float(np.vdot(ref, port)) / denom
    if not math.isfinite(s) or s == 0 or abs(s - 1) < 1e-6 or rel_l2(s * ref, port) > tol:
        return None
    name = next((label for f, label in KNOWN_FACTORS.items() if abs(s / f - 1) < 1e-3), None)
    return (f"scaled by {s:.6g}" + (f" ({name})" if name else ""), {"factor": s})


def fresh_init(port: np.ndarray, ref: Optional[np.ndarray] = None) -> Optional[str]:
    """A tensor that looks left at an initialiser: constant (zeros, ones) where the reference
    is not. None when it does not."""
    port = np.asarray(port)
    if port.size < 2 or not np.all(np.isfinite(port)):
        return None
    if np.all(port == port.flat[0]) and (ref is None or not np.all(ref == ref.flat[0])):
        value = float(port.flat[0])
        what = {0.0: "all zeros", 1.0: "all ones"}.get(value, f"constant {value:g}")
        return f"{what}: the statistics of a fresh init, not of trained weights"
    return None


def content_key(a: np.ndarray) -> Tuple:
    """A key under which two tensors holding the same numbers meet (shape and float32 bytes)."""
    a = np.ascontiguousarray(np.asarray(a, np.float32))
    return a.shape, hash(a.tobytes())


class ContentIndex:
    """name <- content key of the reference's tensors, for "equal to another tensor"."""

    def __init__(self):
        self._names: Dict[Tuple, str] = {}

    def add(self, name: str, a: np.ndarray) -> None:
        self._names.setdefault(content_key(a), name)

    def lookup(self, key: Tuple, exclude: str) -> Optional[str]:
        """The reference tensor holding the numbers under `key` (`content_key`), other than
        `exclude` (the tensor's own name)."""
        found = self._names.get(key)
        return found if found != exclude else None


def first_match(items: Iterable[Tuple[str, np.ndarray]], port: np.ndarray,
                tol: float) -> Optional[str]:
    """The name of the first array of `items` that `port` equals within `tol` (rel_l2)."""
    port = np.asarray(port, np.float64)
    for name, a in items:
        if np.shape(a) == port.shape and rel_l2(a, port) <= tol:
            return name
    return None
