"""The reference computes with the port's thread count, also in the process the harness spawns
for it after MindSpore was imported (which sets OMP_NUM_THREADS=1 for its children)."""
from __future__ import annotations

import importlib
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import pytest

from parity.recording import RunSpec, resolve_checkpoint


def _child_omp_threads() -> str:
    import os

    return os.environ.get("OMP_NUM_THREADS", "")


def test_the_spawned_reference_records_with_the_configured_threads(tmp_path, monkeypatch):
    importlib.import_module("mindspore")  # as in the harness's parent process

    from parity.reference_process import record_isolated

    monkeypatch.setenv("SDXL_MS_THREADS", "2")
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        inherited = pool.submit(_child_omp_threads).result()
    spec = RunSpec(samplers=("euler",), steps=1)
    rec, _ = record_isolated(spec, resolve_checkpoint(spec), tmp_path / "rec", quiet=True)
    # a child inherits MindSpore's one thread; the reference still runs on the two asked for
    assert (inherited, rec.meta["reference"]["threads"]) == ("1", 2)


def test_a_bad_thread_count_is_refused_before_the_reference_loads(tmp_path, monkeypatch):
    from sdxl_common.errors import InputError
    from parity.reference import load_reference

    monkeypatch.setenv("SDXL_MS_THREADS", "two")
    spec = RunSpec(samplers=("euler",), steps=1)
    with pytest.raises(InputError, match="SDXL_MS_THREADS must be a whole number"):
        load_reference(resolve_checkpoint(spec))
