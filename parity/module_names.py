"""Port module names that differ from sgm's, mapped for pairing: the contract's optional
`sgm_name(name)` on the port, and a small mapping file (`--module-names FILE`)::

    # my-port-names.toml: port name prefix = sgm name prefix; the longest prefix wins
    [rename]
    "model.diffusion_model.down." = "model.diffusion_model.input_blocks."
    "conditioner.clip_l." = "conditioner.embedders.0.transformer."

Names are full dotted paths (the stage's sgm prefix, then the port's names below it); a name
no prefix matches is used as it is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional

from sdxl_common.errors import InputError

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

Rename = Callable[[str], str]


def load_module_names(path) -> Rename:
    """The rename function of a mapping file; bad input names the problem in one line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--module-names: no such file: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"--module-names {path}: not TOML ({e})") from None
    table = data.get("rename")
    if not isinstance(table, dict) or not table:
        raise InputError(f"--module-names {path}: needs a [rename] table of "
                         "\"port prefix\" = \"sgm prefix\" entries")
    bad = [k for k, v in table.items() if not isinstance(v, str) or not k]
    if bad:
        raise InputError(f"--module-names {path}: [rename] entries must map a prefix to a "
                         f"string, not {bad[0]!r}")
    return prefix_rename(table)


def prefix_rename(table: Dict[str, str]) -> Rename:
    ordered = sorted(table.items(), key=lambda kv: -len(kv[0]))

    def rename(name: str) -> str:
        for old, new in ordered:
            if name.startswith(old):
                return new + name[len(old):]
        return name
    return rename


def port_rename(port, extra: Optional[Rename] = None) -> Optional[Rename]:
    """The port's own `sgm_name`, then `extra` (a mapping file's), or None for sgm names."""
    own = getattr(port, "sgm_name", None)
    steps = [f for f in (own if callable(own) else None, extra) if f is not None]
    if not steps:
        return None

    def rename(name: str) -> str:
        for step in steps:
            name = step(name)
        return name
    return rename
