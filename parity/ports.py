"""Load the port to check: the built-in one, or any adapter named as `MODULE:FACTORY`.

A factory takes `(checkpoint, dtype)` (a path and "float32"/"float16"/"bfloat16") and returns
an object with the stage contract (`parity.contract.StageContract`; `sample` and `guide`
optional). `MODULE` is an importable module (`my_port.adapter`, searched from the current
folder too) or a Python file (`path/to/adapter.py`).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from sdxl_common.errors import InputError

from .contract import signature_problems
from .port_cells import has_cells
from .recording import file_sha256

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
        return import_file(Path(name))
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


def import_file(path: Path):
    """A port's `.py` file imported as a real module, as `python path/to/file.py` would see it:
    registered in `sys.modules` under its own name (the file's stem, or a name derived from its
    path where another module already holds the stem) and its folder importable; a file inside
    a package is imported as `pkg.module` with the package's parent folder importable. MindSpore's
    graph compiler resolves a jitted function's globals through `sys.modules[fn.__module__]`,
    so a file executed without registration fails to compile any `ms.jit` code it holds."""
    if not path.is_file():
        raise InputError(f"--port: no such file {path}")
    path = path.resolve()
    package = _package_of(path)
    if package is not None:  # its relative imports (`from .unet import ...`) then work
        root, dotted = package
        if root not in sys.path:
            sys.path.insert(0, root)
        return importlib.import_module(dotted)
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)  # kept: the port may import its siblings lazily
    name = path.stem
    held = sys.modules.get(name)
    if held is not None:
        if Path(getattr(held, "__file__", "") or "").resolve() == path:
            return held
        digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]
        name = f"sdxl_parity_port_{path.stem}_{digest}"
        if name in sys.modules:
            return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _package_of(path: Path):
    """(the folder above the package, "pkg.sub.module") for a file inside a package (folders
    holding `__init__.py`), else None."""
    parts, folder = [path.stem], path.parent
    while (folder / "__init__.py").is_file():
        parts.insert(0, folder.name)
        folder = folder.parent
    return (str(folder), ".".join(parts)) if len(parts) > 1 else None


def refuse_unsupported_dtype(dtype: str) -> None:
    """A dtype the port's backend cannot compute here is bad input, before any work."""
    if dtype == "bfloat16":
        import mindspore as ms

        if ms.get_context("device_target") == "CPU":
            raise InputError("the port cannot run in bfloat16 here: MindSpore's CPU backend has "
                             "no bfloat16 kernels; record a bfloat16 golden on this machine "
                             "(sdxl-parity record --dtype bfloat16 --out DIR) and check it on "
                             "Ascend (sdxl-parity check --golden DIR)")


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


def own_description(port: Any) -> Dict[str, Any]:
    """What the port says of itself (the contract's optional `describe()`), or nothing."""
    own = port.describe() if callable(getattr(port, "describe", None)) else None
    return own if isinstance(own, dict) else {}


def describe(port: Any, spec: Optional[PortSpec]) -> Dict[str, Any]:
    """What the report says about the port that was checked."""
    cls = type(port)
    module = sys.modules.get(cls.__module__)
    version = (own_description(port).get("version") or getattr(port, "version", None)
               or getattr(module, "__version__", None))
    top = sys.modules.get(cls.__module__.partition(".")[0])
    version = version or getattr(top, "__version__", None)
    source = {}
    if spec is not None and spec.module.endswith(".py") and Path(spec.module).is_file():
        source = {"file": str(Path(spec.module).resolve()),
                  "file_sha256": file_sha256(Path(spec.module))}
    return {"spec": str(spec) if spec else "an object passed to parity.runner.check",
            "class": f"{cls.__module__}.{cls.__qualname__}", "version": version, **source,
            "modules": "own cells()" if has_cells(port) else
            "none (the port offers no cells(): no localisation or module truths)",
            "sampler": "own sample()" if hasattr(port, "sample")
            else "built-in sdxl_ms sampler (the port offers no sample())",
            "guide": "own guide()" if hasattr(port, "guide") else "the reference's CFG"}
