"""A long-running local search server: model, tokenizer and FAISS index stay warm between requests.

JSON over HTTP on localhost. `imgsearch query` finds a running server through ``<home>/server.json`` and
uses it when it serves the same model; the server reloads the index when an index run changed the library.

Endpoints (all answer JSON; errors are ``{"error": message}`` with a 4xx/5xx code):
  GET  /api/health                      who is serving: model, home, pid
  GET  /api/status                      the same as `imgsearch status --json`
  GET  /api/search?q=TEXT&k=10&...      text search; q repeatable; also not=, under=, min_score=, id=
  POST /api/search                      {"texts": [...], "not": [...], "ids": [...], "images": [base64...],
                                         "not_images": [base64...], "k": 10, "min_score": null, "under": null}
  POST /api/search/image?k=10           raw image bytes as the body (e.g. curl --data-binary @photo.jpg)
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from .config import Settings
from .errors import ImgSearchError, ModelMismatchError, UsageError

MAX_BODY = 25 << 20  # bytes per request
MAX_IMAGES = 16
SERVER_FILE = "server.json"


def server_file(settings: Settings) -> Path:
    return settings.home / SERVER_FILE


class SearchService:
    """The warm state behind the HTTP handlers, usable without HTTP too."""

    def __init__(self, settings: Settings):
        from .search import Searcher

        self.settings = settings
        self.searcher = Searcher(settings)
        self.searcher.encoder  # load the model now, not on the first request
        self.searcher.index()
        self.last_request = time.monotonic()

    def health(self) -> dict:
        s = self.searcher
        return {"ok": True, "pid": os.getpid(), "home": str(self.settings.home), "model": s.model.name,
                "pretrained": s.model.pretrained, "fingerprint": s.model.fingerprint, "vectors": len(s.index())}

    def search(self, body: dict) -> list[dict]:
        from .search import Query

        def strings(key: str) -> list[str]:
            value = body.get(key) or []
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise UsageError(f"'{key}' must be a string or a list of strings")
            return value

        texts, negatives = strings("texts"), strings("not")
        images, not_images = strings("images"), strings("not_images")
        ids = body.get("ids") or []
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise UsageError("'ids' must be a list of image ids")
        if len(images) + len(not_images) > MAX_IMAGES:
            raise UsageError(f"at most {MAX_IMAGES} images per request")
        k = body.get("k", 10)
        min_score = body.get("min_score")
        if not isinstance(k, int) or not 1 <= k <= 10_000:
            raise UsageError("'k' must be a whole number from 1 to 10000")
        if min_score is not None and not isinstance(min_score, (int, float)):
            raise UsageError("'min_score' must be a number")
        under = body.get("under")
        if under is not None and not isinstance(under, str):
            raise UsageError("'under' must be a folder path")
        extra = {k: body[k] for k in ("tag", "keyword", "blend") if body.get(k) is not None}
        if not (images or not_images):
            query = Query.build(texts, [], negatives, [], ids)
            return [h.as_dict() for h in self.searcher.search(query, k, min_score=min_score, under=under, **extra)]
        with tempfile.TemporaryDirectory(prefix="imgsearch-query-") as tmp:
            pos_files = _write_images(images, tmp, "q")
            neg_files = _write_images(not_images, tmp, "n")
            query = Query.build(texts, pos_files, negatives, neg_files, ids)
            hits = self.searcher.search(query, k, min_score=min_score, under=under, **extra)
        return [h.as_dict() for h in hits]


def _write_images(items: list[str], folder: str, prefix: str) -> list[str]:
    paths = []
    for n, b64 in enumerate(items):
        try:
            data = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise UsageError("images must be base64-encoded file contents") from None
        path = os.path.join(folder, f"{prefix}{n}")
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    return paths


class _Handler(BaseHTTPRequestHandler):
    service: SearchService  # set on the subclass made per server
    server_version = "imgsearch"
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out at once, no delayed-ACK stall per request

    def log_message(self, fmt, *args):  # quiet: the CLI prints what matters
        pass

    def _send(self, code: int, payload) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, code: int, message: str) -> None:
        self._send(code, {"error": message})

    def _body(self) -> bytes | None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self._error(400, "bad Content-Length")
            return None
        if length > MAX_BODY:
            self._error(413, f"request body over {MAX_BODY >> 20} MB")
            self.close_connection = True
            return None
        return self.rfile.read(length) if length else b""

    def _guard(self, fn) -> None:
        self.service.last_request = time.monotonic()
        try:
            fn()
        except ModelMismatchError as e:
            self._error(409, str(e))
        except UsageError as e:
            self._error(400, str(e))
        except ImgSearchError as e:
            self._error(500, str(e))
        except Exception as e:  # never kill the server over one request
            self._error(500, f"internal error: {type(e).__name__}: {e}")

    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/api/health":
            return self._guard(lambda: self._send(200, self.service.health()))
        if url.path == "/api/status":
            from .indexer import library_status

            return self._guard(lambda: self._send(200, library_status(self.service.settings)))
        if url.path == "/api/search":
            qs = parse_qs(url.query)

            def run():
                body = {"texts": qs.get("q", []), "not": qs.get("not", []),
                        "ids": [_int(v, "id") for v in qs.get("id", [])],
                        "k": _int(qs.get("k", ["10"])[0], "k"), "under": qs.get("under", [None])[0]}
                if "min_score" in qs:
                    body["min_score"] = _float(qs["min_score"][0], "min_score")
                self._send(200, {"hits": self.service.search(body)})

            return self._guard(run)
        self._error(404, f"no endpoint {url.path}; see /api/health, /api/status, /api/search")

    def do_POST(self):
        url = urlparse(self.path)
        if url.path not in ("/api/search", "/api/search/image"):
            return self._error(404, f"no endpoint {url.path}")
        raw = self._body()
        if raw is None:
            return

        def run():
            if url.path == "/api/search/image":
                qs = parse_qs(url.query)
                if not raw:
                    raise UsageError("send the image file as the request body")
                body = {"images": [base64.b64encode(raw).decode()], "k": _int(qs.get("k", ["10"])[0], "k")}
            else:
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    raise UsageError("request body is not valid JSON") from None
                if not isinstance(body, dict):
                    raise UsageError("request body must be a JSON object")
            self._send(200, {"hits": self.service.search(body)})

        self._guard(run)


def _int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"'{name}' must be a whole number") from None


def _float(value: str, name: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise UsageError(f"'{name}' must be a number") from None


class SearchServer:
    """The HTTP server plus its discovery file and optional idle shutdown."""

    def __init__(self, settings: Settings, host: str = "127.0.0.1", port: int = 0, idle_exit: float | None = None):
        self.settings = settings
        self.service = SearchService(settings)
        handler = type("Handler", (_Handler,), {"service": self.service})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as e:
            raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port") from None
        self.httpd.daemon_threads = True
        self.idle_exit = idle_exit

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.httpd.server_address[:2]
        return host, port

    def write_discovery(self) -> None:
        host, port = self.address
        info = {**self.service.health(), "host": host, "port": port, "started_at": time.time()}
        path = server_file(self.settings)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(info), encoding="utf-8")
        os.replace(tmp, path)

    def remove_discovery(self) -> None:
        path = server_file(self.settings)
        try:
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
        except (OSError, ValueError):
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

    def shutdown(self) -> None:
        self.httpd.shutdown()
