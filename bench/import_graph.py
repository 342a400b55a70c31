"""Static import graph of the imgsearch package: who imports whom, the largest files, and any cycles.

Reads the source with ast (nothing is imported), so it runs in a second and sees lazy, function-local
imports too: a cycle through a lazy import is still a layering knot, even if Python tolerates it.

    python bench/import_graph.py [--root PATH]
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGE = "imgsearch"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path) -> dict[str, Path]:
    """{dotted module name: file} for every .py file of the package under ``root``."""
    return {module_name(p, root): p for p in sorted((root / PACKAGE).rglob("*.py"))}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules that ``name`` imports anywhere in its file (top level or inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, is_package, node)
            # `from . import x` / `from .pkg import mod` name submodules; otherwise the base module itself.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            while t and t not in known:  # `import imgsearch.train.loop.x` -> nearest known module
                t = t.rpartition(".")[0]
            if t and t != name and (t == PACKAGE or t.startswith(PACKAGE + ".")):
                found.add(t)
    return found


def graph(root: Path) -> dict[str, set[str]]:
    mods = modules(root)
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return sorted(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1],
                    help="folder holding the imgsearch package (default: this checkout)")
    ap.add_argument("--top", type=int, default=15, help="how many of the largest files to list")
    args = ap.parse_args()
    mods = modules(args.root)
    g = graph(args.root)
    short = lambda m: m[len(PACKAGE) + 1:] or PACKAGE  # noqa: E731
    print("# intra-package imports (static, including function-local ones)")
    for name in sorted(g):
        print(f"{short(name):24} -> {', '.join(sorted(short(t) for t in g[name])) or '-'}")
    print("\n# largest files (lines)")
    sizes = sorted(((len(p.read_text(encoding='utf-8').splitlines()), n) for n, p in mods.items()), reverse=True)
    for lines, name in sizes[: args.top]:
        print(f"{lines:6}  {mods[name].relative_to(args.root)}")
    found = cycles(g)
    print("\n# import cycles")
    for comp in found:
        print("  " + " <-> ".join(short(m) for m in comp))
    if not found:
        print("  none")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
