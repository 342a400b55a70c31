"""A hostile or unlucky library: moved folders, symlinks and hard links, a home inside the photos,
names that are not UTF-8, huge files. Nothing the user attached to an image may be lost."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from imgsearch import synthetic

COLOURS = list(synthetic.COLORS)


def ok_json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_no_self_pairs(cli):
    """No duplicates group holds one physical file twice (its 'copy' would be the file itself)."""
    for g in ok_json(cli("duplicates", "--json"))["groups"]:
        ids = [(os.stat(m["path"]).st_dev, os.stat(m["path"]).st_ino) for m in g["images"]]
        assert len(set(ids)) == len(ids), g


def index_json(cli, *paths):
    return ok_json(cli("index", *paths, "--json"))


# --- issue 12 point 2: a moved library folder keeps captions, tags and ids ----------------------------
def test_moved_folder_keeps_ids_captions_and_tags_across_runs(cli, photos, tmp_path):
    assert index_json(cli, photos)["new"] == 54
    tagged = ok_json(cli("classify", "--labels", ",".join(COLOURS), "--json"))
    label = tagged["results"][0]["labels"][0]["label"]
    target = photos / "red_circle_001.jpg"
    assert cli("caption", target, "grandma's zeppelin birthday").exit_code == 0
    before = {h["path"]: h["id"] for h in ok_json(cli("query", "a shape", "-k", "54", "--json"))}
    red_before = {h["id"] for h in ok_json(cli("query", "a shape", "--tag", label, "-k", "54", "--json"))}
    assert red_before

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved_to = elsewhere / "photos"
    shutil.move(photos, moved_to)
    rep = index_json(cli, moved_to)  # a run over the new path only: the old rows are outside it
    assert (rep["moved"], rep["new"], rep["encoded"], rep["reused"]) == (54, 0, 0, 0)

    after = {h["path"]: h["id"] for h in ok_json(cli("query", "a shape", "-k", "54", "--json"))}
    assert after == {str(moved_to / Path(p).name): i for p, i in before.items()}  # same rows, new paths
    hits = ok_json(cli("query", "--keyword", "zeppelin", "--json"))
    assert [(h["path"], h["id"]) for h in hits] == [(str(moved_to / target.name), before[str(target)])]
    assert cli("caption", moved_to / target.name).stdout.splitlines() == ["grandma's zeppelin birthday"]
    red_after = ok_json(cli("query", "a shape", "--tag", label, "-k", "54", "--json"))
    assert {h["id"] for h in red_after} == red_before
    assert all(h["path"].startswith(str(moved_to)) for h in red_after)

    st = ok_json(cli("status", "--json"))
    assert st["images"] == 54 and st["models"][0]["vectors"] == 54
    # No row is left at the old place: forgetting it removes nothing.
    assert "nothing in the library" in cli("forget", photos).stderr
    assert index_json(cli, moved_to)["unchanged"] == 54


def test_move_and_copy_in_one_run_keep_the_original_row(cli, photos, tmp_path):
    index_json(cli, photos)
    target = photos / "blue_square_000.jpg"
    cli("caption", target, "xylophone day")
    row_id = ok_json(cli("query", "--keyword", "xylophone", "--json"))[0]["id"]
    other = tmp_path / "other"
    other.mkdir()
    shutil.move(target, other / "b.jpg")
    shutil.copy(other / "b.jpg", other / "c.jpg")
    rep = index_json(cli, other)
    assert (rep["moved"], rep["new"], rep["reused"], rep["encoded"]) == (1, 1, 1, 0)
    hits = ok_json(cli("query", "--keyword", "xylophone", "--json"))
    assert [(h["path"], h["id"]) for h in hits] == [(str(other / "b.jpg"), row_id)]


# --- point 3: one physical file is one row; duplicates never pairs a file with itself -------------------
def test_symlinked_library_is_indexed_once(cli, photos, tmp_path):
    link = tmp_path / "link-to-lib"
    os.symlink(photos, link)
    assert index_json(cli, photos)["new"] == 54
    rep = index_json(cli, link)
    assert (rep["new"], rep["unchanged"], rep["reused"]) == (0, 54, 0)
    rep = index_json(cli, photos, link)  # both in one run
    assert (rep["new"], rep["unchanged"]) == (0, 54)
    assert ok_json(cli("status", "--json"))["images"] == 54
    # The library stores real paths; --under through the symlink finds the same images.
    hits = ok_json(cli("query", "a red circle", "--under", link, "-k", "3", "--json"))
    assert len(hits) == 3 and all(h["path"].startswith(str(photos) + os.sep) for h in hits)
    assert_no_self_pairs(cli)


def test_hard_links_and_symlinked_files_are_aliases_not_copies(cli, photos, tmp_path):
    os.link(photos / "red_circle_000.jpg", photos / "zz hard link.jpg")
    os.symlink(photos / "green_square_000.jpg", photos / "zz soft link.jpg")
    rep = index_json(cli, photos)
    assert (rep["new"], rep["aliases"]) == (54, 2)
    # A hard link in another folder, indexed in a later run, is still the same file: no second row.
    other = tmp_path / "other"
    other.mkdir()
    os.link(photos / "blue_circle_000.jpg", other / "b.jpg")
    rep = index_json(cli, other)
    assert (rep["new"], rep["aliases"]) == (0, 1)
    assert ok_json(cli("status", "--json"))["images"] == 54
    assert_no_self_pairs(cli)
    assert (photos / "red_circle_000.jpg").exists()


def test_duplicates_never_offers_one_file_as_its_own_copy(cli, photos, tmp_path, settings):
    """A library written before aliases were recognised holds a file twice, under a symlinked name."""
    from imgsearch.store import Store

    index_json(cli, photos)
    link = tmp_path / "link-to-lib"
    os.symlink(photos, link)
    store = Store(settings.db_path)
    try:
        row = store.image_by_path(str(photos / "red_circle_000.jpg"))
        (model,) = store.models()
        _, vecs = store.load_vectors(model.id, [row.id])
        alias = str(link / "red_circle_000.jpg")
        store.write_batch(model.id, new=[{"path": alias, "size": row.size, "mtime_ns": row.mtime_ns,
                                          "hash": row.hash, "width": row.width, "height": row.height}],
                          vectors=[(alias, vecs[0])])
    finally:
        store.close()
    # A real copy is still found, so the check is alive.
    shutil.copy(photos / "blue_square_000.jpg", tmp_path / "copy.jpg")
    index_json(cli, tmp_path / "copy.jpg")
    groups = ok_json(cli("duplicates", "--json"))["groups"]
    assert ["blue_square_000.jpg", "copy.jpg"] in [sorted(Path(m["path"]).name for m in g["images"]) for g in groups]
    assert not [g for g in groups if any(Path(m["path"]).name == "red_circle_000.jpg" for m in g["images"])]


# --- point 7: a library home inside an indexed folder is not indexed -----------------------------------
def test_library_homes_inside_the_photos_are_skipped(photos, model_id, tmp_path):
    from conftest import Cli

    from imgsearch.store import Store

    home = photos / "imgsearch home"
    cli = Cli(home, model_id)
    assert index_json(cli, photos)["new"] == 54
    assert (home / ".imgsearch-home").exists()
    # Thumbnails and caches in the home are images; they are not photos.
    (home / "thumbs").mkdir(exist_ok=True)
    synthetic.draw_shape("red", "circle", 64, random.Random(3)).save(home / "thumbs" / "t1.jpg")
    # Another library's home (database + marker) is skipped too ...
    other = photos / "old library"
    Store(other / "library.db").close()
    (other / "thumbs").mkdir()
    synthetic.draw_shape("blue", "square", 64, random.Random(4)).save(other / "thumbs" / "t2.jpg")
    # ... but a folder that merely holds a file called library.db is not a home.
    notes = photos / "notes"
    notes.mkdir()
    (notes / "library.db").write_text("my own database")
    synthetic.draw_shape("green", "circle", 64, random.Random(5)).save(notes / "g.jpg")
    rep = index_json(cli, photos)
    assert (rep["new"], rep["unchanged"], rep["failed"]) == (1, 54, 0)
    paths = [h["path"] for h in ok_json(cli("query", "a shape", "-k", "100", "--json"))]
    assert str(notes / "g.jpg") in paths and not [p for p in paths if "thumbs" in p]


# --- point 10: file names that are not UTF-8 ---------------------------------------------------------
@pytest.mark.skipif(sys.platform in ("darwin", "win32"), reason="needs a file system that takes any bytes")
def test_non_utf8_file_name_is_indexed_and_reopened(cli, tmp_path, settings):
    folder = tmp_path / "mixed"
    synthetic.generate(folder, per_class=1, colors=["red", "green", "blue", "yellow", "purple"], size=48,
                       captions_file=None)
    good = sorted(folder.iterdir())
    assert len(good) == 15
    bad = os.path.join(os.fsencode(folder), b"caf\xe9 \xff.png")  # Latin-1 name: not UTF-8
    synthetic.draw_shape("blue", "triangle", 48, random.Random(9)).save(os.fsdecode(bad))
    rep = index_json(cli, folder)
    assert (rep["new"], rep["failed"]) == (16, 0)
    assert index_json(cli, folder)["unchanged"] == 16

    hits = ok_json(cli("query", "a shape", "-k", "16", "--json"))
    bad_hits = [h["path"] for h in hits if "caf" in h["path"]]
    assert len(bad_hits) == 1 and os.fsencode(bad_hits[0]) == bad  # lossless, reopens the file
    with open(bad_hits[0], "rb") as f:
        assert f.read(4) == b"\x89PNG"
    # The text outputs show it escaped instead of crashing.
    r = cli("query", "a shape", "-k", "16")
    assert r.exit_code == 0 and "caf\\xe9 \\xff.png" in r.stdout
    from imgsearch import Library

    with Library(settings=settings) as lib:
        found = {h.path for h in lib.search("a shape", k=16)}
    assert os.fsdecode(bad) in found

    # It moves like any other file, and a broken copy of it fails with its name escaped.
    moved = os.path.join(os.fsencode(folder), b"sub \xfe")
    os.mkdir(moved)
    os.rename(bad, os.path.join(moved, b"x\xff.png"))
    rep = index_json(cli, folder)
    assert (rep["moved"], rep["new"], rep["removed"]) == (1, 0, 0)
    with open(os.path.join(moved, b"y\xff.jpg"), "wb") as f:
        f.write(b"not a picture")
    r = cli("index", folder)
    assert r.exit_code == 0 and "failed 1" in r.stdout and "y\\xff.jpg" in r.stdout
    st = cli("status", "--failures")
    assert st.exit_code == 0 and "y\\xff.jpg" in st.stdout


# --- point 14: bounded memory, a size cap, failures not retried every run ------------------------------
def _index_peak_rss(home: Path, model_id: str, folder: Path, **env) -> tuple[dict, int]:
    """Run `imgsearch index --json` in a child process: (report, the child's peak RSS in bytes)."""
    code = ("import json, resource, subprocess, sys\n"
            "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "print(json.dumps({'rc': p.returncode, 'out': p.stdout, 'err': p.stderr[-2000:],\n"
            "                  'rss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n")
    cmd = [sys.executable, "-c", code, sys.executable, "-m", "imgsearch", "--home", str(home), "--model", model_id,
           "--device", "cpu", "--precision", "fp32", "--workers", "2", "index", str(folder), "--json", "-q"]
    full_env = {**os.environ, **env}
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, env=full_env, check=True).stdout)
    assert out["rc"] == 0, out["err"]
    return json.loads(out["out"]), out["rss_kb"] * 1024


@pytest.mark.skipif(sys.platform != "linux", reason="sparse files and ru_maxrss in KB")
@pytest.mark.slow
def test_huge_files_are_capped_streamed_and_not_retried(home, model_id, tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    synthetic.draw_shape("red", "circle", 64, random.Random(1)).save(folder / "ok.jpg")
    # The same run over the small image alone: what torch and the model cost (~1 GB on some builds).
    small = tmp_path / "small"
    small.mkdir()
    shutil.copy(folder / "ok.jpg", small / "ok.jpg")
    _, base = _index_peak_rss(tmp_path / "home2", model_id, small)
    limit = base + (300 << 20)  # reading the two files whole took 6 GB more
    for name in ("huge1.jpg", "huge2.jpg"):
        with open(folder / name, "wb") as f:
            f.truncate(3 << 30)  # 3 GB, sparse: no disk used
    rep, rss = _index_peak_rss(home, model_id, folder)
    reasons = {Path(f["path"]).name: f["reason"] for f in rep["failures"]}
    assert rep["new"] == 1 and set(reasons) == {"huge1.jpg", "huge2.jpg"}
    assert reasons["huge1.jpg"] == ("file is 3.0 GB, over the 256 MB cap; raise IMGSEARCH_MAX_FILE_MB "
                                    "if it is a genuine image")
    assert rss < limit, f"peak RSS {rss / 2**20:.0f} MB, {base / 2**20:.0f} MB without the big files"

    # Unchanged failures are not retried, and stay listed.
    rep, _ = _index_peak_rss(home, model_id, folder)
    assert (rep["failed_before"], rep["failed"], rep["unchanged"]) == (2, 0, 1)
    st = subprocess.run([sys.executable, "-m", "imgsearch", "--home", str(home), "status", "--failures"],
                        capture_output=True, text=True, check=True).stdout
    assert "huge1.jpg" in st and "huge2.jpg" in st

    # Changed files under a raised cap are retried; reading them is streamed (the old reader held both whole).
    for name in ("huge1.jpg", "huge2.jpg"):
        with open(folder / name, "r+b") as f:
            f.truncate(200 << 20)
    rep, rss = _index_peak_rss(home, model_id, folder, IMGSEARCH_MAX_FILE_MB="300")
    reasons = {Path(f["path"]).name: f["reason"] for f in rep["failures"]}
    assert set(reasons) == {"huge1.jpg", "huge2.jpg"} and "not an image" in reasons["huge1.jpg"]
    assert rss < limit, f"peak RSS {rss / 2**20:.0f} MB, {base / 2**20:.0f} MB without the big files"


@pytest.mark.slow
def test_a_first_index_that_fails_leaves_no_new_home_behind(tmp_path, model_id):
    """A first `index` with a bad --model made the home folder for its write lock and left it holding only
    write.lock (a stray folder at the path typed): the folder it made goes again; a folder the user made stays,
    and a later run with a good model works."""
    import imgsearch

    photos = tmp_path / "pics"
    synthetic.generate(photos, per_class=1, colors=["red", "blue"], shapes=("circle",), size=64, captions_file=None)
    home = tmp_path / "new-home"
    bad = imgsearch.Library(home, f"local-dir:{tmp_path / 'no-such-model'}", device="cpu")
    with pytest.raises(imgsearch.ModelLoadError, match="does not exist"):
        bad.index(photos)
    assert not home.exists()
    home.mkdir()  # the user's own empty folder
    with pytest.raises(imgsearch.ModelLoadError, match="does not exist"):
        bad.index(photos)
    assert home.is_dir()
    with imgsearch.Library(home, model_id, device="cpu", precision="fp32") as lib:
        assert lib.index(photos).new == 2 and lib.status().images == 2


def test_a_run_waiting_for_a_home_its_maker_removes_locks_the_home_anew(tmp_path, monkeypatch):
    """The waiter held the lock file of the home a failed first run removed: it makes the home again and locks
    the new lock file, so a third run cannot write beside it."""
    import threading

    from imgsearch import lock

    home, waiting, inside = tmp_path / "new-home", threading.Event(), []

    class Stderr:
        def write(self, text):
            if "waiting" in text:
                waiting.set()

        def flush(self):
            pass

    def second_run():
        with lock.write_lock(home):
            inside.append((home / lock.LOCK_NAME).is_file() and lock.is_held(home))

    monkeypatch.setattr(sys, "stderr", Stderr())
    with lock.write_lock(home):
        waiter = threading.Thread(target=second_run)
        waiter.start()
        assert waiting.wait(60)
    waiter.join(60)
    assert inside == [True] and not lock.is_held(home)
