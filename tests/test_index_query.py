"""End-to-end index + query through the CLI on generated shapes and a tiny trained CLIP."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

from imgsearch import synthetic


def hits_of(result) -> list[dict]:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def kind(path: str) -> str:
    """'red_circle' from .../red_circle_002.jpg"""
    return "_".join(Path(path).stem.split("_")[:2])


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_model):
    """A CLI on one library of the 54 photos, indexed once for the tests that only query it."""
    from conftest import Cli, make_photos

    root = tmp_path_factory.mktemp("index-query")
    cli = Cli(root / "home", f"local-dir:{tiny_model}")
    r = cli("index", make_photos(root / "photos"))
    assert r.exit_code == 0, r.output
    assert "new 54" in r.stdout
    return cli


def test_text_query_ranks_matching_images_first(home, indexed):
    cli = indexed
    for color, shape in [("red", "circle"), ("blue", "square"), ("yellow", "triangle")]:
        hits = hits_of(cli("query", f"a {color} {shape}", "-k", "3", "--json"))
        kinds = [kind(h["path"]) for h in hits]
        # The tiny model is sure of colours and mostly right about shapes.
        assert kinds[0] == f"{color}_{shape}", kinds
        assert all(k.startswith(color) for k in kinds), kinds
        assert kinds.count(f"{color}_{shape}") >= 2, kinds


def test_json_output_shape_and_paths_and_table(home, indexed):
    cli = indexed
    hits = hits_of(cli("query", "a green triangle", "--json"))
    assert len(hits) == 10
    for i, h in enumerate(hits, start=1):
        assert {"rank", "id", "path", "score", "width", "height"} <= set(h)
        assert h["rank"] == i and (h["width"], h["height"]) == (96, 96)
        assert os.path.isabs(h["path"]) and os.path.exists(h["path"])
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    r = cli("query", "a green triangle", "--paths", "-k", "4")
    assert r.stdout.splitlines() == [h["path"] for h in hits[:4]]
    table = cli("query", "a green triangle", "-k", "2").stdout.splitlines()
    assert table[0].split() == ["rank", "score", "path"]
    assert table[1].split()[0] == "1" and table[1].split()[2] == hits[0]["path"]


def test_image_query_finds_same_kind(home, indexed, tmp_path):
    cli = indexed
    probe = tmp_path / "probe.png"
    import random

    synthetic.draw_shape("yellow", "square", 96, random.Random(99)).save(probe)
    hits = hits_of(cli("query", "--image", probe, "-k", "3", "--json"))
    kinds = [kind(h["path"]) for h in hits]
    assert kinds[0] == "yellow_square" and kinds.count("yellow_square") >= 2, kinds


def test_negative_and_weighted_terms(home, indexed):
    cli = indexed

    def ranks(hits, k):
        return [h["rank"] for h in hits if kind(h["path"]) == k]

    plain = hits_of(cli("query", "a red circle", "-k", "54", "--json"))
    steered = hits_of(cli("query", "a red circle", "--not", "0.5:a red square", "-k", "54", "--json"))
    # Steering away from red squares pushes them down while red circles stay on top.
    assert sum(ranks(steered, "red_square")) > sum(ranks(plain, "red_square"))
    assert kind(steered[0]["path"]) == "red_circle"
    # A heavier weight decides which of two concepts wins.
    top_blue = hits_of(cli("query", "3:a blue circle", "a purple square", "-k", "2", "--json"))
    top_purple = hits_of(cli("query", "a blue circle", "3:a purple square", "-k", "2", "--json"))
    assert kind(top_blue[0]["path"]) == "blue_circle"
    assert kind(top_purple[0]["path"]) == "purple_square"


def test_a_negative_weight_on_the_command_line_steers_away_as_not_does(home, indexed):
    """`query dog -1:cat` stopped with click's 'No such option: -1' (and `query -- -1:cat` had a relevance
    floor that --not does not)."""
    args = ("-k", "10", "--json", "--no-server")

    def hits(*argv):
        return [(h["path"], pytest.approx(h["score"], abs=1e-5)) for h in hits_of(indexed("query", *args, *argv))]

    steered = hits("a red circle", "--not", "0.5:a red square")
    assert hits("a red circle", "-0.5:a red square") == hits("-0.5:a red square", "a red circle") == steered
    assert hits("a red circle", "--", "-0.5:a red square") == steered
    relevant = hits_of(indexed("query", *args, "--relevant", "a red circle", "-0.5:a red square"))
    assert {h["relevant"] for h in relevant} == {None}  # as with --not: no floor for a query steered away
    # the value of an option stays that option's: minus -1 times a red square is plus a red square
    assert hits("a red circle", "--not", "-1:a red square") == hits("a red circle", "a red square")


def test_no_results_names_a_tag_on_one_line(home, indexed):
    r = indexed("query", "a red circle", "--tag", "dog\nrm -rf", "--no-server")
    assert r.exit_code == 0 and r.stderr.splitlines() == ["no results with tag dog\\nrm -rf"], r.stderr


def test_a_blank_lang_is_not_set_and_a_long_one_is_cut(home, indexed, monkeypatch):
    monkeypatch.setenv("IMGSEARCH_LANG", " ")
    assert len(hits_of(indexed("query", "a red circle", "-k", "1", "--json", "--no-server"))) == 1
    r = indexed("--lang", "x" * 5000, "query", "a red circle", "--no-server")
    assert r.exit_code == 2 and r.stderr.startswith("error: unknown language code 'xxx") and len(r.stderr) < 300


def test_under_and_min_score_filters(cli, tmp_path):
    a, b = tmp_path / "lib" / "a", tmp_path / "lib" / "b"
    synthetic.generate(a, per_class=2, colors=["red", "blue"], size=64, captions_file=None, seed=3)
    synthetic.generate(b, per_class=2, colors=["red", "blue"], size=64, captions_file=None, seed=4)
    cli("index", tmp_path / "lib")
    hits = hits_of(cli("query", "a red circle", "--under", b, "-k", "50", "--json"))
    assert len(hits) == 12 and all(h["path"].startswith(str(b) + os.sep) for h in hits)
    assert kind(hits[0]["path"]) == "red_circle"
    all_hits = hits_of(cli("query", "a red circle", "-k", "50", "--json"))
    threshold = all_hits[5]["score"]
    filtered = hits_of(cli("query", "a red circle", "--min-score", threshold, "-k", "50", "--json"))
    assert len(filtered) == 6 and all(h["score"] >= threshold for h in filtered)
    r = cli("query", "a red circle", "--under", tmp_path / "nope")
    assert r.exit_code == 2 and "no such folder" in r.stderr


@pytest.mark.skipif(sys.platform in ("darwin", "win32"), reason="needs a case-sensitive file system")
def test_folders_whose_names_differ_in_case_stay_apart(cli, tmp_path):
    """--under, index and forget of cats/ never take in Cats/ (SQL LIKE ignores case: `index cats` removed
    the images of Cats from the library)."""
    cats, upper = tmp_path / "lib" / "cats", tmp_path / "lib" / "Cats"
    synthetic.generate(cats, per_class=1, colors=["blue"], size=64, captions_file=None, seed=3)
    synthetic.generate(upper, per_class=1, colors=["red"], size=64, captions_file=None, seed=4)
    cli("index", tmp_path / "lib")
    hits = hits_of(cli("query", "a red circle", "--under", cats, "-k", "50", "--json"))
    assert [Path(h["path"]).parent for h in hits] == [cats] * 3
    rep = json.loads(cli("index", cats, "--json").stdout)
    assert (rep["unchanged"], rep["removed"]) == (3, 0)
    assert "removed 3 images" in cli("forget", cats).stdout
    assert {Path(h["path"]).parent for h in hits_of(cli("query", "a red circle", "-k", "50", "--json"))} == {upper}


def test_incremental_rerun_encodes_nothing(cli, photos):
    cli("index", photos)
    r = cli("index", photos, "--json")
    rep = json.loads(r.stdout)
    assert (rep["new"], rep["unchanged"], rep["encoded"], rep["removed"]) == (0, 54, 0, 0)


def test_changed_file_is_reencoded(cli, photos):
    cli("index", photos)
    target = photos / "red_circle_000.jpg"
    before = {h["path"]: h["id"] for h in hits_of(cli("query", "a blue square", "-k", "54", "--json"))}
    import random

    synthetic.draw_shape("blue", "square", 96, random.Random(5)).save(target, quality=90)
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    rep = json.loads(cli("index", photos, "--json").stdout)
    assert (rep["updated"], rep["encoded"], rep["new"]) == (1, 1, 0)
    hits = hits_of(cli("query", "a blue square", "-k", "4", "--json"))
    assert str(target) in [h["path"] for h in hits]  # now a blue square
    assert before[str(target)] in [h["id"] for h in hits]  # same library row


def test_touched_file_is_not_reencoded(cli, photos):
    cli("index", photos)
    os.utime(photos / "red_circle_000.jpg", ns=(1, 10**18))
    rep = json.loads(cli("index", photos, "--json").stdout)
    assert (rep["unchanged"], rep["encoded"], rep["updated"]) == (54, 0, 0)


def test_a_file_that_could_not_be_read_is_retried_once_readable(cli, photos, monkeypatch):
    """A read error (permissions, a flaky drive or share) is the machine's state, not the file's: fixing it
    (chmod) changes neither size nor mtime, and the file was skipped as 'failed before' on every later run."""
    from imgsearch import files

    target = photos / "red_circle_000.jpg"
    real = files.hash_file

    def denied(f, *a):
        if f.name == str(target):
            raise PermissionError(13, "Permission denied")
        return real(f, *a)

    monkeypatch.setattr(files, "hash_file", denied)
    rep = json.loads(cli("index", photos, "--json").stdout)
    assert rep["new"] == 53
    assert rep["failures"] == [{"path": str(target), "reason": "cannot read file: Permission denied"}]
    monkeypatch.setattr(files, "hash_file", real)  # permissions fixed
    rep = json.loads(cli("index", photos, "--json").stdout)
    assert (rep["new"], rep["failed_before"], rep["failures"]) == (1, 0, [])
    assert str(target) in [h["path"] for h in hits_of(cli("query", "a red circle", "-k", "3", "--json"))]


def test_deleted_file_disappears(cli, photos):
    cli("index", photos)
    gone = photos / "red_circle_001.jpg"
    gone.unlink()
    paths = [h["path"] for h in hits_of(cli("query", "a red circle", "-k", "54", "--json"))]
    assert str(gone) not in paths and len(paths) == 53  # even before re-indexing
    rep = json.loads(cli("index", photos, "--json").stdout)
    assert rep["removed"] == 1
    st = json.loads(cli("status", "--json").stdout)
    assert st["images"] == 53 and st["models"][0]["vectors"] == 53


def test_moved_and_renamed_files_keep_vectors(cli, photos):
    cli("index", photos)
    ids = {h["path"]: h["id"] for h in hits_of(cli("query", "a red circle", "-k", "54", "--json"))}
    (photos / "sub dir").mkdir()
    old = photos / "red_circle_002.jpg"
    new = photos / "sub dir" / "renamed red.jpg"
    shutil.move(old, new)
    rep = json.loads(cli("index", photos, "--json").stdout)
    assert (rep["moved"], rep["encoded"], rep["removed"], rep["new"]) == (1, 0, 0, 0)
    hits = hits_of(cli("query", "a red circle", "-k", "3", "--json"))
    by_path = {h["path"]: h["id"] for h in hits}
    assert by_path.get(str(new)) == ids[str(old)]


def test_a_file_moved_over_another_keeps_its_own_row_and_captions(cli, photos):
    """`mv blue.jpg red.jpg`: the blue square's row (id, vector, caption) moves to red.jpg and the red circle's
    goes. It was re-encoded into the red circle's row, which kept "Grandma's red circle" on the blue square."""
    cli("index", photos)
    red, blue = photos / "red_circle_000.jpg", photos / "blue_square_000.jpg"
    ids = {h["path"]: h["id"] for h in hits_of(cli("query", "a blue square", "-k", "54", "--json"))}
    assert cli("caption", red, "Grandma's red circle").exit_code == 0
    assert cli("caption", blue, "the lake").exit_code == 0
    blue.replace(red)
    rep = json.loads(cli("index", photos, "--json").stdout)
    assert (rep["moved"], rep["removed"], rep["updated"], rep["encoded"]) == (1, 1, 0, 0)
    assert json.loads(cli("caption", red, "--json").stdout)["captions"] == ["the lake"]
    hits = hits_of(cli("query", "a blue square", "-k", "53", "--json"))
    assert {h["path"]: h["id"] for h in hits}[str(red)] == ids[str(blue)] and len(hits) == 53


def test_swapped_names_reuse_both_vectors_and_captions_stay_with_the_path(cli, photos, tmp_path):
    """`mv a t; mv b a; mv t b`: both contents are in the library, yet both files were decoded and encoded
    again. Each path keeps its row and captions (an edit keeps them too); the vector and size come from the row
    that held the same bytes."""
    import random

    red, blue = photos / "red_circle_000.jpg", photos / "blue_small.jpg"
    synthetic.draw_shape("blue", "square", 64, random.Random(3)).save(blue, quality=90)
    os.utime(blue, ns=(1, 10**18))  # its own time: a swap must not look like an untouched file
    shutil.copy(red, tmp_path / "probe.jpg")  # the red circle's bytes, outside the library
    cli("index", photos)
    ids = {h["path"]: h["id"] for h in hits_of(cli("query", "a red circle", "-k", "55", "--json"))}
    assert cli("caption", red, "Grandma's red circle").exit_code == 0
    red.rename(photos / "t")
    blue.rename(red)
    (photos / "t").rename(blue)
    rep = json.loads(cli("index", photos, "--json").stdout)
    assert (rep["updated"], rep["reused"], rep["encoded"], rep["new"], rep["moved"]) == (2, 2, 0, 0, 0)
    (top,) = hits_of(cli("query", "--image", tmp_path / "probe.jpg", "-k", "1", "--json"))
    assert top["path"] == str(blue) and top["score"] == pytest.approx(1, abs=1e-4)
    assert (top["id"], top["width"]) == (ids[str(blue)], 96)
    hits = {h["path"]: h for h in hits_of(cli("query", "a blue square", "-k", "55", "--json"))}
    assert (hits[str(red)]["id"], hits[str(red)]["width"], len(hits)) == (ids[str(red)], 64, 55)
    assert json.loads(cli("caption", red, "--json").stdout)["captions"] == ["Grandma's red circle"]
    rep = json.loads(cli("index", photos, "--json").stdout)
    assert (rep["unchanged"], rep["encoded"]) == (55, 0)


def test_identical_copy_reuses_vector(cli, photos, tmp_path):
    cli("index", photos)
    shutil.copy(photos / "green_square_000.jpg", photos / "copy.jpg")
    rep = json.loads(cli("index", photos, "--json").stdout)
    assert (rep["new"], rep["reused"], rep["encoded"]) == (1, 1, 0)
    hits = hits_of(cli("query", "--image", photos / "green_square_000.jpg", "-k", "2", "--json"))
    assert {Path(h["path"]).name for h in hits} == {"green_square_000.jpg", "copy.jpg"}
    assert hits[0]["score"] == pytest.approx(hits[1]["score"])


def test_forget_removes_folder_not_files(cli, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    synthetic.generate(a, per_class=1, size=64, captions_file=None)
    synthetic.generate(b, per_class=1, size=64, captions_file=None)
    cli("index", a, b)
    r = cli("forget", a)
    assert r.exit_code == 0 and "removed 18 images" in r.stdout
    assert all(p.exists() for p in a.iterdir())
    hits = hits_of(cli("query", "a red circle", "-k", "100", "--json"))
    assert len(hits) == 18 and all(h["path"].startswith(str(b)) for h in hits)
    r = cli("forget", tmp_path / "never")
    assert r.exit_code == 1 and "nothing in the library" in r.stderr


def test_forget_of_an_empty_path_is_refused_and_forgets_nothing(cli, photos, monkeypatch):
    """`imgsearch forget "$DIR"` with DIR unset forgot every image under the current folder (captions, tags
    and album pins with them)."""
    cli("index", photos)
    assert cli("caption", photos / "red_circle_000.jpg", "Grandma's").exit_code == 0
    monkeypatch.chdir(photos)
    r = cli("forget", "")
    assert r.exit_code == 2 and r.stderr.strip() == (
        "error: an empty path was given to forget (an unset variable?); name the files or folders, `.` for the "
        "current folder")
    assert json.loads(cli("status", "--json").stdout)["images"] == 54
    assert json.loads(cli("caption", "red_circle_000.jpg", "--json").stdout)["captions"] == ["Grandma's"]
    r = cli("forget", "red_circle_000.jpg")  # a relative path still names what it names
    assert r.exit_code == 0 and "removed 1 image" in r.stdout


def test_status_reports_models_and_failures(cli, photos):
    (photos / "broken.jpg").write_bytes(b"not a jpeg at all")
    cli("index", photos)
    st = json.loads(cli("status", "--json").stdout)
    assert st["images"] == 54 and st["failures"] == 1
    assert st["failed_files"][0]["path"].endswith("broken.jpg")
    (m,) = st["models"]
    assert m["vectors"] == 54 and m["index_state"] == "ok" and m["index_bytes"] > 0
    text = cli("status").stdout
    assert "images    54" in text and "54 vectors" in text
    assert "broken.jpg" in cli("status", "--failures").stdout


def test_unicode_and_spaces_in_names(cli, tmp_path):
    import random

    folder = tmp_path / "Fotos Ärger 写真"
    folder.mkdir()
    synthetic.draw_shape("red", "circle", 64, random.Random(1)).save(folder / "rot kreis ✓.png")
    synthetic.draw_shape("blue", "square", 64, random.Random(2)).save(folder / "blau — Quadrat.png")
    rep = json.loads(cli("index", folder, "--json").stdout)
    assert rep["new"] == 2 and rep["failed"] == 0
    hits = hits_of(cli("query", "a red circle", "-k", "1", "--json"))
    assert hits[0]["path"] == str(folder / "rot kreis ✓.png")


def test_help_does_not_import_torch():
    import subprocess

    code = ("import sys; from typer.testing import CliRunner; from imgsearch.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "r = CliRunner().invoke(app, ['query', '--help']); assert r.exit_code == 0; "
            "bad = [m for m in ('torch', 'open_clip', 'faiss', 'numpy') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_index_report_counts_one_copy_and_one_second_name_in_the_singular(cli, tmp_path):
    """The report said '(vectors reused for 1 identical files)' and '1 paths were second names'."""
    folder = tmp_path / "one"
    synthetic.generate(folder, per_class=1, colors=["red"], shapes=["circle"], size=64, captions_file=None)
    (img,) = folder.iterdir()
    cli("index", folder)
    shutil.copy(img, folder / "copy.png")  # a copy of a file the library knows: its vector is reused
    os.symlink(img, folder / "link.png")
    r = cli("index", folder)
    assert r.exit_code == 0, r.output
    assert "new 1," in r.stdout and "(vectors reused for 1 identical file)" in r.stdout
    assert "  1 path was a second name (symlinks, hard links) of files indexed once" in r.stdout


def test_index_of_a_folder_without_images_says_so(cli, tmp_path):
    """An empty folder, or one whose images are all in a hidden folder, printed an all-zero report alone."""
    folder = tmp_path / "empty"
    synthetic.generate(folder / ".hidden", per_class=1, colors=["red"], shapes=["circle"], size=64,
                       captions_file=None)
    r = cli("index", folder)
    assert r.exit_code == 0 and "new 0, updated 0" in r.stdout
    assert f"  no images found under {folder} (hidden folders and imgsearch libraries are skipped)" in r.stdout
    synthetic.generate(folder, per_class=1, colors=["red"], shapes=["circle"], size=64, captions_file=None)
    r = cli("index", folder)
    assert "new 1," in r.stdout and "no images found" not in r.stdout
    assert "no images found" not in cli("index", folder).stdout  # unchanged ones are images too


def test_status_failures_json_is_json(cli, photos):
    """`status --failures --json` printed tab-separated lines, --json silently ignored."""
    (photos / "broken.jpg").write_bytes(b"not a jpeg at all")
    cli("index", photos)
    r = cli("status", "--failures", "--json")
    assert r.exit_code == 0
    assert json.loads(r.stdout) == json.loads(cli("status", "--json").stdout)["failed_files"]
    assert json.loads(r.stdout)[0]["path"] == str(photos / "broken.jpg")


def test_forget_of_nothing_is_an_error_line_naming_the_path_as_typed(cli, photos, monkeypatch):
    """It printed 'nothing in the library under with space': no 'error:', the name unquoted, no way on."""
    cli("index", photos)
    monkeypatch.chdir(photos)
    r = cli("forget", "with space")
    assert r.exit_code == 1
    assert r.stderr.splitlines() == ["error: nothing in the library under 'with space'; name files or folders "
                                     "that `imgsearch index` added"]
    assert json.loads(cli("status", "--json").stdout)["images"] == 54
