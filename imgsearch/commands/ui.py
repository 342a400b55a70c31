"""Command: `imgsearch ui`, the Streamlit web page over the current library."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

import typer

from . import command, err, settings_of
from ..errors import ImgSearchError, UsageError

MAX_UPLOAD_MB = 20  # query images only; anything bigger is not a photo someone meant to search with
# st.App (an ASGI app that takes middleware) and server.allowedHosts: the host checks below need both.
MIN_STREAMLIT = (1, 67)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
# The exec'd interpreter runs this; sys.argv[1] is the JSON spec from streamlit_argv.
LAUNCH = "from imgsearch.commands.ui import serve; serve()"

log = logging.getLogger("imgsearch.ui")


def app_file() -> Path:
    """The Streamlit page shipped inside the package (imgsearch/ui/app.py), wherever the package is installed."""
    from importlib.resources import files

    path = Path(str(files("imgsearch.ui") / "app.py"))
    if not path.is_file():  # e.g. a zipped install: Streamlit needs a real file to run
        raise ImgSearchError(f"the web UI page is missing ({path}); reinstall imgsearch with `pip install "
                             "--force-reinstall imgsearch`")
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


def _check_streamlit_version() -> None:
    from importlib.metadata import version

    found = version("streamlit")
    try:
        numbers = tuple(int(part) for part in found.split(".")[:2])
    except ValueError:  # a dev build: let it try
        return
    if numbers < MIN_STREAMLIT:
        need = ".".join(map(str, MIN_STREAMLIT))
        raise ImgSearchError(f"the web UI needs Streamlit {need} or newer (found {found}); upgrade it with "
                             f"`pip install -U 'streamlit>={need}'`")


# --- who may talk to the page ------------------------------------------------------------------------
# A page the user merely visits can rebind its own DNS name to 127.0.0.1, but the browser still sends that
# name in Host and Origin: so any request whose Host is not a name of this machine, or whose Origin is not
# the UI itself, is refused. Streamlit checks neither for HTTP, so serve() puts HostGuard in front of every
# route through st.App's public `middleware=` hook.
def _host_and_port(value: str) -> tuple[str, int | None] | None:
    """'127.0.0.1:8501' / '[::1]:8501' / 'LocalHost.' -> ('localhost', None); None if it is not a bare host."""
    try:
        parts = urlsplit("//" + value)
        hostname, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not hostname or parts.username is not None or parts.password is not None or parts.path or parts.query \
            or parts.fragment:
        return None
    return hostname.rstrip("."), port


class HostPolicy:
    """The Host names (any port) and page origins the UI answers: the loopback names and the --host given;
    with a wildcard --host (0.0.0.0, ::) people on the network open the page by this machine's IP or name,
    so any IP address and its host name too (a rebinding page always sends its own domain name, never an IP)."""

    def __init__(self, bind_host: str, port: int | None = None):
        bind = bind_host.strip().strip("[]").lower().rstrip(".")
        self.port = port
        self.any_ip = bind in WILDCARD_HOSTS
        names = set(LOOPBACK_NAMES)
        if self.any_ip:
            machine = socket.gethostname().lower().rstrip(".")
            if machine:
                names |= {machine, machine + ".local"}
        else:
            names.add(bind)
        self.names = frozenset(names)

    def shown(self) -> str:
        names = ", ".join(f"[{n}]" if ":" in n else n for n in sorted(self.names))
        return names + (" and this machine's IP addresses" if self.any_ip else "")

    def refusal(self, host: str | None, origin: str | None) -> str | None:
        """Why a request with these headers is refused, or None. ``origin`` is None without an Origin header
        (a browser sends one on every websocket handshake and every cross-origin request)."""
        from ..server import is_ip

        parsed = _host_and_port(host) if host else None
        if parsed is None or not (parsed[0] in self.names or (self.any_ip and is_ip(parsed[0]))):
            where = f"http://127.0.0.1:{self.port}/" if self.port else "http://127.0.0.1:PORT/"
            return (f"imgsearch ui refused a request for host {host!r}: it answers only to {self.shown()}. "
                    f"Open it as {where} (or start `imgsearch ui --host NAME` to serve it under NAME).")
        if origin is None:
            return None
        try:
            o = urlsplit(origin)
            default = 443 if o.scheme == "https" else 80
            ok = o.scheme in ("http", "https") and o.hostname and \
                (o.hostname.rstrip("."), o.port or default) == (parsed[0], parsed[1] or default)
        except ValueError:
            ok = False
        return None if ok else (f"imgsearch ui refused a request from the page at {origin!r}: only its own "
                                "page may use it.")


# Another site's page could show the UI in a frame of its own and lure clicks onto it (an album's Delete):
# no page but the UI's own may frame it. (A frame's websocket carries the UI's own Origin, so HostPolicy
# alone lets it through.)
NO_FRAMING = [(b"x-frame-options", b"SAMEORIGIN"), (b"content-security-policy", b"frame-ancestors 'self'")]


class HostGuard:
    """ASGI middleware: answers 403 to a request, or refuses a websocket handshake, that HostPolicy refuses;
    every answer forbids framing by other sites."""

    def __init__(self, app, policy: HostPolicy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if scope["type"] == "http":
            send = _unframed(send)
        hosts = [v for k, v in scope.get("headers", ()) if k == b"host"]
        origins = [v for k, v in scope.get("headers", ()) if k == b"origin"]
        if len(hosts) != 1 or len(origins) > 1:  # two Host headers: which one did the browser mean?
            why = "imgsearch ui refused a request with a missing or repeated Host or Origin header."
        else:
            why = self.policy.refusal(hosts[0].decode("latin-1"),
                                      origins[0].decode("latin-1") if origins else None)
        if why is None:
            return await self.app(scope, receive, send)
        # Debug only: the values are the caller's, and a log line per refusal would let anyone fill the log.
        log.debug("%s %s", scope.get("path"), why)
        if scope["type"] == "websocket":
            await receive()  # websocket.connect; closing before accepting makes the server answer 403
            await send({"type": "websocket.close", "code": 1008})
            return
        body = (why + "\n").encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _unframed(send):
    """``send`` with NO_FRAMING added to the response's headers."""
    async def unframed(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *NO_FRAMING]}
        await send(message)

    return unframed


def streamlit_config(host: str, port: int) -> dict:
    """Streamlit's options for the page; set here, so a ~/.streamlit/config.toml cannot loosen them."""
    cfg = {
        "server.address": host,
        "server.port": port,
        "server.headless": True,  # no browser launch, no e-mail prompt
        "browser.gatherUsageStats": False,
        "server.maxUploadSize": MAX_UPLOAD_MB,
        "server.fileWatcherType": "none",  # a search page, not a dev loop: no reloads on file changes
        "server.runOnSave": False,
        "runner.magicEnabled": False,  # a bare expression in the app must never print itself on the page
        "client.toolbarMode": "viewer",
        "global.developmentMode": False,  # it would send Access-Control-Allow-Origin: *
        # Streamlit's own layers, below HostGuard: a cross-origin page gets no CORS grant, uploads need the
        # XSRF token, no page may be served from the static folder, and no agent API.
        "server.enableCORS": True,
        "server.corsAllowedOrigins": [],
        "server.enableXsrfProtection": True,
        "server.enableStaticServing": False,
        "server.enableAgentApi": False,
    }
    policy = HostPolicy(host, port)
    if not policy.any_ip:  # its websocket check knows names only; HostGuard covers the IP case
        cfg["server.allowedHosts"] = sorted(policy.names)
    return cfg


def streamlit_env(settings) -> dict[str, str]:
    """Environment for the Streamlit process: the global options travel as IMGSEARCH_* variables."""
    return {
        **os.environ,
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
    }


def streamlit_argv(app: Path, host: str, port: int) -> list[str]:
    """`python -c LAUNCH SPEC`: a fresh interpreter that runs serve() with the page, host and options."""
    spec = {"app": str(app), "host": host, "port": port, "config": streamlit_config(host, port)}
    return [sys.executable, "-c", LAUNCH, json.dumps(spec)]


def serve(spec_json: str | None = None) -> None:
    """Run Streamlit's server for the page with HostGuard in front of every route, in the interpreter
    `imgsearch ui` exec'd; st.App.run treats the page as the main script, as `streamlit run` would (its
    folder on sys.path, a bare sys.argv)."""
    import streamlit as st
    from starlette.middleware import Middleware

    spec = json.loads(spec_json if spec_json is not None else sys.argv[1])
    guard = Middleware(HostGuard, policy=HostPolicy(spec["host"], spec["port"]))
    try:
        st.App(spec["app"], middleware=[guard]).run(config=spec["config"])
    except KeyboardInterrupt:  # uvicorn shuts down gracefully on Ctrl+C, then raises the signal again
        pass


@command("ui")
def ui_cmd(
    ctx: typer.Context,
    port: int = typer.Option(8501, "--port", "-p", min=1, max=65535, help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 shares the page (and your "
                             "photos) with your network. The page answers only requests addressed to localhost, "
                             "127.0.0.1, [::1] or this host."),
):
    """Open the web page: search by words or an example image, browse thumbnails, index folders."""
    import importlib.util

    if importlib.util.find_spec("streamlit") is None:
        raise ImgSearchError("the web UI needs Streamlit, which imgsearch installs; install it again with "
                             "`pip install 'streamlit>=1.67'`")
    _check_streamlit_version()
    settings = settings_of(ctx)
    app = app_file()
    _check_port_free(host, port)
    shown = f"[{host}]" if ":" in host else host
    err(f"imgsearch UI for {settings.home} at http://{shown}:{port}/  (Ctrl+C stops it)")
    if host not in LOOPBACK_NAMES:
        err("warning: listening beyond this machine; anyone who can reach it can search and view your photos, "
            "change and export your albums, and index any folder this account can read")
        err(f"it answers requests addressed to {HostPolicy(host, port).shown()}; others get 403")
    argv = streamlit_argv(app, host, port)
    sys.stdout.flush()
    sys.stderr.flush()
    # Become the Streamlit server (same process id): Ctrl+C, `kill` or a service manager then stop the
    # server itself, and no orphan can be left behind listening on the port.
    os.execve(argv[0], argv, streamlit_env(settings))
