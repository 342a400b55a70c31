"""Smart albums: `imgsearch album ...`, Library's album methods and the server's /api/albums.

An album is a saved search that stays current: these tests check what a user sees (which photos, in which
order, when the album last changed, the one-line refusals) across restarts, moves, exports and models.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import pytest

import imgsearch.synthetic as synthetic


def open_lib(home, model):
    import imgsearch

    return imgsearch.Library(home, model, device="cpu", precision="fp32", batch_size=16)


def kind(path: str) -> str:
    return "_".join(Path(path).stem.split("_")[:2])


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_model):
    """54 shapes indexed once for this module; each test gets a copy of the home (the files stay shared),
    and the cosine half-way between the 3rd and 4th hit of "a red circle" (3 red circles above it)."""
    base = tmp_path_factory.mktemp("albums")
    synthetic.generate(base / "photos", per_class=3, size=96, fmt="jpg", seed=1, captions_file=None)
    with open_lib(base / "home", f"local-dir:{tiny_model}") as lib:
        assert lib.index(base / "photos").new == 54
        hits = lib.search("a red circle", k=4)
    assert [kind(h.path) for h in hits[:3]] == ["red_circle"] * 3 and kind(hits[3].path) != "red_circle"
    return base / "home", base / "photos", round((hits[2].score + hits[3].score) / 2, 4)


@pytest.fixture()
def photos(indexed):
    return indexed[1]


@pytest.fixture()
def cut(indexed) -> float:
    return indexed[2]


@pytest.fixture()
def lib(home, model_id, indexed):
    shutil.copytree(indexed[0], home)
    with open_lib(home, model_id) as library:
        yield library


def paths(album) -> list[str]:
    return [h.path for h in album.hits]


def fails(result, *needles: str, code: int = 2) -> str:
    """A refusal: the exit code and ONE line on stderr naming what was wrong."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


# --- the command line ---------------------------------------------------------------------------------------
def test_save_show_list_answer_as_the_query_does(lib, cli, cut):
    saved = cli("album", "save", "reds", "a red circle", "--min-score", cut)
    assert saved.exit_code == 0, saved.output
    assert saved.stdout.strip() == "saved album reds: 3 photos; new photos that pass join it"
    top = cli("album", "save", "Blue Top", "a blue square", "-k", "2", "--not", "circle")
    assert "saved album Blue Top: 2 photos; the top 2 now" in top.stdout

    # Members ranked exactly as `query` ranks the same search: one engine.
    for name, args in (("reds", ["a red circle", "--min-score", cut]),
                       ("blue top", ["a blue square", "-k", "2", "--not", "circle"])):
        shown = cli("album", "show", name, "--json")
        queried = cli("query", *args, "--json", "--no-server")
        assert shown.exit_code == 0 and json.loads(shown.stdout) == json.loads(queried.stdout)
    reds = cli("album", "show", "reds", "--paths").stdout.split()
    assert [kind(p) for p in reds] == ["red_circle"] * 3
    raw = cli("album", "show", "reds", "--print0").stdout_bytes
    assert raw.split(b"\0")[:-1] == [os.fsencode(p) for p in reds]
    table = cli("album", "show", "reds").stdout.splitlines()
    assert table[0].startswith("album reds: 3 photos, last change ")
    assert "search: 'a red circle' --min-score" in table[0]

    listed = cli("album", "list").stdout.splitlines()
    assert listed[0].split() == ["album", "photos", "changed", "search"]
    assert listed[1].split()[:2] == ["Blue", "Top"] and listed[1].split()[2] == "2"
    assert listed[1].endswith("'a blue square' --not circle -k 2")
    assert listed[2].split()[:2] == ["reds", "3"]
    as_json = {a["name"]: a for a in json.loads(cli("album", "list", "--json").stdout)}
    assert as_json["reds"]["request"] == {"texts": [{"text": "a red circle", "weight": 1.0}], "min_score": cut,
                                          "k": 10000}
    assert as_json["reds"]["grows"] and not as_json["Blue Top"]["grows"]


def test_new_photos_join_threshold_albums_and_the_top_k_is_the_top_now(lib, tmp_path, cut):
    lib.save_album("reds", "a red circle", min_score=cut)
    lib.save_album("best red", "a red circle", k=1)
    green = [h.score for h in lib.search("a green triangle", k=4)]
    lib.save_album("greens", "a green triangle", min_score=(green[2] + green[3]) / 2)
    lib.save_album("relevant", "a red circle", relevance=True)  # the calibrated floor as the threshold
    lib.save_album("named circles", keyword="circle")  # keywords alone: every match, and new ones join
    before = {a.name: a for a in lib.albums()}
    assert before["named circles"].count == 18 and before["greens"].count == 3

    new = tmp_path / "new"
    new.mkdir()
    # A fixed draw: a large circle on a dark ground (an unseeded one was now and then too small for the floor)
    synthetic.draw_shape("red", "circle", 96, random.Random(177)).save(new / "circle_fresh.jpg", quality=95)
    assert lib.index(new).new == 1
    looked = time.time()
    after = {a.name: a for a in lib.albums()}

    assert str(new / "circle_fresh.jpg") in paths(lib.album("reds")) and after["reds"].count == 4
    relevant = lib.album("relevant")
    assert {kind(p) for p in paths(relevant)} == {"red_circle", "circle_fresh"}
    assert after["named circles"].count == 19
    # Dated when the photo arrived (the index run evaluated the albums), not when someone looked.
    assert before["reds"].changed_at < after["reds"].changed_at < looked
    assert after["greens"].changed_at == before["greens"].changed_at and after["greens"].count == 3
    best = lib.album("best red")
    assert len(best.hits) == 1 and best.hits[0].path == lib.search("a red circle", k=1)[0].path

    lib.forget(new)
    gone = {a.name: a for a in lib.albums()}
    assert gone["reds"].count == 3 and gone["named circles"].count == 18


def test_relevant_albums_judge_marked_images_as_the_query_does(lib):
    """Images marked good count as image terms for the relevance floor in an album as in a query: likes alone
    take the image floor (the album refused them), text with likes has no floor (the album cut on the text one)."""
    from imgsearch.errors import ParamError

    liked = [h.id for h in lib.search("a blue circle", k=2)]
    relevant = [h.id for h in lib.search(like=liked, relevance=True, k=54) if h.relevant]
    assert relevant and [h.id for h in lib.save_album("likes", like=liked, relevance=True).hits] == relevant
    assert {h.relevant for h in lib.search("a blue circle", like=liked, relevance=True)} == {None}
    with pytest.raises(ParamError, match="needs a text-only or an image-only search"):
        lib.save_album("mixed", "a blue circle", like=liked, relevance=True)


def test_pins_keep_or_drop_whatever_the_search_says_and_survive_a_restart(lib, home, model_id, photos, cut):
    lib.save_album("reds", "a red circle", min_score=cut)
    square = photos / "blue_square_000.jpg"
    dropped = lib.search("a red circle", k=1)[0].path
    n, album = lib.pin("reds", [square])
    assert n == 1 and str(square) in paths(album) and album.count == 4 and album.pinned == 1
    n, album = lib.unpin("reds", [dropped])
    assert n == 1 and dropped not in paths(album) and album.count == 3 and album.dropped == 1
    scores = [h.score for h in album.hits]
    assert scores == sorted(scores, reverse=True) and [h.rank for h in album.hits] == [1, 2, 3]
    lib.save_album("circles", keyword="circle")
    n, circles = lib.unpin("circles", [dropped])
    assert circles.count == 17 and dropped not in paths(circles)  # keyword ranking honours drops too
    lib.close()

    with open_lib(home, model_id) as again:  # a new process: the album and its pins are in the library
        album = again.album("reds")
        assert str(square) in paths(album) and dropped not in paths(album)
        n, album = again.pin("reds", [dropped])  # pin brings a dropped photo back
        assert dropped in paths(album) and album.count == 4
        again.rename_album("reds", "warm")
        assert str(square) in paths(again.album("warm"))
        again.delete_album("warm")
        assert [a.name for a in again.albums()] == ["circles"] and again.status().images == 54 and square.exists()


def test_photos_excluded_from_the_search_saved_as_an_album_are_dropped_from_it(lib, cut):
    """save_album takes search()'s arguments: exclude_ids was taken, and silently forgotten."""
    top = lib.search("a red circle", k=1)[0]
    album = lib.save_album("reds", "a red circle", min_score=cut, exclude_ids=[top.id, 999999])
    assert top.path not in paths(album) and album.count == 2 and album.dropped == 1
    assert lib.pin("reds", [top.path])[1].count == 3  # as any dropped photo, pin brings it back


def test_pin_unpin_rename_delete_from_the_command_line(lib, cli, photos, cut):
    cli("album", "save", "reds", "a red circle", "--min-score", cut)
    out = cli("album", "pin", "reds", photos / "blue_square_000.jpg", photos / "blue_square_001.jpg")
    assert out.exit_code == 0 and out.stdout.strip() == "pinned 2 photos in album reds (5 photos now)"
    out = cli("album", "unpin", "reds", photos / "red_circle_000.jpg")
    assert out.stdout.strip() == "dropped 1 photo from album reds (4 photos now)"
    assert cli("album", "rename", "reds", "warm").stdout.strip() == "renamed album reds to warm"
    assert len(cli("album", "show", "warm", "--paths").stdout.split()) == 4
    out = cli("album", "delete", "warm")
    assert out.stdout.strip() == "deleted album warm (no photo was touched)"
    assert cli("album", "list").stderr.startswith("no albums yet")
    assert (photos / "blue_square_000.jpg").exists() and lib.status().images == 54


def test_moved_photos_stay_in_their_albums(lib, tmp_path, photos, cut):
    own = tmp_path / "own"
    own.mkdir()
    for name in ("red_circle_000.jpg", "blue_square_000.jpg"):
        shutil.copy(photos / name, own / name)
    lib.index(own)
    lib.save_album("mine", "a red circle", min_score=cut, under=own)
    lib.pin("mine", [own / "blue_square_000.jpg"])
    assert sorted(Path(p).name for p in paths(lib.album("mine"))) == ["blue_square_000.jpg", "red_circle_000.jpg"]

    (own / "sub").mkdir()
    os.rename(own / "red_circle_000.jpg", own / "sub" / "renamed.jpg")
    os.rename(own / "blue_square_000.jpg", own / "sub" / "pinned.jpg")
    assert lib.index(own).moved == 2
    assert sorted(paths(lib.album("mine"))) == [str(own / "sub" / "pinned.jpg"), str(own / "sub" / "renamed.jpg")]


def test_the_request_is_stored_with_absolute_paths(lib, cli, photos, monkeypatch):
    monkeypatch.chdir(photos.parent)
    example = f"{photos.name}/green_triangle_000.jpg"
    out = cli("album", "save", "like", "--image", f"2:{example}", "--under", photos.name, "-k", "3")
    assert out.exit_code == 0, out.output
    request = lib.albums()[0].request
    assert request["images"] == [{"path": str(photos / "green_triangle_000.jpg"), "weight": 2.0}]
    assert request["under"] == str(photos) and request["k"] == 3
    assert [kind(p) for p in paths(lib.album("like"))] == ["green_triangle"] * 3


# --- bad input: one line naming it, nothing lost --------------------------------------------------------------
def test_unknown_duplicate_and_invalid_names(lib, cli, photos, tmp_path, cut):
    assert cli("album", "save", "reds", "a red circle", "--min-score", cut).exit_code == 0
    for args in (("show", "nope"), ("pin", "nope", photos / "red_circle_000.jpg"), ("unpin", "nope", photos),
                 ("rename", "nope", "x"), ("delete", "nope"), ("export", "nope", tmp_path / "out")):
        fails(cli("album", *args), "no album named 'nope'", "album list")
    assert not (tmp_path / "out").exists()
    fails(cli("album", "save", "REDS", "a blue square"), "an album named 'reds' already exists")  # as it is
    assert cli("album", "save", "blue", "a blue square").exit_code == 0
    fails(cli("album", "rename", "blue", "Reds"), "an album named 'reds' already exists")
    fails(cli("album", "save", "a/b", "a red circle"), "name:", "without '/'")
    fails(cli("album", "save", "  ", "a red circle"), "give the album a name")
    fails(cli("album", "pin", "reds", tmp_path), f"{tmp_path} is not in the library")
    fails(cli("album", "save", "none", "red", "--under", tmp_path / "nowhere"), "--under", "no such folder")
    fails(cli("album", "save", "mixed", "red", "--image", photos / "red_circle_000.jpg", "--relevant"),
          "relevance: needs a text-only or an image-only search")
    fails(cli("album", "save", "empty"), "nothing to search for")
    fails(cli("album", "save", "k0", "red", "-k", "0"), "-k 0:")
    with pytest.raises(Exception, match="example images as files"):
        lib.save_album("bytes", image=(photos / "red_circle_000.jpg").read_bytes())
    assert [a.name for a in lib.albums()] == ["blue", "reds"] and lib.album("reds").count == 3


def test_names_compare_regardless_of_case_in_every_script(lib, cli):
    """SQLite's NOCASE folds ASCII only: 'Été' and 'été' were two albums; `album show ÉTÉ` found neither."""
    assert cli("album", "save", "Été", "a red circle", "-k", "3").exit_code == 0
    for taken in ("été", "ÉTÉ", "E\u0301te\u0301"):  # the accent typed as a character of its own too
        fails(cli("album", "save", taken, "a blue square"), "an album named 'Été' already exists")
    assert cli("album", "save", "Straße", "a blue square", "-k", "2").exit_code == 0
    fails(cli("album", "save", "STRASSE", "a red circle"), "an album named 'Straße' already exists")
    fails(cli("album", "rename", "straße", "ÉTÉ"), "an album named 'Été' already exists")
    assert cli("album", "rename", "STRASSE", "strasse").exit_code == 0  # its own name in another case
    assert [a.name for a in lib.albums()] == ["strasse", "Été"]
    shown = cli("album", "show", "été", "--paths")
    assert shown.exit_code == 0 and shown.stdout.splitlines() == paths(lib.album("ÉTÉ"))
    assert len(paths(lib.album("Été"))) == 3


def test_a_request_that_no_longer_runs_is_named_and_kept(lib, cli, tmp_path, photos, cut):
    gone = tmp_path / "gone"
    shutil.copytree(photos, gone)
    lib.index(gone)
    lib.classify("red, blue")
    lib.save_album("in gone", "a red circle", under=gone, k=3)
    lib.save_album("tagged", "a circle", tag="red", min_score=cut)
    assert cli("album", "save", "reds", "a red circle", "--min-score", cut).exit_code == 0
    shutil.rmtree(gone)
    lib.drop_tag_set(lib.tag_sets()[0]["id"])

    line = fails(cli("album", "show", "in gone"), f"album in gone: folder {gone} no longer exists;", code=2)
    assert "album delete in gone" in line
    fails(cli("album", "show", "tagged"), "album tagged: no tag set has 'red' (dropped")
    listed = cli("album", "list")
    assert listed.exit_code == 0 and "reds" in listed.stdout and "in gone" in listed.stdout
    assert "warning: album in gone: folder" in listed.stderr and "warning: album tagged:" in listed.stderr
    broken = {a.name: a for a in lib.albums()}
    assert broken["in gone"].problem and broken["in gone"].request["under"] == str(gone)
    assert broken["reds"].problem is None and broken["reds"].count == 3
    fails(cli("album", "export", "in gone", tmp_path / "out"), "no longer exists")
    assert not (tmp_path / "out").exists()


# --- export ------------------------------------------------------------------------------------------------
def test_export_copies_or_links_into_a_new_or_empty_folder_only(lib, cli, tmp_path, photos, cut):
    twin = tmp_path / "twin"
    twin.mkdir()
    shutil.copy(photos / "red_circle_001.jpg", twin / "red_circle_000.jpg")  # same name, another folder
    lib.index(twin)
    lib.save_album("reds", "a red circle", min_score=cut)
    members = paths(lib.album("reds"))
    assert len(members) == 4

    out = cli("album", "export", "reds", tmp_path / "copies")
    assert out.exit_code == 0 and out.stdout.strip() == f"copied 4 photos of album reds into {tmp_path / 'copies'}"
    made = sorted(os.listdir(tmp_path / "copies"))
    assert made == ["red_circle_000 (2).jpg", "red_circle_000.jpg", "red_circle_001.jpg", "red_circle_002.jpg"]
    for p in made:
        f = tmp_path / "copies" / p
        assert not f.is_symlink() and f.read_bytes() in {Path(m).read_bytes() for m in members}
    assert (tmp_path / "copies" / "red_circle_002.jpg").stat().st_mtime_ns == \
        (photos / "red_circle_002.jpg").stat().st_mtime_ns

    (tmp_path / "links").mkdir()  # empty: fine
    assert cli("album", "export", "reds", tmp_path / "links", "--link").exit_code == 0
    links = {os.readlink(tmp_path / "links" / n) for n in os.listdir(tmp_path / "links")}
    assert links == set(members)

    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    fails(cli("album", "export", "reds", full), f"{full} is not empty", "notes.txt")
    fails(cli("album", "export", "reds", full / "notes.txt"), "is not a folder")
    assert os.listdir(full) == ["notes.txt"] and (full / "notes.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")  # never written through: it says where it points
    fails(cli("album", "export", "reds", tmp_path / "link"), "is a symbolic link", str(tmp_path / "empty"))
    assert os.listdir(tmp_path / "empty") == []


def test_export_of_photos_whose_names_are_near_the_length_limit(lib, tmp_path, photos):
    """Each copy is first written as NAME.partial: a photo with a name of 248 to 255 bytes failed the whole
    export ("File name too long"). Such a name loses its end instead."""
    long = tmp_path / "long"
    long.mkdir()
    for size in (251, 255):
        shutil.copy(photos / "red_circle_000.jpg", long / ("x" * (size - 4) + ".jpg"))
    lib.index(long)
    lib.save_album("long", "a red circle", under=long, k=2)
    written = [Path(w) for w in lib.export_album("long", tmp_path / "out")]
    assert sorted(os.listdir(tmp_path / "out")) == sorted(w.name for w in written) and len(written) == 2
    assert all(w.name.startswith("x" * 200) and w.suffix == ".jpg" and len(w.name) <= 255 for w in written)
    assert all(w.read_bytes() == (photos / "red_circle_000.jpg").read_bytes() for w in written)


# --- they survive: export/import of the library, and a change of model -----------------------------------------
def test_albums_travel_with_a_library_export(lib, photos, tmp_path, model_id, cut):
    pytest.importorskip("pyarrow")
    lib.save_album("reds", "a red circle", min_score=cut)
    lib.pin("reds", [photos / "blue_square_000.jpg"])
    lib.unpin("reds", [photos / "red_circle_000.jpg"])
    expected = paths(lib.album("reds"))
    lib.export(tmp_path / "export")

    with open_lib(tmp_path / "fresh", model_id) as fresh:
        report = fresh.import_(tmp_path / "export")
        assert report.added == 54 and report.albums == 1
        album = fresh.album("reds")
        assert paths(album) == expected and album.pinned == 1 and album.dropped == 1
        assert fresh.import_(tmp_path / "export").albums == 0  # its name is taken now: nothing doubled


def test_marked_photos_travel_with_a_library_export_as_photos_not_ids(lib, photos, tmp_path, model_id):
    """Liked, unliked and "more like this" photos are kept by library id; another library gives the same id to
    another photo, so the import showed albums of the wrong photos."""
    pytest.importorskip("pyarrow")
    blue = {n: str(photos / f"blue_{n}_000.jpg") for n in ("triangle", "circle")}
    lib.save_album("refined", "a blue shape", like=[blue["triangle"]], unlike=[blue["circle"]], k=5,
                   under=photos)
    lib.save_album("more like", ids=[lib.search(like=[str(photos / "green_square_000.jpg")], k=1)[0].id], k=4,
                   under=photos)
    expected = {a.name: paths(a) for a in (lib.album("refined"), lib.album("more like"))}
    lib.export(tmp_path / "export")

    others = tmp_path / "others"  # indexed first there: every imported photo gets another id than here
    synthetic.generate(others, per_class=1, size=96, fmt="jpg", seed=9, captions_file=None)
    with open_lib(tmp_path / "fresh", model_id) as fresh:
        assert fresh.index(others).new == 18
        assert fresh.import_(tmp_path / "export").albums == 2
        assert {name: paths(fresh.album(name)) for name in expected} == expected


def test_a_damaged_album_in_an_export_is_skipped_and_breaks_nothing(lib, cli, photos, tmp_path):
    """An export's manifest is a file anyone can edit: an album record with a number for an example image made
    every `album list` and `index` fail after the import, a NaN weight gave NaN scores, a relative folder was
    read against the folder the command ran in, an infinite date made `album list --json` invalid JSON."""
    pytest.importorskip("pyarrow")
    lib.export(tmp_path / "export")
    manifest = tmp_path / "export" / "_imgsearch_export.json"
    meta = json.loads(manifest.read_text())
    red = str(photos / "red_circle_000.jpg")
    search = {"texts": [{"text": "a red circle", "weight": 1.0}], "k": 3}
    meta["albums"] = [{"name": "number", "request": {"images": [{"path": 5, "weight": 1.0}], "k": 3}},
                      {"name": "nan", "request": {"images": [{"path": red, "weight": float("nan")}], "k": 3}},
                      {"name": "relative", "request": {**search, "under": photos.name}},
                      {"name": "texts", "request": {"texts": "a red circle"}},
                      {"name": "listed", "request": ["a red circle"]},
                      {"name": "forever", "request": search, "created_at": float("inf")},
                      {"name": "good", "request": search, "created_at": 1.5e9},
                      # an export from before marks travelled by path: its ids name the other library's photos
                      {"name": "old ids", "request": {**search, "like": [7], "unlike": [red, 9]}}]
    manifest.write_text(json.dumps(meta))

    assert lib.import_(tmp_path / "export").albums == 3
    listed = cli("album", "list", "--json")
    assert listed.exit_code == 0, listed.output
    albums = {a["name"]: a for a in json.loads(listed.stdout, parse_constant=lambda c: pytest.fail(c))}
    assert sorted(albums) == ["forever", "good", "old ids"] and albums["good"]["created_at"] == 1.5e9
    assert "like" not in albums["old ids"]["request"] and albums["old ids"]["request"]["unlike"] == [
        lib.store.images_at([red])[red].id]  # the path found here, kept by id
    top = [h.path for h in lib.search("a red circle", k=3)]
    assert paths(lib.album("forever")) == paths(lib.album("good")) == top
    assert lib.index(photos).unchanged == 54  # and indexing, which evaluates every album, still works


@pytest.mark.slow
def test_switching_models_is_no_change_to_an_album(lib, home, photos, random_tiny_model, cut):
    """Two models find different members: looking with one, then the other, moved `changed` every time."""
    lib.save_album("reds", "a red circle", min_score=cut)
    saved = lib.album("reds")
    with open_lib(home, f"local-dir:{random_tiny_model}") as other:
        other.index(photos)  # evaluates every album with this model
        assert sorted(paths(other.album("reds"))) != sorted(paths(saved))  # it finds other photos...
        assert other.album("reds").changed_at == saved.changed_at  # ...which is no change to the album
    assert lib.album("reds").changed_at == saved.changed_at and paths(lib.album("reds")) == paths(saved)


@pytest.mark.slow
def test_a_model_change_re_evaluates_albums_and_keeps_pins(lib, home, photos, tmp_path, model_id,
                                                           random_tiny_model, cut):
    example = tmp_path / "example.jpg"
    shutil.copy(photos / "green_triangle_000.jpg", example)
    lib.save_album("like", image=example, k=3)
    lib.save_album("reds", "a red circle", min_score=cut)
    lib.pin("reds", [photos / "blue_square_000.jpg"])
    first = paths(lib.album("like"))
    example.unlink()  # the album kept its query vector: the example file is no longer needed
    assert paths(lib.album("like")) == first

    other = f"local-dir:{random_tiny_model}"
    with open_lib(home, other) as lib2:
        lib2.index(photos)
        reds = lib2.album("reds")  # re-embedded with the other model; the pin holds
        assert str(photos / "blue_square_000.jpg") in paths(reds)
        square = str(photos / "blue_square_000.jpg")
        assert [h.path for h in reds.hits if h.path != square] == \
            [h.path for h in lib2.search("a red circle", k=54, min_score=cut) if h.path != square]
        with pytest.raises(Exception, match=f"album like: cannot use query image {example}"):
            lib2.album("like")
    assert paths(lib.album("like")) == first  # the first model still answers from its kept vector


# --- the server -------------------------------------------------------------------------------------------------
def test_server_lists_shows_saves_and_deletes_albums_with_the_token(lib, settings, cut):
    import threading

    from test_server import call

    from imgsearch.server import SearchServer

    srv = SearchServer(settings, "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        red_id = lib.search("a red circle", k=1)[0].id
        code, res = call(srv, "POST", "/api/albums", {"name": "reds", "texts": ["a red circle"], "min_score": cut})
        assert code == 200 and res["album"]["count"] == 3 and res["album"]["grows"]
        code, res = call(srv, "POST", "/api/albums", {"name": "like", "ids": [red_id], "k": 2})
        assert code == 200 and res["album"]["request"] == {"ids": [red_id], "k": 2}
        code, res = call(srv, "GET", "/api/albums")
        assert code == 200 and [a["name"] for a in res["albums"]] == ["like", "reds"]
        code, res = call(srv, "GET", "/api/albums/reds")
        assert code == 200 and [h["path"] for h in res["hits"]] == paths(lib.album("reds"))

        code, res = call(srv, "POST", "/api/albums", {"name": "reds", "texts": ["a blue square"]})
        assert code == 400 and "already exists" in res["error"]
        code, res = call(srv, "POST", "/api/albums", {"name": "x", "texts": ["red"], "k": "many"})
        assert code == 400 and res["field"] == "k"
        code, res = call(srv, "POST", "/api/albums", {"name": "x", "images": ["aGVsbG8="]})
        assert code == 400 and res["field"] == "images" and "as files" in res["error"]
        code, res = call(srv, "GET", "/api/albums/nope")
        assert code == 400 and "no album named 'nope'" in res["error"]
        code, res = call(srv, "PUT", "/api/albums/reds")
        assert code == 405

        host, port = srv.address
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as no_token:
            urllib.request.urlopen(f"http://{host}:{port}/api/albums", timeout=30)
        assert no_token.value.code == 401

        code, res = call(srv, "DELETE", "/api/albums/like")
        assert code == 200 and res == {"deleted": "like"}
        assert [a.name for a in lib.albums()] == ["reds"]
    finally:
        srv.shutdown()
        t.join(10)


# --- watch ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_watch_adds_a_new_matching_photo_to_an_album(settings, tmp_path, cut):
    from test_watch import Running, draw, shapes, wait_for

    with open_lib(settings.home, settings.model) as lib:
        folder = shapes(tmp_path / "photos")  # no red shapes at the start
        run = Running(lib, [folder])
        try:
            lib.save_album("reds", "a red circle", min_score=cut)
            assert lib.album("reds").count == 0
            new = draw(folder / "new.jpg", "red", "circle")
            wait_for(lambda: any(b.report.new for b in run.batches), what="the new photo's batch")
            looked = time.time()
            album = lib.album("reds")
            assert paths(album) == [str(new)] and album.changed_at < looked  # the watch batch dated it
            assert run.error is None
        finally:
            run.close()


def test_export_into_an_indexed_folder_says_its_next_index_adds_the_copies(lib, cli, tmp_path, photos, cut):
    """Copies exported into an indexed folder came back as new images at its next index (duplicate hits,
    and a growing album took in its own copies) without a word; links are taken as the photos themselves."""
    mine = tmp_path / "mine"
    mine.mkdir()
    shutil.copy(photos / "green_square_000.jpg", mine / "green.jpg")
    assert lib.index(mine).new == 1
    lib.save_album("reds", "a red circle", min_score=cut)

    out = cli("album", "export", "reds", mine / "album" / "reds")
    assert out.exit_code == 0 and out.stdout.strip() == \
        f"copied 3 photos of album reds into {mine / 'album' / 'reds'}"
    assert out.stderr.strip() == f"note: {mine / 'album' / 'reds'} is inside the indexed folder {mine}: its next " \
        "`imgsearch index` adds these copies as new images; --link or a folder outside it avoids that"
    assert lib.index(mine).new == 3  # what the note warns of

    linked = cli("album", "export", "reds", mine / "links", "--link")
    assert linked.exit_code == 0 and linked.stderr == ""
    assert (lib.index(mine).new, len(os.listdir(mine / "links"))) == (0, 6)  # as the note says: no new image
    outside = cli("album", "export", "reds", tmp_path / "outside")
    assert outside.exit_code == 0 and outside.stderr == ""
