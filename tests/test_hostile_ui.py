"""Hostile use of the web UI: DNS rebinding against `imgsearch ui`, Markdown injection through URLs and file names.

The rebinding tests start the real `imgsearch ui` on a free port and speak raw HTTP to it, the way a
browser fooled by a rebound name would (Host and Origin naming the attacker's domain). The injection tests
drive the page with Streamlit's AppTest and parse what it renders with a CommonMark parser.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import imgsearch.synthetic as synthetic

APP = str(Path(__file__).resolve().parents[1] / "ui" / "app.py")
# Names a user may well have on disk; '/' cannot be in a file name, so the URLs use '_'.
LINK_NAME = "[x](http:__e.x) *b*.png"
IMAGE_NAME = "![t](https:__e.x_t.png).png"
ODD_NAME = "a\n# b &amp; <i>`c`.png"
INJECTED = "[click](https://evil.example) ![t](https://evil.example/t.png)"
BYTES_NAME = "caf\udce9 \u202egnp.png"  # the byte 0xE9 (Latin-1 é, not UTF-8) and a right-to-left override


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_model):
    """Red/blue circles and squares, plus copies of a red circle under names full of Markdown."""
    from imgsearch.config import Settings
    from imgsearch.indexer import index_paths

    root = tmp_path_factory.mktemp("hostile-ui")
    photos = root / "photos"
    synthetic.generate(photos, per_class=2, colors=["red", "blue"], shapes=["circle", "square"], size=64,
                       fmt="png", seed=4, captions_file=None)
    circle = sorted(photos.glob("red_circle*.png"))[0]
    (photos / "odd").mkdir()
    for name in (LINK_NAME, IMAGE_NAME, ODD_NAME):
        shutil.copy(circle, photos / "odd" / name)
    (photos / "bytes").mkdir()
    shutil.copy(circle, photos / "bytes" / BYTES_NAME)
    settings = Settings(home=root / "home", model=f"local-dir:{tiny_model}", pretrained=None, device="cpu",
                        precision="fp32", workers=2)
    report = index_paths(settings, [photos])
    assert report.new == 8 + 3 + 1 and not report.failed
    return settings, photos


# --- DNS rebinding: the real server ------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_request(port: int, head: str) -> tuple[int, str]:
    """Send a request head as-is (any Host, any Origin) and return the status and the body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head.encode("latin-1"))
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            data += chunk
            if data.startswith(b"HTTP/1.1 101"):  # a websocket was opened: the server keeps it open
                break
    status_line, _, rest = data.decode("latin-1").partition("\r\n")
    return int(status_line.split()[1]), rest.partition("\r\n\r\n")[2]


def get(port: int, path: str, host: str, origin: str | None = None, method: str = "GET") -> tuple[int, str]:
    extra = f"Origin: {origin}\r\n" if origin else ""
    return raw_request(port, f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Length: 0\r\n"
                             "Connection: close\r\n\r\n")


def ws_handshake(port: int, host: str, origin: str | None) -> int:
    extra = f"Origin: {origin}\r\n" if origin else ""
    status, _ = raw_request(port, f"GET /_stcore/stream HTTP/1.1\r\nHost: {host}\r\n{extra}Upgrade: websocket\r\n"
                                  "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                  "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: streamlit\r\n\r\n")
    return status


@pytest.fixture(scope="module")
def server(library, tmp_path_factory):
    """`imgsearch ui` on a free port over the library; yields the port, then stops it as Ctrl+C would."""
    settings, _ = library
    port = free_port()
    exe = str(Path(sys.executable).with_name("imgsearch"))
    logfile = tmp_path_factory.mktemp("ui-log") / "server.log"
    log = open(logfile, "w+")
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSEARCH_")}
    proc = subprocess.Popen([exe, "--home", str(settings.home), "--model", settings.model, "--device", "cpu",
                             "--precision", "fp32", "ui", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"imgsearch ui exited with {proc.returncode}:\n{log.read()}")
            try:
                if get(port, "/_stcore/health", f"127.0.0.1:{port}")[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail("imgsearch ui did not answer within 90 s")
            time.sleep(0.3)
        yield port
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
        log.seek(0)
        output = log.read()
        log.close()
        assert code == 0, output
        assert "Traceback" not in output, output
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0


def test_loopback_hosts_get_the_page(server):
    port = server
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "localhost"):
        status, body = get(server, "/", host)
        assert status == 200 and "<html" in body.lower(), (host, status)
        assert get(server, "/_stcore/health", host) == (200, "ok")


def test_foreign_host_is_refused_everywhere(server):
    port = server
    for path in ("/", "/_stcore/health", "/_stcore/host-config", "/_stcore/stream", "/media/x.png",
                 "/static/js/index.js", "/?q=a+red+circle"):
        for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}", "127.0.0.1@evil"):
            status, body = get(port, path, host)
            assert status == 403, (path, host, status, body[:200])
            assert "refused a request for host" in body and "127.0.0.1" in body


def test_cross_origin_post_is_refused(server):
    port = server
    status, body = get(port, "/_stcore/upload_file/x/y", f"127.0.0.1:{port}", origin="https://evil.example",
                       method="PUT")
    assert status == 403 and "refused a request from the page at 'https://evil.example'" in body


def test_websocket_handshake_needs_this_machine_and_its_own_page(server):
    port = server
    # a rebound name: Host and Origin both the attacker's
    assert ws_handshake(port, f"evil.example:{port}", f"http://evil.example:{port}") == 403
    # the attacker's page talking to the real address
    assert ws_handshake(port, f"127.0.0.1:{port}", f"http://evil.example:{port}") == 403
    # another local page (other port) or a sandboxed frame
    assert ws_handshake(port, f"127.0.0.1:{port}", "http://127.0.0.1:3000") == 403
    assert ws_handshake(port, f"127.0.0.1:{port}", "null") == 403
    # the page itself
    assert ws_handshake(port, f"127.0.0.1:{port}", f"http://127.0.0.1:{port}") == 101
    assert ws_handshake(port, f"localhost:{port}", f"http://localhost:{port}") == 101


def run_page(port: int, query_string: str) -> list[tuple[str, str]]:
    """One browser session over the websocket: (element type, Markdown source) of everything drawn."""
    from streamlit.proto.BackMsg_pb2 import BackMsg
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
    from websockets.sync.client import connect

    drawn = []
    with connect(f"ws://127.0.0.1:{port}/_stcore/stream", subprotocols=["streamlit"],
                 origin=f"http://127.0.0.1:{port}", open_timeout=10) as ws:
        msg = BackMsg()
        msg.rerun_script.query_string = query_string
        ws.send(msg.SerializeToString())
        deadline = time.time() + 90
        while time.time() < deadline:
            fm = ForwardMsg()
            fm.ParseFromString(ws.recv(timeout=90))
            if fm.WhichOneof("type") == "script_finished":
                return drawn
            if fm.WhichOneof("type") != "delta" or not fm.delta.HasField("new_element"):
                continue
            el = fm.delta.new_element
            kind = el.WhichOneof("type")
            if kind == "imgs":
                drawn += [("caption", img.caption) for img in el.imgs.imgs if img.caption]
            elif kind in ("markdown", "alert", "heading"):
                drawn.append((kind, getattr(el, kind).body))
            elif kind == "button" and el.button.help:
                drawn.append(("help", el.button.help))
    pytest.fail("the page did not finish within 90 s")


@pytest.mark.slow
def test_the_page_works_through_the_guard_and_shows_names_literally(server, library):
    from urllib.parse import urlencode

    drawn = run_page(server, urlencode({"q": "a red circle", "under": str(library[1] / "odd")}))
    shown = [plain_text(src) for kind, src in drawn if kind == "caption"]
    names = {s.split(" · ", 1)[1] for s in shown}
    assert names == {LINK_NAME, IMAGE_NAME, ODD_NAME.replace("\n", "\\n")}, drawn
    for kind, src in drawn:
        assert_inert(src)


# --- Markdown injection: the page in-process ---------------------------------------------------------
def use_home(monkeypatch, settings) -> None:
    for var in list(os.environ):
        if var.startswith("IMGSEARCH_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("IMGSEARCH_HOME", str(settings.home))
    monkeypatch.setenv("IMGSEARCH_MODEL", settings.model)
    monkeypatch.setenv("IMGSEARCH_DEVICE", "cpu")
    monkeypatch.setenv("IMGSEARCH_PRECISION", "fp32")
    monkeypatch.setenv("IMGSEARCH_WORKERS", "2")


@pytest.fixture()
def page(library, monkeypatch):
    from streamlit.testing.v1 import AppTest

    use_home(monkeypatch, library[0])
    return AppTest.from_file(APP, default_timeout=60)


def tokens(src: str):
    from markdown_it import MarkdownIt

    for block in MarkdownIt("commonmark").parse(src):
        yield block
        yield from block.children or ()


def plain_text(src: str) -> str:
    """What a Markdown renderer shows for ``src`` (text only)."""
    return "".join(t.content if t.type in ("text", "code_inline") else "\n" if t.type == "softbreak" else ""
                   for t in tokens(src))


def assert_inert(src: str) -> None:
    """Nothing in ``src`` renders as a link, an image, HTML, a heading, a list or emphasis."""
    kinds = {t.type for t in tokens(src)}
    allowed = {"paragraph_open", "paragraph_close", "inline", "text", "softbreak", "hardbreak", "strong_open",
               "strong_close"}
    assert kinds <= allowed, (kinds - allowed, src)
    # GFM turns bare URLs into links too; an escaped ':' or '.' stops it
    assert "://" not in src and "www." not in src, src


def everything_drawn(at) -> list[str]:
    out = []
    for kind in ("markdown", "caption", "error", "warning", "info", "success", "title", "header", "subheader"):
        out += [str(e.value) for e in getattr(at, kind)]
        out += [str(e.value) for e in getattr(at.sidebar, kind)]
    out += [c for img in at.image for c in img.captions if c]
    out += [b.help for b in at.button if b.help]
    return out


def test_shared_url_cannot_inject_links_or_images(page):
    for key in ("q", "not", "under"):
        at = page
        for k in list(at.query_params):
            del at.query_params[k]
        at.query_params["q"] = "a red circle"
        at.query_params[key] = INJECTED
        at.run()
        assert not at.exception, at.exception
        drawn = everything_drawn(at)
        assert any(INJECTED in plain_text(src) for src in drawn), (key, drawn)  # shown, literally
        for src in drawn:
            assert_inert(src)
    # under= names no folder: the error box shows the value, with no live link and no image to fetch
    errors = [plain_text(e.value) for e in at.error]
    assert any("no such folder" in e and INJECTED in e for e in errors), errors


def test_file_names_with_markdown_show_literally(page, library):
    page.query_params["q"] = "a red circle"
    page.query_params["under"] = str(library[1] / "odd")
    at = page.run()
    assert not at.exception
    sources = [c for img in at.image for c in img.captions if c]
    names = {plain_text(c).split(" · ", 1)[1] for c in sources}
    assert names == {LINK_NAME, IMAGE_NAME, ODD_NAME.replace("\n", "\\n")}, names
    for src in everything_drawn(at):
        assert_inert(src)
    # the details view of such a file: its name as a heading, its path in a code block
    button = next(b for b in at.button if b.key and b.key.startswith("hit-view-") and LINK_NAME in
                  plain_text(b.help))
    button.click().run()
    assert not at.exception
    assert [plain_text(h.value) for h in at.subheader] == [LINK_NAME]
    assert any(c.value.endswith(LINK_NAME) for c in at.code)
    for src in everything_drawn(at):
        assert_inert(src)


def test_details_of_a_file_whose_name_is_not_utf8(page, library):
    """A file name holding bytes that are not UTF-8 (an old archive, a camera card) replaced the whole page
    with 'Internal error: UnicodeEncodeError' when its Details opened: its path went to the browser raw."""
    folder = library[1] / "bytes"
    page.query_params["q"] = "a red circle"
    page.query_params["under"] = str(folder)
    at = page.run()
    next(b for b in at.button if b.key and b.key.startswith("hit-view-")).click().run()
    assert not at.exception and not at.error
    assert [c.value for c in at.code] == [f"{folder}/caf\\xe9 \\u202egnp.png"]  # the path, every character visible
    assert [plain_text(h.value) for h in at.subheader] == ["caf\\xe9 \\u202egnp.png"]
    assert len([b for b in at.button if b.key and b.key.startswith("hit-view-")]) == 1  # its result stays below


def test_md_escapes_every_markdown_construct():
    sys.path.insert(0, str(Path(APP).parent))
    try:
        from app import md
    finally:
        sys.path.pop(0)
    hostile = ["[a](http://e.x)", "![i](https://e.x/i.png)", "<img src=x onerror=alert(1)>", "**b** _i_ ~~s~~",
               "# h", "- item", "1. item", "`code`", "$x^2$", ":red[red] :material/home:", "a | b\n--|--",
               "https://evil.example www.evil.example me@evil.example", "&amp; &#x41;", "line\nbreak",
               "bidi\u202egpj.exe", "bytes \udcff\udcfe", "back\\slash"]
    for text in hostile:
        src = md(text)
        assert_inert(src)
        assert "\n" not in src and not any(0xD800 <= ord(c) <= 0xDFFF for c in src)
    assert plain_text(md("[a](http://e.x) *b* & <i>")) == "[a](http://e.x) *b* & <i>"
    assert plain_text(md("line\nbreak\u202e\udcff")) == "line\\nbreak\\u202e\\xff"
    assert plain_text(md("back\\slash")) == "back\\slash"


# --- who is allowed, without a server ----------------------------------------------------------------
def test_host_policy():
    from imgsearch.commands.ui import HostPolicy

    local = HostPolicy("127.0.0.1", 8501)
    assert local.refusal("127.0.0.1:8501", None) is None
    assert local.refusal("LOCALHOST.:8501", "http://localhost:8501") is None
    assert local.refusal("[::1]:8501", "http://[::1]:8501") is None
    assert local.refusal("localhost:9000", "http://localhost:9000") is None  # e.g. through ssh -L 9000:...
    assert "refused a request for host '192.168.1.5:8501'" in local.refusal("192.168.1.5:8501", None)
    assert local.refusal("127.0.0.1:bad", None) is not None
    assert local.refusal("", None) is not None

    named = HostPolicy("photos.lan", 8501)
    assert named.refusal("photos.lan:8501", "http://photos.lan:8501") is None
    assert named.refusal("evil.example:8501", None) is not None

    shared = HostPolicy("0.0.0.0", 8501)
    assert shared.refusal("192.168.1.5:8501", "http://192.168.1.5:8501") is None  # an IP cannot be rebound
    assert shared.refusal(f"{socket.gethostname()}:8501", None) is None
    assert shared.refusal("evil.example:8501", "http://evil.example:8501") is not None


def test_shared_ui_warns_and_says_who_it_answers(cli, home, monkeypatch):
    import imgsearch.commands.ui as ui_cmd

    calls = []
    monkeypatch.setattr(ui_cmd.os, "execve", lambda path, argv, env: calls.append(argv))
    r = cli("ui", "--host", "0.0.0.0", "--port", str(free_port()))
    assert r.exit_code == 0, r.output
    assert "warning: listening beyond this machine" in r.stderr
    assert "this machine's IP addresses; others get 403" in r.stderr
    r = cli("ui", "--port", str(free_port()))
    assert "warning" not in r.stderr
    import json

    config = json.loads(calls[1][3])["config"]
    assert config["server.enableCORS"] is True and config["server.enableXsrfProtection"] is True
    assert config["server.allowedHosts"] == ["127.0.0.1", "::1", "localhost"]
