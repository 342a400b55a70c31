"""Captions and keyword search (FTS5 over names, folders, captions, tags) combined with CLIP ranking."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from imgsearch import keywords, synthetic
from imgsearch.errors import UsageError
from imgsearch.store import Store


def ok_json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture()
def trip(tmp_path):
    """photos/ with a '2019 Trip' folder holding a few of the shapes, and IMG_2019-style names."""
    root = tmp_path / "photos"
    synthetic.generate(root, per_class=2, colors=["red", "blue", "green"], size=96, fmt="jpg", seed=3,
                       captions_file=None)
    trip = root / "2019 Trip"
    trip.mkdir()
    for name in ["red_circle_001.jpg", "blue_square_001.jpg", "green_triangle_001.jpg"]:
        shutil.move(str(root / name), str(trip / name))
    os.rename(root / "blue_circle_000.jpg", root / "IMG_20190501_beach.jpg")
    return root


def test_keyword_filters_clip_ranking_by_folder_and_name(cli, trip):
    assert cli("index", trip).exit_code == 0
    hits = ok_json(cli("query", "a red circle", "--keyword", "2019", "-k", "50", "--json"))
    paths = [h["path"] for h in hits]
    # Every match and only matches: the 3 in the folder plus the IMG_2019... file, CLIP-ranked.
    assert len(paths) == 4
    assert all("2019" in p for p in paths)
    assert paths[0].endswith("2019 Trip/red_circle_001.jpg")
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    # "trip" (any case) finds the folder; a prefix of a longer token matches too.
    assert len(ok_json(cli("query", "a shape", "--keyword", "TRIP", "--json"))) == 3
    assert [Path(h["path"]).name for h in ok_json(cli("query", "x", "--keyword", "beach", "--json"))] == [
        "IMG_20190501_beach.jpg"]
    # -word excludes; a phrase must match in order.
    excl = ok_json(cli("query", "a red circle", "--keyword", "2019 -trip", "--json"))
    assert [Path(h["path"]).name for h in excl] == ["IMG_20190501_beach.jpg"]
    # Any number of them: each nested one more NOT, and past about a hundred FTS5's parser overflowed (the
    # search failed with 'check the library', though the library was fine).
    many = " ".join(f"-zebra{i}" for i in range(150))
    assert ok_json(cli("query", "a red circle", "--keyword", f"2019 -trip {many}", "--json")) == excl
    assert ok_json(cli("query", "a red circle", "--keyword", '"trip 2019"', "--json")) == []


def test_keyword_alone_ranks_by_keywords(cli, trip):
    cli("index", trip)
    hits = ok_json(cli("query", "--keyword", "circle", "-k", "50", "--json"))
    assert len(hits) == 5 and all("circle" in Path(h["path"]).name for h in hits)  # one was renamed IMG_...
    assert hits[0]["score"] == 1.0
    r = cli("query", "--keyword", "zebra")
    assert r.exit_code == 0 and "no results" in r.stderr and "zebra" in r.stderr
    r = cli("query", "--keyword", "circle", "--blend", "0.5")
    assert r.exit_code == 2 and "give query text" in r.stderr


def test_keywords_with_only_not_terms_or_a_min_score(cli, trip):
    """--not beside keywords alone ranks the matches away from it (it was dropped: the red circles it steered
    away from came first), and --min-score cuts a keyword ranking on its score, the one shown (it was ignored)."""
    cli("index", trip)
    hits = ok_json(cli("query", "--keyword", "red", "--not", "a red circle", "-k", "50", "--json"))
    names = [Path(h["path"]).name for h in hits]
    assert len(names) == 6 and all(n.startswith("red_") for n in names)
    assert {n[:10] for n in names[-2:]} == {"red_circle"} and hits[0]["score"] > hits[-1]["score"]
    ranked = ok_json(cli("query", "--keyword", "2019", "--json"))
    assert len(ranked) == 4 and ranked[0]["score"] == 1.0 and ranked[-1]["score"] < 1.0
    kept = ok_json(cli("query", "--keyword", "2019", "--min-score", ranked[-1]["score"] + 1e-6, "--json"))
    assert kept == [h for h in ranked if h["score"] > ranked[-1]["score"]] and kept


def test_captions_are_stored_and_searchable(cli, trip, tmp_path):
    cli("index", trip)
    target = trip / "green_circle_000.jpg"
    r = cli("caption", target, "Grandma's birthday balloon")
    assert r.exit_code == 0 and "caption added" in r.stdout
    assert cli("caption", target, "Grandma's birthday balloon").stdout.strip() == "this caption is already there"
    assert cli("caption", target).stdout.splitlines() == ["Grandma's birthday balloon"]
    hits = ok_json(cli("query", "a red square", "--keyword", "birthday", "--json"))
    assert [h["path"] for h in hits] == [str(target)]
    # Import from a captions file, the format finetune reads; unknown images are reported, not fatal.
    captions = tmp_path / "caps.csv"
    captions.write_text("path,caption\n"
                        f"{trip / 'red_square_000.jpg'},picnic at the lake\n"
                        f"{trip / 'blue_triangle_000.jpg'},lake sunset\n"
                        f"{tmp_path / 'elsewhere.jpg'},not here\n", encoding="utf-8")
    (tmp_path / "elsewhere.jpg").write_bytes((trip / "red_square_000.jpg").read_bytes())
    r = cli("caption", "--import", captions, "--json")
    report = ok_json(r)
    assert report["added"] == 2 and report["not_in_library"] == [str(tmp_path / "elsewhere.jpg")]
    lake = ok_json(cli("query", "a blue triangle", "--keyword", "lake", "--json"))
    assert [Path(h["path"]).name for h in lake] == ["blue_triangle_000.jpg", "red_square_000.jpg"]
    # --replace swaps the caption: the old words stop matching.
    cli("caption", target, "garden party", "--replace")
    assert ok_json(cli("query", "x", "--keyword", "birthday", "--json")) == []
    assert len(ok_json(cli("query", "x", "--keyword", "garden", "--json"))) == 1


def test_caption_bad_inputs(cli, trip, tmp_path):
    cli("index", trip)
    r = cli("caption", tmp_path / "missing.jpg", "hello")
    assert r.exit_code == 2 and "image not found" in r.stderr
    outside = tmp_path / "outside.jpg"
    outside.write_bytes((trip / "red_square_000.jpg").read_bytes())
    r = cli("caption", outside, "hello")
    assert r.exit_code == 2 and "not in the library" in r.stderr
    r = cli("caption", trip / "red_square_000.jpg", "   ")
    assert r.exit_code == 2 and "empty caption" in r.stderr
    r = cli("caption", "--import", tmp_path / "nope.csv")
    assert r.exit_code == 1 and "captions source not found" in r.stderr
    r = cli("caption")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1


def test_caption_import_reads_utf16_and_names_a_sidecar_it_cannot_read(cli, trip, tmp_path):
    """Excel's "Unicode Text" and Notepad's "Unicode" save UTF-16 with a byte-order mark: such a TSV was refused
    as "not UTF-8", and a UTF-16 sidecar was skipped with Python's codec error, saying nothing of what to do."""
    cli("index", trip)
    table = tmp_path / "excel.tsv"  # Windows line ends, paths relative to the table's folder
    table.write_bytes(f"path\tcaption\r\n{(trip / 'red_square_000.jpg').relative_to(tmp_path)}\tÉté à la plage\r\n"
                      .encode("utf-16"))
    assert ok_json(cli("caption", "--import", table, "--json"))["added"] == 1
    assert cli("caption", trip / "red_square_000.jpg").stdout.splitlines() == ["Été à la plage"]
    (trip / "blue_circle_001.txt").write_bytes("fête\r\nnoël\r\n".encode("utf-16"))
    (trip / "green_circle_000.txt").write_bytes("caf\xe9".encode("latin-1"))
    report = ok_json(cli("caption", "--import", trip, "--json"))
    assert report["added"] == 2 and cli("caption", trip / "blue_circle_001.jpg").stdout.split() == ["fête", "noël"]
    sidecar = trip / "green_circle_000.txt"
    assert report["problems"] == [{"where": str(trip / "green_circle_000.jpg"), "reason": f"caption file {sidecar} "
                                   "is not UTF-8 text (unexpected end of data at byte 3); save it as UTF-8"}]


def test_caption_import_from_paths_written_from_the_current_folder_says_where_paths_start(cli, trip, tmp_path,
                                                                                           monkeypatch):
    """Paths in a captions file are relative to its folder (docs/cli.md); a file written from the current folder
    had every row skipped as "image not found" with no word of why the images were plainly there."""
    cli("index", trip)
    table = tmp_path / "lists" / "caps.csv"
    table.parent.mkdir()
    table.write_text("path,caption\nphotos/red_square_000.jpg,lake\nphotos/gone.jpg,nothing\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    report = ok_json(cli("caption", "--import", table, "--json"))
    wrong = tmp_path / "lists" / "photos"
    assert report["added"] == 0 and report["problems"] == [
        {"where": f"{table}:2", "reason": f"image not found: {wrong / 'red_square_000.jpg'}; paths are relative to "
         "the captions file's folder, not the current one: write them from there, or in full"},
        {"where": f"{table}:3", "reason": f"image not found: {wrong / 'gone.jpg'}"}]  # not here either: no hint
    table.write_text("path,caption\n../photos/red_square_000.jpg,lake\n", encoding="utf-8")
    assert ok_json(cli("caption", "--import", table, "--json"))["added"] == 1


def test_blend_moves_keyword_matches_up_by_weight(cli, trip):
    cli("index", trip)
    target = trip / "green_triangle_000.jpg"
    cli("caption", target, "favourite")
    plain = ok_json(cli("query", "a red circle", "-k", "18", "--json"))
    clip_rank = [h["path"] for h in plain].index(str(target))
    assert clip_rank > 3  # a green triangle is far from "a red circle"
    none = ok_json(cli("query", "a red circle", "--keyword", "favourite", "--blend", "0", "-k", "18", "--json"))
    assert [h["path"] for h in none] == [h["path"] for h in plain]  # weight 0: pure CLIP order, all images
    half = ok_json(cli("query", "a red circle", "--keyword", "favourite", "--blend", "0.5", "-k", "18", "--json"))
    half_rank = [h["path"] for h in half].index(str(target))
    assert half_rank < clip_rank and len(half) == 18
    full = ok_json(cli("query", "a red circle", "--keyword", "favourite", "--blend", "1", "-k", "3", "--json"))
    assert full[0]["path"] == str(target)
    assert all(0.0 <= h["score"] <= 1.0 for h in half)
    r = cli("query", "a red circle", "--blend", "0.5")
    assert r.exit_code == 2 and "--blend 0.5: weighs keyword relevance; give a keyword too" in r.stderr


def test_a_blended_score_depends_on_the_query_not_on_k_filters_or_exclusions(trip, settings, monkeypatch):
    """k, --min-score, --under and exclude_ids only remove hits from a blend: CLIP used to be rescaled over
    whatever candidates were left, so a threshold or a folder rescored and reordered the rest, and a larger k
    changed the top 10 (its pool grew with k)."""
    from imgsearch import Library

    monkeypatch.setattr(keywords, "BLEND_POOL", 5)  # fewer than the library's images: k reaches past the pool
    with Library(settings=settings) as lib:
        lib.index(trip)
        query = dict(text="a blue square", keyword="red", blend=0.4)
        ranked = {h.id: h.score for h in lib.search(**query, k=18)}
        assert len(ranked) == 18
        cosine = {h.id: h.score for h in lib.search("a blue square", k=18)}
        reds = {h.id for h in lib.search(keyword="red", k=18)}
        assert len(reds) == 6 and next(iter(ranked)) in reds and next(iter(cosine)) not in reds  # reds lifted

        def same_scores(hits, kept):
            got = {h.id: h.score for h in hits}
            assert list(got) == [i for i in ranked if i in kept][:len(got)] and got == {i: ranked[i] for i in got}

        same_scores(lib.search(**query, k=4), set(ranked))
        cut = sorted(cosine.values())[9]
        same_scores(lib.search(**query, k=18, min_score=cut), {i for i, c in cosine.items() if c >= cut})
        in_trip = {h.id for h in lib.search("x", keyword="trip", k=18)}
        same_scores(lib.search(**query, k=18, under=trip / "2019 Trip"), in_trip)
        best = next(iter(ranked))
        same_scores(lib.search(**query, k=18, exclude_ids=[best]), set(ranked) - {best})


def test_tags_are_keywords_and_tag_filter_combines(cli, trip):
    cli("index", trip)
    cli("classify", "--labels", "red,green,blue")
    reds = ok_json(cli("query", "a circle", "--tag", "red", "-k", "50", "--json"))
    assert reds and all(Path(h["path"]).name.startswith("red") for h in reds)
    by_keyword = ok_json(cli("query", "a circle", "--keyword", "red", "-k", "50", "--json"))
    assert {h["id"] for h in reds} <= {h["id"] for h in by_keyword}
    both = ok_json(cli("query", "a circle", "--tag", "red", "--keyword", "2019", "-k", "50", "--json"))
    assert [Path(h["path"]).name for h in both] == ["red_circle_001.jpg"]
    r = cli("query", "a circle", "--tag", "unicorn")
    assert r.exit_code == 0 and "no results with tag unicorn" in r.stderr


def test_deleting_and_moving_images_keeps_text_index_in_sync(cli, trip, settings):
    cli("index", trip)
    cli("classify", "--labels", "red,green,blue")
    victim = trip / "red_square_000.jpg"
    cli("caption", victim, "to be forgotten")
    store = Store(settings.db_path, create=False)
    vid = store.image_by_path(str(victim)).id
    assert cli("forget", victim).exit_code == 0
    for table, col in [("captions", "image_id"), ("tags", "image_id"), ("image_text", "rowid")]:
        assert store.scalar(f"SELECT count(*) FROM {table} WHERE {col} = :i", i=vid) == 0, table
    assert store.scalar("SELECT count(*) FROM image_text") == store.image_count()
    # A moved file keeps its caption, and is found under its new name.
    mover = trip / "green_circle_001.jpg"
    cli("caption", mover, "holiday")
    new = trip / "renamed_holiday_snap.jpg"
    os.rename(mover, new)
    assert "moved 1" in cli("index", trip).stdout
    assert [h["path"] for h in ok_json(cli("query", "x", "--keyword", "holiday", "--json"))] == [str(new)]
    assert [h["path"] for h in ok_json(cli("query", "x", "--keyword", "snap", "--json"))] == [str(new)]
    # New pixels make old tags wrong: they go, the caption stays.
    moved_id = store.image_by_path(str(new)).id
    tag_count = "SELECT count(*) FROM tags WHERE image_id = :i"
    assert store.scalar(tag_count, i=moved_id)
    synthetic.draw_shape("white", "square", 96, random.Random(6)).save(new, quality=90)
    cli("index", trip)
    assert store.scalar(tag_count, i=moved_id) == 0 and store.captions_of(moved_id) == ["holiday"]
    store.close()


def test_to_fts_quotes_everything():
    assert keywords.to_fts("2019 trip") == '"2019"* AND "trip"*'
    assert keywords.to_fts('"red car" -draft -old') == '("red car") NOT ("draft"* OR "old"*)'
    assert keywords.to_fts('AND OR NOT ( ) "x') == '"AND"* AND "OR"* AND "NOT"* AND "x"*'
    # "_" is a word character to Python but a separator to FTS5: as a word it matched nothing, so "2019 _"
    # found no photo at all
    assert keywords.to_fts("2019 _ -__") == keywords.to_fts("2019")
    for bad in ["", "  ", "-only", "!!! ...", "_"]:
        with pytest.raises(UsageError):
            keywords.to_fts(bad)


def test_blend_scores_scale_both_sides():
    # CLIP 0.3/0.2/0.1 scale to 1/0.5/0; keyword relevance is already 0..1 (0 when unmatched).
    out = keywords.blend_scores({1: 0.3, 2: 0.2, 3: 0.1}, {3: 1.0, 2: 0.8}, 0.6)
    assert [i for i, _ in out] == [2, 3, 1]
    assert [s for _, s in out] == pytest.approx([0.68, 0.6, 0.4])
    assert [i for i, _ in keywords.blend_scores({1: 0.3, 2: 0.2}, {2: 1.0}, 0.0)] == [1, 2]


def _index_kinds(home: Path) -> set[str]:
    """The index types of the FAISS cache files in a home (read from their JSON headers)."""
    kinds = set()
    for f in (home / "index").rglob("*"):
        if f.is_file():
            head = f.read_bytes()[:4096]
            for kind in ("flat", "ivfpq", "ivf"):
                if f'"kind": "{kind}"'.encode() in head:
                    kinds.add(kind)
                    break
    return kinds


def test_blend_on_ivfpq_uses_exact_cosines(cli, tmp_path, monkeypatch):
    """A compressed (IVF-PQ) library blends and cuts --min-score on exact cosines, not PQ estimates."""
    photos = tmp_path / "many"
    # PQ codebooks train 256 centroids each, so the library needs at least 256 images.
    n = len(synthetic.generate(photos, per_class=15, size=48, fmt="jpg", seed=5, captions_file=None))
    assert n >= 256
    assert cli("index", photos).exit_code == 0
    cli("caption", photos / "blue_square_000.jpg", "favourite")
    cli("caption", photos / "green_triangle_001.jpg", "favourite")
    # Exact cosines for every image, from the flat (exact) index this small library starts with.
    exact = {h["path"]: h["score"] for h in ok_json(cli("query", "a red circle", "-k", "1000", "--json"))}
    assert len(exact) == n and _index_kinds(cli.home) == {"flat"}
    store = Store(cli.home / "library.db")
    try:
        kw = {store.get_images([i])[i].path: s for i, s in keywords.match(store, "favourite").items()}
    finally:
        store.close()
    assert len(kw) == 2

    monkeypatch.setenv("IMGSEARCH_FLAT_MAX", "100")
    monkeypatch.setenv("IMGSEARCH_INDEX_BUDGET_MB", "0")
    shutil.rmtree(cli.home / "index")  # a trusted cache would be reused as it is: rebuild under the new policy
    blended = ok_json(cli("query", "a red circle", "--keyword", "favourite", "--blend", "0.3", "-k", "1000",
                          "--json"))
    assert _index_kinds(cli.home) == {"ivfpq"}
    # With k above the library every image comes back. Its blend is 0.7 * (cosine - lo) / (hi - lo) + 0.3 * keyword,
    # lo and hi one pair for the query: solved from two unmatched images, every image fits its exact cosine (a
    # PQ estimate is off by far more than the rounding).
    got = {h["path"]: h["score"] for h in blended}
    assert len(got) == n and set(kw) <= set(got)
    ends = sorted((p for p in got if p not in kw), key=exact.get)
    slope = (got[ends[-1]] - got[ends[0]]) / (exact[ends[-1]] - exact[ends[0]])
    fitted = {p: got[ends[0]] + slope * (exact[p] - exact[ends[0]]) + 0.3 * kw.get(p, 0.0) for p in got}
    assert got == pytest.approx(fitted, abs=1e-5)
    assert [h["score"] for h in blended] == sorted(got.values(), reverse=True)

    # --min-score cuts on the exact cosine: exactly the candidates at or above it remain, for a threshold
    # halfway between two neighbouring exact scores (a PQ estimate lands on the wrong side of it).
    ranked = sorted((exact[p] for p in got), reverse=True)
    cut = (ranked[19] + ranked[20]) / 2
    kept = ok_json(cli("query", "a red circle", "--keyword", "favourite", "--blend", "0", "-k", "1000",
                       "--min-score", f"{cut:.7f}", "--json"))
    assert {h["path"] for h in kept} == {p for p in got if exact[p] >= cut}
    assert len(kept) == 20


def test_caption_import_counts_in_words_a_person_writes(cli, trip, tmp_path):
    """'added 1 captions' and '1 images are not in the library': one is singular."""
    cli("index", trip)
    table = tmp_path / "one.csv"
    table.write_text(f"path,caption\n{trip / 'red_square_000.jpg'},at the beach\n{tmp_path / 'elsewhere.jpg'},x\n")
    (tmp_path / "elsewhere.jpg").write_bytes((trip / "red_square_000.jpg").read_bytes())
    lines = cli("caption", "--import", table).stdout.splitlines()
    assert lines[0] == f"added 1 caption from {table}"
    assert lines[1].startswith("  1 image is not in the library (run `imgsearch index` first), e.g. ")
