"""`tools/import_graph.py`: the packages' import graph has no cycle (lazy imports included)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

from conftest import REPO_ROOT

TOOL = REPO_ROOT / "tools" / "import_graph.py"


def _tool():
    spec = importlib.util.spec_from_file_location("import_graph", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tool_finds_a_cycle_where_there_is_one():
    graph = {"a": [("b", 1)], "b": [("c", 2)], "c": [("a", 3), ("d", 4)], "d": []}
    assert _tool().cycles(graph) == [["a", "b", "c"]]
    assert _tool().cycles({"a": [("b", 1)], "b": []}) == []


def test_the_packages_import_graph_has_no_cycle():
    run = subprocess.run([sys.executable, str(TOOL)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout
    assert " 0 cycle(s)" in run.stdout.splitlines()[0]
