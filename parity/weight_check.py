"""Which of the port's weights differ from the weights the golden was recorded on.

Localisation names a module whose own computation is off; a tensor that no paired module owns
(bigG's `text_projection` and `positional_embedding` sit on the text model itself) leaves no
such module when the port's converter got it wrong. Comparing the port's parameters, as it
holds them, with the golden's weights read through the key maps names that tensor directly.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import numpy as np

from .metrics import rel_l2

# a tensor equal up to the cast the port's dtype makes has rel_l2 0; anything above this is a
# different tensor, not rounding (float32 holds every stored value exactly)
DIFFERS_ABOVE = 1e-6


def differing_weights(cells, golden_weights: Path) -> List[Tuple[str, float]]:
    """(sgm name, rel_l2 of the port's tensor against the golden's) for every port parameter
    that differs, in the port's parameter order; `cells` is the port's
    (`port_cells.PortCells`)."""
    from sdxl_ms.weights.checkpoint import open_checkpoint
    from sdxl_ms.weights.loader import sgm_tensors
    from sdxl_ms.weights.mindspore_ckpt import canonical_name

    from .module_pairs import layout_config

    port = {canonical_name(n): p for stage in ("conditioner", "unet", "decode")
            for n, p in cells.parameters(stage)}
    found = []
    for name, want in sgm_tensors(open_checkpoint(Path(golden_weights)),
                                  layout_config(golden_weights), port):
        held = port.get(name)
        if held is None:
            continue
        got = held.asnumpy()
        if got.shape != want.shape:
            found.append((name, float("inf")))
            continue
        want = np.asarray(want).astype(got.dtype)  # what a faithful load into this dtype holds
        diff = rel_l2(want.astype(np.float32), got.astype(np.float32))
        if not diff <= DIFFERS_ABOVE:
            found.append((name, diff))
    order = {name: i for i, name in enumerate(port)}
    return sorted(found, key=lambda item: order[item[0]])
