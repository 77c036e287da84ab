"""The import graph of the installed packages (sdxl_common, sdxl_ms, parity, benchmarks), read from the AST:
cycles between modules, and every place one package imports another.

    python tools/import_graph.py                    # cycles, then parity -> sdxl_ms imports
    python tools/import_graph.py --from parity --to sdxl_ms
    python tools/import_graph.py --json             # the whole graph

Every import counts, those inside functions too (a lazy import is still a dependency). Exit 1
when the graph has a cycle, else 0.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sdxl_common", "sdxl_ms", "parity", "benchmarks")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def edges(modules: Dict[str, Path]) -> Dict[str, List[Tuple[str, int]]]:
    """module -> [(imported module, line)], only modules of the packages."""
    out: Dict[str, List[Tuple[str, int]]] = defaultdict(list)
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            for target in targets:
                while target and target not in modules:  # `a.b.c` of a module `a.b`
                    target = target.rpartition(".")[0]
                if target and target != name:
                    out[name].append((target, node.lineno))
    return out


def cycles(graph: Dict[str, List[Tuple[str, int]]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    found: List[List[str]] = []
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w, _ in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="source", default="parity")
    p.add_argument("--to", dest="target", default="sdxl_ms")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    modules = {module_name(f): f for pkg in PACKAGES for f in (ROOT / pkg).rglob("*.py")}
    graph = edges(modules)
    found = cycles(graph)
    if args.json:
        print(json.dumps({"cycles": found, "edges": graph}, indent=1))
        return 1 if found else 0
    print(f"{len(modules)} modules, {sum(len(v) for v in graph.values())} imports; "
          f"{len(found)} cycle(s)")
    for c in found:
        print("  cycle: " + " <-> ".join(c))
    crossing = sorted((m, t, line) for m, targets in graph.items() for t, line in targets
                      if m.split(".")[0] == args.source and t.split(".")[0] == args.target)
    importers = sorted({m for m, _, _ in crossing})
    print(f"{args.source} -> {args.target}: {len(crossing)} imports in {len(importers)} modules")
    for m in importers:
        used = sorted({t for mm, t, _ in crossing if mm == m})
        print(f"  {m}: {', '.join(used)}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
