"""Near-duplicates: planted copies are grouped with the right keeper; different pictures are not."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from imgsearch import dupes

OLD = time.mktime((2019, 5, 1, 10, 0, 0, 0, 0, -1))
NEW = time.mktime((2024, 6, 1, 10, 0, 0, 0, 0, -1))


def scene(colour, shape, where, size=256, seed=0):
    """A coloured shape at a chosen place on a dark, mottled background (so crops change real detail)."""
    rng = random.Random(seed)
    im = Image.new("RGB", (size, size), (20, 25, 30))
    d = ImageDraw.Draw(im)
    for _ in range(40):  # background texture that differs between scenes
        x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(4, 18)
        g = rng.randint(25, 70)
        d.ellipse([x - r, y - r, x + r, y + r], fill=(g, g, g + 10))
    cx, cy = where[0] * size, where[1] * size
    r = 0.3 * size
    fill = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 40)}[colour]
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    return im


def save_jpeg(im, path, quality=92, taken=None):
    exif = None
    if taken:
        e = Image.Exif()
        e[306] = taken  # DateTime
        exif = e.tobytes()
    im.save(path, "JPEG", quality=quality, **({"exif": exif} if exif else {}))


def set_time(path, t):
    os.utime(path, (t, t))


@pytest.fixture()
def library(tmp_path):
    """Originals, planted copies of two of them, and a different picture of the same subject."""
    root = tmp_path / "pics"
    (root / "copies").mkdir(parents=True)
    originals = {
        "red": scene("red", "circle", (0.35, 0.4), seed=1),
        "blue": scene("blue", "square", (0.5, 0.5), seed=2),
        "green": scene("green", "circle", (0.6, 0.55), seed=3),
    }
    for name, im in originals.items():
        save_jpeg(im, root / f"{name}.jpg", taken="2019:05:01 10:00:00")
        set_time(root / f"{name}.jpg", OLD)
    red = Image.open(root / "red.jpg").convert("RGB")
    copies = {
        "copies/red_small.jpg": lambda p: save_jpeg(red.resize((128, 128), Image.Resampling.LANCZOS), p),
        "copies/red_q40.jpg": lambda p: save_jpeg(red, p, quality=40),
        "copies/red.png": lambda p: red.save(p),  # converted, EXIF gone
        "copies/red_cropped.jpg": lambda p: save_jpeg(red.crop((10, 10, 246, 246)), p),
        "copies/red_noexif.jpg": lambda p: save_jpeg(red, p, quality=92),
    }
    for rel, make in copies.items():
        make(root / rel)
        set_time(root / rel, NEW)
    blue = Image.open(root / "blue.jpg").convert("RGB")
    blue.resize((200, 200), Image.Resampling.BICUBIC).save(root / "copies" / "blue_small.png")
    set_time(root / "copies" / "blue_small.png", NEW)
    # Same subject, different picture: another red circle elsewhere on another background.
    save_jpeg(scene("red", "circle", (0.65, 0.6), seed=11), root / "red_other.jpg", taken="2019:05:02 09:00:00")
    return root


def run_json(cli, *args):
    r = cli("duplicates", *args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def names(group) -> list[str]:
    return [str(Path(m["path"]).relative_to(Path(group["keeper"]).parent)) for m in group["images"]]


def test_planted_copies_grouped_with_keeper_first_and_distinct_images_not(cli, library):
    assert cli("index", library).exit_code == 0
    before = sorted(p for p in library.rglob("*") if p.is_file())
    out = run_json(cli)
    groups = {Path(g["keeper"]).name: g for g in out["groups"]}
    assert set(groups) == {"red.jpg", "blue.jpg"}, out["groups"]
    red = groups["red.jpg"]
    # Largest resolution first; among the 256px ones the oldest (EXIF date, then file time) is the original.
    assert names(red)[0] == "red.jpg" and red["images"][0]["keeper"] is True
    assert sorted(names(red)[1:]) == sorted(["copies/red_small.jpg", "copies/red_q40.jpg", "copies/red.png",
                                             "copies/red_cropped.jpg", "copies/red_noexif.jpg"])
    assert all(m["match"] >= 0.96 and m["similarity"] >= 0.9 for m in red["images"])
    assert names(groups["blue.jpg"]) == ["blue.jpg", "copies/blue_small.png"]
    flat = [Path(m["path"]).name for g in out["groups"] for m in g["images"]]
    assert "red_other.jpg" not in flat and "green.jpg" not in flat
    assert out["images"] == 10 and out["confirmed"] >= 6
    assert sorted(p for p in library.rglob("*") if p.is_file()) == before  # nothing deleted

    text = cli("duplicates")
    assert text.exit_code == 0
    lines = text.stdout.splitlines()
    assert lines[0] == "group 1 (6 images)" and lines[1].split()[0] == "keep" and lines[1].endswith("red.jpg")
    assert "nothing was deleted" in lines[-1]
    one = cli("duplicates", "--under", library / "copies").stdout.splitlines()[-1]  # red copies, one blue: one group
    assert one.startswith("1 duplicate group among 6 images ("), one


def test_similar_groups_different_pictures_of_same_subject(cli, library):
    cli("index", library)
    strict = run_json(cli)
    loose = run_json(cli, "--similar", "--threshold", "0.9")
    red = next(g for g in loose["groups"] if any(Path(m["path"]).name == "red_other.jpg" for m in g["images"]))
    assert {"red.jpg", "red_other.jpg"} <= {Path(m["path"]).name for m in red["images"]}
    assert all(m["match"] is None for g in loose["groups"] for m in g["images"])  # CLIP only
    assert loose["confirmed"] == loose["candidates"] >= strict["confirmed"]


def test_under_threshold_and_cache(cli, library):
    cli("index", library)
    only_copies = run_json(cli, "--under", str(library / "copies"))
    # Inside copies/ the red copies are still one group; the keeper is the largest/oldest there.
    assert [len(g["images"]) for g in only_copies["groups"]] == [5]
    assert Path(only_copies["groups"][0]["keeper"]).name in {"red_q40.jpg", "red.png", "red_noexif.jpg"}
    default = run_json(cli)
    # Any CLIP threshold only proposes pairs: the pixel check still decides what is a copy.
    everything = run_json(cli, "--threshold", "-1")
    assert everything["candidates"] > default["candidates"]
    assert [g["images"] for g in everything["groups"]] == [g["images"] for g in default["groups"]]
    strict = run_json(cli, "--min-match", "1.0")
    assert strict["confirmed"] < default["confirmed"]
    r = cli("duplicates", "--threshold", "3")
    assert r.exit_code == 2 and "cosine similarity between -1 and 1" in r.stderr
    r = cli("duplicates", "--under", str(library / "nope"))
    assert r.exit_code == 2 and "no such folder" in r.stderr


def test_deleted_and_changed_files(cli, library):
    cli("index", library)
    run_json(cli)  # fills the fingerprint cache
    os.remove(library / "copies" / "red_q40.jpg")  # deleted since indexing: never listed
    out = run_json(cli)
    red = next(g for g in out["groups"] if Path(g["keeper"]).name == "red.jpg")
    assert "red_q40.jpg" not in {Path(m["path"]).name for m in red["images"]}
    # A file whose content changed is fingerprinted again, not judged by its old cache entry.
    scene("green", "square", (0.2, 0.2), seed=9).save(library / "copies" / "red.png")
    cli("index", library)
    out = run_json(cli)
    red = next(g for g in out["groups"] if Path(g["keeper"]).name == "red.jpg")
    assert "red.png" not in {Path(m["path"]).name for m in red["images"]}


def test_a_read_only_library_finds_duplicates_too(cli, library, home, monkeypatch):
    """duplicates only reads the library: on read-only media it answers (the pixel fingerprints it cannot cache
    are computed again next time) instead of refusing as a write would."""
    import imgsearch.store

    assert cli("index", library).exit_code == 0
    real = os.access
    monkeypatch.setattr(imgsearch.store.os, "access", lambda path, mode, *a, **kw: False if mode & os.W_OK and
                        str(path).startswith(str(home)) else real(path, mode, *a, **kw))  # read-only media
    assert "read-only" in cli("status").stdout
    out = run_json(cli)
    assert {Path(g["keeper"]).name for g in out["groups"]} == {"red.jpg", "blue.jpg"}


def test_empty_library_message(cli):
    r = cli("duplicates")
    assert r.exit_code == 1 and "imgsearch index" in r.stderr


# --- pieces -------------------------------------------------------------------------------------------
def test_fingerprint_separates_copies_from_other_pictures():
    a = scene("red", "circle", (0.35, 0.4), seed=1)
    fa = dupes.fingerprint(a)
    for copy in (a.resize((100, 100)), a.crop((8, 8, 248, 248)), a.crop((0, 0, 244, 256))):
        assert dupes.match_score(fa, dupes.fingerprint(copy)) >= 0.96
    other = scene("red", "circle", (0.65, 0.6), seed=11)
    assert dupes.match_score(fa, dupes.fingerprint(other)) < 0.9


def test_keeper_order_prefers_resolution_then_age():
    from imgsearch.store import ImageRow

    rows = [ImageRow(1, "/b.jpg", 10, int(NEW * 1e9), "h", 100, 100, None),
            ImageRow(2, "/a.jpg", 10, int(NEW * 1e9), "h", 200, 100, None),
            ImageRow(3, "/c.jpg", 10, int(NEW * 1e9), "h", 200, 100, "2018-01-01T00:00:00"),
            ImageRow(4, "/d.jpg", 10, int(OLD * 1e9), "h", 200, 100, None)]
    assert [r.id for r in dupes.keeper_order(rows)] == [3, 4, 2, 1]


def test_union_find_joins_chains():
    uf = dupes.UnionFind(6)
    uf.union(0, 1)
    uf.union(2, 1)
    uf.union(4, 5)
    assert sorted(sorted(g) for g in uf.groups()) == [[0, 1, 2], [4, 5]]


def clustered(n, dim=64, pairs=200, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, dim))
    x = centres[rng.integers(0, 50, n)] + 0.6 * rng.normal(size=(n, dim))
    planted = rng.choice(n, size=(pairs, 2), replace=False)
    x[planted[:, 1]] = x[planted[:, 0]] + 0.02 * rng.normal(size=dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), {tuple(sorted(p)) for p in planted.tolist()}


def test_ivf_candidates_find_planted_pairs_like_exact_search():
    x, planted = clustered(4000)
    exact = {(a, b) for a, b, _ in dupes.candidate_pairs(x, 0.95, exact=True)}
    approx = {(a, b) for a, b, _ in dupes.candidate_pairs(x, 0.95, exact=False)}
    assert planted <= exact
    assert len(planted & approx) >= 0.97 * len(planted)
    assert approx <= exact  # IVF only misses pairs, never invents them
    assert all(s >= 0.95 for _, _, s in dupes.candidate_pairs(x, 0.95, exact=False))
