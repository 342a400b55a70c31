"""Talk to a running `imgsearch serve` for the same library and model. Standard library only, so a query
through a warm server starts in a fraction of a second (no torch, numpy or SQLAlchemy imports)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import suppress
from http.client import HTTPException
from pathlib import Path

from .config import CLI_ENV, Settings, atomic_file, make_home
from .errors import ImgSearchError, LibraryError, ModelMismatchError, ParamError, UsageError
from .modelspec import ModelSpec

SERVER_FILE = "server.json"
SERVER_LOCK = "server.lock"  # held while a starting server checks and writes server.json
CHALLENGE = "X-Imgsearch-Challenge"  # a client's random value; /api/health answers proof(token, value)


def server_file(settings: Settings) -> Path:
    return Path(settings.home) / SERVER_FILE


def find_server(settings: Settings, timeout: float = 0.5, any_model: bool = False) -> dict | None:
    """The discovery record of a live server for this library and model (``any_model``: whatever it serves),
    or None."""
    path = server_file(settings)
    try:
        if hasattr(os, "getuid") and path.stat().st_uid != os.getuid():
            return None  # someone else's file could point our queries at their server
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    fields = (("token", str), ("host", str), ("port", int), ("pid", int))
    if not isinstance(info, dict) or not all(isinstance(info.get(key), kind) for key, kind in fields) or \
            not (0 < info["port"] < 65536 and info["pid"] > 0) or \
            not (any_model or ModelSpec(settings.model, settings.pretrained).same_model(info.get("model"),
                                                                                        info.get("pretrained"))):
        return None  # not a record a server wrote (damaged, edited, another program's)
    if not any_model and info.get("lang") != settings.lang:
        return None  # it encodes query texts in its own --lang
    try:
        os.kill(info["pid"], 0)
    except (OSError, OverflowError):
        return None  # left behind by a server that died
    # The server that wrote the record proves it holds the token before the token or a query is sent: after
    # it died, another program (another user's) may listen on its port, while its pid went to a process of ours.
    challenge = os.urandom(16).hex()
    try:
        health = _request(info, "GET", "/api/health", None, timeout, {CHALLENGE: challenge})
    except (OSError, ValueError, ImgSearchError):  # no server, or not ours (not even JSON)
        return None
    answer = health.get("proof") if isinstance(health, dict) else None
    return info if isinstance(answer, str) and hmac.compare_digest(answer, proof(info["token"], challenge)) else None


def refuse_if_served(settings: Settings, token: str | None = None) -> None:
    """A one-line LibraryError when another server, alive and proving it holds its token, serves this library."""
    info = find_server(settings, timeout=5.0, any_model=True)  # a server busy loading may answer slowly
    if info is not None and info["token"] != token:
        raise LibraryError(f"another imgsearch serve (pid {info['pid']}, port {info['port']}) is serving this "
                           "library; `imgsearch query` uses it (stop it to serve this library here)")


def publish(settings: Settings, info: dict) -> None:
    """Write the discovery record of a starting server, readable by this user only from the start. It is taken
    from a server that died, never from one that runs: one record per library, so that one could not be found."""
    from .lock import file_lock

    path = server_file(settings)
    with file_lock(path.with_name(SERVER_LOCK)):  # two servers starting at once: the second finds the first
        refuse_if_served(settings, info["token"])
        with atomic_file(path) as f:  # created 0600
            f.write(json.dumps(info).encode())


def proof(token: str, challenge: str) -> str:
    return hmac.new(token.encode(), challenge.encode(), hashlib.sha256).hexdigest()


def _url_host(host: str) -> str:
    """Where to connect: a wildcard bind is reached on loopback; IPv6 literals go in brackets."""
    host = str(host).strip("[]")
    wildcards = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "[::1]"}
    return wildcards.get(host) or (f"[{host}]" if ":" in host else host)


def _request(info: dict, method: str, path: str, body: dict | None, timeout: float,
             headers: dict | None = None) -> dict:
    """``headers``: sent instead of the token."""
    url = f"http://{_url_host(info['host'])}:{int(info['port'])}{path}"
    data = json.dumps(body).encode() if body is not None else None
    headers = dict(headers or {"Authorization": f"Bearer {info['token']}"})
    if data is not None:
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        message, field = str(e), None
        with suppress(ValueError, AttributeError):
            payload = json.loads(e.read())
            message, field = payload.get("error", str(e)), payload.get("field")
        if e.code == 409:
            raise ModelMismatchError(message) from None
        if e.code == 400 and isinstance(field, str) and message.startswith(f"{field}: "):
            raise ParamError(field, message[len(field) + 2:]) from None  # the CLI rewords it with its flag
        if 400 <= e.code < 500:
            raise UsageError(message) from None
        raise ImgSearchError(f"search server: {message}") from None
    except HTTPException as e:  # e.g. the answer cut short: the server stopped meanwhile, as if it were gone
        raise ConnectionError(f"search server: {type(e).__name__}") from None


def search(info: dict, request, timeout: float = 60.0) -> list[dict]:
    """Run one request.SearchRequest on the server; image files are sent as their bytes (the server reads no
    client paths)."""
    return _request(info, "POST", "/api/search", request.to_json(), timeout)["hits"]


def start_daemon(settings: Settings, idle_exit: str = "10m", wait: float = 180.0) -> dict | None:
    """Start `imgsearch serve --idle-exit` in the background for this library and wait until it answers."""
    try:
        log_path = make_home(settings.home) / "server.log"  # queries and paths: for this user's eyes only
        log = os.fdopen(os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")
    except OSError:
        return None  # a read-only library: no server could publish itself there; the caller answers in-process
    cmd = [sys.executable, "-m", "imgsearch", "--home", str(settings.home), "--model", settings.model]
    if settings.pretrained:
        cmd += ["--pretrained", settings.pretrained]
    cmd += ["--device", settings.device, "--precision", settings.precision] + (
        ["--lang", settings.lang] if settings.lang else []) + ["serve", "--idle-exit", idle_exit]
    env = {k: v for k, v in os.environ.items() if CLI_ENV.get(k) != v}  # the server picks its own threads
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, env=env)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        info = find_server(settings)
        if info is not None:
            return info
        if proc.poll() is not None:
            return None  # it failed to start (the log says why); the caller answers in-process
        time.sleep(0.2)
    return None
