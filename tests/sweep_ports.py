"""Ports for the sweep tests, named in sweep files as `port = "<this file>:FACTORY"`.

A sweep loads its port in worker processes (spawned, or Ray's), so these factories read what
they need from the environment, never from the test's memory.
"""
from __future__ import annotations

import importlib.util
import os
import signal
from pathlib import Path

import numpy as np

KILL_MARKER = "SDXL_PARITY_TEST_KILL_MARKER"

_spec = importlib.util.spec_from_file_location("sweep_test_adapters",
                                               Path(__file__).resolve().parent / "adapters.py")
adapters = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(adapters)


class BrokenAncestralPort(adapters.OwnLoopPort):
    """Its own Euler loop (`tests/adapters.py`), with a bug only in the ancestral sampler:
    every euler_a step goes half the way. Euler cases pass; euler_a cases fail."""

    sampler = None

    def sample(self, run, eps, callback):
        self.sampler = run.sampler
        return super().sample(run, eps, callback)

    def step(self, x, derivative, dt):
        if self.sampler == "euler_a":
            dt = dt / 2
        return x + derivative * np.float32(dt)


def broken_ancestral(checkpoint, dtype):
    return BrokenAncestralPort(checkpoint, dtype)


def killed_once(checkpoint, dtype):
    """The built-in port, except that the first call anywhere (the file named by
    $SDXL_PARITY_TEST_KILL_MARKER does not exist yet) creates that file and SIGKILLs its own
    worker process, as an out-of-memory kill would."""
    marker = os.environ.get(KILL_MARKER)
    if marker:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass
        else:
            os.write(fd, f"{os.getpid()}\n".encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)
    from sdxl_ms import load_pipeline

    return load_pipeline(checkpoint, dtype=dtype)


def killed_always(checkpoint, dtype):
    """A port whose every load kills its worker: the case must end as an error, not hang."""
    os.kill(os.getpid(), signal.SIGKILL)
