"""How a port module lays out what the reference module lays out, learned from the free run.

Ports keep activations in layouts of their own: row-major tokens (B*L, C) where diffusers has
(B, L, C), channels-first maps where diffusers' VAE attention has (B, HW, C), a GEGLU output
transposed, a text encoder run one prompt at a time where the reference ran the batch, or the
batch in the other order (negative first). Rather
than a table of conventions per port class, each port module's own arguments and output in its
free run are matched with the reference module's recorded ones: both are viewed as token
matrices (N, C) in the few ways a layout can differ, and the view pair that brings the port's
tensor closest to the reference's is the layout. In the free run the port's tensors are close to
the reference's (the error that has accumulated is small next to the O(1) distance of a wrong
layout), so the values settle what the shapes leave open.

A `Layout` turns a reference tensor into the port's layout (inputs) or a port tensor into the
reference's (outputs); `match` finds it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .metrics import rel_l2

# ways to read a tensor as a token matrix (N, C)
VIEWS = ("rows", "channels_first", "transposed")
# a match this far off is no match: a wrong layout is ~1.4 away (uncorrelated values)
FAR = 0.5
# the batch in the other order is taken only this close, and twice as close as in order
CLEAR = 0.05


def _as_tokens(a: np.ndarray, view: str) -> Optional[np.ndarray]:
    """`a` as (N, C) under `view`, or None where the view does not apply."""
    if view == "rows":  # a vector or a scalar (a timestep) as a column
        return a.reshape(-1, a.shape[-1]) if a.ndim >= 2 else a.reshape(-1, 1)
    if view == "channels_first":
        if a.ndim < 3:
            return None
        return np.moveaxis(a, 1, -1).reshape(-1, a.shape[1])
    if view == "transposed":
        return a.T if a.ndim == 2 else None
    raise ValueError(view)


def _from_tokens(m: np.ndarray, view: str, shape: Tuple[int, ...]) -> np.ndarray:
    """The inverse of `_as_tokens`: the (N, C) matrix `m` laid out as `shape` under `view`."""
    if view == "rows":
        return m.reshape(shape)
    if view == "channels_first":
        moved = (shape[0],) + tuple(shape[2:]) + (shape[1],)
        return np.moveaxis(m.reshape(moved), -1, 1)
    return m.T.reshape(shape)


@dataclass(frozen=True)
class Layout:
    """Reference tensor `source` (a recorded name: x, context, temb, out) read as tokens under
    `ref_view`, its first `rows` rows along axis 0 (a port that runs part of the batch), laid
    out as the port's `port_view` of `port_shape`."""

    source: str
    ref_view: str
    port_view: str
    port_shape: Tuple[int, ...]
    rows: Optional[int] = None
    reversed: bool = False  # the port runs the batch in the other order (uncond first)

    def to_port(self, ref: np.ndarray) -> np.ndarray:
        """A reference tensor in the port's layout."""
        ref = np.asarray(ref)
        ref = ref[::-1] if self.reversed else ref
        ref = ref if self.rows is None else ref[:self.rows]
        return _from_tokens(_as_tokens(ref, self.ref_view), self.port_view, self.port_shape)

    def to_reference(self, port: np.ndarray, ref_shape: Tuple[int, ...]) -> np.ndarray:
        """A port tensor (of `port_shape`) in the reference's layout (`ref_shape`, cut to `rows`
        where the port ran part of the batch)."""
        shape = ref_shape if self.rows is None else (self.rows,) + tuple(ref_shape[1:])
        out = _from_tokens(_as_tokens(np.asarray(port), self.port_view), self.ref_view, shape)
        return np.ascontiguousarray(out[::-1]) if self.reversed else out

    def to_dict(self) -> Dict:
        return {"source": self.source, "ref_view": self.ref_view, "port_view": self.port_view,
                "port_shape": list(self.port_shape), "rows": self.rows,
                "reversed": self.reversed}


def _candidates(ref: np.ndarray, port_shape: Tuple[int, ...]):
    """(ref_view, port_view, rows) under which `ref` can be laid out as `port_shape`."""
    cut = [None]
    if ref.ndim >= 1 and len(port_shape) == ref.ndim and 0 < port_shape[0] < ref.shape[0]:
        cut.append(port_shape[0])  # the port ran the first rows of the batch
    elif port_shape == () and ref.ndim >= 1 and ref.shape[0] > 1:
        cut.append(1)  # one value where the reference has one per row (a timestep)
    probe = np.empty(port_shape, np.float32)
    for rows in cut:
        shape = ref.shape if rows is None else (rows,) + ref.shape[1:]
        for rv in VIEWS:
            r = _as_tokens(np.empty(shape, np.float32), rv)
            if r is None:
                continue
            for pv in VIEWS:
                p = _as_tokens(probe, pv)
                if p is not None and p.shape == r.shape:
                    yield rv, pv, rows


def match(recorded: Dict[str, np.ndarray], port: np.ndarray, sources: Sequence[str],
          kind: str = "", reversed_batch: bool = False) -> Optional[Tuple[Layout, float]]:
    """The layout under which one of the reference's `sources` tensors is closest to the port's
    tensor `port` (an argument or output from the free run), and that distance (rel L2); None
    when no source can take the port's shape. Plain layouts (the same view on both sides) win
    ties; when every layout is far, the one that reads both tensors as the operation of
    `kind` does (`_natural_view`) wins, in the batch order the port was seen to use
    (`reversed_batch`)."""
    port = np.asarray(port, np.float32)
    found = []
    for source in sources:
        ref = recorded.get(source)
        if ref is None:
            continue
        orders = (False, True) if ref.ndim >= 1 and ref.shape[0] > 1 else (False,)
        for rv, pv, rows in _candidates(ref, port.shape):
            for reverse in orders:
                layout = Layout(source, rv, pv, tuple(port.shape), rows, reverse)
                found.append((rel_l2(layout.to_port(ref), port), layout))
    if not found:
        return None
    closest = min(found, key=lambda f: f[0])
    if closest[1].reversed:  # the other batch order only on clear evidence
        in_order = [f for f in found if not f[1].reversed]
        if in_order:
            straight = min(in_order, key=lambda f: f[0])
            if not (closest[0] <= CLEAR and straight[0] > 2 * closest[0]):
                closest = straight
    if closest[0] <= FAR:
        same = [f for f in found if f[0] == closest[0] and _plain(f[1]) and not f[1].reversed]
        return same[0][::-1] if same else closest[::-1]
    # every layout is far (the port's tensor itself is off): values cannot tell, so the
    # natural reading of both shapes is taken (features last; NCHW maps channels first), else
    # the plain one, the first source's before the others'
    in_order = [f for f in found if f[1].reversed == reversed_batch] or found
    for prefer in (_natural, _plain):
        chosen = [f for f in in_order if prefer(f[1], recorded[f[1].source].shape, kind)]
        if chosen:
            return chosen[0][::-1]
    return closest[::-1]


def _plain(layout: Layout, ref_shape=None, kind: str = "") -> bool:
    return layout.ref_view == layout.port_view and layout.rows is None


# kinds whose operation normalises over axis 1 whatever the rank (torch's and MindSpore's
# GroupNorm take (N, C, *)): a 3-D tensor there is (B, C, L), not tokens
_CHANNEL_AXIS_1 = ("GroupNorm",)


def _natural_view(shape: Tuple[int, ...], kind: str) -> str:
    """How the operation reads a tensor of `shape`: NCHW maps (and GroupNorm's inputs) with
    channels on axis 1, everything else with features last."""
    if len(shape) == 4 or (len(shape) == 3 and kind in _CHANNEL_AXIS_1):
        return "channels_first"
    return "rows"


def _natural(layout: Layout, ref_shape: Tuple[int, ...], kind: str) -> bool:
    return (layout.rows is None and layout.ref_view == _natural_view(ref_shape, kind)
            and layout.port_view == _natural_view(layout.port_shape, kind))
