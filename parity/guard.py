"""Tell the port's exceptions from the harness's own.

Every stage calls the port through a `PortGuard`. Whatever the port raises comes out as a
`PortError`, which the runner records as that stage's verdict `error` (the port is broken: exit
1). Anything else a stage raises is the harness's problem: bad input (exit 2) or a bug (exit 3).
The guard also tells the run clock (`parity.eta`) of each UNet call and decode it forwards.
"""
from __future__ import annotations

from typing import Any

from . import eta

_NETWORK_CALLS = {"unet": eta.unet_done, "decode": eta.decode_done}


class PortError(Exception):
    """The port raised `original` while the harness called `method`."""

    def __init__(self, method: str, original: BaseException):
        super().__init__(f"{method}: {type(original).__name__}: {original}")
        self.method = method
        self.original = original


class PortGuard:
    """A stand-in for a port whose callables raise `PortError` instead of the port's errors."""

    def __init__(self, port: Any):
        self._port = port

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._port, name)
        if not callable(value):
            return value

        def guarded(*args, **kwargs):
            try:
                result = value(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - every port failure is the stage's verdict
                raise PortError(name, e) from e
            if name in _NETWORK_CALLS:
                _NETWORK_CALLS[name]()
            return result

        return guarded

    def __call__(self, *args, **kwargs):
        return self.__getattr__("__call__")(*args, **kwargs)

    @property
    def unwrapped(self) -> Any:
        return self._port
