"""A port adapter whose UNet call runs inside `ms.jit`, as graph-mode ports do: the compiled
function reaches the network through this module's globals, which MindSpore's graph compiler
resolves through `sys.modules[__name__]` (so `--port FILE.py:make` must register the file)."""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor

from adapters import NetworksPort  # tests/adapters.py: its folder is importable (--port FILE)

_PIPE = None  # the loaded pipeline, read by the graph below as a module global


@ms.jit
def _unet_graph(x, t, context, vector):
    return _PIPE.model.unet(x, t, context, vector)


class JitUNetPort(NetworksPort):
    """The built-in networks, the UNet called through the compiled function above."""

    version = "jit-unet-adapter 1.0"

    def __init__(self, checkpoint, dtype):
        global _PIPE
        super().__init__(checkpoint, dtype)
        _PIPE = self.pipe

    def unet(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        b = sample.shape[0]
        t = np.broadcast_to(np.asarray(timestep, np.float32).reshape(-1), (b,)).copy()
        vector = self.pipe.model.conditioner.vector(Tensor(np.asarray(text_embeds, np.float32)),
                                                    Tensor(np.asarray(time_ids, np.float32)))
        eps = _unet_graph(Tensor(np.asarray(sample, np.float32)), Tensor(t),
                          Tensor(np.asarray(encoder_hidden_states, np.float32)), vector)
        return eps.astype(ms.float32).asnumpy()


def make(checkpoint, dtype):
    return JitUNetPort(checkpoint, dtype)
