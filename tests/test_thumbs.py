"""Thumbnails: made once, cached under the library home, only ever of library images chosen by id."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from PIL import Image

import imgsearch.synthetic as synthetic
from imgsearch import thumbs
from imgsearch.errors import DataError, UsageError


@pytest.fixture()
def indexed(settings, tmp_path):
    """A small indexed library: {file name: image id}."""
    from imgsearch.indexer import index_paths
    from imgsearch.store import Store

    photos = tmp_path / "pics"
    synthetic.generate(photos, per_class=1, colors=["red", "blue"], shapes=("circle",), size=300, fmt="jpg",
                       seed=2, captions_file=None)
    index_paths(settings, [photos])
    store = Store(settings.db_path, create=False)
    try:
        ids = {r.name: r.id for r in store.images_under([str(photos)]).values()}
    finally:
        store.close()
    assert len(ids) == 2
    return ids, photos


def test_thumbnail_is_made_once_and_reused(settings, indexed, monkeypatch):
    ids, _ = indexed
    path = thumbs.thumbnail(settings, ids["red_circle_000.jpg"])
    assert path.is_file() and settings.thumbs_dir in path.parents
    with Image.open(path) as im:
        assert max(im.size) == thumbs.THUMB and im.format == "JPEG"
    mtime = path.stat().st_mtime_ns

    def no_decoding(*a, **k):
        raise AssertionError("a cached thumbnail was decoded again")

    monkeypatch.setattr(thumbs.images, "open_image", no_decoding)
    assert thumbs.thumbnail(settings, str(ids["red_circle_000.jpg"])) == path
    assert thumbs.thumbnails(settings, [ids["red_circle_000.jpg"]])[ids["red_circle_000.jpg"]] == path
    assert path.stat().st_mtime_ns == mtime
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # no temp files left behind


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "1/../2", "1.0", "-1", "0", "0x1", "１",
                                 "", "1; DROP TABLE images", True, None, 2 ** 70])
def test_only_ids_are_accepted(settings, bad):
    with pytest.raises(UsageError, match="not an image id"):
        thumbs.thumbnail(settings, bad)
    assert not settings.thumbs_dir.exists()  # nothing read, nothing written


def test_ids_outside_the_library_and_odd_sizes_are_refused(settings, indexed):
    ids, _ = indexed
    with pytest.raises(UsageError, match="image id 99999 is not in the library"):
        thumbs.thumbnail(settings, 99999)
    with pytest.raises(UsageError, match="thumbnail size must be one of 256, 1024"):
        thumbs.thumbnail(settings, ids["red_circle_000.jpg"], size=4096)
    result = thumbs.thumbnails(settings, [ids["blue_circle_000.jpg"], 99999])
    assert result[ids["blue_circle_000.jpg"]].is_file()
    assert isinstance(result[99999], UsageError)


def test_cache_file_name_holds_no_part_of_the_image_path(settings, tmp_path):
    from imgsearch.store import ImageRow

    row = ImageRow(7, str(tmp_path / ".." / ".." / "etc" / "passwd"), 1, 1, "ab12" * 8)
    path = thumbs.cache_path(settings, row, thumbs.THUMB)
    assert path == settings.thumbs_dir / "256" / "07" / f"7-{'ab12' * 8}.jpg"


def test_changed_photo_gets_a_new_thumbnail(settings, indexed):
    from imgsearch.indexer import index_paths

    ids, photos = indexed
    image_id = ids["red_circle_000.jpg"]
    old = thumbs.thumbnail(settings, image_id)
    # A fixed seed: an unseeded background can be reddish enough to fail the colour check below.
    synthetic.draw_shape("blue", "square", 300, random.Random(0)).save(photos / "red_circle_000.jpg", "JPEG")
    index_paths(settings, [photos])
    new = thumbs.thumbnail(settings, image_id)
    assert new != old and new.is_file() and not old.exists()  # the stale one is removed
    from PIL import ImageStat

    with Image.open(new) as im:
        r, g, b = ImageStat.Stat(im.convert("RGB")).mean
    assert b > r + 20  # shows the new (blue) content, not the old red one


def test_missing_file_is_a_clear_error(settings, indexed):
    ids, photos = indexed
    os.unlink(photos / "blue_circle_000.jpg")
    with pytest.raises(DataError, match="no longer on disk"):
        thumbs.thumbnail(settings, ids["blue_circle_000.jpg"], size=thumbs.PREVIEW)


def test_a_library_the_user_cannot_write_still_has_thumbnails(settings, indexed):
    """On read-only media (or a home the user may only read) thumbnails were a DataError, so the web page showed
    no pictures: they are made in a private temporary folder imgsearch owns, reused, never written into the
    library, and that folder is gone when the program ends."""
    import json
    import sys

    from test_hostile_robustness import _read_only_possible, _run_read_only, _snapshot

    if not _read_only_possible():  # root without mount namespaces: chmod would prove nothing
        pytest.skip("running as root without permission to make a read-only bind mount")
    ids, _ = indexed
    wanted = sorted(ids.values())
    before = _snapshot(settings.home)
    script = ("import json, sys\nfrom PIL import Image\nimport imgsearch\n"
              "lib = imgsearch.Library(sys.argv[1])\nseen = {}\n"
              "for i, p in lib.thumbnails(sys.argv[2:]).items():\n"
              "    with Image.open(p) as im:\n        seen[i] = (str(p), im.format, max(im.size))\n"
              "print(json.dumps([seen, str(lib.thumbnail(sys.argv[2])), lib.status().read_only]))\n")
    r = _run_read_only(settings.home, [sys.executable, "-c", script, str(settings.home), *map(str, wanted)])
    assert r.returncode == 0, r.stderr
    seen, again, read_only = json.loads(r.stdout)
    assert read_only and sorted(map(int, seen)) == wanted
    for path, fmt, longest in seen.values():
        assert fmt == "JPEG" and longest == thumbs.THUMB and settings.home not in Path(path).parents
    assert again == seen[str(wanted[0])][0]  # made once, then reused
    assert not Path(again).parent.exists()  # removed at exit
    assert _snapshot(settings.home) == before and not settings.thumbs_dir.exists()
