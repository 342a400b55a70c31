"""Refine by example: results marked good (like) and bad (unlike) move the query (search.rocchio), through
every door, and a mark that is not in the library is refused with its id or path named."""

from __future__ import annotations

import json
import random
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

import imgsearch.synthetic as synthetic


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, tiny_model):
    """126 shapes (red, green, blue x circle, square, triangle, 14 each), indexed; (settings, photos)."""
    from imgsearch.config import Settings
    from imgsearch.indexer import index_paths

    root = tmp_path_factory.mktemp("refine")
    photos = root / "photos"
    synthetic.generate(photos, per_class=14, colors=["red", "green", "blue"], size=64, seed=3, captions_file=None)
    settings = Settings(home=root / "home", model=f"local-dir:{tiny_model}", pretrained=None, device="cpu",
                        precision="fp32", workers=2)
    assert index_paths(settings, [photos]).new == 126
    return settings, photos


@pytest.fixture()
def lib(shapes):
    from imgsearch import Library

    with Library(settings=shapes[0]) as lib:
        yield lib


def name(hit) -> str:
    return Path(hit.path).name


def marks(lib, query: str, good: str, bad: str, n: int = 2):
    """What a user would mark among the shown results: the first n of the shape wanted and of another."""
    shown = lib.search(query, k=40)
    return ([h.id for h in shown if name(h).startswith(good)][:n], [h.id for h in shown if name(h).startswith(bad)][:n])


def precision_at_10(hits, prefix: str) -> float:
    return sum(name(h).startswith(prefix) for h in hits[:10]) / 10


def test_marks_raise_precision_for_the_shape_meant(lib, shapes):
    liked, unliked = marks(lib, "red", "red_circle", "red_square")
    assert len(liked) == 2 and len(unliked) == 2
    marked = liked + unliked  # left out of both rankings: only new finds count
    before = lib.search("red", k=10, exclude_ids=marked)
    after = lib.search("red", k=10, exclude_ids=marked, like=liked, unlike=unliked)
    p0, p1 = precision_at_10(before, "red_circle"), precision_at_10(after, "red_circle")
    assert p1 >= p0 + 0.4, (p0, p1, [name(h) for h in after])
    assert all(name(h).startswith("red_") for h in after)  # still the colour asked for
    # the same marks given as paths of the library's files rank the same
    by_path = lib.search("red", k=10, exclude_ids=marked, like=[lib.image(i).path for i in liked],
                         unlike=[Path(lib.image(i).path) for i in unliked])
    assert [h.id for h in by_path] == [h.id for h in after]


def test_likes_alone_find_images_like_them(lib):
    liked, _ = marks(lib, "blue", "blue_triangle", "blue_circle")
    hits = lib.search(like=liked, k=5, exclude_ids=liked)
    assert [h.id for h in hits] == [h.id for h in lib.search(ids=liked, k=5, exclude_ids=liked)]  # "more like these"
    assert all(name(h).startswith("blue_") for h in hits) and name(hits[0]).startswith("blue_triangle")


def test_unknown_marks_are_named_in_the_python_api(lib, shapes, tmp_path):
    from imgsearch.errors import ParamError

    with pytest.raises(ParamError) as e:
        lib.search("red", like=[999999])
    assert e.value.param == "like" and "image id 999999 is not in the library" in str(e.value)
    outside = tmp_path / "not-indexed.png"
    synthetic.draw_shape("red", "circle", 64, random.Random(6)).save(outside)
    with pytest.raises(ParamError) as e:
        lib.search("red", unlike=[str(outside)])
    assert e.value.param == "unlike" and f"{outside} is not in the library" in str(e.value)
    with pytest.raises(ParamError, match="like: 'x' is not an image id|like: give an image id"):
        lib.search("red", like=[""])


def test_unknown_marks_at_the_command_line(shapes, tmp_path):
    from typer.testing import CliRunner

    from imgsearch.cli import app

    settings, photos = shapes
    pre = ["--home", str(settings.home), "--model", settings.model, "--device", "cpu", "--precision", "fp32"]
    runner = CliRunner()
    first = sorted(photos.glob("red_circle_*"))[0]
    ok = runner.invoke(app, pre + ["query", "red", "--like", str(first), "--unlike", "1", "--no-server", "--json"])
    assert ok.exit_code == 0, ok.output
    assert len(json.loads(ok.stdout)) == 10
    bad = runner.invoke(app, pre + ["query", "red", "--like", "999999", "--no-server"])
    assert bad.exit_code == 2
    assert bad.stderr.strip().splitlines() == ["error: --like 999999: image id 999999 is not in the library (or has "
                                               "no vector for this model)"]
    missing = tmp_path / "nope.png"
    bad = runner.invoke(app, pre + ["query", "red", "--unlike", str(missing), "--no-server"])
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert f"{missing} is not in the library" in bad.stderr and "Traceback" not in bad.output


def test_a_photo_both_liked_and_unliked_is_refused_at_every_door(lib, shapes):
    """Opposite marks on one photo cancelled in part (2 toward it, 1 away) without a word: which was meant?"""
    from typer.testing import CliRunner

    from imgsearch.cli import app
    from imgsearch.errors import ParamError

    settings, photos = shapes
    liked, unliked = marks(lib, "red", "red_circle", "red_square")
    first = sorted(photos.glob("red_circle_*"))[0]
    first_id = lib.search(like=[str(first)], k=1)[0].id
    for like, unlike, named in ((liked, [unliked[0], liked[1]], f"image id {liked[1]}"),
                                ([first_id], [str(first)], str(first))):  # one photo's id and path
        with pytest.raises(ParamError) as e:
            lib.search("red", like=like, unlike=unlike)
        assert e.value.param == "unlike" and f"{named} is marked both liked and unliked" in str(e.value)
    pre = ["--home", str(settings.home), "--model", settings.model, "--device", "cpu", "--precision", "fp32"]
    bad = CliRunner().invoke(app, pre + ["query", "red", "--like", str(liked[0]), "--unlike", str(liked[0]),
                                         "--no-server"])
    assert bad.exit_code == 2 and bad.stderr.strip().splitlines() == [
        f"error: --unlike {liked[0]}: image id {liked[0]} is marked both liked and unliked; keep one of "
        "the marks"]
    with pytest.raises(ParamError, match="both liked and unliked"):
        lib.save_album("both", "red", like=liked, unlike=liked[:1])
    assert lib.albums() == []


def test_marks_through_the_server(shapes):
    from imgsearch.server import SearchServer

    settings, photos = shapes
    srv = SearchServer(settings, "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    host, port = srv.address

    def call(path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {srv.token}", "Content-Type": "application/json"}
        req = urllib.request.Request(f"http://{host}:{port}{path}", data=data, headers=headers,
                                     method="POST" if data else "GET")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        from imgsearch import Library

        with Library(settings=settings) as lib:
            liked, unliked = marks(lib, "red", "red_circle", "red_square")
            want = [h.id for h in lib.search("red", like=liked, unlike=unliked)]
        ids = ",".join(map(str, liked))
        code, res = call(f"/api/search?q=red&like={ids}&unlike={unliked[0]}&unlike={unliked[1]}")
        assert code == 200 and [h["id"] for h in res["hits"]] == want
        code, res = call("/api/search", {"texts": ["red"], "like": liked, "unlike": unliked})
        assert code == 200 and [h["id"] for h in res["hits"]] == want
        code, res = call("/api/search?q=red&like=999999")
        assert code == 400 and res["field"] == "like" and "image id 999999 is not in the library" in res["error"]
        gone = str(photos / "nowhere.png")
        code, res = call("/api/search", {"texts": ["red"], "unlike": [gone]})
        assert code == 400 and res["field"] == "unlike" and f"{gone} is not in the library" in res["error"]
        code, res = call("/api/search", {"texts": ["red"], "like": {"id": 1}})
        assert code == 400 and res["field"] == "like"
        code, res = call(f"/api/search?q=red&like={ids}&unlike={liked[0]}")
        assert code == 400 and res["field"] == "unlike" and "marked both liked and unliked" in res["error"]
    finally:
        srv.shutdown()
        t.join(10)


def test_marks_survive_the_trip_to_the_server_and_the_url():
    from imgsearch.request import SearchRequest

    r = SearchRequest.build("red", like=[3, "12", "/p/a,b.jpg"], unlike=[7])
    assert r.like == (3, 12, "/p/a,b.jpg") and r.unlike == (7,)
    assert SearchRequest.from_json(json.loads(json.dumps(r.to_json()))) == r
    url = SearchRequest.from_params(urllib.parse.parse_qs("q=red&like=3,12&like=/p/a,b.jpg&unlike=7"))
    assert url.like == r.like and url.unlike == r.unlike
