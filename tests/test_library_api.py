"""imgsearch.Library, used as a Python user would: index, search by text / image / bytes, filters, tags,
captions, duplicates, status, threads."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


def kind(path: str) -> str:
    return "_".join(os.path.basename(path).split("_")[:2])


@pytest.fixture()
def lib(home, model_id, photos):
    import imgsearch

    with imgsearch.Library(home, model_id, device="cpu", precision="fp32", batch_size=16) as lib:
        report = lib.index(photos)
        assert isinstance(report, imgsearch.IndexReport) and report.new == 54 and not report.failed
        yield lib


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_model):
    """One library over the 54 photos, indexed once for the tests that only read it."""
    import imgsearch
    from conftest import make_photos

    root = tmp_path_factory.mktemp("library-api")
    home, model_id, photos = root / "home", f"local-dir:{tiny_model}", make_photos(root / "photos")
    with imgsearch.Library(home, model_id, device="cpu", precision="fp32", batch_size=16, workers=2) as lib:
        report = lib.index(photos)
        assert isinstance(report, imgsearch.IndexReport) and report.new == 54 and not report.failed
        yield SimpleNamespace(lib=lib, home=home, model_id=model_id, photos=photos)


def test_text_search_ranks_red_circles_first(indexed):
    import imgsearch

    lib = indexed.lib

    hits = lib.search("a red circle", k=3)
    assert all(isinstance(h, imgsearch.Hit) for h in hits)
    assert [kind(h.path) for h in hits] == ["red_circle"] * 3
    assert [h.rank for h in hits] == [1, 2, 3] and hits[0].score >= hits[-1].score


def test_cold_library_answers_text_without_torch(indexed):
    """A fresh Library answers a plain text query through the lean path: torch is never imported."""
    home, model_id = indexed.home, indexed.model_id
    code = ("import sys, json, imgsearch\n"
            f"lib = imgsearch.Library({str(home)!r}, {model_id!r}, device='cpu', precision='fp32')\n"
            "hits = lib.search('a red circle', k=3)\n"
            "print(json.dumps({'kinds': [h.path for h in hits], 'type': type(hits[0]).__name__,\n"
            "  'heavy': sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip', 'faiss',"
            " 'sqlalchemy'))}))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSEARCH_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["heavy"] == [] and out["type"] == "Hit"
    assert [kind(p) for p in out["kinds"]] == ["red_circle"] * 3


def test_image_path_bytes_file_and_pil_rank_alike(indexed):
    from PIL import Image

    lib, photos = indexed.lib, indexed.photos

    example = sorted(photos.glob("green_triangle*"))[0]
    data = example.read_bytes()
    by_path = lib.search(image=example, k=10)
    by_str = lib.search(image=str(example), k=10)
    by_bytes = lib.search(image=data, k=10)
    upload = io.BytesIO(data)
    upload.name = "upload.jpg"
    by_file = lib.search(image=upload, k=10)
    with Image.open(example) as im:
        by_pil = lib.search(image=im.convert("RGB"), k=10)
    ids = [h.id for h in by_path]
    assert kind(by_path[0].path) == "green_triangle"
    assert [h.id for h in by_str] == ids and [h.id for h in by_bytes] == ids and [h.id for h in by_file] == ids
    # Pillow's JPEG draft mode is only used when the library opens the file itself: same top hits.
    assert [kind(h.path) for h in by_pil[:3]] == ["green_triangle"] * 3
    with pytest.raises(Exception, match="cannot use the uploaded file bad.jpg"):
        bad = io.BytesIO(b"not an image")
        bad.name = "bad.jpg"
        lib.search(image=bad)


def test_weights_negatives_and_more_like_this(indexed):
    lib = indexed.lib
    plain = lib.search("a red circle", k=54)
    steered = lib.search("a red circle", not_text="0.5:a red square", k=54)

    def rank_sum(hits, what):
        return sum(h.rank for h in hits if kind(h.path) == what)

    assert rank_sum(steered, "red_square") > rank_sum(plain, "red_square")
    assert kind(steered[0].path) == "red_circle"
    # Weights as "W:text" and as (W, text) pairs agree.
    a = lib.search(["3:a blue circle", "a purple square"], k=2)
    b = lib.search([(3, "a blue circle"), (1, "a purple square")], k=2)
    c = lib.search(["a blue circle", (3, "a purple square")], k=2)
    assert kind(a[0].path) == "blue_circle" and [h.id for h in a] == [h.id for h in b]
    assert kind(c[0].path) == "purple_square"
    like = lib.search(ids=[plain[0].id], exclude_ids=[plain[0].id], k=3)
    assert plain[0].id not in [h.id for h in like] and kind(like[0].path) == "red_circle"


def test_filters_and_errors_without_cli_flags(indexed, tmp_path):
    import imgsearch

    lib, photos = indexed.lib, indexed.photos

    hits = lib.search("a red circle", k=54, under=photos)
    assert len(hits) == 54
    threshold = hits[5].score  # a score as shown (rounded) is a valid bound: that hit stays
    above = lib.search("a red circle", k=54, min_score=threshold)
    assert len(above) == 6 and all(h.score >= threshold for h in above)
    with pytest.raises(imgsearch.ParamError) as e:
        lib.search("a red circle", under=tmp_path / "nope")
    assert str(e.value) == "under: no such folder"
    with pytest.raises(imgsearch.ParamError, match="^k: "):
        lib.search("a red circle", k=0)
    with pytest.raises(imgsearch.UsageError, match="nothing to search for"):
        lib.search()


def test_status_is_typed(indexed):
    import imgsearch

    lib = indexed.lib

    st = lib.status()
    assert isinstance(st, imgsearch.LibraryStatus)
    assert st.images == 54 and st.failures == 0 and st.models[0].vectors == 54
    d = st.as_dict()
    assert d["images"] == 54 and d["models"][0]["vectors"] == 54 and json.dumps(d)


def test_status_json_matches_the_cli(home, indexed):
    from conftest import Cli

    lib, cli = indexed.lib, Cli(indexed.home, indexed.model_id)
    st = json.loads(cli("status", "--json").stdout)
    mine = lib.status().as_dict()
    for key in ("home", "images", "failures", "failed_files", "disk_bytes", "read_only", "schema_version"):
        assert mine[key] == st[key]
    assert [m["vectors"] for m in mine["models"]] == [m["vectors"] for m in st["models"]]


def test_classify_tags_and_tag_filter(lib):
    report = lib.classify(["red", "green", "blue"], top=1)
    assert report.images == 54
    counts = dict(lib.tags())
    assert counts["red"] >= 9 and sum(counts.values()) == 54
    sets = lib.tag_sets()
    assert len(sets) == 1
    hits = lib.search("a circle", tag="red", k=54)
    assert hits and len(hits) == counts["red"]
    assert lib.drop_tag_set(sets[0]["id"]) and lib.tags() == []
    assert not lib.drop_tag_set(999)


def test_captions_and_keyword_search(lib, photos):
    target = sorted(photos.glob("blue_square*"))[0]
    assert lib.add_caption(target, "grandma's garden party")
    assert not lib.add_caption(target, "grandma's garden party")
    assert lib.captions(target) == ["grandma's garden party"]
    hits = lib.search(keyword="grandma garden")
    assert [h.path for h in hits] == [str(target.resolve())]


def test_duplicates_never_load_the_model(lib, home, model_id, photos):
    import shutil

    src = sorted(photos.glob("red_circle*"))[0]
    shutil.copy(src, photos / "copy_of_it.jpg")
    lib.index(photos)
    code = ("import sys, json, imgsearch\n"
            f"lib = imgsearch.Library({str(home)!r}, {model_id!r}, device='cpu', precision='fp32')\n"
            "r = lib.duplicates()\n"
            "print(json.dumps({'groups': [[m.path for m in g.members] for g in r.groups],\n"
            "  'heavy': sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'open_clip'))}))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSEARCH_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["heavy"] == []
    groups = [sorted(os.path.basename(p) for p in g) for g in out["groups"]]
    assert sorted(["copy_of_it.jpg", src.name]) in groups
    assert not [g for g in groups if "copy_of_it.jpg" in g and src.name not in g]


def test_image_rows_and_thumbnails(indexed):
    from PIL import Image

    from imgsearch.errors import ImgSearchError, UsageError

    lib = indexed.lib

    hit = lib.search("a red circle", k=1)[0]
    row = lib.image(str(hit.id))  # ids as typed in a URL work too
    assert row.path == hit.path and (row.width, row.height) == (96, 96)
    thumb = lib.thumbnail(hit.id, lib.THUMB)
    with Image.open(thumb) as im:
        assert im.format == "JPEG" and max(im.size) <= lib.THUMB
    many = lib.thumbnails([hit.id, 999999])
    assert many[hit.id].is_file() and isinstance(many[999999], ImgSearchError)
    with pytest.raises(UsageError, match="not an image id"):
        lib.image("12; DROP TABLE images")


def test_import_imgsearch_is_light():
    code = ("import sys, imgsearch\n"
            "assert imgsearch.Library.__name__ == 'Library' and imgsearch.Hit.__name__ == 'Hit'\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'torch', 'sqlalchemy', 'faiss',"
            " 'open_clip', 'PIL')))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_one_library_shared_by_threads(indexed):
    lib, photos = indexed.lib, indexed.photos
    lib.load()  # every query on the warm path, as in the server and the UI
    queries = [dict(text="a red circle"), dict(text="a blue square", not_text="a green square"),
               dict(image=sorted(photos.glob("green_triangle*"))[0]), dict(text="a purple circle", under=photos)]
    serial = [[h.as_dict() for h in lib.search(k=10, **q)] for q in queries]
    results: dict[tuple[int, int], list] = {}
    errors = []

    def worker(n: int) -> None:
        try:
            for rep in range(3):
                for j, q in enumerate(queries):
                    results[(n, rep * 10 + j)] = [h.as_dict() for h in lib.search(k=10, **q)]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert len(results) == 4 * 3 * len(queries)
    for (n, key), hits in results.items():
        want = serial[key % 10]
        assert [h["id"] for h in hits] == [h["id"] for h in want]
        assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in want], abs=1e-5)


def test_wheel_ships_the_ui_page(tmp_path):
    """A built wheel holds imgsearch/ui/app.py and `imgsearch ui` finds it from the installed copy."""
    import shutil
    import zipfile

    src = tmp_path / "src"  # a copy: an in-tree build would leave build/ and egg-info in the checkout
    shutil.copytree(ROOT / "imgsearch", src / "imgsearch", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path / "whl"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(out.glob("imgsearch-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        assert "imgsearch/ui/app.py" in z.namelist()
        z.extractall(site)
    code = ("from imgsearch.commands.ui import app_file; import imgsearch; p = app_file(); "
            "print(p); print(imgsearch.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    page, package = proc.stdout.split()
    assert Path(package).is_relative_to(site) and Path(page) == site / "imgsearch" / "ui" / "app.py"
    assert "def main()" in Path(page).read_text()


def test_paths_are_one_path_in_any_form_and_an_empty_one_is_refused(indexed, tmp_path, monkeypatch):
    """A str, Path or bytes path is that one path to every method that takes paths (bytes were read as a list of
    numbers, and a str given to watcher as one-letter folders); an empty path (an unset variable) is refused, not
    read as the current folder; a value that is no path is a TypeError naming the method."""
    import shutil

    import imgsearch

    lib, photos = indexed.lib, indexed.photos
    assert lib.index(os.fsencode(photos)).unchanged == 54
    with imgsearch.Library(os.fsencode(indexed.home), indexed.model_id) as by_bytes:
        assert by_bytes.status().images == 54
    for given in (str(photos), photos, os.fsencode(photos), [photos]):
        assert lib.watcher(given).roots == [str(photos.resolve())]
    one = os.fsencode(sorted(photos.glob("*.jpg"))[0])  # methods of one path (they failed in files.abspath)
    assert lib.add_caption(one, "a bytes path") and lib.captions(one) == ["a bytes path"]
    assert lib.indexed_folder_of(one) == str(photos.resolve())
    shutil.copy(sorted(photos.glob("*.jpg"))[0], tmp_path / "in-the-current-folder.jpg")
    monkeypatch.chdir(tmp_path)
    for verb, call in (("index", lambda: lib.index("")), ("watch", lambda: lib.watcher("")),
                       ("forget", lambda: lib.forget([photos, ""]))):
        with pytest.raises(imgsearch.UsageError, match=f"^an empty path was given to {verb} "):
            call()
    with pytest.raises(imgsearch.UsageError, match="^give at least one file or folder to pin$"):
        lib.pin("no album needed to say so", [])
    with pytest.raises(TypeError, match="^index: give a path or a list of paths, not NoneType$"):
        lib.index(None)
    assert lib.status().images == 54 and len(lib.search("a red circle", k=54)) == 54


def test_classify_checks_templates_top_and_min_prob_as_the_cli_does(indexed):
    """One template given as a string is that template (it was split into one-letter templates); a template
    without {} (every label the same prompt) and a top or min_prob that is no number are refused in one line
    before anything is written."""
    import imgsearch

    lib, photos = indexed.lib, indexed.photos
    red = sorted(photos.glob("red_circle*"))[0]
    one = lib.classify_files(red, ["red", "green", "blue"], templates="a {} shape")[0].labels
    assert one == lib.classify_files(red, ["red", "green", "blue"], templates=["a {} shape"])[0].labels
    assert one[0][0] == "red"
    for bad in ("no placeholder", ["a {} shape", "a photo"]):
        with pytest.raises(imgsearch.UsageError, match="^templates: template 'no placeholder|a photo' must contain"):
            lib.classify(["red", "green"], templates=bad)
    with pytest.raises(imgsearch.ParamError, match="^top: "):
        lib.classify(["red", "green"], top="2")
    with pytest.raises(imgsearch.ParamError, match="^min_prob: "):
        lib.classify_files(photos, ["red", "green"], min_prob="0.5")
    assert lib.tag_sets() == []


@pytest.mark.parametrize("stop_at", [0, 20])
def test_a_progress_callback_that_raises_stops_the_run_as_an_interruption(lib, photos, stop_at):
    """The host's exception (a cancel button, Ctrl-C) comes through as raised, the run is recorded as
    interrupted at whichever call it came (the first call's left it 'running' for good), the write lock is free
    and the next run finishes the work."""
    from imgsearch import lock, synthetic

    more = photos.parent / "more"
    synthetic.generate(more, per_class=2, size=64, fmt="png", seed=3, captions_file=None)
    calls = []

    def cancel(done, total):
        calls.append(done)
        if done == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lib.index(more, progress=cancel)
    assert calls[-1] == stop_at and not lock.is_held(lib.settings.home)
    assert lib.status().last_run["state"] == "interrupted"
    report = lib.index(more)
    assert report.new + report.unchanged == 36 and lib.status().last_run["state"] == "finished"
    assert lib.status().images == 54 + 36


def test_numeric_settings_are_checked_when_the_library_opens(home, model_id, monkeypatch):
    """A batch size, worker count or size cap that is no whole number (or under its least value) is refused in
    one line when the Library is made: batch_size="8" was a TypeError deep inside the first index run, and
    max_pixels=-1 (or IMGSEARCH_MAX_PIXELS=0) recorded every image as failed ("over the -0 MP cap")."""
    import imgsearch

    for bad in (dict(batch_size="8"), dict(batch_size=0), dict(workers=-1), dict(max_pixels=-1),
                dict(max_file_mb=0), dict(workers=True)):
        (name, value), = bad.items()
        with pytest.raises(imgsearch.UsageError, match=f"^{name} must be a whole number from [01], not {value!r} "):
            imgsearch.Library(home, model_id, **bad)
    monkeypatch.setenv("IMGSEARCH_MAX_PIXELS", "0")
    with pytest.raises(imgsearch.UsageError, match=r"\(IMGSEARCH_MAX_PIXELS or max_pixels=\)$"):
        imgsearch.Library(home, model_id)
    assert not home.exists()


def test_writes_to_a_home_without_a_library_leave_no_folder_behind(indexed, tmp_path, model_id):
    """A caption, a dropped tag set or a captions import for a home that holds no library (a typo) says so in
    one line and creates nothing there (the write lock's file and its folder were made first)."""
    import imgsearch

    typo = tmp_path / "no-such-home"
    lib = imgsearch.Library(typo, model_id)
    for call in (lambda: lib.add_caption(sorted(indexed.photos.glob("*.jpg"))[0], "our dog"),
                 lambda: lib.drop_tag_set(1), lambda: lib.import_captions(tmp_path / "captions.csv")):
        with pytest.raises(imgsearch.LibraryError, match=f"^no library at {typo}; "):
            call()
    assert not typo.exists()


def test_ids_and_marks_take_any_iterable_of_ids(indexed):
    """ids, exclude_ids, like and unlike take a set, a range, a generator or a numpy array of ids as they take a
    list (a set of the ids already shown was refused as "'{3, 7}' is not an image id"), and numpy integers."""
    import numpy as np

    lib = indexed.lib
    shown = lib.search("a red circle", k=3)
    seen = {h.id for h in shown}
    rest = lib.search("a red circle", k=3, exclude_ids=seen)
    assert seen.isdisjoint(h.id for h in rest) and [h.id for h in rest] == [
        h.id for h in lib.search("a red circle", k=6)][3:]
    assert [h.id for h in lib.search(ids=np.array(sorted(seen)), k=3)] == [
        h.id for h in lib.search(ids=sorted(seen), k=3)]
    assert [h.id for h in lib.search("a red circle", like=(i for i in seen), unlike=[np.int64(rest[0].id)])] == [
        h.id for h in lib.search("a red circle", like=sorted(seen), unlike=[rest[0].id])]


def test_objects_of_the_wrong_kind_get_a_type_error_saying_what_to_give(indexed, home):
    """run() and save_album(request=) given the server's JSON body (a dict) say how to make a SearchRequest of it
    (they failed on an internal attribute); Library(settings=) refuses a dict, and settings= with a device or a
    precision besides, which it ignored."""
    import imgsearch
    from imgsearch.request import SearchRequest

    lib = indexed.lib
    body = {"texts": ["a red circle"], "k": 3}
    with pytest.raises(TypeError, match=r"^run\(\) takes a SearchRequest \(.*from_json\(body\).*\), not dict$"):
        lib.run(body)
    with pytest.raises(TypeError, match=r"^save_album\(request=\) takes a SearchRequest "):
        lib.save_album("reds", request=body)
    assert lib.albums() == []
    assert [h.id for h in lib.run(SearchRequest.from_json(body))] == [h.id for h in lib.search("a red circle", k=3)]
    with pytest.raises(TypeError, match="^give settings= or the individual settings, not both$"):
        imgsearch.Library(settings=lib.settings, device="cpu")
    with pytest.raises(TypeError, match=r"^settings= takes an imgsearch\.config\.Settings, not dict$"):
        imgsearch.Library(settings={"home": str(home)})


def test_a_closed_library_refuses_every_use(indexed):
    """After close() (or its with block) nothing loads a model again (classify_files did, a model load of
    seconds for a real one); a second with block refuses use as the first close promised."""
    import imgsearch

    photo = sorted(indexed.photos.glob("red_circle*"))[0]
    with imgsearch.Library(indexed.home, indexed.model_id, device="cpu", precision="fp32") as lib:
        assert lib.search("a red circle", k=1)
    for call in (lambda: lib.classify_files(photo, ["red", "blue"]), lambda: lib.score(photo, ["red"]),
                 lambda: lib.search("a red circle"), lambda: lib.encoder):
        with pytest.raises(imgsearch.UsageError, match="^this Library was closed; open a new one$"):
            with lib:
                call()


def test_values_of_the_wrong_type_are_refused_at_the_door_naming_the_argument(indexed, home, model_id, tmp_path):
    """A value of the wrong type to a public method gets one line naming the argument, before any work (each
    was an AttributeError or TypeError from inside: score took a photo's bytes for a path and quoted the whole
    file as "image not found: b'\\xff\\xd8...'"), and nothing is written; score takes an image as search does."""
    import imgsearch

    lib = indexed.lib
    red = sorted(indexed.photos.glob("red_circle*"))[0]
    texts = ["a red circle", "a blue square"]
    by_path = [s.cosine for s in lib.score(red, texts)]
    assert [s.cosine for s in lib.score(red.read_bytes(), texts)] == pytest.approx(by_path, abs=1e-5)
    assert by_path[0] > by_path[1]
    with pytest.raises(imgsearch.UsageError) as bad:
        lib.score(b"\x00" * 100_000, texts)
    assert len(str(bad.value)) < 200 and "\n" not in str(bad.value)
    refused = [
        (imgsearch.ParamError, "^texts: must be text$", lambda: lib.score(red, [5])),
        (imgsearch.UsageError, "^give at least one non-empty text", lambda: lib.score(red, None)),
        (imgsearch.ParamError, "^image: give a file path", lambda: lib.score(object(), texts)),
        (imgsearch.ParamError, "^text: a caption is text", lambda: lib.add_caption(red, 5)),
        (imgsearch.ParamError, "^model: give the name, label or id", lambda: lib.export(tmp_path / "out", model=1.5)),
        (imgsearch.UsageError, r"^lang must be text, not 5 \(lang=\)$", lambda: imgsearch.Library(home, lang=5)),
        (imgsearch.UsageError, "^device must be text", lambda: imgsearch.Library(home, device=5)),
        (imgsearch.ParamError, "^min_match: give a pixel likeness", lambda: lib.duplicates(min_match="x")),
        (imgsearch.ParamError, "^threshold: give a cosine", lambda: lib.duplicates(threshold=[0.9])),
        (imgsearch.ParamError, '^ray: give "local"', lambda: lib.index(indexed.photos, ray=True)),
        (imgsearch.ParamError, "^labels: give a comma-separated", lambda: lib.classify(5)),
        (imgsearch.UsageError, "^templates: give templates as text", lambda: lib.classify("red,blue", templates=5)),
        (imgsearch.ParamError, "^set_id: give a tag set id", lambda: lib.drop_tag_set(object())),
        (imgsearch.ParamError, "^set_id: give a tag set id", lambda: lib.drop_tag_set(2 ** 70)),
    ]
    for error, message, call in refused:
        with pytest.raises(error, match=message):
            call()
    assert lib.captions(red) == [] and lib.tag_sets() == [] and not (tmp_path / "out").exists()
    assert not home.exists() and lib.status().images == 54
    # One id, or any iterable of them, as search's ids: "12" was read as the ids 1 and 2.
    one = lib.search("a red circle", k=1)[0].id
    assert set(lib.thumbnails(str(one))) == set(lib.thumbnails(one)) == {one}
    # A model named by its id, as the CLI's --model 1 names it.
    report = lib.export(tmp_path / "by-id", model=lib.model.id)
    assert report.rows == 54


def test_wait_false_tells_a_python_caller_how_to_wait(indexed):
    """forget(wait=False) while another writer holds the lock fails at once in one line that says how to wait
    in Python as well as on the command line (it said only "leave out --no-wait"), and removes nothing."""
    import imgsearch
    from imgsearch.lock import write_lock

    held, done = threading.Event(), threading.Event()

    def other_writer():
        with write_lock(indexed.home):
            held.set()
            done.wait()

    writer = threading.Thread(target=other_writer)
    writer.start()
    try:
        assert held.wait(60)
        with pytest.raises(imgsearch.LibraryError, match=r"^another imgsearch run \(pid \d+\) is writing to this "
                                                         r"library; .*wait=True in Python"):
            indexed.lib.forget(indexed.photos, wait=False)
    finally:
        done.set()
        writer.join()
    assert indexed.lib.status().images == 54
