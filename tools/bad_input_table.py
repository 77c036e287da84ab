"""Print the README's "Bad input" table from the cases in tests/test_parity/test_bad_input.py.

Each case is run exactly as the test runs it; the message column is what the tool printed,
with the temporary folder shown as `TMP/`. Run from the repository root:

    python tools/bad_input_table.py > /tmp/table.md
"""
from __future__ import annotations

import contextlib
import io
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "test_parity"), str(ROOT / "tests"), str(ROOT)]


def main() -> int:
    from sdxl_ms.config import TINY
    from sdxl_ms.weights.synthetic import make_checkpoint
    from test_bad_input import CASES, _tool

    rows = ["| bad input | command | exit | message |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        ckpts = {"diffusers": make_checkpoint(TINY, 0, root / "tiny-diffusers", "diffusers"),
                 "sgm": make_checkpoint(TINY, 0, root / "tiny.safetensors", "sgm")}
        for i, case in enumerate(CASES):
            tmp = root / f"case{i}"
            tmp.mkdir()
            tool, argv, _ = case.build(tmp, ckpts)
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    code = _tool(tool)(argv)
                except SystemExit as e:
                    code = e.code
            shown = lambda s: (s.replace(str(tmp) + "/", "TMP/").replace(str(root) + "/", "TMP/")  # noqa: E731
                               .replace(str(ROOT) + "/", ""))
            message = shown(err.getvalue().strip())
            command = shown(" ".join([tool] + [a if " " not in a else repr(a) for a in argv]))
            cell = lambda s: s.replace("|", "\\|")  # noqa: E731
            rows.append(f"| {case.input} | `{cell(command)}` | {code} | {cell(message)} |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
