"""`imgsearch serve`: endpoints, errors, limits, concurrency, and `query` using it or falling back."""

from __future__ import annotations

import base64
import json
import os
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from imgsearch import synthetic


def serving(settings):
    """A SearchServer for ``settings`` running in a thread (yields it; shut down afterwards)."""
    from imgsearch.server import SearchServer

    srv = SearchServer(settings, "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    for _ in range(100):
        if (settings.home / "server.json").exists():
            break
        threading.Event().wait(0.05)
    yield srv
    srv.shutdown()
    t.join(10)


@pytest.fixture()
def server(cli, photos, settings):
    assert cli("index", photos).exit_code == 0
    yield from serving(settings)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_model):
    """A server on one library of the 54 photos, indexed once for the tests that only search through it;
    .cli runs the CLI on that library."""
    from conftest import Cli, make_photos
    from imgsearch.config import Settings

    root = tmp_path_factory.mktemp("server")
    settings = Settings(home=root / "home", model=f"local-dir:{tiny_model}", pretrained=None, device="cpu",
                        precision="fp32", workers=2, batch_size=16)
    cli = Cli(settings.home, settings.model)
    photos = make_photos(root / "photos")
    assert cli("index", photos).exit_code == 0
    for srv in serving(settings):
        srv.cli, srv.photos = cli, photos
        yield srv


def call(srv, method, path, body=None, raw: bytes | None = None):
    host, port = srv.address
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    # The API wants the token from server.json, and JSON or image bodies typed as such.
    headers = {"Authorization": f"Bearer {srv.token}"}
    if data is not None:
        headers["Content-Type"] = "application/octet-stream" if "/image" in path else "application/json"
    req = urllib.request.Request(f"http://{host}:{port}{path}", data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def kind(path: str) -> str:
    return "_".join(Path(path).stem.split("_")[:2])



def test_a_query_in_another_language_is_not_answered_by_a_server_reading_its_own(shared):
    """The server encodes with its own --lang: `imgsearch --lang deu_Latn query ...` was answered by a server
    started without it, in English, silently. Such a query is answered in-process (or by a server with its
    language)."""
    from imgsearch.client import find_server

    assert find_server(shared.settings) is not None  # this server (no --lang) for queries without one
    assert find_server(shared.settings.with_(lang="deu_Latn")) is None

def test_endpoints_answer_searches(home, shared):
    server, photos = shared, shared.photos
    code, health = call(server, "GET", "/api/health")
    assert code == 200 and health["vectors"] == 54 and health["pid"] == os.getpid()
    code, res = call(server, "GET", "/api/search?q=a+red+circle&k=3")
    assert code == 200 and kind(res["hits"][0]["path"]) == "red_circle" and len(res["hits"]) == 3
    code, res = call(server, "POST", "/api/search", {"texts": ["a blue square"], "k": 2})
    assert code == 200 and kind(res["hits"][0]["path"]) == "blue_square"
    image = (photos / "green_triangle_000.jpg").read_bytes()
    code, res = call(server, "POST", "/api/search/image?k=1", raw=image)
    assert code == 200 and res["hits"][0]["path"] == str(photos / "green_triangle_000.jpg")
    code, res = call(server, "POST", "/api/search", {"images": [base64.b64encode(image).decode()],
                                                     "under": str(photos), "k": 1})
    assert res["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    code, st = call(server, "GET", "/api/status")
    assert code == 200 and st["images"] == 54


def test_bad_requests_get_json_errors(home, shared):
    server = shared
    assert call(server, "GET", "/api/nothing")[0] == 404
    code, res = call(server, "POST", "/api/search", raw=b"{not json")
    assert code == 400 and "not valid JSON" in res["error"]
    code, res = call(server, "POST", "/api/search", {"texts": 5})
    assert code == 400 and res["field"] == "texts" and res["error"].startswith("texts: ")
    code, res = call(server, "POST", "/api/search", {})
    assert code == 400 and "nothing to search for" in res["error"]
    code, res = call(server, "GET", "/api/search?q=x&k=zero")
    assert code == 400 and res == {"error": "k: give a whole number from 1 to 10000", "field": "k"}
    code, res = call(server, "POST", "/api/search/image", raw=b"definitely not an image")
    assert code == 400 and "cannot use query image" in res["error"]
    code, res = call(server, "POST", "/api/search", {"images": ["***"]})
    assert code == 400 and "base64" in res["error"]


def test_head_answers_as_get_and_a_wrong_method_is_told_the_allowed_ones(home, shared):
    """HEAD on a GET endpoint was a 405 (`curl -I` health checks failed), and no 405 said which methods work."""
    host, port = shared.address

    def send(method, path, token=True):
        headers = {"Authorization": f"Bearer {shared.token}"} if token else {}
        req = urllib.request.Request(f"http://{host}:{port}{path}", method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    for path in ("/api/health", "/api/status", "/api/search?q=a+red+circle&k=3", "/api/albums"):
        code, headers, body = send("HEAD", path)
        _, _, got = send("GET", path)
        assert code == 200 and body == b"" and headers["Content-Type"] == "application/json", path
        assert int(headers["Content-Length"]) == len(got), path
    assert send("HEAD", "/api/health", token=False)[0] == 200 and send("HEAD", "/api/status", token=False)[0] == 401
    for method, path, allow in (("PUT", "/api/search", "GET, HEAD, POST"), ("HEAD", "/api/search/image", "POST"),
                                ("POST", "/api/status", "GET, HEAD"),
                                ("OPTIONS", "/api/albums/x", "DELETE, GET, HEAD")):
        code, headers, body = send(method, path)
        assert code == 405 and headers["Allow"] == allow, (method, path)
        assert method == "HEAD" or json.loads(body) == {"error": f"{method} is not allowed on {path}"}


def test_oversize_upload_is_refused(home, shared, monkeypatch):
    server = shared
    import imgsearch.server as srvmod

    monkeypatch.setattr(srvmod, "MAX_BODY", 1000)
    code, res = call(server, "POST", "/api/search/image", raw=b"x" * 5000)
    assert code == 413 and "over" in res["error"]


def test_concurrent_requests(home, shared):
    server = shared
    queries = ["a red circle", "a blue square", "a green triangle", "a yellow circle"] * 5

    def one(q):
        return q, call(server, "GET", "/api/search?q=" + q.replace(" ", "+") + "&k=1")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, queries))
    for q, (code, res) in results:
        assert code == 200
        assert kind(res["hits"][0]["path"]) == q.split(" ", 1)[1].replace(" ", "_")


def test_server_reloads_after_an_index_run(server, cli, photos):
    import random

    synthetic.draw_shape("white", "square", 96, random.Random(3)).save(photos / "zz_new.jpg")
    cli("index", photos)
    code, res = call(server, "GET", "/api/search?q=a+white+square&k=60")
    assert str(photos / "zz_new.jpg") in [h["path"] for h in res["hits"]] and len(res["hits"]) == 55


def test_query_uses_running_server(home, shared, monkeypatch):
    from imgsearch.library import Library  # the in-process path: Library.search

    cli = shared.cli

    def must_not_run(*a, **kw):
        raise AssertionError("query ran in-process although a server was running")

    monkeypatch.setattr(Library, "search", must_not_run)
    r = cli("query", "a red circle", "-k", "2", "--json")
    assert r.exit_code == 0, r.output
    hits = json.loads(r.stdout)
    assert kind(hits[0]["path"]) == "red_circle"
    r = cli("query", "빨간 원", "-k", "2")  # an English-only model: the hint reaches the user, not the server log
    assert r.exit_code == 0, r.output
    assert [line for line in r.stderr.splitlines() if line.startswith("hint:")] == [
        line for line in r.stderr.splitlines() if "--model multilingual" in line] != []
    assert len([line for line in r.stderr.splitlines() if line.startswith("hint:")]) == 1
    r = cli("query", "--image", "missing.jpg")
    assert r.exit_code == 2 and "not found" in r.stderr


def test_query_falls_back_without_server(cli, photos, home):
    cli("index", photos)
    (home / "server.json").write_text(json.dumps({"pid": 2**22 + 12345, "host": "127.0.0.1", "port": 9,
                                                  "model": "x"}))
    r = cli("query", "a red circle", "-k", "1", "--json")
    assert r.exit_code == 0 and kind(json.loads(r.stdout)[0]["path"]) == "red_circle"


def test_other_model_server_is_not_used(server, cli, tmp_path):
    from imgsearch.encoder import save_local_dir

    model, cfg = synthetic.build_tiny_clip(seed=5)
    other = save_local_dir(model, cfg, tmp_path / "other", {"size": 32})
    r = cli("query", "a red circle", model=f"local-dir:{other}")
    assert r.exit_code == 1 and "no vectors for" in r.stderr  # answered in-process, not by the server


def test_idle_exit_and_duration_parsing(settings, cli, photos):
    from imgsearch.commands.serve import parse_duration
    from imgsearch.errors import UsageError
    from imgsearch.server import SearchServer

    assert parse_duration("10m") == 600 and parse_duration("90") == 90 and parse_duration("2h") == 7200
    for wrong in ("soon", "0", "0.0s"):  # zero was taken, and the server never exited
        with pytest.raises(UsageError, match="give a duration above zero"):
            parse_duration(wrong)
    cli("index", photos)
    srv = SearchServer(settings, "127.0.0.1", 0, idle_exit=0.5)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    t.join(15)
    assert not t.is_alive() and not (settings.home / "server.json").exists()


@pytest.mark.slow
def test_query_daemon_starts_a_server_that_later_queries_use(cli, photos, home):
    import signal

    cli("index", photos)
    r = cli("query", "a red circle", "-k", "1", "--json", "--daemon")
    assert r.exit_code == 0 and kind(json.loads(r.stdout)[0]["path"]) == "red_circle"
    info = json.loads((home / "server.json").read_text())
    try:
        assert info["pid"] != os.getpid()
        from imgsearch.client import find_server
        from imgsearch.config import Settings

        assert find_server(Settings.from_env(home=home, model=cli.model)) is not None
    finally:
        os.kill(info["pid"], signal.SIGTERM)


def test_hostile_requests_get_a_400_naming_the_field_never_a_500(server):
    many = {"texts": [f"word {i}" for i in range(150_000)]}  # 1.5 MB: refused before any encoding
    code, res = call(server, "POST", "/api/search", many)
    assert code == 400 and res["field"] == "texts" and "at most 64 query terms" in res["error"]
    code, res = call(server, "POST", "/api/search", raw=b"[" * 100_000 + b"]" * 100_000)
    assert code == 400 and "nested too deeply" in res["error"]
    code, res = call(server, "POST", "/api/search", {"texts": ["x"], "ids": [2 ** 70]})
    assert code == 400 and res["field"] == "ids"
    code, res = call(server, "GET", "/api/search?q=red&under=%00")
    assert code == 400 and res == {"error": "under: contains a NUL character; remove it", "field": "under"}
    code, res = call(server, "POST", "/api/search", {"texts": ["x"], "under": "a\x00b"})
    assert code == 400 and res["field"] == "under"
    code, res = call(server, "GET", "/api/search?q=a+red+circle&k=2")  # and the server still answers
    assert code == 200 and len(res["hits"]) == 2
