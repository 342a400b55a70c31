"""`imgsearch [globals] query TEXT... [simple options]` answered before Typer parses anything.

This Typer version coerces every parameter through pydantic, whose import was about a quarter of a cold
text query's wall time (measured with -X importtime). The common case, text terms plus -k/--min-score/
--under/--tag/--not/--json/--paths, is parsed here by hand; anything else, or anything odd, returns None
and the normal Typer command runs (so its messages, help and validation stay the only ones).
"""

from __future__ import annotations

import math
import sys

_GLOBALS = {"--home": "home", "--model": "model", "--pretrained": "pretrained", "--device": "device",
            "--precision": "precision", "--lang": "lang"}
_FLAGS = {"--json", "--paths", "--print0", "--no-server", "--server"}


def _parse(argv: list[str]) -> dict | None:
    opts: dict = {}
    i = 0
    while i < len(argv) and argv[i] != "query":
        if argv[i] not in _GLOBALS or i + 1 >= len(argv):
            return None
        opts[_GLOBALS[argv[i]]] = argv[i + 1]
        i += 2
    if i >= len(argv):
        return None
    q: dict = {"texts": [], "not": [], "tag": [], "k": 10, "min_score": None, "under": None, "json": False,
               "paths": False, "print0": False, "server": True}
    i += 1
    while i < len(argv):
        a = argv[i]
        if a in _FLAGS:
            if a in ("--json", "--paths", "--print0"):
                q[a[2:]] = True
            else:
                q["server"] = a == "--server"
            i += 1
            continue
        if a.startswith("-"):
            if a not in ("-k", "--top", "--min-score", "--under", "--tag", "--not") or i + 1 >= len(argv):
                return None  # help, image terms, keywords, --opt=value forms, unknown: Typer decides
            v = argv[i + 1]
            try:
                if a in ("-k", "--top"):
                    q["k"] = int(v)
                elif a == "--min-score":
                    q["min_score"] = float(v)
                elif a == "--under":
                    q["under"] = v
                else:
                    q["tag" if a == "--tag" else "not"].append(v)
            except ValueError:
                return None
            i += 2
            continue
        q["texts"].append(a)
        i += 1
    if not q["texts"] or q["json"] + q["paths"] + q["print0"] > 1:
        return None
    from .config import MAX_K

    if not 1 <= q["k"] <= MAX_K or (q["min_score"] is not None and not math.isfinite(q["min_score"])):
        return None  # Typer's path words the error
    return {"globals": opts, **q}


def run(argv: list[str]) -> bool:
    """Answer the query and return True, or return False (having printed nothing) for the Typer path."""
    try:
        p = _parse(argv)
        if p is None:
            return False
        from .config import Settings

        settings = Settings.from_env(**p["globals"])
        if p["server"]:
            from . import client

            if client.find_server(settings) is not None:
                return False
        from .library import Library

        hits = Library(settings=settings).quick_search(p["texts"], not_text=p["not"], k=p["k"],
                                                       min_score=p["min_score"], under=p["under"],
                                                       tag=p["tag"] or None)
        rows = None if hits is None else [h.as_dict() for h in hits]
    except Exception:  # noqa: BLE001 - the fast path must never be the reason a query fails
        return False
    if rows is None:
        return False
    from .output import print_hits

    fmt = "json" if p["json"] else "print0" if p["print0"] else "paths" if p["paths"] else "table"
    print_hits(rows, fmt, min_score=p["min_score"], tag=p["tag"])
    sys.stdout.flush()
    return True


def main() -> None:
    """Console-script entry: the fast path first (no Typer import at all), else the full CLI."""
    import warnings

    # Here imgsearch is the host program, so it may set this: Pillow's per-file warnings (odd EXIF, a size
    # over its bomb limit) would break into the progress bars, and such a file is reported or fine anyway.
    warnings.filterwarnings("ignore", module="PIL")
    if len(sys.argv) > 2 and run(sys.argv[1:]):
        sys.exit(0)
    from .cli import app

    app(prog_name="imgsearch")
