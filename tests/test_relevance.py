"""The calibrated relevance floor on the shapes set: what the library holds passes it, what it does not hold
(a colour/shape it lacks, nonsense) falls under it; `query --relevant`, status, server JSON and the UI."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from imgsearch import synthetic

# The library holds red, blue and green circles and squares: no triangles, no yellow, white or purple.
PRESENT = ["a red circle", "a blue square", "a green circle", "a red square"]
ABSENT = ["a yellow triangle", "a white triangle", "a purple triangle", "asdf qwerty zxcv"]


def make_shapes(folder: Path) -> Path:
    synthetic.generate(folder, per_class=3, colors=["red", "blue", "green"], shapes=("circle", "square"), size=96,
                       fmt="png", seed=2, captions_file=None)
    return folder


@pytest.fixture()
def shapes(tmp_path) -> Path:
    return make_shapes(tmp_path / "shapes")


class Shared:
    """One library over the shapes, indexed (and its floor measured) once for the tests that only search it."""

    def __init__(self, settings, library, folder: Path):
        from conftest import Cli

        self.settings, self.lib, self.shapes = settings, library, folder
        self.cli = Cli(settings.home, settings.model)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_model):
    from imgsearch import Library
    from imgsearch.config import Settings

    root = tmp_path_factory.mktemp("relevance")
    settings = Settings(home=root / "home", model=f"local-dir:{tiny_model}", pretrained=None, device="cpu",
                        precision="fp32", workers=2, batch_size=16)
    folder = make_shapes(root / "shapes")
    with Library(settings=settings) as library:
        assert library.index(folder).new == 18
        yield Shared(settings, library, folder)


@pytest.fixture()
def lib(shared):
    return shared.lib


def kind(path: str) -> str:
    return "_".join(Path(path).stem.split("_")[:2])


def test_present_shapes_pass_the_floor_and_absent_ones_fall_under(lib):
    for text in PRESENT:
        hits = lib.search(text, k=3, relevance=True)
        assert hits[0].relevant is True, (text, hits[0])
        assert kind(hits[0].path) == text[2:].replace(" ", "_")
    for text in ABSENT:
        hits = lib.search(text, k=18, relevance=True)
        assert [h.relevant for h in hits] == [False] * 18, (text, hits[0].score)


def test_first_query_measures_the_floor_index_keeps_it_fresh_and_the_cold_path_uses_it(settings, tmp_path):
    from imgsearch import Library
    from imgsearch.store import Store

    def floor():
        store = Store(settings.db_path, create=False)
        try:
            return json.loads(store.get_meta("relevance:1") or "null")
        finally:
            store.close()

    first = tmp_path / "first"
    synthetic.generate(first, per_class=3, colors=["red", "blue"], shapes=("circle", "square"), size=96, fmt="png",
                       seed=3, captions_file=None)
    with Library(settings=settings) as lib:
        lib.index(first)
        assert floor() is None  # index never pays for encoding the captions
        assert lib.search("a blue square", k=1)[0].relevant is None  # not asked for
        assert lib.search("a blue square", k=1, relevance=True)[0].relevant is True
    assert floor()["vectors"] == 12
    more = tmp_path / "more"
    synthetic.generate(more, per_class=3, colors=["green"], shapes=("circle", "square"), size=96, fmt="png", seed=4,
                       captions_file=None)
    with Library(settings=settings) as lib:
        lib.index(more)
    assert floor()["vectors"] == 18  # re-measured from the kept caption vectors
    with Library(settings=settings) as lib:
        hits = lib.search("a green circle", k=2, relevance=True)  # a fresh Library: the stored floor
        assert [h.relevant for h in hits] == [True, True]
        assert [h.relevant for h in lib.search("a yellow triangle", k=3, relevance=True)] == [False] * 3
        assert lib.relevance_floor() == floor()
    # Without kept caption vectors, index leaves the floor as it was: re-measuring would mean encoding the
    # captions, which index never pays for (whichever text encoder the library has).
    store = Store(settings.db_path, create=False)
    try:
        store.set_meta("relevance-captions:1", "null")
    finally:
        store.close()
    third = tmp_path / "third"
    synthetic.generate(third, per_class=2, colors=["red"], shapes=("triangle",), size=96, fmt="png", seed=5,
                       captions_file=None)
    with Library(settings=settings) as lib:
        assert lib.index(third).new == 2
    assert floor()["vectors"] == 18
    with Library(settings=settings) as lib:  # a query encodes them again and measures
        assert lib.relevance_floor()["vectors"] == 20
    assert floor()["vectors"] == 20


def test_photos_replaced_without_changing_the_count_measure_the_floor_again(settings, tmp_path):
    """docs/cli.md: under 1,000 images `index` re-measures the floor after any change. Six blue squares replaced
    by six different shapes under the same names keep the count: the image floor measured on six near-identical
    squares (near 1) stayed, and judged the new red circles irrelevant to a red circle."""
    import random

    from imgsearch import Library

    folder = tmp_path / "six"
    synthetic.generate(folder, per_class=6, colors=["blue"], shapes=("square",), size=96, fmt="png", seed=6,
                       captions_file=None)
    probe = synthetic.draw_shape("red", "circle", 96, random.Random(79))
    with Library(settings=settings) as lib:
        lib.index(folder)
        assert [h.relevant for h in lib.search(image=probe, k=6, relevance=True)] == [False] * 6
        now = [("red", "circle"), ("red", "circle"), ("green", "triangle"), ("yellow", "square"),
               ("purple", "circle"), ("white", "triangle")]
        for i, (path, (color, shape)) in enumerate(zip(sorted(folder.iterdir()), now)):
            synthetic.draw_shape(color, shape, 96, random.Random(i)).save(path)
        assert lib.index(folder).updated == 6
    with Library(settings=settings) as lib:
        hits = lib.search(image=probe, k=6, relevance=True)
        assert [h.relevant for h in hits[:2]] == [True, True] and [h.relevant for h in hits[3:]] == [False] * 3
        assert {h.path for h in hits[:2]} == {str(p) for p in sorted(folder.iterdir())[:2]}


def test_image_queries_use_the_image_floor(lib, shared):
    import random

    probe = synthetic.draw_shape("red", "circle", 96, random.Random(77))  # a red circle the library lacks
    red = lib.search(image=probe, k=3, relevance=True)
    assert red[0].relevant is True and kind(red[0].path) == "red_circle"
    odd = lib.search(image=synthetic.draw_shape("yellow", "triangle", 96, random.Random(78)), k=3, relevance=True)
    assert [h.relevant for h in odd] == [False] * 3  # nothing in the library looks like it
    mixed = lib.search("a red circle", image=str(shared.shapes / "red_circle_001.png"), k=3, relevance=True)
    assert [h.relevant for h in mixed] == [None] * 3  # neither floor is calibrated for a mix


def test_a_query_steered_away_gets_no_verdict_rather_than_failing_its_best_hits(lib):
    """A --not term or an unliked image lowers every score: the text floor judged every square that "a blue square
    --not a circle" ranks first irrelevant. Such a query gets no verdict, as a mix does, and an album says so."""
    from imgsearch.errors import ParamError

    assert all(h.relevant for h in lib.search("a blue square", k=3, relevance=True))
    steered = lib.search("a blue square", not_text="a circle", k=6, relevance=True)
    assert {kind(h.path).split("_")[1] for h in steered} == {"square"}
    assert [h.relevant for h in steered] == [None] * 6
    circle = lib.search("a circle", k=1)[0].id
    assert {h.relevant for h in lib.search("a blue square", unlike=[circle], k=6, relevance=True)} == {None}
    with pytest.raises(ParamError, match="without --not terms or unliked photos"):
        lib.save_album("squares", "a blue square", not_text="a circle", relevance=True)


def test_query_relevant_keeps_good_hits_and_says_when_there_are_none(home, shared):
    cli = shared.cli
    r = cli("query", "a blue square", "--relevant", "-k", "18", "--json", "--no-server")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert rows and all(row["relevant"] for row in rows) and len(rows) < 18
    assert kind(rows[0]["path"]) == "blue_square" and "no good matches" not in r.stderr
    r = cli("query", "a yellow triangle", "--relevant", "-k", "4", "--no-server")
    assert r.exit_code == 0, r.output
    assert r.stderr.strip() == "no good matches; closest results:"
    assert len(r.stdout.splitlines()) == 1 + 4  # header + the 4 closest anyway
    plain = json.loads(cli("query", "a yellow triangle", "-k", "4", "--json", "--no-server").stdout)
    assert [row["relevant"] for row in plain] == [None] * 4  # only judged when asked


def test_an_image_query_in_a_one_image_library_says_why_it_has_no_floor(cli, shapes):
    one = shapes / "red_circle_000.png"
    assert cli("index", one).exit_code == 0
    r = cli("query", "--image", one, "--relevant", "--no-server")
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 1 + 1, r.output  # the image itself, shown anyway
    assert "the image floor is measured on pairs of images; index a second one" in r.stderr
    assert "mixed" not in r.stderr


def test_status_shows_the_floor_and_when_it_is_stale(cli, shapes):
    assert cli("index", shapes).exit_code == 0
    assert json.loads(cli("status", "--json").stdout)["models"][0]["relevance_floor"] is None
    assert cli("query", "a red circle", "--relevant", "--no-server").exit_code == 0  # measures it
    st = json.loads(cli("status", "--json").stdout)
    floor = st["models"][0]["relevance_floor"]
    assert floor["vectors"] == 18 and floor["stale"] is False
    assert f"relevance floor: text queries {floor['text']:.3f}, image queries {floor['image']:.3f}" \
        in cli("status").stdout
    assert cli("forget", shapes / "red_circle_000.png").exit_code == 0
    assert json.loads(cli("status", "--json").stdout)["models"][0]["relevance_floor"]["stale"] is True
    assert cli("query", "a red circle", "-k", "1", "--relevant", "--no-server").exit_code == 0  # re-measures it
    floor = json.loads(cli("status", "--json").stdout)["models"][0]["relevance_floor"]
    assert floor["vectors"] == 17 and floor["stale"] is False


def test_server_hits_carry_relevance(home, shared, monkeypatch):
    import urllib.error
    import urllib.request

    from imgsearch.server import SearchServer

    settings, lib, cli = shared.settings, shared.lib, shared.cli
    srv = SearchServer(settings, "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        host, port = srv.address
        out = {}
        for q in ("q=a+green+circle&relevance=1", "q=a+white+triangle&relevance=true", "q=a+green+circle"):
            req = urllib.request.Request(f"http://{host}:{port}/api/search?{q}&k=2",
                                         headers={"Authorization": f"Bearer {srv.token}"})
            with urllib.request.urlopen(req, timeout=30) as r:
                out[q] = [h["relevant"] for h in json.loads(r.read())["hits"]]
        req = urllib.request.Request(f"http://{host}:{port}/api/search", method="POST",
                                     data=json.dumps({"texts": ["a red square"], "k": 1, "relevance": "yes"}).encode(),
                                     headers={"Authorization": f"Bearer {srv.token}",
                                              "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as bad:
            urllib.request.urlopen(req, timeout=30)
        assert bad.value.code == 400
        assert json.loads(bad.value.read()) == {"error": "relevance: must be true or false", "field": "relevance"}
        with monkeypatch.context() as m:  # `query --relevant` asks the running server
            m.setattr(type(lib), "search", lambda *a, **kw: pytest.fail("answered in-process"))
            r = cli("query", "a white triangle", "--relevant", "-k", "2", "--json")
        assert r.exit_code == 0 and r.stderr.strip() == "no good matches; closest results:"
        assert [row["relevant"] for row in json.loads(r.stdout)] == [False, False]
    finally:
        srv.shutdown()
        t.join(10)
    assert out == {"q=a+green+circle&relevance=1": [True, True], "q=a+white+triangle&relevance=true": [False, False],
                   "q=a+green+circle": [None, None]}  # judged only when asked: same answer as in-process


def test_ui_says_no_good_matches_when_the_best_is_under_the_floor(home, shared, monkeypatch):
    from streamlit.testing.v1 import AppTest

    settings = shared.settings
    for var, value in (("IMGSEARCH_HOME", settings.home), ("IMGSEARCH_MODEL", settings.model),
                       ("IMGSEARCH_DEVICE", "cpu"), ("IMGSEARCH_PRECISION", "fp32")):
        monkeypatch.setenv(var, str(value))
    app = str(Path(__file__).resolve().parents[1] / "ui" / "app.py")
    shown = {}
    for q in ("a white triangle", "a red circle"):
        at = AppTest.from_file(app, default_timeout=60)
        at.query_params["q"] = q
        at.run()
        assert not at.exception, at.exception
        shown[q] = "\n".join(str(e.value) for e in at.info)
    assert "No good matches; closest results" in shown["a white triangle"]
    assert "No good matches" not in shown["a red circle"]
