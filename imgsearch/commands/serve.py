"""`imgsearch serve`: keep the model and index warm and answer searches over local HTTP."""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

import typer

from . import command, err, kept_lines, library_of, plural, settings_of
from ..errors import UsageError


def parse_duration(text: str) -> float:
    """'90', '90s', '10m', '2h' -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text or "")
    if not m or not float(m.group(1)):  # zero: the server would say it exits when idle, and never did
        raise UsageError(f"--idle-exit {text!r}: give a duration above zero, such as 90s, 10m or 2h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


@command("serve")
def serve_cmd(
    ctx: typer.Context,
    port: int = typer.Option(8577, "--port", min=0, max=65535, help="Port to listen on (0 = any free port)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; localhost unless you mean it."),
    idle_exit: str = typer.Option(None, "--idle-exit", help="Exit after this long without requests (e.g. 10m)."),
    watch: Optional[List[Path]] = typer.Option(None, "--watch", help="Also keep this folder in step with the "
                                               "library, as `imgsearch watch` does (repeatable)."),
    poll: bool = typer.Option(False, "--poll", help="With --watch: poll instead of native file events."),
):
    """Serve searches over local HTTP with the model and index kept warm; `query` uses it automatically."""
    from ..client import refuse_if_served
    from ..server import SearchServer, is_loopback, server_file

    idle = parse_duration(idle_exit) if idle_exit else None
    settings = settings_of(ctx)
    library = watcher = None
    if poll and not watch:
        raise UsageError("--poll is how --watch notices changes; give --watch FOLDER too")
    refuse_if_served(settings)  # before the model loads; checked again when this server publishes itself
    try:
        if watch:
            from ..progress import Bar
            from .watch import batch_printer, say

            library = library_of(ctx)
            watcher = library.watcher(watch, poll=poll, on_batch=batch_printer(), say=say)
            watcher.start()  # before the catch-up, so nothing written meanwhile is missed
            with Bar("catching up", skip_empty=True, smoothing=0.1) as bar:
                report = watcher.catch_up(progress=bar)
            say(f"caught up: new {report.new}, updated {report.updated}, moved {report.moved}, removed "
                f"{report.removed}, failed {len(report.failed)}; watching {plural(len(watcher.roots), 'folder')} "
                f"({watcher.how})")
            for line in kept_lines(report):
                say(line)
        server = SearchServer(settings, host, port, idle, library=library)
    except BaseException:
        if watcher is not None:
            watcher.close()
        raise
    if watcher is not None:
        server.watch(watcher)
    h, p = server.address
    shown = f"[{h}]" if ":" in h else h
    def ready() -> None:  # once published: a server refused then (another took the library) never said it served
        err(f"imgsearch serving {server.service.library.model.label} ({server.service.library.vector_count()} "
            f"images) on http://{shown}:{p}/api/search?q=... (Ctrl-C stops"
            + (f"; exits after {idle_exit} idle" if idle_exit else "") + ")")
        err(f"requests need 'Authorization: Bearer TOKEN' with the token from {server_file(settings)}")
        if not is_loopback(host):
            err("warning: listening beyond this machine; anyone who can reach it and obtains the token can search "
                "your library and see its file paths, and the token crosses the network unencrypted (plain HTTP)")
    try:  # Ctrl-C, or `kill` (the entry point makes SIGTERM a KeyboardInterrupt): the discovery file goes
        server.serve_forever(ready)
    except KeyboardInterrupt:
        err("stopped")
