"""A long-running local search server: model, tokenizer and FAISS index stay warm between requests.

JSON over HTTP on localhost. `imgsearch query` finds a running server through ``<home>/server.json`` and
uses it when it serves the same model; the server reloads the index when an index run changed the library.

Who may ask: the Host header must name this machine (localhost, 127.0.0.1, [::1] or the ``--host``
address), so a page that rebinds its DNS name to 127.0.0.1 is refused; so are requests a browser marks as
cross-site (Origin, Sec-Fetch-Site); and every endpoint wants the random token only the 0600 ``server.json``
holds (``Authorization: Bearer TOKEN``). Without it, /api/health answers ``{"ok": true}`` and nothing else.

Endpoints and error codes: docs/cli.md (`imgsearch serve`). Every search is one request.SearchRequest, so a
wrong value is a 400 naming the field as the CLI and the Python API do; errors are ``{"error": message}``,
plus ``"field"`` when one field was wrong.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import re
import secrets
import socket
import sys
import threading
import time
from contextlib import suppress
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse, urlsplit

from .client import CHALLENGE, proof, publish, server_file
from .config import NESTED_JSON, Settings, read_json
from .errors import ImgSearchError, LibraryError, ModelMismatchError, ParamError, UsageError
from .request import SearchRequest, Term

MAX_BODY = 25 << 20  # bytes per request
LISTEN_BACKLOG = 128  # bursts of clients queue instead of getting connection resets
MAX_CONNECTIONS = 128  # open connections; past it the longest-idle one is dropped to make room
REQUEST_TIMEOUT = 30.0  # seconds a connection may sit silent (half-sent request, idle keep-alive)
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[^:\[\]/@\s]+)(?::(\d{1,5}))?")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (localhost, 127.x, ::1)."""
    name = host.strip().strip("[]").lower()
    try:
        return name == "localhost" or ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class SearchService:
    """The warm state behind the HTTP handlers, usable without HTTP too."""

    def __init__(self, settings: Settings, library=None):
        from .library import Library

        self.settings = settings
        # One Library shared by every request thread (its docstring says what it locks), and by the
        # watcher of `serve --watch`, whose batches move the version that makes searches reload the index.
        self.library = (library or Library(settings=settings)).load()  # now, not on the first request
        self.last_request = time.monotonic()

    def health(self) -> dict:
        m = self.library.model
        return {"ok": True, "pid": os.getpid(), "home": str(self.settings.home), "model": m.name,
                "pretrained": m.pretrained, "fingerprint": m.fingerprint, "vectors": self.library.vector_count()}

    def search(self, request) -> list[dict]:
        return [h.as_dict() for h in self.library.run(request)]


class _Handler(BaseHTTPRequestHandler):
    service: SearchService  # set on the subclass made per server
    token: str
    allowed_names: frozenset[str]
    any_ip_host: bool  # bound to a wildcard address: any IP literal names this machine
    server_version = "imgsearch"
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out at once, no delayed-ACK stall per request

    def log_message(self, fmt, *args):  # quiet: the CLI prints what matters
        pass

    def handle_one_request(self):
        self.server.mark(self.connection, busy=False)  # waiting for a request: may be dropped when full
        self._unread_body = False
        super().handle_one_request()

    def _send(self, code: int, payload, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        if self._unread_body:
            # The body was not read; the bytes left on the socket must never be parsed as the next request.
            self.close_connection = True
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        if self.close_connection:
            self.send_header("Connection", "close")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, code: int, message: str, field: str | None = None, headers: dict | None = None) -> None:
        self._send(code, {"error": message, **({"field": field} if field else {})}, headers)

    def send_error(self, code, message=None, explain=None):
        """Errors the base class finds while parsing (bad request line, headers too long) as JSON too."""
        self.close_connection = True
        self._unread_body = False
        try:
            self._error(code, message or HTTPStatus(code).phrase)
        except ValueError:
            super().send_error(code, message, explain)

    # --- who may ask --------------------------------------------------------------------------
    def _names_this_machine(self, value: str, scheme_port: int | None = None) -> bool:
        m = _HOST.fullmatch(value.strip().lower())
        if not m:
            return False
        name, port = m.group(1).removesuffix("."), m.group(2)  # a bracketed address ends in "]"
        port = int(port) if port else scheme_port
        if port is not None and port != self.server.server_address[1]:
            return False
        return name in self.allowed_names or (self.any_ip_host and is_ip(name.strip("[]")))

    def _refusal(self) -> tuple[int, str] | None:
        """Why this request may not be served, or None. Says nothing about the library."""
        hosts, origins = self.headers.get_all("Host") or [], self.headers.get_all("Origin") or []
        if len(hosts) != 1 or not self._names_this_machine(hosts[0]):  # two Host headers: which one is meant?
            return 403, "this server answers only requests addressed to localhost"
        if origins:
            try:
                parts = urlsplit(origins[0])
                ok = len(origins) == 1 and parts.scheme == "http" and self._names_this_machine(parts.netloc, 80)
            except ValueError:
                ok = False
            if not ok:
                return 403, "cross-origin requests are not allowed"
        if self.headers.get("Sec-Fetch-Site", "none").lower() not in ("none", "same-origin"):
            return 403, "cross-site requests are not allowed"
        return None

    def _authorized(self) -> bool:
        given = self.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token.encode())

    def _dispatch(self) -> None:
        if not self.server.mark(self.connection, busy=True):
            # Dropped to make room while its headers trickled in: what arrived is not a request to answer.
            self.close_connection = True
            return
        self.service.last_request = time.monotonic()
        te = self.headers.get("Transfer-Encoding")
        # One plain decimal number: int() also takes "+5", "1_0" and " 5", and of two lengths the first was used.
        lengths = {value.strip() for value in self.headers.get_all("Content-Length") or ["0"]}
        length = lengths.pop() if len(lengths) == 1 else ""
        self._length = int(length) if re.fullmatch(r"[0-9]{1,18}", length) else None
        self._unread_body = bool(te) or self._length != 0
        if te is not None:
            return self._error(411, "chunked request bodies are not supported; send Content-Length")
        if self._length is None:
            return self._error(400, "bad Content-Length")
        refusal = self._refusal()
        if refusal:
            return self._error(*refusal)
        url = urlparse(self.path)
        authorized = self._authorized()
        method = "GET" if self.command == "HEAD" else self.command  # HEAD: the GET answer's headers only
        if url.path == "/api/health" and method == "GET" and not authorized and \
                not self.headers.get("Authorization"):
            # Liveness only (no paths, no pid); to a client's challenge, proof that this server holds the token.
            challenge = self.headers.get(CHALLENGE)
            return self._send(200, {"ok": True, **({"proof": proof(self.token, challenge)} if challenge else {})})
        if not authorized:
            return self._error(401, "missing or wrong token; send 'Authorization: Bearer TOKEN' with the token "
                                    "from server.json in the library folder",
                               headers={"WWW-Authenticate": 'Bearer realm="imgsearch"'})
        lib = self.service.library
        routes = {("GET", "/api/health"): lambda url: self.service.health(),
                  ("GET", "/api/status"): lambda url: lib.status().as_dict(),
                  ("GET", "/api/search"): self._get_search, ("POST", "/api/search"): self._post_search,
                  ("POST", "/api/search/image"): self._post_image,
                  ("GET", "/api/albums"): lambda url: {"albums": [a.as_dict() for a in lib.albums()]},
                  ("POST", "/api/albums"): self._save_album}
        if url.path.startswith("/api/albums/"):  # /api/albums/NAME
            routes = {("GET", url.path): self._album, ("DELETE", url.path): self._delete_album}
        route = routes.get((method, url.path))
        if route is None:
            if allowed := {m for m, p in routes if p == url.path}:
                allow = ", ".join(sorted(allowed | ({"HEAD"} if "GET" in allowed else set())))
                return self._error(405, f"{self.command} is not allowed on {url.path}", headers={"Allow": allow})
            return self._error(404, f"no endpoint {url.path}; see /api/health, /api/status, /api/search, "
                                    "/api/albums")
        self._guard(lambda: self._send(200, route(url)))

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch

    def _body(self) -> bytes:
        length = self._length
        if length > MAX_BODY:
            raise _Reply(413, f"request body over {MAX_BODY >> 20} MB")
        data = self.rfile.read(length) if length else b""
        if len(data) < length:
            self.close_connection = True
            raise ConnectionAbortedError("client sent less than its Content-Length")
        self._unread_body = False
        return data

    def _content_type(self) -> str:
        return (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()

    def _guard(self, fn) -> None:
        try:
            fn()
        except (ConnectionError, TimeoutError):
            raise  # the client went away: nothing to answer; the server logs one line
        except _Reply as e:
            self._error(*e.args)
        except ImgSearchError as e:  # a ParamError names its field
            # The library's state, no fault of the server: no vectors for this model, or an album written to a
            # read-only library.
            conflict = isinstance(e, ModelMismatchError) or (isinstance(e, LibraryError)
                                                             and self.service.library.store.read_only)
            code = 409 if conflict else 400 if isinstance(e, UsageError) else 500
            self._error(code, str(e), getattr(e, "param", None))
        except Exception as e:  # never kill the server over one request
            self._error(500, f"internal error: {type(e).__name__}: {e}")

    # --- endpoints: each returns its JSON answer ------------------------------------------------
    def _get_search(self, url, image: Term | None = None) -> dict:
        request = SearchRequest.from_params(parse_qs(url.query, keep_blank_values=True), image=image)
        return {"hits": self.service.search(request)}

    def _json(self):
        if self._content_type() != "application/json":
            raise _Reply(415, "send the search as JSON with 'Content-Type: application/json'")
        raw = self._body()
        try:
            return read_json(raw or b"{}")
        except ValueError as e:
            raise UsageError("request body is nested too deeply; send a flat JSON object of search fields"
                             if getattr(e, "msg", "") == NESTED_JSON else "request body is not valid JSON") from None

    def _post_search(self, url) -> dict:
        return {"hits": self.service.search(SearchRequest.from_json(self._json()))}

    def _post_image(self, url) -> dict:
        if self._content_type() in ("application/x-www-form-urlencoded", "multipart/form-data", "text/plain"):
            # What a web form may send cross-site without asking first; an image upload is never one.
            raise _Reply(415, "send the image with 'Content-Type: image/jpeg' (or its type, or "
                              "application/octet-stream)")
        raw = self._body()
        if not raw:
            raise UsageError("send the image file as the request body")
        return self._get_search(url, Term("image", raw, 1.0, "in the request body"))

    def _album(self, url) -> dict:
        album = self.service.library.album(unquote(url.path[len("/api/albums/"):]))
        return {"album": album.as_dict(), "hits": [h.as_dict() for h in album.hits]}

    def _save_album(self, url) -> dict:
        body = self._json()
        if not isinstance(body, dict):
            raise ParamError("body", "send the album as a JSON object: its name and the search fields")
        name, k = body.pop("name", None), body.pop("k", None)
        album = self.service.library.save_album(name, request=SearchRequest.from_json(body), k=k)
        return {"album": album.as_dict()}

    def _delete_album(self, url) -> dict:
        name = unquote(url.path[len("/api/albums/"):])
        self.service.library.delete_album(name)
        return {"deleted": name}


class _Reply(Exception):
    """An HTTP error answer decided inside an endpoint: _Reply(code, message)."""


class _HTTPServer(ThreadingHTTPServer):
    """Threads per connection, with a deep accept queue, a cap on open connections and one-line logs."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address, handler, max_connections: int):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.max_connections = max_connections
        # socket -> monotonic time it started waiting for a request, or None while a request runs
        self._conns: dict = {}
        self._conns_lock = threading.RLock()  # _refuse, under it, closes through shutdown_request
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        with self._conns_lock:
            if len(self._conns) >= self.max_connections:
                idle = [(since, s) for s, since in self._conns.items() if since is not None]
                if not idle:
                    self._refuse(request)
                    return
                # Drop whoever has kept a connection silent longest, so half-sent requests can never starve
                # a real one; shutdown (not close) wakes its thread, which then closes its own socket.
                victim = min(idle, key=lambda p: p[0])[1]
                del self._conns[victim]
                with suppress(OSError):
                    victim.shutdown(socket.SHUT_RDWR)
            self._conns[request] = time.monotonic()
        super().process_request(request, client_address)

    def _refuse(self, request) -> None:
        body = b'{"error": "server busy: too many requests at once; try again"}'
        with suppress(OSError):
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        self.shutdown_request(request)

    def mark(self, request, busy: bool) -> bool:
        """Record whether a request is running on this connection; False once it was dropped."""
        with self._conns_lock:
            if request not in self._conns:
                return False
            self._conns[request] = None if busy else time.monotonic()
            return True

    def shutdown_request(self, request):
        with self._conns_lock:
            self._conns.pop(request, None)
        super().shutdown_request(request)

    _log_lock = threading.Lock()  # one for every server in the process: they share one stderr

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        who = f"{client_address[0]}:{client_address[1]}" if isinstance(client_address, tuple) else "a client"
        if isinstance(exc, (ConnectionError, TimeoutError)):
            line = f"request from {who} aborted ({type(exc).__name__})"
        else:
            line = f"request from {who} failed: {type(exc).__name__}: {' '.join(str(exc).split())}"
        # The line and its newline in one write: print() writes them apart, and lines from requests
        # failing at the same moment ran together.
        with suppress(OSError, ValueError), self._log_lock:
            sys.stderr.write(f"imgsearch serve: {line}\n")
            sys.stderr.flush()


class SearchServer:
    """The HTTP server plus its discovery file and optional idle shutdown."""

    def __init__(self, settings: Settings, host: str = "127.0.0.1", port: int = 0, idle_exit: float | None = None,
                 library=None):
        self.settings = settings
        self.service = SearchService(settings, library)
        self.token = secrets.token_urlsafe(32)
        bind = host.strip("[]")
        handler = type("Handler", (_Handler,), {"service": self.service, "token": self.token,
                                                "allowed_names": _allowed_names(bind),
                                                "any_ip_host": _is_wildcard(bind),
                                                "timeout": REQUEST_TIMEOUT})
        try:
            self.httpd = _HTTPServer((bind, port), handler, MAX_CONNECTIONS)
        except (OSError, OverflowError) as e:
            reason = getattr(e, "strerror", None) or e
            raise UsageError(f"cannot listen on {host}:{port}: {reason}; pick another --port or --host") from None
        self.idle_exit = idle_exit
        self._watching: tuple[threading.Thread, threading.Event] | None = None

    def watch(self, watcher) -> None:
        """Run a started Library watcher (``serve --watch``) in a thread for as long as the server runs."""
        stop = threading.Event()

        def run() -> None:
            try:
                watcher.run(stop)
            except ImgSearchError as e:  # every watched folder gone: searches go on, watching stops
                watcher.say(f"stopped watching: {e}")
            except Exception as e:  # a bug must not take the search server down with it
                watcher.say(f"stopped watching: internal error: {type(e).__name__}: {e} (restart serve to "
                            "watch again; please report it)")

        thread = threading.Thread(target=run, name="imgsearch-watch", daemon=True)
        thread.start()
        self._watching = (thread, stop)

    @property
    def address(self) -> tuple[str, int]:
        return tuple(self.httpd.server_address[:2])

    def write_discovery(self) -> None:
        """server.json: how to reach this server and its token (client.publish)."""
        host, port = self.address
        try:
            publish(self.settings, {**self.service.health(), "host": host, "port": port, "token": self.token,
                                    "lang": self.service.library.settings.lang, "started_at": time.time()})
        except OSError as e:  # e.g. a library on read-only media: no client could learn the token
            raise LibraryError(f"cannot write {server_file(self.settings)} ({e.strerror or e}), where clients find "
                               "the server and its token; query the library directly (queries work without "
                               "write access), or serve a writable copy") from None

    def remove_discovery(self) -> None:
        path = server_file(self.settings)
        with suppress(OSError, ValueError, AttributeError):
            info = json.loads(path.read_text())
            if info.get("pid") == os.getpid() and info.get("token") == self.token:
                path.unlink()

    def _watch_idle(self) -> None:
        while True:
            time.sleep(min(5.0, self.idle_exit / 4))
            if time.monotonic() - self.service.last_request > self.idle_exit:
                self.httpd.shutdown()
                return

    def serve_forever(self, ready=None) -> None:
        """Publish server.json, call ``ready()`` (the server is now the library's), and answer until shut down."""
        try:
            self.write_discovery()
            if ready:
                ready()
            if self.idle_exit:
                threading.Thread(target=self._watch_idle, daemon=True).start()
            self.httpd.serve_forever(poll_interval=0.2)
        finally:
            self.httpd.server_close()
            self.remove_discovery()
            if self._watching is not None:  # a batch being written finishes first
                thread, stop = self._watching
                stop.set()
                thread.join(60)

    def shutdown(self) -> None:
        self.httpd.shutdown()


def is_ip(name: str) -> bool:
    try:
        return bool(ipaddress.ip_address(name))
    except ValueError:
        return False


def _is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def _allowed_names(host: str) -> frozenset[str]:
    """Host header names that mean this machine: loopback, the --host value and, on a wildcard bind, its name."""
    if _is_wildcard(host):
        return LOOPBACK_NAMES | {name.lower() for name in (socket.gethostname(), socket.getfqdn()) if name}
    return LOOPBACK_NAMES | {f"[{host.lower()}]" if ":" in host else host.lower()}
