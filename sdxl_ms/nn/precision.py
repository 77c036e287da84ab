"""Precision as a load-time property, as diffusers and tinygrad treat it: networks are built in
float32 and `cast` sets the dtype they hold and compute in.

Cast before the weights are assigned: an unallocated parameter then only changes its metadata,
and the loader converts each checkpoint tensor once, straight to that dtype (`set_weights`).
"""
from __future__ import annotations

from mindspore import nn

from .module import Network


def cast(cell: nn.Cell, dtype) -> nn.Cell:
    """Every parameter of `cell` in `dtype`, and `dtype` as each of its networks' `dtype`, the
    dtype a network casts its inputs to (set here once, not looked up per call). Returns `cell`.

    No parameter is kept in float32: what the port keeps in float32 it keeps at compute time
    (norm statistics, softmax, the sinusoidal embeddings), on the cast weights, as the
    reference does, and a float16 pipeline decodes with a float32 copy of its VAE
    (`SDXLPipeline.decoding_vae`)."""
    for param in cell.get_parameters():
        if param.dtype != dtype:
            param.set_dtype(dtype)  # converts allocated data; only retypes an unallocated one
    for _, sub in cell.cells_and_names():
        if isinstance(sub, Network):
            sub.dtype = dtype
    return cell
