"""The import layering the architecture notes promise (docs/architecture.md), checked from the source.

The graph is read statically (bench/import_graph.py), function-local imports included: a lazy import
is still a dependency, and a cycle through one is still a knot someone has to untie later.
"""

from __future__ import annotations

import importlib.util
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
FRONT_DOOR = {P} | {f"{P}.{m}" for m in ("library", "errors", "config", "output", "queryspec", "quickcli",
                                           "client", "progress", "commands", "cli", "server", "ui.app",
                                           "query", "results")}  # query, results: the API's own types
# Known exceptions, kept visible rather than hidden: `eval` and `finetune` never open a library and are
# the front ends of the evaluation and training code, which they call directly.
EXCEPTIONS = {f"{P}.commands.evaluate": {f"{P}.{m}" for m in ("evaluation", "captions", "encoder", "metrics",
                                                              "tagging", "zeroshot", "files")},
              f"{P}.commands.finetune": {f"{P}.metrics", f"{P}.train.loop"}}


def _graph() -> dict[str, set[str]]:
    return import_graph.graph(ROOT)


def _front_ends(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """{front-end module: the package modules it imports}: cli, commands.*, server and the UI app."""
    fronts = {m: deps for m, deps in graph.items()
              if m in (f"{P}.cli", f"{P}.server") or m.startswith((f"{P}.commands.", f"{P}.ui"))
              or m in (f"{P}.ui_app",)}
    app = ROOT / "ui" / "app.py"  # the Streamlit script, while it still lives outside the package
    if app.exists():
        fronts["ui.app"] = import_graph.imports_of("ui.app", app, set(graph))
    return fronts


def test_the_checker_sees_real_imports():
    g = _graph()
    assert f"{P}.errors" in g[f"{P}.store"] and f"{P}.migrations" in g[f"{P}.store"]
    assert import_graph.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_in_the_package():
    assert import_graph.cycles(_graph()) == []


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
