"""MindSpore's runtime as the harness reports and keys it, whichever port runs on it: the
device the policy tables are chosen by, and the versions and execution mode a report records."""
from __future__ import annotations

import platform
from typing import Dict


def port_device() -> str:
    """The port's device as policies key it: cpu, cuda or ascend (MindSpore says "gpu")."""
    import mindspore as ms

    target = str(ms.get_context("device_target")).lower()
    return {"gpu": "cuda"}.get(target, target)


def versions() -> Dict[str, str]:
    """The framework versions the port ran with."""
    import mindspore
    import numpy

    return {"mindspore": mindspore.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def execution() -> Dict[str, str]:
    """MindSpore's device target and global mode; a port's own `describe()` adds its own
    (the built-in port: which parts it compiles, kernel threads)."""
    import mindspore as ms

    mode = ms.get_context("mode")
    return {"device_target": str(ms.get_context("device_target")),
            "mode": "graph" if mode == ms.GRAPH_MODE else "pynative"}
