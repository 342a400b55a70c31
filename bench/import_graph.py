"""Static import graph of the imgsearch package: who imports whom, the largest files, and any cycles.

Reads the source with ast (nothing is imported), so it runs in a second and sees lazy, function-local
imports too: a cycle through a lazy import is still a layering knot, even if Python tolerates it.
Dynamic imports count as well: importlib.import_module / __import__ of a literal name, or of an
f-string whose parts are names bound to literal strings (a loop over a literal tuple, a value of a
literal dict). One whose name cannot be read that way is listed, so it cannot hide a dependency.

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


def _literal_strings(node: ast.AST) -> list[str] | None:
    """The strings a literal str, or tuple/list/set of them, holds; None for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        items = [_literal_strings(e) for e in node.elts]
        return None if any(i is None for i in items) else [s for i in items for s in i]
    return None


def _bound_strings(tree: ast.AST) -> dict[str, list[str] | None]:
    """{name: the literal strings it may hold} from the file's assignments and loops; None: not literal.

    Deliberately simple: a name is followed across the whole file, not by scope, and any binding that is
    not literal (nor a literal collection, nor a literal dict looked up) makes it unknown."""
    values: dict[str, list[str] | None] = {}
    dicts: dict[str, list[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            vals = [_literal_strings(v) for v in node.value.values]
            if all(v is not None and len(v) == 1 for v in vals):
                dicts.update({t.id: [v[0] for v in vals] for t in node.targets if isinstance(t, ast.Name)})
    for node in ast.walk(tree):
        pairs: list[tuple[ast.AST, ast.AST, bool]] = []  # (target, value, value is iterated)
        if isinstance(node, ast.Assign):
            pairs = [(t, node.value, False) for t in node.targets]
        elif isinstance(node, (ast.AnnAssign, ast.NamedExpr)) and node.value is not None:
            pairs = [(node.target, node.value, False)]
        elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
            pairs = [(node.target, node.iter, True)]
        for target, value, iterated in pairs:
            if not isinstance(target, ast.Name):
                continue
            if isinstance(value, ast.Name):
                found = values.get(value.id)  # `for g in GROUPS` with GROUPS = ("a", "b")
            elif isinstance(value, ast.Subscript) or (isinstance(value, ast.Call)
                                                      and getattr(value.func, "attr", "") == "get"):
                holder = value.value if isinstance(value, ast.Subscript) else value.func.value
                found = dicts.get(getattr(holder, "id", ""))  # `module = _LAZY.get(name)`
            elif iterated and isinstance(value, ast.Constant):
                found = None  # the characters of a string
            else:
                found = _literal_strings(value)
            old = values.get(target.id, [])
            values[target.id] = None if found is None or old is None else old + found
    return values


def _expand(node: ast.AST, bound: dict[str, list[str] | None]) -> list[str] | None:
    """Every string an import's name argument can be: a literal, a bound name or an f-string of those."""
    if isinstance(node, ast.Name):
        return bound.get(node.id)
    if isinstance(node, ast.JoinedStr):
        out = [""]
        for part in node.values:
            if isinstance(part, ast.FormattedValue):
                options = _expand(part.value, bound) if part.format_spec is None and part.conversion == -1 else None
            else:
                options = _literal_strings(part)
            if options is None:
                return None
            out = [a + b for a in out for b in options]
        return out
    return _literal_strings(node)


def _import_call(node: ast.AST) -> str | None:
    """"import_module" or "__import__" when ``node`` calls one (by any spelling), else None."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    f = node.func
    called = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
    return called if called in ("import_module", "__import__") else None


def dynamic_imports(name: str, tree: ast.AST, is_package: bool) -> tuple[set[str], list[int]]:
    """(modules imported through importlib.import_module / __import__, lines of the unreadable calls).

    A call is unreadable when its module name is not made of literals (see _bound_strings), or is
    relative without a readable ``package``."""
    bound = _bound_strings(tree)
    found: set[str] = set()
    unread: list[int] = []
    for call in ast.walk(tree):
        kind = _import_call(call)
        if kind is None:
            continue
        anchor: str | None = None  # the package a relative name is resolved against
        if kind == "import_module":
            pkg = call.args[1] if len(call.args) > 1 else next(
                (k.value for k in call.keywords if k.arg == "package"), None)
            if isinstance(pkg, ast.Name) and pkg.id == "__package__":
                anchor = name if is_package else name.rpartition(".")[0]
            elif isinstance(pkg, ast.Name) and pkg.id == "__name__":
                anchor = name
            elif pkg is not None:
                anchor = (_literal_strings(pkg) or [None])[0]
        names = _expand(call.args[0], bound)
        if names is None:
            unread.append(call.lineno)
            continue
        for n in names:
            level = len(n) - len(n.lstrip("."))
            if level and anchor is None:
                unread.append(call.lineno)
                break
            if level:  # as importlib resolves it: `..x` against "a.b" is "a.x"
                base = anchor.split(".")
                n = ".".join(base[: len(base) - (level - 1)] + ([n[level:]] if n[level:] else []))
            found.add(n)
    return found, unread


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules that ``name`` imports anywhere in its file (top level or inside functions),
    the dynamic imports dynamic_imports can read included."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    targets = dynamic_imports(name, tree, is_package)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, is_package, node)
            # `from . import x` / `from .pkg import mod` name submodules; otherwise the base module itself.
            targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names)
    found: set[str] = set()
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


def unreadable_imports(root: Path) -> list[str]:
    """"module:line" of every dynamic import whose module name the graph cannot read (see dynamic_imports)."""
    out = []
    for name, path in modules(root).items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        out += [f"{name}:{line}" for line in dynamic_imports(name, tree, path.name == "__init__.py")[1]]
    return out


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
    print("\n# dynamic imports whose module name cannot be read (not in the graph above)")
    print("\n".join("  " + u for u in unreadable_imports(args.root)) or "  none")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
