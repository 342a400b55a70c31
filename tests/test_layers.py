"""The import layering the architecture notes promise (docs/architecture.md), checked from the source.

The graph is read statically (bench/import_graph.py), function-local and dynamic imports included: a
lazy import is still a dependency, and a cycle through one is still a knot someone has to untie later.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("import_graph", ROOT / "bench" / "import_graph.py")
import_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_graph)

P = "imgsearch"
LOWER = {f"{P}.{m}" for m in ("errors", "config", "files", "images", "encoder", "store", "vectors", "metrics")}
SHARED_BY_ALL = {f"{P}.errors", f"{P}.config"}
# What the command line, the server and the UI may import from the package: the front door and the
# small pieces every front end needs to talk to a user; never the store, encoder, index or indexer.
FRONT_DOOR = {P} | {f"{P}.{m}" for m in ("library", "errors", "config", "output", "request", "quickcli",
                                           "client", "progress", "commands", "cli", "server", "ui.app",
                                           "results")}  # request, results: the API's own types
# Known exceptions, kept visible rather than hidden: `eval` and `finetune` never open a library and are
# the front ends of the evaluation and training code, which they call directly.
EXCEPTIONS = {f"{P}.commands.evaluate": {f"{P}.{m}" for m in ("evaluation", "captions", "encoder", "metrics",
                                                              "tagging", "zeroshot", "files")},
              f"{P}.commands.finetune": {f"{P}.metrics", f"{P}.train.loop"}}


@functools.lru_cache(maxsize=1)
def _graph() -> dict[str, set[str]]:
    return import_graph.graph(ROOT)


def _front_ends(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """{front-end module: the package modules it imports}: cli, commands(.*), server and the UI app."""
    fronts = {m: deps for m, deps in graph.items()
              if m in (f"{P}.cli", f"{P}.server", f"{P}.commands") or m.startswith((f"{P}.commands.", f"{P}.ui"))
              or m in (f"{P}.ui_app",)}
    app = ROOT / "ui" / "app.py"  # the Streamlit script, while it still lives outside the package
    if app.exists():
        fronts["ui.app"] = import_graph.imports_of("ui.app", app, set(graph))
    return fronts


def test_the_checker_sees_real_imports():
    g = _graph()
    assert f"{P}.errors" in g[f"{P}.store"] and f"{P}.migrations" in g[f"{P}.store"]
    assert import_graph.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_checker_sees_dynamic_imports(tmp_path):
    pkg = tmp_path / P
    (pkg / "sub").mkdir(parents=True)
    sources = {
        "__init__.py": 'LAZY = {"A": "a"}\n\ndef __getattr__(n):\n    import importlib\n'
                       '    m = LAZY.get(n)\n    return importlib.import_module(f".{m}", __name__)\n',
        "a.py": "from importlib import import_module\nfor g in ('x', 'y'):\n"
                "    import_module(f'.sub.{g}', __package__)\n",
        "b.py": "def f():\n    return __import__('imgsearch.a')\n",
        "c.py": "import importlib\n\ndef f(name):\n    return importlib.import_module(name)\n",
        "sub/__init__.py": "", "sub/x.py": "import importlib\nimportlib.import_module('..b', __package__)\n",
        "sub/y.py": "",
    }
    for rel, text in sources.items():
        (pkg / rel).write_text(text, encoding="utf-8")
    g = import_graph.graph(tmp_path)
    assert g[P] == {f"{P}.a"} and g[f"{P}.a"] == {f"{P}.sub.x", f"{P}.sub.y"}
    assert g[f"{P}.b"] == {f"{P}.a"} and g[f"{P}.sub.x"] == {f"{P}.b"}
    assert import_graph.cycles(g) == [[f"{P}.a", f"{P}.b", f"{P}.sub.x"]]
    # A name that is not built from literals cannot be followed: it is reported, not silently skipped.
    assert import_graph.unreadable_imports(tmp_path) == [f"{P}.c:4"]


def test_no_import_cycles_in_the_package():
    g = _graph()
    assert {f"{P}.commands.apps", f"{P}.commands.watch"} <= g[f"{P}.cli"]  # loaded with importlib
    assert import_graph.cycles(g) == []
    assert import_graph.unreadable_imports(ROOT) == []


SQL_HOME = {f"{P}.store", f"{P}.migrations"}
SQL_EXEMPT: set[str] = set()
# Statements as this code writes them (upper-case keywords), and the shapes only SQL has in any case.
_SQL = (re.compile(r"\b(SELECT\b.*?\bFROM|INSERT\b.*?\bINTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|"
                   r"(CREATE|DROP)\s+(TABLE|INDEX|UNIQUE|VIRTUAL|TRIGGER|VIEW)|ALTER\s+TABLE|PRAGMA)\b", re.S),
        re.compile(r"\b(insert\s+(or\s+\w+\s+)?into\s+\w+\s*\(|delete\s+from\s+\w+\s+where|"
                   r"update\s+\w+\s+set\s+\w+\s*=|select\s[^.;]*?\sfrom\s+\w+\s+(where|order\s+by|group\s+by|"
                   r"join|limit)|create\s+(table|index|trigger)\s+(if\s+not\s+exists\s+)?\w+\s*(\(|on\b)|"
                   r"pragma\s+\w+\s*[=(])\b", re.S | re.I))
_SQL_TOOLKITS = ("sqlite3", "sqlalchemy")


def sql_in(name: str, path: Path) -> list[str]:
    """What in a module speaks SQL: a string holding a statement (f-string parts included; docstrings,
    which run nothing, aside), or an import of sqlite3 / SQLAlchemy (static or dynamic)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    skip = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    skip |= {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}  # read whole
    imported, _ = import_graph.dynamic_imports(name, tree, path.name == "__init__.py")
    found = [f"line {n.lineno}: imports {m}" for n in ast.walk(tree) for m in
             ([a.name for a in n.names] if isinstance(n, ast.Import) else
              [n.module or ""] if isinstance(n, ast.ImportFrom) and n.level == 0 else [])
             if m.split(".")[0] in _SQL_TOOLKITS]
    found += [f"imports {m}" for m in sorted(imported) if m.split(".")[0] in _SQL_TOOLKITS]
    for n in ast.walk(tree):
        if isinstance(n, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "?" for v in n.values)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip:
            text = n.value
        else:
            continue
        hit = next((m for m in (r.search(text) for r in _SQL) if m), None)
        if hit:
            found.append(f"line {n.lineno}: {hit.group(0)[:60]!r}")
    return found


def test_the_sql_check_finds_sql_and_ignores_prose(tmp_path):
    assert sql_in(f"{P}.store", ROOT / P / "store.py")  # it sees the SQL where it belongs
    mod = tmp_path / "m.py"
    mod.write_text('"""SELECT id FROM images, in a docstring, runs nothing."""\nimport sqlite3\n'
                   'def f(s, t, cols):\n    s.rows(f"SELECT {cols} FROM {t} WHERE id = :i")\n'
                   '    s.rows(f"SELECT id FROM images WHERE id = {t}")\n'
                   '    s.rows("delete from images where id = 1")\n'
                   '    return "Select the photos from your holidays, then delete from the list what you '
                   'do not want to update."\n', encoding="utf-8")
    assert sql_in(f"{P}.m", mod) == ["line 2: imports sqlite3", "line 4: 'SELECT ? FROM'",
                                     "line 5: 'SELECT id FROM'", "line 6: 'delete from images where'"]


def test_all_sql_lives_in_the_store():
    mods = import_graph.modules(ROOT)
    if (ROOT / "ui" / "app.py").exists():  # the Streamlit script, while it still lives outside the package
        mods["ui.app"] = ROOT / "ui" / "app.py"
    found = {name: hits for name, path in mods.items()
             if name not in SQL_HOME | SQL_EXEMPT and (hits := sql_in(name, path))}
    assert found == {}, "move these statements into a Store method (imgsearch/store.py)"


def test_lower_layers_import_only_config_and_errors_from_each_other():
    g = _graph()
    bad = {m: sorted((g[m] & LOWER) - SHARED_BY_ALL - {m}) for m in sorted(LOWER)}
    assert {m: deps for m, deps in bad.items() if deps} == {}
    assert g[f"{P}.errors"] == set() and g[f"{P}.config"] <= {f"{P}.errors"}


def test_cli_server_and_ui_import_only_the_front_door():
    g = _graph()
    fronts = _front_ends(g)
    assert f"{P}.cli" in fronts and f"{P}.server" in fronts and len(fronts) >= 6
    allowed = FRONT_DOOR | set(fronts)  # the front ends may call each other (commands use cli helpers)
    bad = {m: sorted(deps - allowed - EXCEPTIONS.get(m, set())) for m, deps in sorted(fronts.items())}
    assert {m: deps for m, deps in bad.items() if deps} == {}


def test_architecture_notes_cover_every_module_and_the_readme_links_inside_the_repository():
    import re

    notes = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = [str(p.relative_to(ROOT / P)) for p in sorted((ROOT / P).rglob("*.py"))
               if p.name != "__init__.py" and p.parent.name != "commands"
               and f"`{p.relative_to(ROOT / P).as_posix()}`" not in notes]
    assert missing == [], "add these modules to docs/architecture.md"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "](docs/architecture.md)" in readme
    links = re.findall(r"\]\(([^)#\s]+)", readme) + re.findall(r"`(\.\./[^`]+)`", readme)
    outside = [t for t in links if not t.startswith(("http://", "https://", "mailto:"))
               and not (ROOT / t).resolve().is_relative_to(ROOT)]
    broken = [t for t in links if not t.startswith(("http://", "https://", "mailto:")) and not (ROOT / t).exists()]
    assert outside == [] and broken == []


def test_every_name_a_bench_script_imports_from_the_package_exists():
    """bench/ reaches into the package (often inside main()); a renamed class must fail here, not on the next
    person who runs the benchmark (bench/query_latency.py imported search.Query long after it was gone)."""
    import importlib

    missing = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == P:
                module = importlib.import_module(node.module)
                missing += [f"{path.name}: {node.module}.{a.name}" for a in node.names if not hasattr(module, a.name)
                            and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
    assert not missing
