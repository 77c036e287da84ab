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


def _graph():
    tool = _tool()
    modules = {tool.module_name(f): f for pkg in tool.PACKAGES
               for f in (tool.ROOT / pkg).rglob("*.py")}
    return tool.edges(modules)


# what the harness may know of the built-in port besides the stage contract: the weight
# layouts, key maps and checkpoint readers and writers; everything else goes through the one
# adapter module
HARNESS_MAY_IMPORT = ("sdxl_ms.weights", "sdxl_ms.config")
BUILTIN_ADAPTER = "parity.builtin_port"


def test_the_harness_reaches_the_builtin_port_only_through_its_adapter_and_the_weights():
    crossing = sorted((m, t, line) for m, targets in _graph().items() for t, line in targets
                      if m.split(".")[0] == "parity" and t.split(".")[0] == "sdxl_ms")
    assert crossing, "the tool found no parity -> sdxl_ms import at all: it reads nothing"
    outside = [f"{m}:{line} imports {t}" for m, t, line in crossing
               if m != BUILTIN_ADAPTER and not t.startswith(HARNESS_MAY_IMPORT)]
    assert outside == []


def test_the_shared_package_imports_neither_the_port_nor_the_harness():
    graph = _graph()
    assert any(m.startswith("sdxl_common") for m in graph)
    wrong = [f"{m} imports {t}" for m, targets in graph.items() if m.startswith("sdxl_common")
             for t, _ in targets if t.split(".")[0] in ("sdxl_ms", "parity", "benchmarks")]
    assert wrong == []
