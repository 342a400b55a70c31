"""`imgsearch serve` against hostile and unlucky clients: DNS rebinding, cross-site pages, other users,
slow and vanishing clients, malformed bodies; and server answers identical to in-process ones."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest


def start(settings, host="127.0.0.1"):
    from imgsearch.server import SearchServer

    srv = SearchServer(settings, host, 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    for _ in range(200):
        if (settings.home / "server.json").exists():
            break
        time.sleep(0.05)
    return srv, t


def indexed_once(root, tiny_model, tagged=False):
    """(home, photos): the 54 photos indexed in a library of their own, once per module. Tests get a copy of
    the home (``copy_home``); the photos stay shared, and no test here changes them."""
    from conftest import Cli, make_photos

    photos = make_photos(root / "photos")
    cli = Cli(root / "home", f"local-dir:{tiny_model}")
    if tagged:
        sub = photos / "sub"
        sub.mkdir()
        for p in sorted(photos.glob("*_00[01].jpg")):
            shutil.move(p, sub / p.name)
    assert cli("index", photos).exit_code == 0
    if tagged:
        assert cli("classify", "--labels", "red,green,blue,yellow", "--json").exit_code == 0
    return cli.home, photos


def copy_home(indexed, home):
    shutil.copytree(indexed[0], home)
    return indexed[1]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_model):
    return indexed_once(tmp_path_factory.mktemp("hostile-server"), tiny_model)


@pytest.fixture()
def library(indexed, home):
    return copy_home(indexed, home)


@pytest.fixture(scope="module")
def server(indexed, tmp_path_factory, tiny_model):
    """One server, on a copy of the library, for the tests that only send it requests; .photos are its photos."""
    from imgsearch.config import Settings

    home = tmp_path_factory.mktemp("served") / "home"
    settings = Settings(home=home, model=f"local-dir:{tiny_model}", pretrained=None, device="cpu",
                        precision="fp32", workers=2, batch_size=16)
    photos = copy_home(indexed, home)
    srv, t = start(settings)
    srv.photos = photos
    yield srv
    srv.shutdown()
    t.join(10)


def raw_http(srv, request: bytes, timeout=10.0) -> bytes:
    """Send bytes as they are; everything the server answers until it closes the connection."""
    host, port = srv.address
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(request)
        chunks = []
        while True:
            try:
                data = s.recv(65536)
            except socket.timeout:
                break
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def closed_by_server(s: socket.socket, within: float) -> bool:
    s.settimeout(within)
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def get(srv, path, headers=None, token=True, body=None, method=None):
    host, port = srv.address
    h = dict(headers or {})
    if token:
        h.setdefault("Authorization", f"Bearer {srv.token}")
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    if isinstance(body, (dict, list)):
        h.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(f"http://{host}:{port}{path}", data=data, headers=h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def token_of(home) -> str:
    return json.loads((home / "server.json").read_text())["token"]


# --- nobody in -------------------------------------------------------------------------------
def test_rebinding_page_gets_nothing_even_with_the_token(server):
    _, port = server.address
    home = server.settings.home
    for host in ("attacker.example", f"attacker.example:{port}", f"127.0.0.1.nip.io:{port}",
                 f"localhost:{port + 1}", ""):
        code, res = get(server, "/api/status", {"Host": host})
        assert code == 403, host
        assert str(home) not in json.dumps(res) and "images" not in res
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost"):
        code, res = get(server, "/api/status", {"Host": host})
        assert code == 200 and res["images"] == 54, host


def test_cross_origin_requests_are_refused(server):
    _, port = server.address
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                    {"Origin": f"http://localhost:{port + 1}"}, {"Sec-Fetch-Site": "cross-site"}):
        code, res = get(server, "/api/search?q=a+red+circle", headers)
        assert code == 403 and "hits" not in res, headers
    code, _ = get(server, "/api/search?q=a+red+circle", {"Origin": f"http://127.0.0.1:{port}"})
    assert code == 200


def test_token_is_required_and_the_folder_oracle_is_gone(server, tmp_path):
    home = server.settings.home
    (tmp_path / "secret").mkdir()
    answers = set()
    for path in ("/api/status", "/api/search?q=x", f"/api/search?q=x&under={tmp_path / 'secret'}",
                 f"/api/search?q=x&under={tmp_path / 'missing'}"):
        code, res = get(server, path, token=False)
        assert code == 401 and str(home) not in json.dumps(res)
        answers.add(json.dumps(res))
        code, res = get(server, path, {"Authorization": "Bearer wrong"}, token=False)
        assert code == 401
    assert len(answers) == 1  # an existing and a missing folder look the same to a caller without the token
    code, res = get(server, "/api/health", token=False)
    assert code == 200 and res == {"ok": True}  # liveness only: no home, no pid
    code, res = get(server, "/api/health")
    assert code == 200 and res["home"] == str(home) and res["pid"] == os.getpid()
    assert token_of(home) == server.token


def test_simple_cross_site_posts_are_refused(server):
    photos = server.photos
    body = json.dumps({"texts": ["a red circle"]}).encode()
    for kind in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": kind} if kind else {}
        code, res = get(server, "/api/search", headers, body=body, method="POST")
        assert code == 415 and "application/json" in res["error"], kind
    image = (photos / "red_circle_000.jpg").read_bytes()
    code, res = get(server, "/api/search/image", {"Content-Type": "multipart/form-data"}, body=image, method="POST")
    assert code == 415
    code, res = get(server, "/api/search/image?k=1", {"Content-Type": "image/jpeg"}, body=image, method="POST")
    assert code == 200 and res["hits"][0]["path"] == str(photos / "red_circle_000.jpg")


def test_server_file_is_private_from_the_start(library, settings, monkeypatch):
    from imgsearch import server as srvmod

    modes = []
    real_replace = os.replace

    def watch(src, dst):
        modes.append(stat.S_IMODE(os.stat(src).st_mode))
        return real_replace(src, dst)

    srv = srvmod.SearchServer(settings, "127.0.0.1", 0)
    old = os.umask(0)  # the most permissive umask a user could have
    try:
        monkeypatch.setattr(srvmod.os, "replace", watch)
        srv.write_discovery()
    finally:
        os.umask(old)
        monkeypatch.undo()
    path = settings.home / "server.json"
    assert modes == [0o600] and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["token"] == srv.token and len(srv.token) >= 32
    assert [p.name for p in settings.home.iterdir() if p.name.startswith(".server.json")] == []
    srv.httpd.server_close()
    srv.remove_discovery()
    assert not path.exists()


def test_serve_on_all_interfaces_warns(cli, library, monkeypatch):
    import signal

    from imgsearch import server as srvmod

    monkeypatch.setattr(srvmod.SearchServer, "serve_forever", lambda self, ready: (ready(), self.httpd.server_close()))
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # keep pytest's own SIGTERM handling
    r = cli("serve", "--host", "0.0.0.0", "--port", "0")
    assert r.exit_code == 0, r.output
    assert "warning: listening beyond this machine" in r.stderr and "token" in r.stderr
    r = cli("serve", "--host", "127.0.0.1", "--port", "0")
    assert r.exit_code == 0 and "warning" not in r.stderr and "Authorization: Bearer" in r.stderr


def test_wildcard_bind_accepts_ip_hosts_and_the_client_finds_it(library, settings, cli, monkeypatch):
    from imgsearch.library import Library  # the in-process path: Library.search

    monkeypatch.setattr(Library, "search", None)  # answering in-process would fail
    srv, t = start(settings, "0.0.0.0")
    try:
        _, port = srv.address
        assert get(srv, "/api/status", {"Host": f"192.168.1.7:{port}"})[0] == 200
        assert get(srv, "/api/status", {"Host": f"evil.example:{port}"})[0] == 403
        r = cli("query", "a red circle", "-k", "1", "--json")
        assert r.exit_code == 0 and len(json.loads(r.stdout)) == 1, r.output
    finally:
        srv.shutdown()
        t.join(10)


def test_client_ignores_a_server_file_without_token(library, cli, settings, home):
    from imgsearch.client import find_server

    srv, t = start(settings)
    try:
        assert find_server(settings)["token"] == srv.token
        info = json.loads((home / "server.json").read_text())
        del info["token"]
        (home / "server.json").write_text(json.dumps(info))
        assert find_server(settings) is None
    finally:
        srv.shutdown()
        t.join(10)


def test_a_second_server_on_one_library_refuses_and_the_first_stays_found(library, settings, cli, monkeypatch,
                                                                          random_tiny_model):
    """A second `serve` (another port, another model) overwrote server.json; once it exited, the first server
    ran on but `query` could no longer find it. Only a record left by a server that died is taken over."""
    import signal

    from imgsearch.client import find_server
    from imgsearch.errors import LibraryError
    from imgsearch.server import SearchServer

    first, t = start(settings)
    monkeypatch.setattr(SearchServer, "serve_forever",
                        lambda self, ready: (self.write_discovery(), ready(), self.httpd.server_close()))
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # keep pytest's own SIGTERM handling
    record = (settings.home / "server.json").read_text()
    try:
        port = first.address[1]
        for model in ("default", f"local-dir:{random_tiny_model}"):
            r = cli("serve", "--port", "0", model=model)
            assert r.exit_code == 1 and r.stderr.strip().splitlines() == [
                f"error: another imgsearch serve (pid {os.getpid()}, port {port}) is serving this library; "
                "`imgsearch query` uses it (stop it to serve this library here)"], r.output
        second = SearchServer(settings, "127.0.0.1", 0)  # started while the first was still loading: refused too
        with pytest.raises(LibraryError, match=f"port {port}"):
            second.write_discovery()
        second.httpd.server_close()
        assert (settings.home / "server.json").read_text() == record
        assert find_server(settings)["token"] == first.token
    finally:
        first.shutdown()
        t.join(10)
    (settings.home / "server.json").write_text(record)  # as a killed server leaves it: pid alive, port closed
    r = cli("serve", "--port", "0")
    assert r.exit_code == 0, r.output
    assert json.loads((settings.home / "server.json").read_text())["token"] != first.token


def test_a_serve_that_loses_the_library_to_another_never_says_it_serves(library, settings, cli, monkeypatch):
    """Two `serve` started at once both pass the first check; the one that publishes second is refused, but it
    had already printed "imgsearch serving ... on http://..." for a port nobody would ever be answered on."""
    import signal

    from imgsearch.server import SearchServer

    publish, others = SearchServer.write_discovery, []

    def another_serve_publishes_first(self):
        if not others:  # the CLI's server; the other one, started here, publishes as usual
            others.append(None)
            others[0] = start(settings)
        publish(self)

    monkeypatch.setattr(SearchServer, "write_discovery", another_serve_publishes_first)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # keep pytest's own SIGTERM handling
    try:
        r = cli("serve", "--port", "0")
        (first, t), = others
        assert r.exit_code == 1 and r.stderr.strip().splitlines() == [
            f"error: another imgsearch serve (pid {os.getpid()}, port {first.address[1]}) is serving this library; "
            "`imgsearch query` uses it (stop it to serve this library here)"], r.output
        assert json.loads((settings.home / "server.json").read_text())["token"] == first.token
    finally:
        for srv, t in others:
            srv.shutdown()
            t.join(10)


# --- keeps working under load and abuse ------------------------------------------------------
def test_bursts_of_clients_are_queued_not_reset(server):
    assert server.httpd.request_queue_size >= 128

    def one(_):
        try:
            return get(server, "/api/health")[0]
        except OSError as e:
            return type(e).__name__

    with ThreadPoolExecutor(50) as pool:
        codes = list(pool.map(one, range(200)))
    assert codes == [200] * 200


def closed_by_server_among(socks: list, at_least: int, within: float = 60.0) -> int:
    """How many of ``socks`` the server has closed, waiting (at most ``within`` s) until ``at_least`` are."""
    import select

    closed, deadline = set(), time.monotonic() + within
    while len(closed) < at_least and time.monotonic() < deadline:
        ready, _, _ = select.select([s for s in socks if s not in closed], [], [], 1.0)
        closed.update(ready)  # readable with nothing sent to them: end of stream or reset
    return len(closed)


@pytest.mark.parametrize("sent", [b"", b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n"], ids=["silent", "half-sent"])
def test_idle_and_half_sent_connections_cannot_starve_health(library, settings, monkeypatch, sent):
    from imgsearch import server as srvmod

    monkeypatch.setattr(srvmod, "MAX_CONNECTIONS", 32)
    # Far beyond the client's wait: no connection can time out during the test, so health is answered
    # only if the server drops silent connections to make room for it.
    monkeypatch.setattr(srvmod, "REQUEST_TIMEOUT", 3600.0)
    srv, t = start(settings)
    host, port = srv.address
    idle = []
    try:
        for _ in range(200):
            s = socket.create_connection((host, port), timeout=5)
            s.sendall(sent)
            idle.append(s)
        code, res = get(srv, "/api/health")
        assert code == 200 and res["vectors"] == 54
        # All but the 31 newest silent ones (32 open at most, one given to health) were dropped.
        assert closed_by_server_among(idle, 200 + 1 - 32) == 200 + 1 - 32
    finally:
        for s in idle:
            s.close()
        srv.shutdown()
        t.join(10)


def test_a_half_sent_request_is_closed_after_the_request_timeout(library, settings, monkeypatch):
    from imgsearch import server as srvmod

    monkeypatch.setattr(srvmod, "REQUEST_TIMEOUT", 0.5)
    srv, t = start(settings)
    try:
        with socket.create_connection(srv.address, timeout=5) as s:
            s.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
            assert closed_by_server(s, 60)
    finally:
        srv.shutdown()
        t.join(10)


def test_aborted_requests_are_one_line_not_a_traceback(server, monkeypatch):
    writes, aborted = [], threading.Semaphore(0)

    class Stderr:  # keeps each write apart: a line written in pieces can be cut by another thread's line
        def write(self, text):
            writes.append(text)
            if "aborted" in text:
                aborted.release()
            return len(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Stderr())
    host, port = server.address
    request = (f"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {server.token}\r\n"
               "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"texts\": [").encode()
    for _ in range(3):
        s = socket.create_connection((host, port))
        s.sendall(request)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
        s.close()
    assert all(aborted.acquire(timeout=60) for _ in range(3))
    assert get(server, "/api/health")[0] == 200
    lines = [line for line in "".join(writes).splitlines() if "aborted" in line]
    assert len(lines) == 3 and all(line.startswith("imgsearch serve: request from 127.0.0.1:") for line in lines)
    assert "Traceback" not in "".join(writes)
    assert [w for w in writes if "aborted" in w] == [line + "\n" for line in lines]  # each line whole, in one write


def test_chunked_bodies_get_411_and_are_never_read_as_a_request(server):
    _, port = server.address
    smuggled = f"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {server.token}\r\n\r\n"
    chunk = f"{len(smuggled):x}\r\n{smuggled}\r\n0\r\n\r\n"
    answer = raw_http(server, (f"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                               f"Authorization: Bearer {server.token}\r\nContent-Type: application/json\r\n"
                               f"Transfer-Encoding: chunked\r\n\r\n{chunk}").encode())
    assert answer.startswith(b"HTTP/1.1 411 ") and answer.count(b"HTTP/1.1 ") == 1
    assert b'"images"' not in answer


def test_unread_bodies_never_become_the_next_request(server):
    _, port = server.address
    smuggled = f"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {server.token}\r\n\r\n"
    answer = raw_http(server, (f"POST /api/nowhere HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                               f"Authorization: Bearer {server.token}\r\nContent-Length: {len(smuggled)}\r\n\r\n"
                               f"{smuggled}").encode())
    assert answer.startswith(b"HTTP/1.1 404 ") and answer.count(b"HTTP/1.1 ") == 1


@pytest.mark.parametrize("field, value", [
    ("tag", 5), ("blend", "abc"), ("keyword", []), ("k", True), ("k", 2.5), ("min_score", "x"),
    ("min_score", True), ("ids", ["1"]), ("under", 5), ("texts", [7]), ("not", {"text": 3}),
    ("images", [5]), ("not_images", {"data": "***"}), ("colour", "red"),
])
def test_wrongly_typed_fields_are_400_naming_the_field(server, field, value):
    body = {"texts": ["a red circle"], "keyword": "circle" if field == "blend" else None, field: value}
    code, res = get(server, "/api/search", body=body, method="POST")
    assert code == 400, res
    assert res["field"].split("[")[0] == field and field in res["error"]


@pytest.mark.parametrize("item", [{"text": "a red circle", "weight": "x"}, {"text": "a red circle", "weight": None},
                                  {"text": "a red circle", "weight": True}])
def test_wrongly_typed_weights_are_400(server, item):
    code, res = get(server, "/api/search", body={"texts": [item]}, method="POST")
    assert code == 400 and res["field"] == "texts[0]" and "weight" in res["error"]


def test_nan_weights_and_scores_are_400(server):
    body = b'{"texts": [{"text": "a red circle", "weight": NaN}]}'
    code, res = get(server, "/api/search", {"Content-Type": "application/json"}, body=body, method="POST")
    assert code == 400 and res["field"] == "texts[0]"
    code, res = get(server, "/api/search?q=x&min_score=nan")
    assert code == 400 and res["field"] == "min_score"


@pytest.mark.parametrize("field", ["after", "before", "near", "camera"])
def test_a_blank_date_place_or_camera_is_no_filter_through_either_transport(server, field):
    """Found by fuzzing: a value of spaces passed the request check but built no filter, then failed (500)."""
    want = get(server, "/api/search?q=a+red+circle")
    assert want[0] == 200 and want[1]["hits"]
    assert get(server, f"/api/search?q=a+red+circle&{field}=%20%20") == want
    assert get(server, "/api/search", body={"texts": ["a red circle"], field: "  "}, method="POST") == want


@pytest.mark.parametrize("field", ["under", "tag", "keyword", "texts", "camera"])
def test_a_lone_surrogate_is_400_naming_the_field(server, field):
    """JSON's "\\ud800" decodes to a lone surrogate, which no database or file name can hold (was a 500)."""
    body = b'{"texts": ["a red circle"], "%s": "\\ud800"}' % field.encode()
    if field == "texts":
        body = b'{"texts": ["\\ud800 circle"]}'
    code, res = get(server, "/api/search", {"Content-Type": "application/json"}, body=body, method="POST")
    assert code == 400 and res["field"].split("[")[0] == field and "lone surrogate" in res["error"], res


def test_server_errors_name_fields_not_flags_and_leak_no_temp_paths(server, tmp_path):
    import base64

    code, res = get(server, "/api/search", body={"texts": ["x"], "under": str(tmp_path / "nope")}, method="POST")
    assert (code, res) == (400, {"error": "under: no such folder", "field": "under"})
    code, res = get(server, "/api/search", body={"texts": ["x"], "k": 10_001}, method="POST")
    assert (code, res) == (400, {"error": "k: give a whole number from 1 to 10000", "field": "k"})
    junk = base64.b64encode(b"not a picture").decode()
    code, res = get(server, "/api/search", body={"images": [{"data": junk, "weight": 2}]}, method="POST")
    assert code == 400
    assert res["error"] == "cannot use query image images[0]: not an image Pillow can read (unknown or corrupt format)"
    code, res = get(server, "/api/search", body={"texts": ["x"], "blend": 0.5}, method="POST")
    assert code == 400 and res["field"] == "blend" and "--" not in res["error"]


# --- the same answers with or without a server ------------------------------------------------
@pytest.fixture(scope="module")
def tagged_once(tmp_path_factory, tiny_model):
    return indexed_once(tmp_path_factory.mktemp("tagged"), tiny_model, tagged=True)


@pytest.fixture()
def tagged(tagged_once, home):
    """The photos, a third of them moved to sub/, indexed and classified by colour (a copy of the library)."""
    return copy_home(tagged_once, home)


QUERIES = [
    ["2:a red circle", "0.5:a square"],
    ["--image", "5:{photos}/red_circle_002.jpg", "--image", "{photos}/sub/blue_square_000.jpg"],
    ["--image", "{photos}/sub/blue_square_000.jpg", "--image", "4:{photos}/red_circle_002.jpg"],
    ["a circle", "--not", "2:red", "--not-image", "3:{photos}/green_circle_002.jpg", "-k", "20"],
    ["a shape", "--image", "0.5:{photos}/yellow_triangle_002.jpg", "--under", "{photos}/sub", "-k", "7"],
    ["a triangle", "--tag", "{tag}", "-k", "50"],
    ["a red shape", "--keyword", "circle", "--min-score", "{min}", "-k", "30"],
    ["a blue shape", "--keyword", "square", "--blend", "0.4", "-k", "12"],
    ["a green triangle", "--min-score", "{min}", "-k", "5"],
]


def same_hits(a: list[dict], b: list[dict]) -> bool:
    """Identical hits; scores equal up to float summation order (a server answers through FAISS, a fresh
    process through numpy on the lean path: the last of six decimals can differ)."""
    strip = [{k: v for k, v in h.items() if k != "score"} for h in a]
    return strip == [{k: v for k, v in h.items() if k != "score"} for h in b] and \
        all(abs(x["score"] - y["score"]) <= 2e-6 for x, y in zip(a, b))


def test_server_and_in_process_results_are_identical(tagged, cli, settings, monkeypatch):
    from imgsearch.library import Library  # the in-process path: Library.search

    # A colour that classify gave to some images (which ones depends on the tiny model).
    tag = next(c for c in ("red", "green", "blue", "yellow")
               if json.loads(cli("query", "x", "--tag", c, "--json", "--no-server").stdout))
    srv, t = start(settings)
    try:
        for q in QUERIES:
            cut = ""
            if "{min}" in q:  # a threshold that keeps some of this query's hits and drops others
                i = q.index("{min}")
                plain = cli("query", *[a.format(photos=tagged) for a in q[:i - 1] + q[i + 1:]], "--json", "--no-server")
                ranked = json.loads(plain.stdout)
                cut = str((ranked[1]["score"] + ranked[2]["score"]) / 2)  # not on a hit's (rounded) score
            args = [a.format(photos=tagged, tag=tag, min=cut) for a in q] + ["--json"]
            with monkeypatch.context() as m:
                def must_not_run(*a, **kw):
                    raise AssertionError("answered in-process although a server was running")

                m.setattr(Library, "search", must_not_run)
                served = cli("query", *args)
            local = cli("query", *args, "--no-server")
            assert served.exit_code == 0 and local.exit_code == 0, (q, served.output, local.output)
            assert same_hits(json.loads(served.stdout), json.loads(local.stdout)), q
            assert json.loads(local.stdout), q
    finally:
        srv.shutdown()
        t.join(10)


def test_image_weights_change_the_ranking_through_the_server(tagged, cli, settings):
    srv, t = start(settings)
    try:
        plain = json.loads(cli("query", "--image", f"{tagged}/red_circle_002.jpg", "--image",
                               f"{tagged}/sub/blue_square_000.jpg", "-k", "54", "--json").stdout)
        heavy = json.loads(cli("query", "--image", f"9:{tagged}/red_circle_002.jpg", "--image",
                               f"{tagged}/sub/blue_square_000.jpg", "-k", "54", "--json").stdout)
        assert [h["score"] for h in plain] != [h["score"] for h in heavy]
        assert "red_circle" in heavy[0]["path"]
    finally:
        srv.shutdown()
        t.join(10)


@pytest.mark.parametrize("args, message", [
    (["a red circle", "--under", "nope"], "error: --under nope: no such folder"),
    (["a red circle", "-k", "10001"], "error: -k 10001: give a whole number from 1 to 10000"),
    (["a red circle", "-k", "0"], "error: -k 0: give a whole number from 1 to 10000"),
    (["a red circle", "--keyword", "!!!"], "error: --keyword '!!!': has no words to look for"),
])
def test_cli_errors_keep_flag_wording_with_and_without_server(library, cli, settings, args, message):
    local = cli("query", *args, "--no-server")
    srv, t = start(settings)
    try:
        served = cli("query", *args)
    finally:
        srv.shutdown()
        t.join(10)
    assert local.exit_code == served.exit_code == 2
    assert local.stderr == served.stderr and local.stderr.startswith(message), local.stderr


def test_python_api_takes_image_bytes_and_pil_images(library, settings):
    from PIL import Image

    from imgsearch import Library

    photo = library / "green_triangle_001.jpg"
    with Library(settings=settings) as lib:
        by_path = lib.search(image=str(photo), k=3)
        by_bytes = lib.search(image=photo.read_bytes(), k=3)
        with Image.open(photo) as im:
            by_pil = lib.search(image=im.convert("RGB"), k=3)
    assert by_path == by_bytes and by_path[0].path == str(photo)
    assert [h.id for h in by_pil] == [h.id for h in by_path]


# --- fourth pass: what reaches the port besides a search ---------------------------------------
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n%%EndComments\n0 0 moveto 64 64 lineto stroke\nshowpage\n"


def test_an_uploaded_or_indexed_postscript_file_never_runs_ghostscript(library, settings, cli, tmp_path, monkeypatch):
    """Pillow left to itself tries every plugin: its EPS one hands the bytes (through a temp file) to Ghostscript,
    an outside interpreter. An upload, or a .jpg in a photo folder, holding PostScript must never reach it."""
    from PIL import EpsImagePlugin

    ran = tmp_path / "ghostscript-ran"
    fake = tmp_path / "gs"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {ran}\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", str(fake))  # as if Ghostscript were installed
    srv, t = start(settings)
    try:
        code, res = get(srv, "/api/search/image?k=1", {"Content-Type": "application/postscript"}, body=EPS,
                        method="POST")
        assert (code, res["error"]) == (400, "cannot use query image in the request body: not an image Pillow can "
                                             "read (unknown or corrupt format)")
        code, _ = get(srv, "/api/search", body={"images": [__import__("base64").b64encode(EPS).decode()]},
                      method="POST")
        assert code == 400
    finally:
        srv.shutdown()
        t.join(10)
    folder = tmp_path / "downloads"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(EPS)
    r = cli("index", folder, "--json")
    assert r.exit_code == 0, r.output
    assert [f["reason"] for f in json.loads(r.stdout)["failures"]] == [
        "not an image Pillow can read (unknown or corrupt format)"]
    assert not ran.exists()


def test_an_album_deleted_while_the_albums_are_evaluated_is_no_error(library, settings, monkeypatch):
    """GET /api/albums reads the albums, then evaluates each; a DELETE landing in between made the evaluation
    store a vector for an album that no longer existed: a 500 (and, in a watch batch, the watcher stopped)."""
    from imgsearch.store import Store

    srv, t = start(settings)
    try:
        code, _ = get(srv, "/api/albums", body={"name": "reds", "texts": ["a red circle"], "k": 5}, method="POST")
        assert code == 200
        listed = Store.albums

        def then_deleted(self):
            rows = listed(self)
            for row in rows:  # another client's DELETE /api/albums/reds, just after the list was read
                self.delete_album(row[0])
            return rows

        monkeypatch.setattr(Store, "albums", then_deleted)
        code, res = get(srv, "/api/albums")
        assert code == 200, res
        monkeypatch.undo()
        assert get(srv, "/api/albums") == (200, {"albums": []})
        code, res = get(srv, "/api/albums/reds")
        assert code == 400 and "no album named 'reds'" in res["error"]
    finally:
        srv.shutdown()
        t.join(10)


def test_a_program_on_a_dead_servers_port_gets_neither_token_nor_query(library, settings, cli):
    """server.json outlives a killed server. Its pid can go to another process of ours, its port to another
    program (another user's), which may well answer with that pid: it must never see the token or the query."""
    from http.server import BaseHTTPRequestHandler, HTTPServer

    seen = []

    class Stranger(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            self.do_POST()

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append(f"{self.requestline}\n{self.headers}\n{body.decode(errors='replace')}")
            answer = {"ok": True, "pid": os.getpid(), "proof": "0" * 64,
                      "hits": [{"rank": 1, "id": 1, "path": "/elsewhere/not-yours.jpg", "score": 1.0}]}
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    stranger = HTTPServer(("127.0.0.1", 0), Stranger)
    t = threading.Thread(target=stranger.serve_forever, daemon=True)
    t.start()
    try:
        record = {"ok": True, "pid": os.getpid(), "home": str(settings.home), "model": settings.model,
                  "pretrained": None, "host": "127.0.0.1", "port": stranger.server_address[1],
                  "token": "the-dead-servers-token"}
        (settings.home / "server.json").write_text(json.dumps(record))
        r = cli("query", "a secret red circle", "-k", "1", "--json")
    finally:
        stranger.shutdown()
        t.join(10)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)[0]["path"].startswith(str(library))  # answered in-process
    assert seen  # it was asked to prove itself...
    assert not any("the-dead-servers-token" in s or "secret" in s for s in seen), seen  # ...and told nothing


@pytest.mark.parametrize("length", ["+5", "1_0", "5\r\nContent-Length: 7", "9" * 5000, "-1", ""])
def test_content_length_is_one_plain_number(server, length):
    """int() takes '+5' and '1_0', and of two lengths the first was used: a proxy in front reading them another
    way would see a different request boundary."""
    _, port = server.address
    answer = raw_http(server, (f"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer "
                               f"{server.token}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
                               '{"texts": ["a red circle"]}').encode())
    assert answer.startswith(b"HTTP/1.1 400 ") and b"bad Content-Length" in answer and answer.count(b"HTTP/1.1") == 1


def test_a_second_host_or_origin_header_is_refused(server):
    _, port = server.address
    for extra in (f"Host: evil.example:{port}", "Origin: http://evil.example"):
        answer = raw_http(server, (f"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                   + (f"Origin: http://127.0.0.1:{port}\r\n" if "Origin" in extra else "")
                                   + f"{extra}\r\nAuthorization: Bearer {server.token}\r\nConnection: close\r\n\r\n"
                                   ).encode())
        assert answer.startswith(b"HTTP/1.1 403 ") and b'"images"' not in answer, extra


def test_an_album_written_to_a_read_only_library_is_a_conflict_not_a_server_fault(library, settings, monkeypatch):
    import imgsearch.store

    real = os.access
    monkeypatch.setattr(imgsearch.store.os, "access", lambda path, mode, *a, **kw: False if mode & os.W_OK and
                        str(path).startswith(str(settings.home)) else real(path, mode, *a, **kw))  # read-only media
    srv, t = start(settings)
    try:
        assert srv.service.library.store.read_only
        code, res = get(srv, "/api/albums", body={"name": "reds", "texts": ["a red circle"]}, method="POST")
        assert code == 409 and "is read-only" in res["error"], res
        code, res = get(srv, "/api/search?q=a+red+circle&k=1")
        assert code == 200 and "red_circle" in res["hits"][0]["path"]
    finally:
        srv.shutdown()
        t.join(10)


def test_serve_and_query_daemon_on_a_read_only_library(library, cli, settings, monkeypatch):
    """Queries work on read-only media; serve cannot publish its token there and says so in one line, and
    query --daemon answers in-process (both were an internal error)."""
    import errno
    import signal
    import tempfile

    real_mkstemp, real_open = tempfile.mkstemp, os.open

    def refused(path):
        if str(path).startswith(str(settings.home)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def mkstemp(*a, dir=None, **kw):
        refused(dir)
        return real_mkstemp(*a, dir=dir, **kw)

    def open_(path, *a, **kw):
        refused(path)
        return real_open(path, *a, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # keep pytest's own SIGTERM handling
    r = cli("serve", "--port", "0")
    assert r.exit_code == 1 and "internal error" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: cannot write {settings.home / 'server.json'} "
                                                        "(Read-only file system)")
    r = cli("query", "a red circle", "-k", "1", "--json", "--daemon")
    assert r.exit_code == 0 and "red_circle" in json.loads(r.stdout)[0]["path"], r.output
    assert not (settings.home / "server.json").exists()


def test_a_damaged_server_file_or_a_web_page_on_its_port_is_ignored(library, settings, cli):
    """server.json is checked before use (a hand edit, a damaged disk, another program's record) and so is
    what answers on its port: each was an internal error of `imgsearch query`."""
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class WebPage(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            body = b"<html>a dev server that took the port</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    page = HTTPServer(("127.0.0.1", 0), WebPage)
    t = threading.Thread(target=page.serve_forever, daemon=True)
    t.start()
    good = {"pid": os.getpid(), "model": settings.model, "pretrained": None, "host": "127.0.0.1",
            "port": page.server_address[1], "token": "t"}
    try:
        for change in ({}, {"port": "abc"}, {"port": None}, {"pid": None}, {"pid": 2 ** 70}, {"host": "a b"},
                       {"host": "x" * 300}, {"host": None}):
            (settings.home / "server.json").write_text(json.dumps({**good, **change}))
            r = cli("query", "a red circle", "-k", "1", "--json")
            assert r.exit_code == 0 and json.loads(r.stdout)[0]["path"].startswith(str(library)), (change, r.output)
    finally:
        page.shutdown()
        t.join(10)


def test_a_server_that_stops_mid_answer_leaves_the_query_to_be_answered_in_process(library, settings, cli):
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from imgsearch.client import CHALLENGE, proof

    class Dying(BaseHTTPRequestHandler):  # proves itself, then stops half-way through the search's answer
        def log_message(self, *a):
            pass

        def do_GET(self):
            challenge = self.headers.get(CHALLENGE)
            body = json.dumps({"ok": True, "pid": os.getpid(),
                               **({"proof": proof("t", challenge)} if challenge else {})}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b'{"hits": [')
            self.close_connection = True

    dying = HTTPServer(("127.0.0.1", 0), Dying)
    t = threading.Thread(target=dying.serve_forever, daemon=True)
    t.start()
    try:
        (settings.home / "server.json").write_text(json.dumps({
            "pid": os.getpid(), "model": settings.model, "pretrained": None, "host": "127.0.0.1",
            "port": dying.server_address[1], "token": "t"}))
        r = cli("query", "a red circle", "-k", "1", "--json")
    finally:
        dying.shutdown()
        t.join(10)
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["path"].startswith(str(library)), r.output


def test_a_connection_past_the_cap_while_every_request_runs_gets_503_and_the_server_lives_on(
        library, settings, monkeypatch):
    """Refusing it closed the socket under the lock the refusal already held: the server stopped accepting
    anyone, for good (a burst of long requests, or bodies sent slowly, reached it)."""
    from imgsearch import server as srvmod

    monkeypatch.setattr(srvmod, "MAX_CONNECTIONS", 4)
    srv, t = start(settings)
    host, port = srv.address
    running = []
    try:
        for _ in range(4):  # requests whose bodies are still on their way: running, not idle
            s = socket.create_connection((host, port), timeout=30)
            s.sendall(f"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {srv.token}\r\n"
                      "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode())
            running.append(s)
        deadline = time.monotonic() + 60
        while sum(v is None for v in list(srv.httpd._conns.values())) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        answer = raw_http(srv, f"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode(), timeout=30)
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        for s in running:
            s.close()
        running = []
        # The handlers see the closed sockets in their own time: wait for their slots, not a fixed pause.
        deadline = time.monotonic() + 60
        while len(srv.httpd._conns) >= 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert get(srv, "/api/health")[0] == 200
    finally:
        for s in running:
            s.close()
        threading.Thread(target=srv.shutdown, daemon=True).start()  # a deadlocked server never stops
        t.join(10)
