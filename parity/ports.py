"""Load the port to check: the built-in one, or any adapter named as `MODULE:FACTORY`.

A factory takes `(checkpoint, dtype)` (a path and "float32"/"float16"/"bfloat16") and returns
an object with the stage contract (`parity.contract.StageContract`; `sample` and `guide`
optional). `MODULE` is an importable module (`my_port.adapter`, searched from the current
folder too) or a Python file (`path/to/adapter.py`).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from sdxl_ms.errors import InputError

from .contract import signature_problems

BUILTIN = "sdxl_ms.pipeline:load_pipeline"


@dataclass(frozen=True)
class PortSpec:
    """Where a port comes from: `module:factory`."""

    module: str
    factory: str

    @classmethod
    def parse(cls, text: str) -> "PortSpec":
        module, sep, factory = str(text).rpartition(":")
        if not sep or not module or not factory.isidentifier():
            raise InputError(f"--port {text!r}: write MODULE:FACTORY (e.g. my_port.adapter:make, "
                             "or path/to/adapter.py:make)")
        return cls(module, factory)

    def __str__(self) -> str:
        return f"{self.module}:{self.factory}"

    def resolve(self) -> Callable[..., Any]:
        module = _import(self.module)
        factory = getattr(module, self.factory, None)
        if not callable(factory):
            raise InputError(f"--port {self}: {self.module} has no callable {self.factory!r}")
        return factory


def _import(name: str):
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise InputError(f"--port: no such file {path}")
        spec = importlib.util.spec_from_file_location(f"sdxl_parity_port_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    added = str(Path.cwd()) not in sys.path
    if added:  # like `python -m`: modules beside the current folder
        sys.path.insert(0, str(Path.cwd()))
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise InputError(f"--port: cannot import {name!r} ({e})") from None
    finally:
        if added:
            sys.path.remove(str(Path.cwd()))


def load_port(spec: PortSpec, checkpoint: Path, dtype: str) -> Any:
    """Build the port from its factory and check it offers the contract's methods."""
    try:
        port = spec.resolve()(checkpoint, dtype)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - the adapter's own failure, named as such
        raise InputError(f"--port {spec}: the factory raised {type(e).__name__}: {e}") from None
    problems = signature_problems(port)
    if problems:
        raise InputError(f"--port {spec}: {type(port).__name__} does not implement the stage "
                         f"contract: {'; '.join(problems)} (see parity/contract.py)")
    return port


def describe(port: Any, spec: Optional[PortSpec]) -> Dict[str, Any]:
    """What the report says about the port that was checked."""
    cls = type(port)
    module = sys.modules.get(cls.__module__)
    version = getattr(port, "version", None) or getattr(module, "__version__", None)
    top = sys.modules.get(cls.__module__.partition(".")[0])
    version = version or getattr(top, "__version__", None)
    return {"spec": str(spec) if spec else "an object passed to parity.runner.check", "class": f"{cls.__module__}.{cls.__qualname__}",
            "version": version, "sampler": "own sample()" if hasattr(port, "sample")
            else "built-in sdxl_ms sampler (the port offers no sample())",
            "guide": "own guide()" if hasattr(port, "guide") else "the reference's CFG"}
