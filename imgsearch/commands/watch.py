"""`imgsearch watch`: catch up, then keep the library in step with folders as files come and go."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List

import typer

from . import command, err, kept_lines, library_of, plural
from ..output import shown


def stamp(line: str) -> str:
    return time.strftime("%H:%M:%S ") + line


def batch_printer(quiet: bool = False):
    """on_batch for a Watcher: one line per batch on stdout, failures named on stderr."""

    def on_batch(batch) -> None:
        if quiet and not batch.error and not batch.report.failed:
            return
        typer.echo(stamp(batch.line()))
        for path, reason in batch.report.failed[:5]:
            err(f"  failed: {shown(path)}: {shown(reason)}")

    return on_batch


def say(line: str) -> None:
    err(stamp(line))


@command("watch")
def watch_cmd(
    ctx: typer.Context,
    paths: List[Path] = typer.Argument(..., help="Folders to keep in step with the library (recursive)."),
    poll: bool = typer.Option(False, "--poll", help="Poll for changes instead of native file events (network "
                              "drives, containers, or when inotify's watch limit is reached)."),
    interval: float = typer.Option(1.0, "--interval", min=0.05, help="Seconds between polls with --poll."),
    debounce: float = typer.Option(0.5, "--debounce", min=0.0, help="Seconds a file must stay unchanged "
                                   "before it is indexed (bursts of changes become one batch)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, and no line per batch."),
):
    """Index PATHS now, then keep indexing new, changed, moved and deleted files as they happen (Ctrl-C stops)."""
    from ..progress import Bar

    with library_of(ctx) as lib:
        watcher = lib.watcher(paths, poll=poll, interval=interval, debounce=debounce,
                              on_batch=batch_printer(quiet), say=say)
        with watcher:
            watcher.start()  # events from now on are kept: nothing written during the catch-up is missed
            with Bar("catching up", quiet=quiet, skip_empty=True, smoothing=0.1) as bar:
                report = watcher.catch_up(progress=bar)
            say(f"caught up: new {report.new}, updated {report.updated}, moved {report.moved}, removed "
                f"{report.removed}, failed {len(report.failed)} ({report.seconds:.1f}s)")
            for line in kept_lines(report):
                say(line)
            try:  # from here on a stop (Ctrl-C, kill) is the normal end, even before the first batch
                say(f"watching {plural(len(watcher.roots), 'folder')} ({watcher.how}); {lib.status().images} "
                    "images in the library; Ctrl-C stops")
                watcher.run()
            except KeyboardInterrupt:
                pass
            t, n = watcher.totals, watcher.batches
            say(f"stopped after {n} batch{'' if n == 1 else 'es'}: added {t.new}, updated {t.updated}, "
                f"moved {t.moved}, removed {t.removed}")
