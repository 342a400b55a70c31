"""Watched folders: `imgsearch watch` and `serve --watch` keep the library in step with the disk.

The polling observer with a short interval keeps these deterministic on any file system; native events
take the same batch path.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

import imgsearch.synthetic as synthetic

ROOT = Path(__file__).resolve().parents[1]
# No red and no blue shapes at the start: a red circle or a blue square added later must rank first.
START_COLORS = ["green", "yellow", "purple", "white"]


def shapes(folder: Path, per_class: int = 1, seed: int = 1) -> Path:
    synthetic.generate(folder, per_class=per_class, colors=START_COLORS, size=64, fmt="jpg", seed=seed,
                       captions_file=None)
    return folder


def draw(path: Path, color: str, shape: str, seed: int = 0) -> Path:
    import random

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"  # written whole, then renamed in, as a camera import would
    synthetic.draw_shape(color, shape, 64, random.Random(seed)).save(tmp, format="JPEG", quality=92)
    os.replace(tmp, path)
    return path


def wait_for(check, timeout: float = 20.0, what: str = "the library to follow the disk"):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def top(lib, text: str, k: int = 1) -> list[str]:
    return [h.path for h in lib.search(text, k=k)]


class Running:
    """A Library's watcher running in a thread, as `serve --watch` runs it."""

    def __init__(self, lib, paths, **kw):
        self.said: list[str] = []
        self.batches = []
        self.error: BaseException | None = None
        self.watcher = lib.watcher(paths, poll=True, interval=0.1, debounce=0.3, on_batch=self.batches.append,
                                   say=self.said.append, **kw)
        self.watcher.start()
        self.caught_up = self.watcher.catch_up()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.watcher.run(self.stop)
        except BaseException as e:
            self.error = e

    def close(self):
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture()
def lib(settings):
    from imgsearch import Library

    with Library(settings=settings) as library:
        yield library


def test_add_modify_rename_delete_are_followed_by_queries(lib, tmp_path):
    folder = shapes(tmp_path / "photos")
    run = Running(lib, [folder])
    try:
        assert run.caught_up.new == 12
        start = lib.status().images

        new = draw(folder / "new.jpg", "red", "circle")
        wait_for(lambda: top(lib, "a red circle") == [str(new)], what="the new red circle to be found")
        row_id = lib.search("a red circle", k=1)[0].id

        draw(folder / "new.jpg", "blue", "square", seed=3)  # same name, new picture
        wait_for(lambda: top(lib, "a blue square") == [str(new)], what="the modified file's new content")
        assert str(new) not in top(lib, "a red circle", k=3)
        assert lib.search("a blue square", k=1)[0].id == row_id  # updated in place

        moved = folder / "2024" / "renamed.jpg"
        moved.parent.mkdir()
        os.rename(new, moved)
        wait_for(lambda: top(lib, "a blue square") == [str(moved)], what="the renamed file")
        assert lib.search("a blue square", k=1)[0].id == row_id  # a move keeps the row (captions, tags)
        assert lib.status().images == start + 1

        moved.unlink()
        wait_for(lambda: lib.status().images == start, what="the deleted file to be forgotten")
        assert str(moved) not in top(lib, "a blue square", k=20)
        assert run.error is None
        lines = [b.line() for b in run.batches]
        assert any(line.startswith("added 1,") for line in lines), lines
        assert any("moved 1" in line for line in lines) and any("removed 1" in line for line in lines), lines
    finally:
        run.close()


class StoppedClock:
    """The watcher's clock, stopped while a test writes: no quiet spell can pass however slow the machine is."""

    def __init__(self):
        self.offset = 0.0
        self.stopped_at: float | None = None

    def __call__(self) -> float:
        return self.stopped_at if self.stopped_at is not None else time.monotonic() + self.offset

    def stop(self) -> None:
        self.stopped_at = self()

    def restart_after(self, seconds: float) -> None:
        """Run on from ``seconds`` after the moment it stopped."""
        self.offset = self.stopped_at + seconds - time.monotonic()
        self.stopped_at = None


def test_a_file_moved_over_another_while_watched_brings_its_row_and_captions_as_index_does(lib, tmp_path):
    """`mv blue.jpg red.jpg` is one batch: red.jpg changed, blue.jpg gone. The batch re-encoded the blue square
    into red.jpg's row, which kept "Grandma's red circle", and forgot blue.jpg's row with "the lake" on it;
    `index` moves the blue square's row over (docs/cli.md). Swapping two names encoded both again."""
    folder = shapes(tmp_path / "photos")
    red, blue = draw(folder / "red.jpg", "red", "circle"), draw(folder / "blue.jpg", "blue", "square", seed=3)
    os.utime(blue, ns=(1, 10**18))  # not the red one's size and time
    lib.index([folder])
    ids = {h.path: h.id for h in lib.search("a blue square", k=14)}
    assert lib.add_caption(red, "Grandma's red circle") and lib.add_caption(blue, "the lake")
    blue.replace(red)
    report = lib._watch_batch([str(red)], [str(blue)])
    assert (report.moved, report.removed, report.updated, report.encoded) == (1, 1, 0, 0)
    assert lib.captions(red) == ["the lake"] and top(lib, "a blue square") == [str(red)]
    assert lib.search("a blue square", k=1)[0].id == ids[str(blue)] and lib.status().images == 13

    draw(blue, "yellow", "triangle", seed=4)
    lib.index([folder])
    (folder / "t.jpg").write_bytes(red.read_bytes())
    blue.replace(red)  # mv red t; mv blue red; mv t blue, as a watcher sees it
    (folder / "t.jpg").replace(blue)
    report = lib._watch_batch([str(blue), str(red)], [str(folder / "t.jpg")])
    assert (report.updated, report.reused, report.encoded, report.moved) == (2, 2, 0, 0)
    assert top(lib, "a yellow triangle") == [str(red)] and top(lib, "a blue square") == [str(blue)]
    assert lib.captions(red) == ["the lake"]  # a path keeps its captions when its content changes


def test_a_batch_of_many_new_files_costs_the_same_per_file_as_a_small_one(lib, tmp_path, monkeypatch):
    """A watch batch names every changed file as a root of its index run, and each new file was tested against
    every root: a card of 5000 photos copied in took 12.5M path comparisons per batch (seconds holding the lock,
    and in serve --watch the encoder, so queries waited)."""
    from imgsearch import files

    calls, real = [0], files.under
    monkeypatch.setattr(files, "under", lambda *a: calls.__setitem__(0, calls[0] + 1) or real(*a))
    folder = shapes(tmp_path / "photos", per_class=13)
    paths = sorted(str(p) for p in folder.glob("*.jpg"))
    report = lib._watch_batch(paths, [])
    assert report.new == len(paths) == 156 and top(lib, "a green circle")[0].startswith(str(folder))
    assert calls[0] < 2 * len(paths)  # was 12k here


def test_a_file_is_looked_at_only_after_a_quiet_spell_in_which_it_stopped_changing(tmp_path):
    from imgsearch.watch import Watcher

    photo = tmp_path / "copying.jpg"
    photo.write_bytes(b"\xff\xd8 first part")
    watcher = Watcher([tmp_path], apply=None, catch_up=None, debounce=0.5)
    now = [100.0]
    watcher.clock = lambda: now[0]
    watcher.notice(str(photo))
    now[0] += 0.4
    assert watcher._ready() == ([], [])  # not quiet long enough
    with open(photo, "ab") as f:  # more arrives, its event not yet delivered
        f.write(b"second part")
    now[0] += 0.1
    assert watcher._ready() == ([], [])  # quiet, but the file changed since its event: still being written
    now[0] += 0.4
    assert watcher._ready() == ([], [])  # a new quiet spell began at that look
    draw(photo, "red", "circle")  # finished: a whole JPEG (renamed in)
    watcher.notice(str(photo))
    now[0] += 0.5
    assert watcher._ready() == ([str(photo)], [])
    assert watcher._ready() == ([], [])  # once
    photo.unlink()
    (tmp_path / "notes.txt").write_text("not a photo")
    watcher.notice(str(photo))
    watcher.notice(str(tmp_path / "notes.txt"))
    now[0] += 0.5
    assert watcher._ready() == ([], [str(photo)])  # gone: to be forgotten; notes.txt is no photo to index


def test_a_file_that_vanishes_mid_batch_costs_the_batch_nothing_else(lib, tmp_path):
    """One file of a batch gone between the look and the write stopped the whole batch; only that file was
    looked at again, so a new photo that came in the same batch was never indexed."""
    folder = shapes(tmp_path / "photos")
    watcher = lib.watcher([folder], poll=True, debounce=0.5)
    now = [100.0]
    watcher.clock = lambda: now[0]
    assert watcher.catch_up().new == 12
    new, brief = draw(folder / "new.jpg", "red", "circle"), draw(folder / "brief.jpg", "blue", "square")
    for photo in (new, brief):
        watcher.notice(str(photo))
    now[0] += 0.5
    changed, gone = watcher._ready()
    assert changed == [str(brief), str(new)]
    brief.unlink()  # e.g. a download moved on at once
    watcher._run_batch(changed, gone)  # not applied: brief.jpg is not there to index
    now[0] += 0.5
    watcher._run_batch(*watcher._ready())
    assert top(lib, "a red circle") == [str(new)]
    assert str(brief) not in top(lib, "a blue square", k=20)


def test_partial_writes_temp_hidden_and_other_files_are_not_indexed(lib, home, tmp_path):
    import io
    import random

    from imgsearch.watch import _signature

    folder = shapes(tmp_path / "photos")
    assert home.parent == tmp_path
    run = Running(lib, [tmp_path])  # the library's own home is inside the watched folder
    clock = StoppedClock()
    noticed: list[tuple[str, tuple | None]] = []
    notice, ready, looks = run.watcher.notice, run.watcher._ready, []
    run.watcher.notice = lambda path: noticed.append((os.fsdecode(path), _signature(path))) or notice(path)
    run.watcher._ready = lambda: looks.append(1) or ready()
    run.watcher.clock = clock

    def looked_again():  # a whole look at what is pending began after this call (one may be under way)
        n = len(looks) + 1
        wait_for(lambda: len(looks) > n, what="the watcher to look at its pending files")
    try:
        start = lib.status().images
        buf = io.BytesIO()
        synthetic.draw_shape("red", "circle", 64, random.Random(5)).save(buf, format="JPEG", quality=92)
        data = buf.getvalue()
        slow = folder / "slow.jpg"
        others = [folder / ".hidden.jpg", folder / "download.jpg.part", folder / "notes.txt"]
        clock.stop()  # a slow copy: however long it takes here, it is all within one quiet spell's wait
        with open(slow, "wb") as f:
            f.write(data[:len(data) // 3])
            f.flush()
            half = _signature(str(slow))
            wait_for(lambda: (str(slow), half) in noticed, what="the half-written file's event")
            looked_again()
            f.write(data[len(data) // 3:])
        others[0].write_bytes(data)
        others[1].write_bytes(data)
        others[2].write_text("not a photo")
        written = {(str(p), _signature(str(p))) for p in [slow, *others]}
        wait_for(lambda: written <= set(noticed), what="the events of every file written")
        looked_again()
        assert run.batches == [] and lib.status().images == start  # nothing looked at while it changed
        clock.restart_after(run.watcher.debounce)  # the quiet spell passes: one batch takes everything noticed
        wait_for(lambda: top(lib, "a red circle") == [str(slow)], what="the finished copy")
        assert lib.status().images == start + 1
        assert lib.failures() == []  # never indexed half-written; notes.txt and the library's files not tried
        assert [b.line().split(" (")[0] for b in run.batches] == ["added 1, updated 0, moved 0, removed 0"]
        png = io.BytesIO()
        synthetic.draw_shape("red", "circle", 64, random.Random(6)).save(png, format="PNG")
        (folder / "scan").write_bytes(png.getvalue())  # no extension: its first bytes say PNG, as in `index`
        wait_for(lambda: lib.status().images == start + 2, what="the extension-less PNG")
        assert lib.failures() == []
    finally:
        run.close()


def test_watching_holds_the_write_lock_only_while_a_batch_is_written(lib, cli, tmp_path):
    folder = shapes(tmp_path / "photos")
    other = shapes(tmp_path / "other", seed=2)
    run = Running(lib, [folder])
    try:
        r = cli("index", "--no-wait", other)  # another writer, e.g. a second terminal
        assert r.exit_code == 0, r.stderr
        assert "new 12" in r.stdout
    finally:
        run.close()


def test_a_folder_that_disappears_is_named_and_the_others_still_watched(lib, tmp_path):
    a = shapes(tmp_path / "a")
    b = tmp_path / "b"
    b.mkdir()
    run = Running(lib, [a, b])
    try:
        images = lib.status().images
        shutil.rmtree(a)
        wait_for(lambda: any("is gone" in s for s in run.said), what="the message about the vanished folder")
        gone = [s for s in run.said if "is gone" in s]
        assert len(gone) == 1 and str(a) in gone[0] and "still watching 1 folder" in gone[0]
        assert "\n" not in gone[0]
        assert lib.status().images == images  # maybe an unplugged drive: nothing forgotten on a guess

        new = draw(b / "red.jpg", "red", "circle")
        wait_for(lambda: top(lib, "a red circle") == [str(new)], what="the other folder still watched")

        shutil.rmtree(b)
        run.thread.join(20)
        assert not run.thread.is_alive()
        assert "every watched folder is gone" in str(run.error)
    finally:
        run.close()


def test_a_vanished_folder_with_an_odd_name_is_named_in_one_line_that_can_be_pasted(tmp_path):
    """A watched folder named with a newline or a non-UTF-8 byte was named raw: the line broke in two, the byte
    came out as \\udcff, and the `imgsearch forget` it suggested could not be pasted."""
    from imgsearch.watch import Watcher

    odd, spaced = os.fsdecode(os.fsencode(str(tmp_path)) + b"/trip\xff\nday"), tmp_path / "My Photos"
    os.mkdir(odd)
    spaced.mkdir()
    (tmp_path / "other").mkdir()
    said = []
    watcher = Watcher([odd, spaced, tmp_path / "other"], apply=None, catch_up=None, say=said.append)
    os.rmdir(odd)
    spaced.rmdir()
    watcher._check_roots()
    assert len(said) == 2 and not any("\n" in line or "\udcff" in line for line in said), said
    assert f"folder $'{tmp_path}/trip\\xff\\nday' is gone" in said[0]
    assert f"(`imgsearch forget $'{tmp_path}/trip\\xff\\nday'` removes them)" in said[0]
    assert f"(`imgsearch forget '{spaced}'` removes them)" in said[1]


def test_without_inotify_it_falls_back_to_polling_and_says_so(lib, tmp_path, monkeypatch):
    import errno

    import watchdog.observers

    class NoInotify:
        def schedule(self, *a, **k):
            raise OSError(errno.ENOSPC, "inotify watch limit reached")

        def stop(self):
            pass

    monkeypatch.setattr(watchdog.observers, "Observer", NoInotify)
    folder = shapes(tmp_path / "photos")
    said = []
    w = lib.watcher([folder], interval=0.1, debounce=0.2, say=said.append)
    with w:
        w.start()
        assert w.how == "polling every 0.1s"
        assert said == ["native file events unavailable (inotify watch limit reached); polling every 0.1s instead"]
        w.catch_up()
        stop = threading.Event()
        t = threading.Thread(target=w.run, args=(stop,), daemon=True)
        t.start()
        try:
            new = draw(folder / "red.jpg", "red", "circle")
            wait_for(lambda: top(lib, "a red circle") == [str(new)], what="the polled change")
        finally:
            stop.set()
            t.join(20)


def test_a_symlinked_folder_in_a_watched_one_is_followed_as_the_catch_up_indexed_it(lib, tmp_path):
    """photos/phone -> phone-sync: the catch-up indexed the linked folder, but inotify does not follow links, so
    photos arriving there later were never added and deleted ones never forgotten (polling did follow them)."""
    folder, target = shapes(tmp_path / "photos"), tmp_path / "phone-sync"
    old = draw(target / "sub" / "old.jpg", "blue", "square")
    (folder / "phone").symlink_to(target)
    (target / "loop").symlink_to(folder)  # and back: walked once
    watcher = lib.watcher([folder], interval=0.1, debounce=0.2)
    with watcher:
        watcher.start()
        assert watcher.catch_up().new == 13 and watcher.links == [str(target)]
        stop = threading.Event()
        thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
        thread.start()
        try:
            new = draw(target / "sub" / "red.jpg", "red", "circle")  # written where the phone syncs to
            wait_for(lambda: top(lib, "a red circle") == [str(new)], what="the photo in the linked folder")
            old.unlink()
            wait_for(lambda: lib.status().images == 13, what="the photo deleted in the linked folder")
        finally:
            stop.set()
            thread.join(20)


def test_watch_refuses_paths_that_are_not_folders(cli, tmp_path):
    folder = shapes(tmp_path / "photos")
    r = cli("watch", folder / "green_circle_000.jpg")
    assert r.exit_code == 2
    assert r.stderr.strip() == (f"error: {folder / 'green_circle_000.jpg'} is not a folder; watch takes folders "
                                "(index single files with `imgsearch index FILE`)")
    r = cli("watch", tmp_path / "nowhere")
    assert r.exit_code == 2 and r.stderr.strip() == f"error: no such folder: {tmp_path / 'nowhere'}"
    r = cli("serve", "--watch", folder / "green_circle_000.jpg")
    assert r.exit_code == 2 and "is not a folder" in r.stderr
    assert not (Path(os.environ["IMGSEARCH_HOME"]) / "library.db").exists()  # refused before any write


# --- as separate processes ---------------------------------------------------------------------------
def _cmd(home: Path, model_id: str, *args) -> list[str]:
    return [sys.executable, "-m", "imgsearch", "--home", str(home), "--model", model_id, "--device", "cpu",
            "--precision", "fp32", *[str(a) for a in args]]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "IMGSEARCH_WORKERS": "2"}


class Output:
    """Collects a process's stdout and stderr without blocking."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.text = ""

    def until(self, needle: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        streams = [s for s in (self.proc.stdout, self.proc.stderr) if s is not None]
        while needle not in self.text:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {needle!r} in the output: {self.text[-2000:]}")
            ready, _, _ = select.select(streams, [], [], 0.2)
            for s in ready:
                chunk = os.read(s.fileno(), 65536)
                self.text += chunk.decode(errors="replace")
            if not ready and self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode} before {needle!r}: {self.text[-2000:]}")
        return self.text


BURST = 10


@pytest.mark.slow
def test_kill_9_mid_way_loses_nothing_the_next_start_catches_up(home, model_id, tmp_path):
    from imgsearch import Library

    folder = shapes(tmp_path / "photos")
    cmd = _cmd(home, model_id, "watch", "--poll", "--interval", "0.1", "--debounce", "0.2", folder)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    out = Output(proc)
    try:
        out.until("Ctrl-C stops")
        for i in range(BURST // 2):
            draw(folder / f"burst_{i:02d}.jpg", "red", "circle", seed=i)
        out.until("added")
        for i in range(BURST // 2, BURST):  # the watcher is killed while this batch is due or being written
            draw(folder / f"burst_{i:02d}.jpg", "red", "circle", seed=i)
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # While nobody watches: one more photo, one deleted.
    late = draw(folder / "late.jpg", "blue", "square", seed=7)
    (folder / "green_circle_000.jpg").unlink()

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    out = Output(proc)
    try:
        text = out.until("Ctrl-C stops")
        assert "caught up:" in text and "removed 1" in text
        proc.send_signal(signal.SIGTERM)  # as Ctrl-C (SIGINT may be ignored in a background test run)
        text = out.until("stopped after")
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    on_disk = sorted(str(p) for p in folder.glob("*.jpg"))
    with Library(home=home, model=model_id, device="cpu", precision="fp32") as lib:
        assert lib.status().images == len(on_disk) == 12 - 1 + BURST + 1
        reds = [h.path for h in lib.search("a red circle", k=BURST)]
        assert sorted(reds) == sorted(str(folder / f"burst_{i:02d}.jpg") for i in range(BURST))
        assert top(lib, "a blue square") == [str(late)]


@pytest.mark.slow
def test_serve_watch_answers_with_new_files_without_a_restart(home, model_id, tmp_path):
    folder = shapes(tmp_path / "photos")
    cmd = _cmd(home, model_id, "serve", "--port", "0", "--watch", folder, "--poll")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    out = Output(proc)
    try:
        text = out.until("imgsearch serving")
        assert "caught up: new 12" in text
        wait_for(lambda: (home / "server.json").exists(), what="the server's discovery file")
        info = json.loads((home / "server.json").read_text())

        def search(q: str) -> list[str]:
            req = urllib.request.Request(f"http://127.0.0.1:{info['port']}/api/search?q={q.replace(' ', '+')}&k=1",
                                         headers={"Authorization": f"Bearer {info['token']}"})
            with urllib.request.urlopen(req, timeout=30) as r:
                return [h["path"] for h in json.loads(r.read())["hits"]]

        assert search("a red circle") != [str(folder / "new.jpg")]
        new = draw(folder / "new.jpg", "red", "circle")
        wait_for(lambda: search("a red circle") == [str(new)], what="the server to find the new file")
        out.until("added 1")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not (home / "server.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ui_status_follows_another_process_without_waiting_for_its_cache(settings, tmp_path, monkeypatch):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from imgsearch import Library
    from imgsearch.config import Settings
    from imgsearch.ui import app

    # The status cache never expires here, however slow the machine: only the change counter can refresh it.
    monkeypatch.setattr(app, "cached_status", st.cache_data(show_spinner=False, hash_funcs={Settings: repr})(
        app.cached_status.__wrapped__))
    folder = shapes(tmp_path / "photos")
    with Library(settings=settings) as lib:
        lib.index([folder])
    for var in ("IMGSEARCH_MODEL", "IMGSEARCH_DEVICE", "IMGSEARCH_PRECISION"):
        monkeypatch.setenv(var, {"IMGSEARCH_MODEL": settings.model, "IMGSEARCH_DEVICE": "cpu",
                                 "IMGSEARCH_PRECISION": "fp32"}[var])
    at = AppTest.from_file(str(ROOT / "ui" / "app.py"), default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    assert "**Images** 12" in "\n".join(m.value for m in at.sidebar.markdown)
    with Library(settings=settings) as lib:  # a watcher in another process forgets deleted photos
        assert lib.forget(sorted(folder.glob("green_*.jpg"))) == 3
    at.run()
    assert "**Images** 9" in "\n".join(m.value for m in at.sidebar.markdown)


def test_removing_one_of_two_hard_links_while_watched_keeps_the_row_at_the_other_as_index_does(lib, tmp_path):
    """a.jpg and b.jpg are one file (one row, at a.jpg). `rm a.jpg` while watched forgot the row, its caption
    and its id although the picture is still there as b.jpg; `index` moves the row to b.jpg."""
    folder = shapes(tmp_path / "photos")
    a = draw(folder / "a.jpg", "red", "circle")
    (folder / "sub").mkdir()
    b = folder / "sub" / "b.jpg"  # in another folder: hard links need not be neighbours
    os.link(a, b)
    report = lib._watch_catch_up([folder])
    assert (report.new, report.aliases) == (13, 1)
    assert lib.add_caption(a, "Grandma's red circle")
    before = lib.search("a red circle", k=1)[0]
    assert before.path == str(a)
    a.unlink()
    report = lib._watch_batch([], [str(a)])
    assert (report.moved, report.removed, report.encoded) == (1, 0, 0)
    hit = lib.search("a red circle", k=1)[0]
    assert (hit.path, hit.id) == (str(b), before.id) and lib.captions(b) == ["Grandma's red circle"]
    assert lib.status().images == 13


def test_a_touched_photo_is_re_stamped_but_counts_as_no_batch(lib, tmp_path):
    folder = shapes(tmp_path / "photos")
    run = Running(lib, [folder])
    try:
        photo = str(next(folder.glob("*.jpg")))
        before = lib.store.image_by_path(photo).mtime_ns
        os.utime(photo, ns=(before + 10**9, before + 10**9))  # new time, same bytes: nothing to show
        wait_for(lambda: lib.store.image_by_path(photo).mtime_ns == before + 10**9, what="the new time stored")
    finally:
        run.close()
    assert run.error is None and run.batches == []
    assert run.watcher.batches == 0  # "stopped after 0 batches", as no batch line was printed
