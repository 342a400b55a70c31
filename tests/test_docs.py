"""The documentation stays true to the code.

docs/cli.md is checked against the real `--help` of every command and sub-command (found by walking the
Typer app's command tree, so a new command or option without documentation fails here), every relative
link in README.md and docs/*.md must lead to a file and heading that exist, and the README stays a one-page
guide. Names are compared, never help prose, so rewording a help text cannot break these tests. The
Python examples (```python blocks of docs/api.md and README.md) run as written against a tiny library.
"""

from __future__ import annotations

import functools
import re
import shutil
from pathlib import Path

import typer.main
from typer.testing import CliRunner

from imgsearch.cli import app

ROOT = Path(__file__).resolve().parents[1]
CLI_MD = ROOT / "docs" / "cli.md"
API_MD = ROOT / "docs" / "api.md"
README = ROOT / "README.md"
README_MAX_LINES = 300
HELP_OPTIONS = {"-h", "--help"}  # on every command; cli.md says so once instead of in every table

OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z0-9][\w-]*)")
LONG_OPTION = re.compile(r"(?<![\w-])(--[A-Za-z0-9][\w-]*)")
CODE_SPAN = re.compile(r"`([^`]+)`")  # may run over a line break, as in Markdown
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"(#{1,6})\s+(.+?)\s*#*\s*$")
COMMAND_HEADING = re.compile(r"`imgsearch((?: [a-z][\w-]*)*)`")
RUNS_IMGSEARCH = re.compile(r"(?:^|[\s/])imgsearch\s")
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
# Python examples the suite cannot run (a GPU, a real pretrained model, Ray): a text the block contains -> why.
# Every other block runs; an entry that matches no block fails, so this list cannot go stale.
PYTHON_NOT_RUN: dict[str, str] = {}


# --- the command line as --help shows it --------------------------------------------------------------
def commands() -> list[tuple[tuple[str, ...], object]]:
    """(path, click command) for the root and every visible command and sub-command."""
    found = []

    def walk(cmd, path):
        found.append((path, cmd))
        for name, sub in getattr(cmd, "commands", {}).items():
            if not getattr(sub, "hidden", False):
                walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return found


@functools.lru_cache(maxsize=None)
def help_text(path: tuple[str, ...]) -> str:
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    return result.output


def help_entries(text: str, section: str) -> list[str]:
    """The terms of one definition list of a --help page ("Options", "Commands"): what precedes the
    two-space gap on each entry line. Continuation lines are indented deeper and are skipped."""
    terms, current = [], None
    for line in text.splitlines():
        heading = re.fullmatch(r"(\w[\w ]*):", line)
        if heading:
            current = heading.group(1)
        elif current == section and re.match(r"  \S", line):
            terms.append(re.split(r"\s{2,}", line.strip())[0])
    return terms


def help_options(text: str) -> set[str]:
    return {name for term in help_entries(text, "Options") for name in OPTION.findall(term)} - HELP_OPTIONS


def help_commands(text: str) -> set[str]:
    return {term.split()[0] for term in help_entries(text, "Commands")}


def declared_options(cmd) -> set[str]:
    return {name for p in cmd.params if p.param_type_name == "option" for name in (*p.opts, *p.secondary_opts)}


# --- the documents ----------------------------------------------------------------------------------
def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (fenced lines become empty, so numbering is kept)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line)
    return out


def code_lines(text: str) -> list[str]:
    """The lines inside fenced code blocks and indented (4-space) code blocks."""
    prose = prose_lines(text)
    return [line for line, p in zip(text.splitlines(), prose)
            if (p == "" and line.strip() and not line.lstrip().startswith("```")) or p.startswith("    ")]


def headings(text: str) -> list[tuple[int, int, str]]:
    """(line number, level, text) of every heading outside code blocks."""
    found = []
    for n, line in enumerate(prose_lines(text)):
        m = HEADING.fullmatch(line)
        if m:
            found.append((n, len(m.group(1)), m.group(2)))
    return found


def command_sections(text: str) -> dict[tuple[str, ...], list[str]]:
    """Each command heading (`imgsearch eval parity`) with its lines: up to the next command heading or the
    next heading of the same or a higher level."""
    lines = prose_lines(text)
    heads = headings(text)
    sections = {}
    for i, (n, level, title) in enumerate(heads):
        m = COMMAND_HEADING.match(title)
        if not m:
            continue
        end = next((n2 for n2, level2, title2 in heads[i + 1:]
                    if level2 <= level or COMMAND_HEADING.match(title2)), len(lines))
        path = tuple(m.group(1).split())
        assert path not in sections, f"docs/cli.md has two sections for `imgsearch {' '.join(path)}`"
        sections[path] = lines[n + 1:end]
    return sections


def table_options(section: list[str]) -> set[str]:
    """Option names in the first column of the section's tables (rows whose first cell is a `-option`)."""
    names = set()
    for line in section:
        if not line.startswith("|"):
            continue
        first = re.split(r"(?<!\\)\|", line)[1].strip()
        if first.startswith("`-"):
            for span in CODE_SPAN.findall(first):
                names.update(OPTION.findall(span))
    return names


def slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", title.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, _, title in headings(path.read_text(encoding="utf-8")):
        base = slug(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def documents() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def name(path: tuple[str, ...]) -> str:
    return " ".join(("imgsearch", *path))


# --- tests ------------------------------------------------------------------------------------------
def test_help_pages_are_read_completely():
    """The --help reader finds exactly the options and sub-commands each command declares, so the
    documentation checks below compare against everything a user can type."""
    tree = commands()
    assert {p for p, _ in tree} >= {(), ("index",), ("query",), ("eval",), ("eval", "parity")}
    for path, cmd in tree:
        text = help_text(path)
        assert help_options(text) == declared_options(cmd) - HELP_OPTIONS, name(path)
        assert help_commands(text) == set(getattr(cmd, "commands", {})), name(path)


def test_cli_reference_documents_every_command_and_option():
    sections = command_sections(CLI_MD.read_text(encoding="utf-8"))
    missing_commands = [name(p) for p, _ in commands() if p not in sections]
    assert missing_commands == [], "add a `## `imgsearch ...`` section to docs/cli.md for these"
    undocumented = {}
    for path, _ in commands():
        text = help_text(path)
        options = help_options(text)
        missing = sorted(options - table_options(sections[path]))
        if missing:
            undocumented[name(path)] = missing
        subcommands = help_commands(text)
        absent = sorted(c for c in subcommands if (*path, c) not in sections)
        if absent:
            undocumented[name(path) + " (sub-commands)"] = absent
    assert undocumented == {}, "document these in the option table of the command's section of docs/cli.md"


def test_cli_reference_documents_nothing_that_does_not_exist():
    sections = command_sections(CLI_MD.read_text(encoding="utf-8"))
    tree = dict(commands())
    assert [name(p) for p in sections if p not in tree] == [], "docs/cli.md has sections for commands that do not exist"
    extra = {}
    for path, section in sections.items():
        stale = sorted(table_options(section) - HELP_OPTIONS - help_options(help_text(path)))
        if stale:
            extra[name(path)] = stale
    assert extra == {}, "docs/cli.md documents options these commands do not have"


def test_docs_name_only_options_that_exist():
    """Every `--option` the README and docs show, in code spans and in imgsearch command lines, is an
    option of some imgsearch command (docs/performance.md also names the bench scripts' own options, so
    only its imgsearch command lines count)."""
    known = set().union(*(help_options(help_text(p)) for p, _ in commands())) | HELP_OPTIONS
    unknown = {}
    for doc in documents():
        text = doc.read_text(encoding="utf-8")
        bare_options_are_ours = doc.name != "performance.md"
        shown = [span for span in CODE_SPAN.findall("\n".join(prose_lines(text)))
                 if (bare_options_are_ours and span.startswith("-")) or RUNS_IMGSEARCH.search(span)]
        shown += [line for line in code_lines(text) if RUNS_IMGSEARCH.search(line)]
        bad = sorted({o for s in shown for o in LONG_OPTION.findall(s)} - known)
        if bad:
            unknown[str(doc.relative_to(ROOT))] = bad
    assert unknown == {}


def test_relative_links_lead_to_existing_files_and_headings():
    broken = []
    for doc in documents():
        prose = CODE_SPAN.sub("", "\n".join(prose_lines(doc.read_text(encoding="utf-8"))))
        for target in LINK.findall(prose):
            if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (doc.parent / file_part).resolve() if file_part else doc
            where = f"{doc.relative_to(ROOT)}: {target}"
            if not dest.is_relative_to(ROOT) or not dest.exists():
                broken.append(where + " (no such file in the repository)")
            elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
                broken.append(where + " (no such heading)")
    assert broken == []


def test_readme_is_a_one_page_guide_with_the_test_command():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES, "move detail into docs/ (the README is the one-page guide)"
    assert "make test" in text  # .ci/run calls the README's test command
    for doc in ("docs/cli.md", "docs/api.md", "docs/performance.md", "docs/security.md", "docs/architecture.md"):
        assert f"]({doc})" in text, f"the README links {doc}"


def python_examples() -> list[tuple[str, str]]:
    """(where, code) of every ```python block of docs/api.md and README.md."""
    found = []
    for doc in (API_MD, README):
        text = doc.read_text(encoding="utf-8")
        for m in PYTHON_BLOCK.finditer(text):
            found.append((f"{doc.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 2}", m.group(1)))
    return found


def test_python_examples_run_as_written(home, model_id, tmp_path, monkeypatch, capsys):
    """Each example runs unchanged in a fresh user folder: "~" holds Pictures/ (12 generated shapes, the red
    and blue ones in Pictures/2024) and is the current folder, with example.jpg (a red circle); the model
    comes from IMGSEARCH_MODEL, as the API reference says arguments left out do. What an example prints is
    what a user would see: its report counts the new images, its text search finds red shapes first."""
    import imgsearch.synthetic as synthetic

    examples = python_examples()
    assert [w for w, _ in examples if w.startswith("docs/api.md")], "docs/api.md shows no ```python example"
    for text in PYTHON_NOT_RUN:
        assert sum(text in code for _, code in examples) == 1, f"PYTHON_NOT_RUN entry {text!r} matches no block"
    monkeypatch.setenv("IMGSEARCH_MODEL", model_id)
    monkeypatch.setenv("IMGSEARCH_DEVICE", "cpu")
    monkeypatch.setenv("IMGSEARCH_PRECISION", "fp32")
    ran = []
    for n, (where, code) in enumerate(examples):
        if any(text in code for text in PYTHON_NOT_RUN):
            continue  # listed above, with the reason
        user = tmp_path / f"user{n}"
        pictures = user / "Pictures"
        synthetic.generate(pictures / "2024", per_class=1, colors=["red", "blue"], size=48, fmt="jpg", seed=3,
                           captions_file=None)
        synthetic.generate(pictures, per_class=1, colors=["green", "yellow"], size=48, fmt="jpg", seed=4,
                           captions_file=None)
        shutil.copy(pictures / "2024" / "red_circle_000.jpg", user / "example.jpg")
        monkeypatch.setenv("HOME", str(user))
        monkeypatch.chdir(user)
        exec(compile(code, where, "exec"), {"__name__": "__main__"})
        lines = capsys.readouterr().out.splitlines()
        if 'report.new, "new,"' in code:
            assert lines[0] == "12 new, 0 failed", where
        hits = [re.fullmatch(r"-?\d\.\d{3}  (\S+)", line) for line in lines]
        hits = [Path(m.group(1)) for m in hits if m]
        asked = re.search(r"search\(\"a red car[^\"]*\", k=(\d+)", code)
        if asked:
            assert len(hits) == int(asked.group(1)) and hits[0].name.startswith("red_"), (where, lines)
            assert all(h.is_relative_to(pictures) and h.is_file() for h in hits), where
        if 'as_dict()["images"]' in code:
            assert lines[-1] == "12", where
        ran.append(where)
    assert ran, "no Python example ran"
