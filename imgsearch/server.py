"""A long-running local search server: model, tokenizer and FAISS index stay warm between requests.

JSON over HTTP on localhost. `imgsearch query` finds a running server through ``<home>/server.json`` and
uses it when it serves the same model; the server reloads the index when an index run changed the library.

Who may ask: every request must name this machine in its Host header (localhost, 127.0.0.1, [::1] or the
``--host`` address), so a web page that rebinds its DNS name to 127.0.0.1 is refused; requests a browser
marks as coming from another site (Origin, Sec-Fetch-Site) are refused; and every endpoint wants the random
token that only the 0600 ``server.json`` holds (``Authorization: Bearer TOKEN``). Without the token,
/api/health answers ``{"ok": true}`` and nothing else.

Endpoints (all answer JSON; errors are ``{"error": message}`` with a 4xx/5xx code, plus ``"field"`` when
one request field was wrong):
  GET  /api/health                      who is serving: model, home, pid
  GET  /api/status                      the same as `imgsearch status --json`
  GET  /api/search?q=TEXT&k=10&...      text search; q repeatable; also not=, under=, min_score=, id=, tag=,
                                        keyword=, blend=, after=, before=, near=LAT,LON[,KM], camera=
  POST /api/search                      Content-Type: application/json
                                        {"texts": ["2:red car", {"text": "night", "weight": 0.5}], "not": [...],
                                         "ids": [...], "images": [base64 or {"data": base64, "weight": 2}],
                                         "not_images": [...], "k": 10, "min_score": null, "under": null,
                                         "tag": null, "keyword": null, "blend": null, "after": "2023",
                                         "before": "2023-06", "near": "48.85,2.29,5" or [48.85, 2.29, 5],
                                         "camera": "pixel", "relevance": false}
  POST /api/search/image?k=10           the image file as the body (Content-Type image/* or
                                        application/octet-stream)
With "relevance": true (relevance=1 in a URL), every hit carries "relevant": true/false against the
model's calibrated relevance floor (relevance.py); it is null otherwise, and where no floor applies
(keyword ranking, text and images mixed).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import math
import os
import re
import secrets
import socket
import sys
import tempfile
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse, urlsplit

from .config import Settings
from .errors import ImgSearchError, ModelMismatchError, ParamError, UsageError

MAX_BODY = 25 << 20  # bytes per request
MAX_IMAGES = 16
SERVER_FILE = "server.json"
LISTEN_BACKLOG = 128  # bursts of clients queue instead of getting connection resets
MAX_CONNECTIONS = 128  # open connections; past it the longest-idle one is dropped to make room
REQUEST_TIMEOUT = 30.0  # seconds a connection may sit silent (half-sent request, idle keep-alive)
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
_SEARCH_FIELDS = ("texts", "not", "images", "not_images", "ids", "k", "min_score", "under", "tag", "keyword",
                  "blend", "after", "before", "near", "camera", "relevance")
_WHEN_WHERE = ("after", "before", "near", "camera")
_GET_PARAMS = {"q", "not", "id", "k", "under", "min_score", "tag", "keyword", "blend", "relevance", *_WHEN_WHERE}
_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[^:\[\]/@\s]+)(?::(\d{1,5}))?")


def server_file(settings: Settings) -> Path:
    return settings.home / SERVER_FILE


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (localhost, 127.x, ::1)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class FieldError(UsageError):
    """One request field has the wrong type; the JSON error names it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _weight(item: dict, name: str) -> float:
    w = item.get("weight", 1.0)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
        raise FieldError(name, f"'{name}.weight' must be a finite number")
    return float(w)


def _only_keys(item: dict, name: str, keys: set[str]) -> None:
    extra = sorted(set(item) - keys)
    if extra:
        raise FieldError(name, f"'{name}' has unknown key {extra[0]!r}; use {', '.join(sorted(keys))}")


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

    def parse(self, body: dict):
        """(Query, k, search keyword arguments) from a JSON request; wrong types are a FieldError."""
        from .query import Query, Term, image_data_term, text_term
        from .queryspec import check_k

        unknown = sorted(set(body) - set(_SEARCH_FIELDS))
        if unknown:
            raise FieldError(unknown[0], f"unknown field {unknown[0]!r}; the fields are {', '.join(_SEARCH_FIELDS)}")

        def items(key: str) -> list:
            value = body.get(key)
            if value is None:
                return []
            return value if isinstance(value, list) else [value]

        def texts(key: str) -> list:
            out = []
            for n, item in enumerate(items(key)):
                name = f"{key}[{n}]"
                if isinstance(item, str):
                    out.append(text_term(item))  # '2:red car' is weighted as on the command line
                elif isinstance(item, dict):
                    _only_keys(item, name, {"text", "weight"})
                    text = item.get("text")
                    if not isinstance(text, str) or not text.strip():
                        raise FieldError(name, f"'{name}.text' must be some words")
                    out.append(Term("text", text.strip(), _weight(item, name)))
                else:
                    raise FieldError(key, f"'{key}' must be a string or a list of strings")
            return out

        def pictures(key: str) -> list:
            out = []
            for n, item in enumerate(items(key)):
                name = f"{key}[{n}]"
                weight = 1.0
                if isinstance(item, dict):
                    _only_keys(item, name, {"data", "weight"})
                    weight = _weight(item, name)
                    item = item.get("data")
                if not isinstance(item, str):
                    raise FieldError(key, f"'{key}' must be a list of base64 strings or "
                                          '{"data": base64, "weight": number} objects')
                try:
                    data = base64.b64decode(item, validate=True)
                except (binascii.Error, ValueError):
                    raise FieldError(name, f"'{name}': images must be base64-encoded file contents") from None
                out.append(image_data_term(data, weight, name))
            return out

        positives, negatives = texts("texts"), texts("not")
        images, not_images = pictures("images"), pictures("not_images")
        if len(images) + len(not_images) > MAX_IMAGES:
            raise FieldError("images", f"at most {MAX_IMAGES} images per request")
        ids = body.get("ids") or []
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise FieldError("ids", "'ids' must be a list of image ids")
        k = body.get("k", 10)
        if isinstance(k, bool) or not isinstance(k, int):
            raise FieldError("k", "'k' must be a whole number")
        check_k(k)
        min_score = body.get("min_score")
        if min_score is not None and (isinstance(min_score, bool) or not isinstance(min_score, (int, float))
                                      or not math.isfinite(min_score)):
            raise FieldError("min_score", "'min_score' must be a number")
        under = body.get("under")
        if under is not None and not isinstance(under, str):
            raise FieldError("under", "'under' must be a folder path")
        tag = body.get("tag")
        if tag is not None and not (isinstance(tag, str) or (isinstance(tag, list)
                                                             and all(isinstance(t, str) for t in tag))):
            raise FieldError("tag", "'tag' must be a string or a list of strings")
        keyword = body.get("keyword")
        if keyword is not None and not isinstance(keyword, str):
            raise FieldError("keyword", "'keyword' must be a string")
        blend = body.get("blend")
        if blend is not None and (isinstance(blend, bool) or not isinstance(blend, (int, float))
                                  or not math.isfinite(blend)):
            raise FieldError("blend", "'blend' must be a number from 0 to 1")
        ww = {name: body.get(name) for name in _WHEN_WHERE if body.get(name) is not None}
        for name in ("after", "before", "camera"):
            if name in ww and not isinstance(ww[name], str):
                raise FieldError(name, f"{name}: must be a string, e.g. " + ('"pixel"' if name == "camera" else
                                                                             '"2023-06" or "2023-06-01T14:30Z"'))
        near = ww.get("near")  # values are checked by the search itself: a ParamError naming the field (400)
        if near is not None and not (isinstance(near, str) or (
                isinstance(near, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in near))):
            raise FieldError("near", 'near: must be "LAT,LON[,KM]" or [lat, lon, km]')
        relevance = body.get("relevance", False)
        if not isinstance(relevance, bool):
            raise FieldError("relevance", "'relevance' must be true or false")
        query = Query.build(positives, images, negatives, not_images, ids)
        return query, k, {"min_score": min_score, "under": under, "tag": tag or None, "keyword": keyword,
                          "blend": blend, "relevance": relevance, **ww}

    def search(self, body: dict) -> list[dict]:
        query, k, kwargs = self.parse(body)
        return [h.as_dict() for h in self.library.search_query(query, k, **kwargs)]


class _Handler(BaseHTTPRequestHandler):
    service: SearchService  # set on the subclass made per server
    token: str
    allowed_names: frozenset[str]
    any_ip_host: bool  # bound to a wildcard address: any IP literal names this machine
    server_version = "imgsearch"
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out at once, no delayed-ACK stall per request
    timeout = REQUEST_TIMEOUT

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
        name, port = m.group(1), m.group(2)
        if name.endswith(".") and not name.startswith("["):
            name = name[:-1]
        port = int(port) if port else scheme_port
        if port is not None and port != self.server.server_address[1]:
            return False
        if name in self.allowed_names:
            return True
        if self.any_ip_host:
            try:
                ipaddress.ip_address(name.strip("[]"))
                return True
            except ValueError:
                return False
        return False

    def _refusal(self) -> tuple[int, str] | None:
        """Why this request may not be served, or None. Says nothing about the library."""
        host = self.headers.get("Host")
        if not host or not self._names_this_machine(host):
            return 403, "this server answers only requests addressed to localhost"
        origin = self.headers.get("Origin")
        if origin is not None:
            try:
                parts = urlsplit(origin)
                ok = parts.scheme == "http" and self._names_this_machine(parts.netloc, 80)
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
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        self._unread_body = bool(te) or length != 0
        if te is not None:
            return self._error(411, "chunked request bodies are not supported; send Content-Length")
        if length < 0:
            return self._error(400, "bad Content-Length")
        refusal = self._refusal()
        if refusal:
            return self._error(*refusal)
        url = urlparse(self.path)
        authorized = self._authorized()
        if url.path == "/api/health" and self.command == "GET" and not authorized and \
                not self.headers.get("Authorization"):
            return self._send(200, {"ok": True})  # liveness only: no paths, no pid
        if not authorized:
            return self._error(401, "missing or wrong token; send 'Authorization: Bearer TOKEN' with the token "
                                    "from server.json in the library folder",
                               headers={"WWW-Authenticate": 'Bearer realm="imgsearch"'})
        routes = {("GET", "/api/health"): self._health, ("GET", "/api/status"): self._status,
                  ("GET", "/api/search"): self._get_search, ("POST", "/api/search"): self._post_search,
                  ("POST", "/api/search/image"): self._post_image}
        route = routes.get((self.command, url.path))
        if route is None:
            if any(p == url.path for _, p in routes):
                return self._error(405, f"{self.command} is not allowed on {url.path}")
            return self._error(404, f"no endpoint {url.path}; see /api/health, /api/status, /api/search")
        self._guard(lambda: route(url))

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
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
            self._error(e.code, e.message)
        except ModelMismatchError as e:
            self._error(409, str(e))
        except (FieldError, ParamError) as e:
            self._error(400, str(e), e.param)
        except UsageError as e:
            self._error(400, str(e))
        except ImgSearchError as e:
            self._error(500, str(e))
        except Exception as e:  # never kill the server over one request
            self._error(500, f"internal error: {type(e).__name__}: {e}")

    # --- endpoints ----------------------------------------------------------------------------
    def _health(self, url) -> None:
        self._send(200, self.service.health())

    def _status(self, url) -> None:
        self._send(200, self.service.library.status().as_dict())

    def _get_search(self, url) -> None:
        qs = parse_qs(url.query, keep_blank_values=True)
        unknown = sorted(set(qs) - _GET_PARAMS)
        if unknown:
            raise FieldError(unknown[0], f"unknown parameter {unknown[0]!r}; use {', '.join(sorted(_GET_PARAMS))}")

        def one(name):
            return qs[name][-1] if name in qs else None

        body = {"texts": qs.get("q", []), "not": qs.get("not", []),
                "ids": [_int(v, "id") for v in qs.get("id", [])], "k": _int(one("k") or "10", "k"),
                "under": one("under"), "tag": qs.get("tag") or None, "keyword": one("keyword"),
                **{name: one(name) for name in _WHEN_WHERE if name in qs}}
        if "min_score" in qs:
            body["min_score"] = _float(one("min_score"), "min_score")
        if "blend" in qs:
            body["blend"] = _float(one("blend"), "blend")
        if "relevance" in qs:
            body["relevance"] = _bool(one("relevance"), "relevance")
        self._send(200, {"hits": self.service.search(body)})

    def _post_search(self, url) -> None:
        if self._content_type() != "application/json":
            raise _Reply(415, "send the search as JSON with 'Content-Type: application/json'")
        raw = self._body()
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise UsageError("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise UsageError("request body must be a JSON object")
        self._send(200, {"hits": self.service.search(body)})

    def _post_image(self, url) -> None:
        from .query import Query, image_data_term
        from .queryspec import check_k

        kind = self._content_type()
        if kind in ("application/x-www-form-urlencoded", "multipart/form-data", "text/plain"):
            # What a web form may send cross-site without asking first; an image upload is never one.
            raise _Reply(415, "send the image with 'Content-Type: image/jpeg' (or its type, or "
                              "application/octet-stream)")
        qs = parse_qs(url.query)
        k = check_k(_int(qs.get("k", ["10"])[-1], "k"))
        raw = self._body()
        if not raw:
            raise UsageError("send the image file as the request body")
        query = Query.build(images_=[image_data_term(raw, 1.0, "in the request body")])
        relevance = _bool(qs["relevance"][-1], "relevance") if "relevance" in qs else False
        hits = self.service.library.search_query(query, k, relevance=relevance)
        self._send(200, {"hits": [h.as_dict() for h in hits]})


class _Reply(Exception):
    """An HTTP error answer decided inside an endpoint."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def _int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise FieldError(name, f"'{name}' must be a whole number") from None


def _bool(value: str, name: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes"):
        return True
    if v in ("0", "false", "no", ""):
        return False
    raise FieldError(name, f"{name}={value[:20]!r} must be 1/true or 0/false")


def _float(value: str, name: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise FieldError(name, f"'{name}' must be a number")
    return number


class _HTTPServer(ThreadingHTTPServer):
    """Threads per connection, with a deep accept queue, a cap on open connections and one-line logs."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address, handler, max_connections: int):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.max_connections = max_connections
        self.request_queue_size = LISTEN_BACKLOG
        # socket -> monotonic time it started waiting for a request, or None while a request runs
        self._conns: dict = {}
        self._conns_lock = threading.Lock()
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
                try:
                    victim.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._conns[request] = time.monotonic()
        super().process_request(request, client_address)

    def _refuse(self, request) -> None:
        body = b'{"error": "server busy: too many requests at once; try again"}'
        try:
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        except OSError:
            pass
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
        try:
            # The line and its newline in one write: print() writes them apart, and lines from requests
            # failing at the same moment ran together.
            with self._log_lock:
                sys.stderr.write(f"imgsearch serve: {line}\n")
                sys.stderr.flush()
        except (OSError, ValueError):
            pass


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
        host, port = self.httpd.server_address[:2]
        return host, port

    def write_discovery(self) -> None:
        """server.json: how to reach this server and its token, readable by this user only from the start."""
        host, port = self.address
        info = {**self.service.health(), "host": host, "port": port, "token": self.token,
                "started_at": time.time()}
        path = server_file(self.settings)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # created 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(info))
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def remove_discovery(self) -> None:
        path = server_file(self.settings)
        try:
            info = json.loads(path.read_text())
            if info.get("pid") == os.getpid() and info.get("token") == self.token:
                path.unlink()
        except (OSError, ValueError, AttributeError):
            pass

    def _watch_idle(self) -> None:
        while True:
            time.sleep(min(5.0, self.idle_exit / 4))
            if time.monotonic() - self.service.last_request > self.idle_exit:
                self.httpd.shutdown()
                return

    def serve_forever(self) -> None:
        self.write_discovery()
        if self.idle_exit:
            threading.Thread(target=self._watch_idle, daemon=True).start()
        try:
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


def _is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def _allowed_names(host: str) -> frozenset[str]:
    """Host header names that mean this machine: loopback, the --host value and, on a wildcard bind, its name."""
    names = set(LOOPBACK_NAMES)
    if host and not _is_wildcard(host):
        names.add(f"[{host.lower()}]" if ":" in host else host.lower())
    if _is_wildcard(host):
        for name in (socket.gethostname(), socket.getfqdn()):
            if name:
                names.add(name.lower())
    return frozenset(names)
