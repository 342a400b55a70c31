"""Command: `imgsearch ui`, the Streamlit web page over the current library."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import typer

from ..cli import command, err, settings_of
from ..errors import ImgSearchError, UsageError

MAX_UPLOAD_MB = 20  # query images only; anything bigger is not a photo someone meant to search with


def app_file() -> Path:
    """ui/app.py of the source tree this package runs from (a checkout or an editable install)."""
    path = Path(__file__).resolve().parents[2] / "ui" / "app.py"
    if not path.is_file():
        raise ImgSearchError(f"the web UI is not installed ({path} is missing); install imgsearch from a source "
                             "checkout with `pip install -e '.[ui]'`")
    return path


def _check_port_free(host: str, port: int) -> None:
    """Fail with a clear sentence instead of Streamlit's log line when the port is taken."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        try:
            s.bind(addr)
        except PermissionError:
            raise UsageError(f"not allowed to listen on port {port}; use --port 1024 or above") from None
        except OSError as e:
            raise UsageError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port") from None


def streamlit_env(settings) -> dict[str, str]:
    """Environment for the Streamlit process: the global options travel as IMGSEARCH_* variables."""
    env = dict(os.environ)
    env.update({
        "IMGSEARCH_HOME": str(Path(settings.home).expanduser().resolve()),
        "IMGSEARCH_MODEL": settings.model,
        # Always set, even empty: from_env would otherwise drop the tag of a non-default model.
        "IMGSEARCH_PRETRAINED": settings.pretrained or "",
        "IMGSEARCH_DEVICE": settings.device,
        "IMGSEARCH_PRECISION": settings.precision,
        "IMGSEARCH_BATCH_SIZE": str(settings.batch_size),
        "IMGSEARCH_WORKERS": str(settings.workers),
        "IMGSEARCH_MAX_PIXELS": str(settings.max_pixels),
        "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
    })
    return env


def streamlit_argv(app: Path, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(app),
            "--server.address", host,
            "--server.port", str(port),
            "--server.headless", "true",  # no browser launch, no e-mail prompt
            "--browser.gatherUsageStats", "false",
            "--server.maxUploadSize", str(MAX_UPLOAD_MB),
            "--server.fileWatcherType", "none",  # a search page, not a dev loop: no reloads on file changes
            "--server.runOnSave", "false",
            "--runner.magicEnabled", "false",  # a bare expression in the app must never print itself on the page
            "--client.toolbarMode", "viewer",
            "--global.developmentMode", "false"]


@command("ui")
def ui_cmd(
    ctx: typer.Context,
    port: int = typer.Option(8501, "--port", "-p", min=1, max=65535, help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 shares the page (and your "
                             "photos) with your network."),
):
    """Open the web page: search by words or an example image, browse thumbnails, index folders."""
    import importlib.util

    if importlib.util.find_spec("streamlit") is None:
        raise ImgSearchError("the web UI needs Streamlit; install it with `pip install 'imgsearch[ui]'`")
    settings = settings_of(ctx)
    app = app_file()
    _check_port_free(host, port)
    shown = f"[{host}]" if ":" in host else host
    err(f"imgsearch UI for {settings.home} at http://{shown}:{port}/  (Ctrl+C stops it)")
    if host not in ("127.0.0.1", "localhost", "::1"):
        err("warning: listening beyond this machine; anyone who can reach it can search and view your photos "
            "and index any folder this account can read")
    argv = streamlit_argv(app, host, port)
    sys.stdout.flush()
    sys.stderr.flush()
    # Become the Streamlit server (same process id): Ctrl+C, `kill` or a service manager then stop the
    # server itself, and no orphan can be left behind listening on the port.
    os.execve(argv[0], argv, streamlit_env(settings))
