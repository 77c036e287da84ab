"""Differences that enter between modules (wiring): every module's own error is within bounds,
yet an input or the stage's output is off. Found in the port's free run (`InputWatch`: the first
module whose input is off while everything before it was close) or at the stage's output
(`divergent_output`), and explained by `difference.explain` (a transposition, a wrong tap, a
scale, concatenation order, ...)."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import numpy as np

from .difference import explain
from .metrics import rel_l2
from .module_capture import CaptureReader
from .module_kinds import TOKEN_ID_KINDS
from .module_pairs import ModulePair
from .recording import Recording
from .stage_calls import network_inputs, network_outputs


# a module input this far from the reference's (rel L2), and 100x further than anything that
# returned before it, did not drift there: something between modules changed it
INPUT_OFF = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 2e-1}
INPUT_OFF_OVER_UPSTREAM = 100.0
# a transformation explains an activation when it reproduces it to this (compute noise ~1e-6)
ACTIVATION_TOL = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 5e-2}


class InputWatch:
    """During the free run: the first module whose input is off while everything that returned
    before it was close to the reference (a wiring bug enters there)."""

    def __init__(self, reader: CaptureReader, dtype: str):
        self.reader = reader
        self.off = INPUT_OFF.get(dtype, INPUT_OFF["float32"])
        self.upstream = 0.0  # the largest accumulated error returned so far
        self.first: Optional[Tuple[int, ModulePair, Optional[np.ndarray], float]] = None

    def returned(self, accumulated: float) -> None:
        if not math.isnan(accumulated):
            self.upstream = max(self.upstream, accumulated)

    def started(self, i: int, pair: ModulePair, plan) -> None:
        """Module at capture position `i` starts with arguments read into `plan` (a
        `port_cells.CallPlan`)."""
        if self.first is not None or pair.kind in TOKEN_ID_KINDS:
            return
        try:
            want = self.reader.tensor(i, "x")
        except KeyError:
            return
        if plan.x_layout is None:  # no argument takes the reference's input: another shape
            got, err = None, math.inf
        else:
            got = plan.x_layout.to_reference(plan.x_port, want.shape)
            err = plan.x_error
        if err > max(self.off, INPUT_OFF_OVER_UPSTREAM * self.upstream):
            self.first = (i, pair, got, err)

    def explained(self, dtype: str) -> Optional[Dict]:
        if self.first is None:
            return None
        i, pair, got, err = self.first
        want = self.reader.tensor(i, "x")
        if got is None:
            found = {"kind": "shape", "text": "of another shape than the reference's input"}
        else:
            found = explain(want, got, dtype=dtype, tol=ACTIVATION_TOL.get(dtype, 1e-3),
                            channel_axis=1 if want.ndim == 4 else None,
                            others=lambda a: recorded_output_equal_to(self.reader, a, i,
                                                                      dtype)).to_dict()
        ref = pair.reference.partition("/")[2]
        return {"where": "input", "module": pair.module, "reference_module": pair.reference,
                "rel_l2": err, "explanation": found,
                "text": f"the input of module '{pair.module}' ({ref}) differs from the "
                        f"reference's: {found['text']} (rel_l2 {err:.3g}), while every module "
                        "before it is within bounds"}


def recorded_output_equal_to(reader: CaptureReader, a: np.ndarray, exclude: int,
                              dtype: str) -> Optional[str]:
    """The captured module whose recorded output `a` equals (a wrong tap), or None."""
    tol = ACTIVATION_TOL.get(dtype, 1e-3)
    for j, pair in enumerate(reader.index.pairs):
        if j == exclude:
            continue
        out = reader.tensor(j, "out")
        if out.shape == a.shape and rel_l2(out, a) <= tol:
            ref = pair.reference.partition('/')[2]
            if not pair.module:
                return f"output of the reference's '{ref}' (no port module computes it)"
            return f"output of module '{pair.module}' ({ref})"
    return None


def divergent_output(reader: CaptureReader, rec: Recording, at: Tuple[str, str, int], cells,
                     cfg, outputs) -> Optional[Dict]:
    """Every module and its input within bounds, yet the stage's output off: the difference
    enters after the last module (which layer is tapped, which row pooled). Each output the
    port's free run returned is explained against the reference's, block by block along its
    last axis (the conditioner's crossattn is CLIP-L's hidden state beside bigG's, widths from
    `cfg`); None when no block is explained. `cells`: the port's (`port_cells.PortCells`)."""
    if not isinstance(outputs, dict):
        return None
    dtype = rec.spec.dtype
    tol = ACTIVATION_TOL.get(dtype, 1e-3)
    for name, want in network_outputs(rec, *at).items():
        got = outputs.get(name)
        if got is None:
            continue
        got = np.asarray(got, np.float32).reshape(want.shape)
        err = rel_l2(want, got)
        if err <= tol:
            continue
        parts = []
        eos = _eos_positions(rec, at)
        blocks = [("all", (0, want.shape[-1]))] + [b for b in _blocks(want.shape[-1], cfg)
                                                    if b[0] != "all"]
        for label, (lo, hi) in blocks:
            w, g = want[..., lo:hi], got[..., lo:hi]
            if rel_l2(w, g) <= tol:
                continue
            found = explain(w, g, dtype=dtype, tol=tol,
                            others=lambda a: (recorded_output_equal_to(reader, a, -1, dtype)
                                              or _pooled_row(reader, a, cells, tol, eos)))
            if found.kind == "unexplained":
                continue
            block = "" if (lo, hi) == (0, want.shape[-1]) else f"[..., {lo}:{hi}] ({label})"
            parts.append(f"{name}{block} differs from the reference's: {found.text}")
            if label == "all":  # the whole output explained: no need to look block by block
                break
        if not parts:  # nothing explained: the runner's note says what else it knows
            continue
        return {"where": "output", "output": name, "rel_l2": err,
                "text": f"the stage's {'; '.join(parts)} (rel_l2 "
                        f"{err:.3g}), while every module and its input are within bounds"}
    return None


def _eos_positions(rec: Recording, at: Tuple[str, str, int]) -> Optional[List[int]]:
    """Where bigG pools in the conditioner's ids: the first largest id (EOS) of each row."""
    if at[0] != "conditioner":
        return None
    return [int(np.argmax(row)) for row in network_inputs(rec, *at)["input_ids_2"]]


def _pooled_row(reader: CaptureReader, pooled: np.ndarray, cells, tol: float,
                eos: Optional[List[int]]) -> Optional[str]:
    """SDXL's pooled text embedding is bigG's final hidden state at the EOS token times
    `text_projection` (a bare parameter, no module): the position whose projected row the
    port's pooled output holds, when it is not the EOS token's."""
    final = next((j for j, pair in enumerate(reader.index.pairs)
                  if pair.reference == "text_encoder_2/text_model.final_layer_norm"
                  and pair.module), None)
    projection = next((prm for name, prm in cells.parameters("conditioner")
                       if name.endswith("embedders.1.model.text_projection")), None)
    if final is None or projection is None or pooled.ndim != 2:
        return None
    hidden = reader.tensor(final, "out").astype(np.float64)  # (B, L, W)
    rows = hidden @ projection.asnumpy().astype(np.float64)  # (B, L, D): every position pooled
    if rows.shape[0] != pooled.shape[0] or rows.shape[2] != pooled.shape[1]:
        return None
    found = []
    for b in range(pooled.shape[0]):
        distance = [rel_l2(rows[b, q], pooled[b]) for q in range(rows.shape[1])]
        q = int(np.argmin(distance))
        if distance[q] > tol:
            return None
        found.append(q)
    if eos is None or found == list(eos):  # the right rows: the projection itself differs
        return None
    return (f"final hidden state of bigG at position(s) {sorted(set(found))}, projected (the "
            "pooled row taken there, not at the EOS token)")


def _blocks(width: int, cfg):
    """(label, (lo, hi)) blocks of the conditioner's crossattn: each text encoder's width
    (one block, "all", for other outputs)."""
    cond = getattr(cfg, "conditioner", None)
    widths = [("CLIP-L", getattr(getattr(cond, "clip_l", None), "width", None)),
              ("OpenCLIP-bigG", getattr(getattr(cond, "clip_g", None), "width", None))]
    if all(w for _, w in widths) and sum(w for _, w in widths) == width:
        lo = 0
        for label, w in widths:
            yield label, (lo, lo + w)
            lo += w
    else:
        yield "all", (0, width)


