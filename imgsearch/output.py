"""How paths and hits are printed. Standard library only: the cold query path (quickcli) and the Typer CLI
print through the same functions, so their output cannot drift apart."""

from __future__ import annotations

import json
import os
import sys


def err(msg: str) -> None:
    print(msg, file=sys.stderr)


_CONTROL = set(range(0x20)) | {0x7F} | set(range(0x80, 0xA0))
_ESCAPES = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\t": "\\t"}


def shown(name: str) -> str:
    """A path as printed in line-based output: verbatim unless it holds control characters (a newline in
    a crafted name would pass for two paths to `xargs`), then as a shell $'...' string with escapes."""
    if not any(ord(ch) in _CONTROL or 0xDC80 <= ord(ch) <= 0xDCFF for ch in name):
        return name
    out = []
    for ch in name:
        o = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif 0xDC80 <= o <= 0xDCFF:  # an undecodable byte kept by surrogateescape
            out.append(f"\\x{o - 0xDC00:02x}")
        elif o in _CONTROL:
            out.append(f"\\x{o:02x}" if o < 0x80 else f"\\u{o:04x}")  # C1 controls are characters, not bytes
        else:
            out.append(ch)
    shown.escaped += 1
    return "$'" + "".join(out) + "'"


shown.escaped = 0


def one_line(text: str) -> str:
    """A message as one printable line: a control character (a newline in a file name it quotes) shown as its
    escape, a byte that is not UTF-8 as \\xNN."""
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch) - 0xDC00:02x}" if 0xDC80 <= ord(ch) <= 0xDCFF
                   else ch.encode("unicode_escape").decode() for ch in text)


def shortened(text: str, width: int) -> str:
    """``text`` with its middle left out when longer than ``width``: both ends stay readable (a refused value
    echoed by the CLI or the web page, a file name under a thumbnail)."""
    return text if len(text) <= width else text[:width // 2 - 2] + "…" + text[2 - width // 2:]


def shell_word(name: str) -> str:
    """A path to paste into a suggested command: shown()'s $'...' form where it escapes, else shell-quoted."""
    import shlex

    word = shown(name)
    return shlex.quote(name) if word == name else word


def warn_if_escaped(hint: str = "--print0 or --json") -> None:
    """One stderr line when some names were shown escaped (they are not usable as paths as printed)."""
    if shown.escaped:
        err(f"warning: {shown.escaped} name{'s' if shown.escaped != 1 else ''} with control characters shown "
            f"escaped as $'...'; {hint} give{'s' if ' or ' not in hint else ''} them verbatim")
        shown.escaped = 0


def print_hits(rows: list[dict], fmt: str = "table", *, min_score: float | None = None, tag=None,
               keyword: str | None = None) -> None:
    """Search hits as the `query` command prints them: fmt is table, paths, print0 or json."""
    if fmt == "json":
        print(json.dumps(rows, indent=2))
    elif fmt == "print0":
        sys.stdout.flush()
        sys.stdout.buffer.write(b"".join(os.fsencode(h["path"]) + b"\0" for h in rows))
        sys.stdout.buffer.flush()
    elif fmt == "paths":
        for h in rows:
            print(shown(h["path"]))
        warn_if_escaped()
    elif not rows:
        err("no results" + (" above --min-score" if min_score is not None else "")
            + (" with tag " + one_line(", ".join(tag)) if tag else "")
            + (f" matching --keyword {keyword!r}" if keyword else ""))
    else:
        print(f"{'rank':>4}  {'score':>6}  path")
        for h in rows:
            print(f"{h['rank']:>4}  {h['score']:6.4f}  {shown(h['path'])}")
        warn_if_escaped()


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KB'."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
