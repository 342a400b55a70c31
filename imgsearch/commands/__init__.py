"""The CLI's shared pieces (the Typer app, the error mapping every command goes through): cli.py and the
command groups here, which register on `app`, both import them, so no group imports cli (no cycle)."""

from __future__ import annotations

import contextlib
import functools
import os
import sys

import typer

from ..config import Settings
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
            err(f"error: {e}")
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


def command(*args, **kwargs):
    """app.command that turns library errors into one line on stderr and an exit code."""

    def decorate(fn):
        return app.command(*args, **kwargs)(handle_errors(fn))

    return decorate


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
        raise UsageError(f"{flag} {value}: {e.detail}") from None
