"""The CLI's shared pieces (the Typer app, the error mapping every command goes through): cli.py and the
command groups here, which register on `app`, both import them, so no group imports cli (no cycle)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperCommand

from ..config import MAX_K, Settings
from ..errors import ImgSearchError, ParamError, UsageError, disk_full_message

app = typer.Typer(
    name="imgsearch",
    help="Semantic image search on your own machine: CLIP vectors in FAISS, everything else in SQLite.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def err(msg: str) -> None:
    typer.echo(msg, err=True)


def _one_line(text: str, limit: int = 300) -> str:
    """Internal error text, never raw data: first line only, printable, bounded."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    line = "".join(ch if ch.isprintable() else "?" for ch in line)
    return line if len(line) <= limit else line[:limit] + "…"


def handle_errors(fn):
    """Wrap a command so library errors become one line on stderr and an exit code (for any Typer group)."""

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except ImgSearchError as e:
            from ..output import one_line

            err(f"error: {one_line(str(e))}")
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err("interrupted: finished batches are saved; run the same command again to continue")
            raise typer.Exit(130) from None
        except BrokenPipeError:
            sys.stderr.close()  # output piped into `head`; not an error
            raise typer.Exit(0) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except OSError as e:
            import errno

            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                return _internal(e)
            err("error: " + disk_full_message(e.filename or os.getcwd()))
            raise typer.Exit(1) from None
        except Exception as e:
            return _internal(e)

    def _internal(e: Exception):  # a bug: still one line, with a way to get the details
        if os.environ.get("IMGSEARCH_DEBUG"):
            raise e
        err(f"internal error: {type(e).__name__}: {_one_line(str(e))} (set IMGSEARCH_DEBUG=1 for a traceback "
            "and please report it)")
        raise typer.Exit(1) from None

    return wrapper


def command(*args, group: typer.Typer | None = None, **kwargs):
    """app.command (or ``group``'s) that turns library errors into one line on stderr and an exit code."""

    def decorate(fn):
        kwargs.setdefault("cls", getattr(fn, "command_class", None))  # search_options' own parsing
        return (group or app).command(*args, **kwargs)(handle_errors(fn))

    return decorate


def when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def kept_lines(report) -> list[str]:
    """One line per folder whose images an index run kept although it found none of their files there."""
    from ..output import shown

    lines = []
    for folder, n in report.kept.items():
        where = shown(folder)
        lines.append(f"kept {plural(n, 'image')} under {where}, which holds no images now (a drive not mounted?); "
                     f"`imgsearch forget {shlex.quote(folder) if where == folder else where}` drops them")
    return lines


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def report_skipped(skipped: list[tuple[str, str]], all_in: str, limit: int = 10) -> None:
    """The first ``limit`` (where, reason) pairs on stderr; ``all_in`` says where the rest are listed."""
    for where, reason in skipped[:limit]:
        err(f"skipped: {where}: {reason}")
    if len(skipped) > limit:
        err(f"... and {len(skipped) - limit} more skipped ({all_in})")


# Options several commands share, declared once with their help.
NO_WAIT = typer.Option(False, "--no-wait", help="Fail at once when another imgsearch run is writing to the "
                       "library, instead of waiting for it.")
JSON_HITS = typer.Option(False, "--json", help="Print a JSON array of hits.")
PATHS = typer.Option(False, "--paths", help="Print bare paths, one per line (names with control characters "
                     "escaped; see --print0).")
PRINT0 = typer.Option(False, "--print0", help="Print bare paths, each ended by a NUL byte, verbatim (for "
                      "`xargs -0`).")


def hits_format(json_out: bool, paths_out: bool, print0: bool) -> str:
    """How print_hits prints: the one of JSON_HITS, PATHS and PRINT0 given, else a table."""
    if json_out + paths_out + print0 > 1:
        raise UsageError("--json, --paths and --print0 are exclusive; pick one output format")
    return "json" if json_out else "print0" if print0 else "paths" if paths_out else "table"


def settings_of(ctx: typer.Context) -> Settings:
    return ctx.obj


def library_of(ctx: typer.Context):
    """The Python API over this command's settings (imgsearch.Library); close it, or use `with`."""
    from ..library import Library

    return Library(settings=settings_of(ctx))


@contextlib.contextmanager
def flag_words(**flags):
    """The library names a parameter ("under: no such folder"); say it as typed here ("--under x: ...").
    ``flags`` maps a parameter name to (flag, value shown)."""
    try:
        yield
    except ParamError as e:
        if e.param not in flags:
            raise
        flag, value = flags[e.param]
        from ..output import shortened

        raise UsageError(f"{flag} {shortened(str(value), 80)}: {e.detail}") from None  # on one line: handle_errors


def _search_params(
    texts: Optional[List[str]] = typer.Argument(None, help="What to look for; several combine. Prefix a weight "
                                                "as in 2:\"red car\"."),
    image: Optional[List[str]] = typer.Option(None, "--image", "-i", help="Find images like this file "
                                              "(repeatable, W:FILE weights it)."),
    not_text: Optional[List[str]] = typer.Option(None, "--not", help="Text to steer away from (repeatable)."),
    not_image: Optional[List[str]] = typer.Option(None, "--not-image", help="Image to steer away from."),
    k: Optional[int] = typer.Option(None, "-k", "--top", help=f"Number of results (1 to {MAX_K}) [default 10].",
                                    show_default=False),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Drop results below this cosine score "
                                              "(keyword relevance when ranking by keywords alone)."),
    under: Optional[Path] = typer.Option(None, "--under", help="Only results inside this folder."),
    tag: Optional[List[str]] = typer.Option(None, "--tag", help="Only images with this zero-shot tag (from "
                                            "`imgsearch classify`; repeatable: all must match)."),
    keyword: Optional[str] = typer.Option(None, "--keyword", help="Only images whose file name, folder, captions "
                                          "or tags contain these words (word prefixes; \"a phrase\"; -word "
                                          "excludes). Alone, ranks by keywords only."),
    blend: Optional[float] = typer.Option(None, "--blend", help="Blend keyword relevance into "
                                          "the CLIP ranking with this weight (0-1) instead of filtering by "
                                          "--keyword."),
    after: Optional[str] = typer.Option(None, "--after", help="Only photos taken from this date on: YYYY, YYYY-MM, "
                                        "YYYY-MM-DD or an ISO timestamp (EXIF time, else the file's)."),
    before: Optional[str] = typer.Option(None, "--before", help="Only photos taken before the END of this period "
                                         "(--before 2023 includes 2023; a full timestamp is excluded)."),
    near: Optional[str] = typer.Option(None, "--near", help="Only photos with GPS within KM of a point: "
                                       "LAT,LON[,KM] in decimal degrees (default 5 km), or a city, "
                                       "PLACE[,KM] (needs the places extra)."),
    camera: Optional[str] = typer.Option(None, "--camera", help="Only photos whose camera make/model contains "
                                         "this text (case-insensitive)."),
    relevant: bool = typer.Option(False, "--relevant", help="Only results above the model's calibrated relevance "
                                  "floor (see `imgsearch status`)."),
    like: Optional[List[str]] = typer.Option(None, "--like", help="A library image (id or path) that is what you "
                                             "want: refine the query toward it (repeatable)."),
    unlike: Optional[List[str]] = typer.Option(None, "--unlike", help="A library image (id or path) that is not "
                                               "what you want: refine the query away from it (repeatable)."),
):
    """The search arguments and options of `imgsearch query`, which `imgsearch album save` shares."""


class _SearchCommand(TyperCommand):
    """A negative weight (`-1:cat`) is a query text, not an unknown option: it goes past a `--`, where click
    reads it as one (unless it is the value of the option before it, as in `--not -1:cat`)."""

    def parse_args(self, ctx, args):
        from ..request import WEIGHTED

        takes_value = {o for p in self.get_params(ctx) if p.param_type_name == "option" and not p.is_flag
                       for o in p.opts}
        head, tail, value_next = [], [], False
        for n, a in enumerate(args):
            if a == "--" and not value_next:
                tail += args[n + 1:]
                break
            (head if value_next or a[:1] != "-" or not WEIGHTED.match(a) else tail).append(a)
            value_next = not value_next and a in takes_value
        return super().parse_args(ctx, head + ["--"] * bool(tail) + tail)


def search_options(fn):
    """Give a command `imgsearch query`'s search arguments and options, declared once above. The command
    receives them as ``search``: the keywords of SearchRequest.build and Library.search (``k`` None when -k
    was not given); a ParamError raised anywhere in it names the flag as typed ("--under x: no such folder")."""
    shared = inspect.signature(_search_params, eval_str=True).parameters
    params = [p.replace(kind=p.KEYWORD_ONLY) for p in
              [*inspect.signature(fn, eval_str=True).parameters.values(), *shared.values()] if p.name != "search"]

    @functools.wraps(fn)
    def wrapper(**kw):
        v = {name: kw.pop(name) for name in shared}
        search = dict(text=list(v["texts"] or []), image=list(v["image"] or []), not_text=list(v["not_text"] or []),
                      not_image=list(v["not_image"] or []), k=v["k"], min_score=v["min_score"], under=v["under"],
                      tag=v["tag"] or None, keyword=v["keyword"], blend=v["blend"], after=v["after"],
                      before=v["before"], near=v["near"], camera=v["camera"], relevance=v["relevant"],
                      like=v["like"] or (), unlike=v["unlike"] or ())
        flags = {"k": ("-k", v["k"]), "under": ("--under", v["under"]), "min_score": ("--min-score", v["min_score"]),
                 "blend": ("--blend", v["blend"]), "keyword": ("--keyword", repr(v["keyword"])),
                 "tag": ("--tag", ", ".join(v["tag"] or [])), "after": ("--after", v["after"]),
                 "before": ("--before", v["before"]), "near": ("--near", v["near"]),
                 "camera": ("--camera", repr(v["camera"])), "like": ("--like", ", ".join(v["like"] or [])),
                 "unlike": ("--unlike", ", ".join(v["unlike"] or []))}
        with flag_words(**flags):
            return fn(search=search, **kw)

    wrapper.__signature__ = inspect.Signature(params)  # what Typer reads: the command's own, then the shared
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    wrapper.command_class = _SearchCommand
    return wrapper
