"""Progress bars for long work (sampling, weight loading, recording, checkpoint writing).

Bars go to stderr, only when it is a terminal, and never after `set_enabled(False)` (the CLIs'
`--quiet`), so logs and CI output stay clean.
"""
from __future__ import annotations

import sys
from typing import Iterable, Optional

_enabled = True


def set_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = bool(enabled)


def enabled() -> bool:
    return _enabled


def bar(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "",
        unit: str = "it", show: bool = True, leave: bool = False):
    """A tqdm bar, or a silent one when progress is off, `show` is False or stderr is no TTY."""
    from tqdm.auto import tqdm

    disable = True if not (_enabled and show) else None  # None: tqdm hides it off a terminal
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=disable,
                file=sys.stderr, dynamic_ncols=True)
