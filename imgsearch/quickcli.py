"""Console-script entry point: the `imgsearch` program itself (never imported by a host program)."""

from __future__ import annotations

import os
import sys

from .config import CLI_ENV


def main() -> None:
    # Pillow's per-file warnings are silenced by the CLI's own callback (cli.main), which every command runs.
    # A query embeds a handful of tokens: OpenBLAS's thread pool costs more than it saves there, and on a busy
    # 2-core machine its spinning threads made the text forward 20x slower (measured). This is the program's
    # own process, so it may choose, before numpy loads; a user's own setting wins.
    if "query" in sys.argv[1:] and "OPENBLAS_NUM_THREADS" not in os.environ:
        os.environ["OPENBLAS_NUM_THREADS"] = CLI_ENV["OPENBLAS_NUM_THREADS"] = "1"
    import signal

    from .cli import app

    def _terminate(signum, frame):
        raise KeyboardInterrupt

    # `kill` stops a command as Ctrl-C does, so its clean-up runs (an export's temporary folder, a server's
    # discovery file, a watcher's last batch). Only this entry point, which owns its process, does so: the
    # library never touches signal handlers, which belong to whatever program imported it.
    signal.signal(signal.SIGTERM, _terminate)
    app(prog_name="imgsearch")
