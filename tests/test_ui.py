"""The Streamlit page, driven in-process with Streamlit's AppTest (no browser, no server)."""

from __future__ import annotations

import io
import json
import os
import re
import time
from pathlib import Path

import pytest

import imgsearch.synthetic as synthetic

APP = str(Path(__file__).resolve().parents[1] / "ui" / "app.py")


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_model):
    """A library of 54 shapes, one folder per colour x shape (e.g. photos/red_circle/red_circle_000.jpg)."""
    from imgsearch.config import Settings
    from imgsearch.indexer import index_paths

    root = tmp_path_factory.mktemp("ui-lib")
    photos = root / "photos"
    synthetic.generate(photos, per_class=3, size=96, fmt="jpg", seed=1, captions_file=None, subfolders=True)
    settings = Settings(home=root / "home", model=f"local-dir:{tiny_model}", pretrained=None, device="cpu",
                        precision="fp32", workers=2)
    report = index_paths(settings, [photos])
    assert report.new == 54
    return settings, photos


def use_home(monkeypatch, home: Path, model: str) -> None:
    for var in list(os.environ):
        if var.startswith("IMGSEARCH_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("IMGSEARCH_HOME", str(home))
    monkeypatch.setenv("IMGSEARCH_MODEL", model)
    monkeypatch.setenv("IMGSEARCH_DEVICE", "cpu")
    monkeypatch.setenv("IMGSEARCH_PRECISION", "fp32")
    monkeypatch.setenv("IMGSEARCH_WORKERS", "2")


@pytest.fixture()
def page(library, monkeypatch):
    """An AppTest over the shapes library; set query_params, then .run()."""
    from streamlit.testing.v1 import AppTest

    settings, _ = library
    use_home(monkeypatch, settings.home, settings.model)
    return AppTest.from_file(APP, default_timeout=60)


def open_url(at, **params):
    for k, v in params.items():
        at.query_params[k] = str(v)
    at.run()
    assert not at.exception, at.exception
    return at


def captions(at) -> list[str]:
    """Image captions as shown (the page escapes every punctuation mark for Markdown)."""
    return [c.replace("\\", "") for img in at.image for c in img.captions if c]


def result_names(at) -> list[str]:
    """File names of the results grid, best first ('0.845 · red_circle_001.jpg' -> 'red_circle_001.jpg')."""
    return [c.split(" · ", 1)[1] for c in captions(at) if " · " in c]


def texts(elements) -> str:
    """The text of some elements, with the page's Markdown escapes removed."""
    return "\n".join(str(e.value) for e in elements).replace("\\", "")


def test_text_search_ranks_red_circles_first(page):
    at = open_url(page, q="a red circle")
    names = result_names(at)
    assert len(names) == 20  # the default number of results
    assert names[0].startswith("red_circle")
    assert all(n.startswith("red_") for n in names[:3]), names[:5]
    assert "20 results for “a red circle”" in texts(at.caption)
    assert not at.error and not at.warning
    # scores shown with each thumbnail, best first
    scores = [float(c.split(" · ")[0]) for c in captions(at)]
    assert scores == sorted(scores, reverse=True)


def test_form_puts_the_search_in_the_url(page):
    at = open_url(page)
    assert not captions(at)
    at.text_input(key="w_q").input("a blue square")
    at.number_input(key="w_k").set_value(5)
    at.button(key="FormSubmitter:search-Search").click().run()
    assert not at.exception
    assert at.query_params == {"q": "a blue square", "k": "5"}
    names = result_names(at)
    assert len(names) == 5 and names[0].startswith("blue_square")


def test_more_like_this_and_details(page, library):
    _, photos = library
    at = open_url(page, q="a red circle")
    first = result_names(at)[0]
    like_button = next(b for b in at.button if b.key and b.key.startswith("hit-like-"))
    image_id = like_button.key.rsplit("-", 1)[1]
    like_button.click().run()
    assert not at.exception
    assert at.query_params == {"like": image_id}  # text dropped: this is a search by that image
    assert f"images like {first}" in texts(at.caption)
    names = result_names(at)
    assert first not in names  # the example itself is not repeated as a result
    assert names[0].startswith("red_circle")

    next(b for b in at.button if b.key and b.key.startswith("hit-view-")).click().run()
    assert not at.exception
    assert "view" in at.query_params
    details = texts(at.markdown)
    assert "**Dimensions** 96 × 96 px" in details
    assert re.search(r"\*\*Taken\*\* \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(file date: no EXIF date\)", details)
    assert "**Similar images**" in details
    assert any(str(photos) in c.value for c in at.code)  # the full path of the file
    at.button(key="detail-close").click().run()
    assert "view" not in at.query_params and "**Similar images**" not in texts(at.markdown)


def test_empty_library_says_how_to_start(tmp_path, monkeypatch, model_id):
    from streamlit.testing.v1 import AppTest

    use_home(monkeypatch, tmp_path / "empty-home", model_id)
    at = AppTest.from_file(APP, default_timeout=60)
    open_url(at, q="a red circle")
    assert "No library yet" in texts(at.sidebar.info)
    assert "library is empty" in texts(at.info)
    assert not captions(at) and not at.error
    assert not (tmp_path / "empty-home").exists()  # looking does not create a library


def test_no_results_above_min_score(page):
    at = open_url(page, q="a red circle", min="0.999")
    assert not captions(at)
    assert "No results for “a red circle” with score ≥ 0.999" in texts(at.info)
    assert at.number_input(key="w_min").value == pytest.approx(0.999)


def test_bad_query_string_is_refused_as_at_every_door(page):
    """The page's URL becomes the same SearchRequest as the server's: the same refusal, naming the field."""
    cases = [(dict(k="lots"), "Results lots: give a whole number from 1 to 10000"),
             (dict(min="7"), "Minimum score 7: give a cosine score between -1 and 1, such as 0.25"),
             (dict(like="../../etc/passwd"), "Liked images ../../etc/passwd: give image ids, as in like=12,31"),
             (dict(under="\x00"), "contains a NUL character; remove it"),
             # only an address can carry these (the form's fields stop at 1000): named as the form names them
             (dict(q="a" * 1001), "Search for: is longer than 1000 characters; shorten it"),
             ({"not": "b" * 1001}, "But not: is longer than 1000 characters; shorten it")]
    for params, message in cases:
        for key in list(page.query_params):
            del page.query_params[key]
        at = open_url(page, **{"q": "a red circle", **params})
        assert message in texts(at.error), (params, texts(at.error))
        assert not captions(at) and "Internal error" not in texts(at.error)
    for key in list(page.query_params):
        del page.query_params[key]
    # 3000 marks in an address: one short line, not the 14 kB value repeated back
    at = open_url(page, q="a red circle", like=",".join(str(i) for i in range(1, 3001)))
    assert [texts(at.error)] == ["Liked images 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16…993,2994,2995,2996,2997,"
                                 "2998,2999,3000: at most 1000 marked images"]
    del page.query_params["like"]
    at = open_url(page, q="a red circle", view="/etc/passwd")  # the page's own view= is only ignored
    assert "view=: not an image id: '/etc/passwd'" in texts(at.warning)
    assert len(result_names(at)) == 20 and result_names(at)[0].startswith("red_circle")


def test_query_text_is_shown_literally(page):
    at = open_url(page, q="**a red circle** $x$ [link](javascript:alert(1))")
    shown = [c.value for c in at.caption if "results for" in c.value][0]
    assert r"“\*\*a red circle\*\* \$x\$ \[link\]\(javascript\:alert\(1\)\)”" in shown  # no bold, math or link


def test_unknown_image_id_in_url(page):
    at = open_url(page, like="999999")
    assert "image id 999999 is not in the library" in texts(at.error)
    assert not captions(at)


def test_folder_filter(page, library):
    _, photos = library
    at = open_url(page, q="a red circle", under=str(photos / "blue_square"))
    names = result_names(at)
    assert len(names) == 3 and all(n.startswith("blue_square") for n in names)
    at = open_url(page, q="a red circle", under=str(photos / "nowhere"))
    assert "no such folder" in texts(at.error)
    assert not captions(at)


def _png(color="red", shape="circle") -> bytes:
    import random

    buf = io.BytesIO()
    synthetic.draw_shape(color, shape, 96, random.Random(5)).save(buf, "PNG")
    return buf.getvalue()


def test_upload_search_and_bad_uploads(page):
    at = open_url(page)
    at.file_uploader(key="w_upload").set_value(("mine.png", _png("green", "triangle"), "image/png"))
    at.button(key="FormSubmitter:search-Search").click().run()
    assert not at.exception and not at.error
    assert "images like the uploaded mine.png" in texts(at.caption)
    assert result_names(at)[0].startswith("green_triangle")

    at.file_uploader(key="w_upload").set_value(("broken.jpg", b"this is not a jpeg", "image/jpeg"))
    at.button(key="FormSubmitter:search-Search").click().run()
    assert not at.exception
    assert "cannot use the uploaded file broken.jpg" in texts(at.error)
    assert not captions(at)

    at.file_uploader(key="w_upload").set_value(("huge.png", b"\0" * (21 * 1024 * 1024), "image/png"))
    at.button(key="FormSubmitter:search-Search").click().run()
    assert not at.exception
    assert "query images can be at most 20 MB" in texts(at.error)


def test_marking_a_result_of_an_upload_search_refines_it(page):
    """A 👍 on a result of an uploaded-image search was shown as a "more like this" of the marked photo
    (its header, no "Refined by", no Clear marks), though the upload still took part in the search; and
    Save as album asked for a name only to refuse the upload with a message about paths and bytes."""
    at = open_url(page)
    at.file_uploader(key="w_upload").set_value(("mine.png", _png("green", "triangle"), "image/png"))
    at.button(key="FormSubmitter:search-Search").click().run()
    marked = next(b for b in at.button if b.key and b.key.startswith("hit-up-")).key.rsplit("-", 1)[1]
    at.button(key=f"hit-up-{marked}").click().run()
    assert not at.exception and not at.error
    assert at.query_params == {"like": marked}
    assert "images like the uploaded mine.png" in texts(at.caption)
    assert "Refined by 👍 1 · 👎 0" in texts(at.markdown) and at.button(key="marks-clear")
    assert not [b for b in at.button if b.key == "example-view"]  # no "Images like <the marked photo>" header
    assert at.button(key=f"hit-up-{marked}").proto.type == "primary"  # the marked photo stays, pressed
    assert not [t for t in at.text_input if t.key == "w_album_name"]
    assert "the uploaded mine.png is not a file in the library" in texts(at.caption)


def test_index_a_folder_from_the_page(tmp_path, monkeypatch, model_id):
    from streamlit.testing.v1 import AppTest

    photos = tmp_path / "pics"
    synthetic.generate(photos, per_class=1, colors=["red", "blue"], size=64, fmt="png", seed=3, captions_file=None)
    (photos / "broken.jpg").write_bytes(b"not an image")
    use_home(monkeypatch, tmp_path / "home", model_id)
    at = AppTest.from_file(APP, default_timeout=60)
    open_url(at)
    at.text_input(key="w_index").input(str(tmp_path / "missing"))
    at.button(key="FormSubmitter:index-form-Index").click().run()
    assert f"No such folder: {tmp_path / 'missing'}" in texts(at.sidebar.error)

    def index(folder) -> str:
        """Index ``folder`` from the sidebar; what the sidebar says when the run has finished."""
        at.text_input(key="w_index").input(str(folder))
        at.button(key="FormSubmitter:index-form-Index").click().run()
        assert not at.exception
        deadline = time.time() + 60
        while not (at.sidebar.success or at.sidebar.warning) and time.time() < deadline:
            time.sleep(0.3)
            at.run()  # a browser would be re-polled by the progress fragment
        assert not at.exception
        return texts(at.sidebar.success) + texts(at.sidebar.warning)

    # the wrong folder (its photos in a hidden one): said so, not an all-zero report alone, as `index` does
    hidden = tmp_path / "albums"
    synthetic.generate(hidden / ".thumbs", per_class=1, colors=["red"], shapes=["circle"], size=64,
                       captions_file=None)
    assert index(hidden) == (f"Indexed {hidden}: no images found there (hidden folders and imgsearch libraries "
                             "are skipped)")
    assert f"Indexed {photos}: 6 new, 0 updated, 0 removed, 1 failed" in index(photos)
    at.run()  # the status panel refreshes after a run finishes
    assert "**Images** 6" in texts(at.sidebar.markdown)
    open_url(at, q="a blue square")
    assert result_names(at)[0] == "blue_square_000.png"


def test_unknown_detail_id_still_shows_results(page):
    at = open_url(page, q="a red circle", view="424242")
    assert "image id 424242 is not in the library" in texts(at.error)
    assert result_names(at)[0].startswith("red_circle")


def test_library_made_with_another_model(library, monkeypatch, random_tiny_model):
    from streamlit.testing.v1 import AppTest

    settings, _ = library
    use_home(monkeypatch, settings.home, f"local-dir:{random_tiny_model}")
    at = AppTest.from_file(APP, default_timeout=60)
    open_url(at, q="a red circle")
    assert "the library has no vectors for" in texts(at.error)
    assert "no vectors for this model yet" in texts(at.sidebar.caption)
    assert "Also in the library:" in texts(at.sidebar.caption) and "(54 vectors)" in texts(at.sidebar.caption)


# --- `imgsearch ui` --------------------------------------------------------------------------------------
class FakeExec:
    """Stands in for os.execve: records how Streamlit would have been started."""

    calls: list = []

    def __call__(self, path, argv, env):
        FakeExec.calls.append((argv, env))


def test_ui_command_passes_the_library_settings(cli, home, model_id, monkeypatch):
    import imgsearch.commands.ui as ui_cmd
    from imgsearch.config import Settings

    FakeExec.calls = []
    monkeypatch.setattr(ui_cmd.os, "execve", FakeExec())
    r = cli("ui", "--port", "8599")
    assert r.exit_code == 0, r.output
    assert "at http://127.0.0.1:8599/" in r.stderr
    (argv, env), = FakeExec.calls
    assert argv[1:3] == ["-c", ui_cmd.LAUNCH]
    spec = json.loads(argv[3])
    # `imgsearch ui` runs the page shipped inside the package (ui/app.py is the checkout's shim to it).
    assert spec["app"] == str(Path(APP).parents[1] / "imgsearch" / "ui" / "app.py")
    opts = spec["config"]
    assert opts["server.address"] == "127.0.0.1" and opts["server.port"] == 8599
    assert opts["server.headless"] is True and opts["browser.gatherUsageStats"] is False
    assert opts["server.maxUploadSize"] == 20
    # The app rebuilds exactly the CLI's settings from the environment it is given.
    monkeypatch.setattr(os, "environ", env)
    rebuilt = Settings.from_env()
    assert rebuilt == Settings.from_env(home=home.resolve(), model=model_id, device="cpu", precision="fp32")
    assert rebuilt.home == home.resolve() and rebuilt.model == model_id and rebuilt.pretrained is None


def test_ui_command_keeps_the_pretrained_tag(cli, home, monkeypatch):
    import imgsearch.commands.ui as ui_cmd
    from imgsearch.config import DEFAULT_MODEL, DEFAULT_PRETRAINED, Settings

    FakeExec.calls = []
    monkeypatch.setattr(ui_cmd.os, "execve", FakeExec())
    r = cli("--pretrained", "openai", "ui", "--host", "0.0.0.0", "--port", "8598", model="ViT-B-16")
    assert r.exit_code == 0, r.output
    assert "warning: listening beyond this machine" in r.stderr
    r = cli("ui", "--port", "8597", model=None)  # the default model and its default weights
    assert r.exit_code == 0, r.output
    (argv, env), (_, default_env) = FakeExec.calls
    assert json.loads(argv[3])["config"]["server.address"] == "0.0.0.0"
    monkeypatch.setattr(os, "environ", env)
    assert (Settings.from_env().model, Settings.from_env().pretrained) == ("ViT-B-16", "openai")
    monkeypatch.setattr(os, "environ", default_env)
    assert (Settings.from_env().model, Settings.from_env().pretrained) == (DEFAULT_MODEL, DEFAULT_PRETRAINED)


def test_ui_command_port_in_use(cli):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = cli("ui", "--port", str(port))
    assert r.exit_code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr and "pick another --port" in r.stderr


def test_marks_refine_the_search_and_live_in_the_url(page, library):
    from imgsearch import Library

    at = open_url(page, q="red", k="12")
    names = result_names(at)
    ids = {n: b.key.rsplit("-", 1)[1] for n, b in zip(names, [b for b in at.button if b.key.startswith("hit-up-")])}
    good = next(i for n, i in ids.items() if n.startswith("red_circle"))
    bad = next(i for n, i in ids.items() if n.startswith("red_square"))
    at.button(key=f"hit-up-{good}").click().run()
    at.button(key=f"hit-down-{bad}").click().run()
    assert not at.exception and not at.error
    assert at.query_params == {"q": "red", "k": "12", "like": good, "unlike": bad}  # a shareable refined search
    assert "Refined by 👍 1 · 👎 1" in texts(at.markdown)
    assert at.button(key=f"hit-up-{good}").proto.type == "primary"  # shown pressed
    settings, _ = library
    with Library(settings=settings) as lib:
        want = [h.path for h in lib.search("red", k=12, like=[int(good)], unlike=[int(bad)])]
    assert result_names(at) == [os.path.basename(p) for p in want]  # the page ranks as the engine does
    at.button(key=f"hit-down-{good}").click().run()  # 👎 on a liked image moves it
    assert at.query_params == {"q": "red", "k": "12", "unlike": f"{bad},{good}"}
    at.button(key="marks-clear").click().run()
    assert at.query_params == {"q": "red", "k": "12"} and "Refined by" not in texts(at.markdown)


def test_unknown_marks_in_the_url(page):
    at = open_url(page, q="red", like="999999")
    assert "Liked images 999999: image id 999999 is not in the library" in texts(at.error)
    assert not captions(at)
    # a marked photo since removed from the library (or a link from another one): Search keeps the marks, so
    # the page offered no way out but editing the address
    at.button(key="marks-clear").click().run()
    assert at.query_params == {"q": "red"} and not at.error and result_names(at)
    at = open_url(page, unlike="/etc/passwd")  # the page marks by id only: no file name is echoed back
    assert "Unliked images /etc/passwd: give image ids, as in unlike=12,31" in texts(at.error)


def test_refined_search_saved_as_album_and_the_albums_page(page, library, tmp_path):
    at = open_url(page, q="a red circle", k="6")
    first = next(b for b in at.button if b.key.startswith("hit-up-")).key.rsplit("-", 1)[1]
    at.button(key=f"hit-up-{first}").click().run()
    shown = result_names(at)
    at.text_input(key="w_album_name").input("reds")
    at.button(key="FormSubmitter:save-album-Save").click().run()
    assert not at.exception and "Saved album reds (6 photos)" in texts(at.success)

    at.query_params.clear()  # a new address
    at = open_url(page, page="albums")
    at.button(key="album-open-reds").click().run()
    assert "Album: reds" in texts(at.header)
    assert f"--like {first}" in texts(at.caption)  # the marks are part of the saved search
    assert result_names(at) == shown  # the album holds what the refined search showed

    at.text_input(key="w_album_rename").input("red ones")
    at.button(key="FormSubmitter:album-rename-Rename").click().run()
    assert at.query_params["album"] == "red ones" and "Album: red ones" in texts(at.header)
    out = tmp_path / "export"
    at.text_input(key="w_album_export").input(str(out))
    at.button(key="FormSubmitter:album-export-Export").click().run()
    assert f"Exported 6 photos to {out}" in texts(at.success)
    assert sorted(p.name for p in out.iterdir()) == sorted(shown)
    at.button(key="FormSubmitter:album-delete-Delete").click().run()
    assert "Tick the box" in texts(at.warning)  # nothing deleted without it
    at.checkbox(key="w_album_sure").check()
    at.button(key="FormSubmitter:album-delete-Delete").click().run()
    assert at.query_params == {"page": "albums"} and "No albums yet" in texts(at.info)
    assert sorted(p.name for p in out.iterdir()) == sorted(shown)  # the photos stay


def test_an_album_that_no_longer_runs_can_be_deleted_from_its_page(page, library, tmp_path):
    """Its folder gone, the album's page showed only the error: the album could be removed from the command
    line only."""
    from imgsearch import Library

    gone = tmp_path / "trip"
    gone.mkdir()
    with Library(settings=library[0]) as lib:
        lib.save_album("Trip", "a red circle", under=gone, k=3)
    gone.rmdir()
    at = open_url(page, page="albums", album="trip")
    assert f"album Trip: folder {gone} no longer exists" in texts(at.error)
    assert "Album: Trip" in texts(at.header)
    at.checkbox(key="w_album_sure").check()
    at.button(key="FormSubmitter:album-delete-Delete").click().run()
    assert at.query_params == {"page": "albums"} and "No albums yet" in texts(at.info)
    at = open_url(page, page="albums", album="nope")  # no such album: said, and nothing to rename or delete
    assert "no album named 'nope'" in texts(at.error) and not at.checkbox and "Album:" not in texts(at.header)


def test_a_search_with_a_min_score_saved_as_album_keeps_every_photo_above_it(page, library):
    """As `album save --min-score` does: every photo above the threshold, and new ones join. The page's
    Results (how many thumbnails to show) capped the album at the photos on the screen."""
    from imgsearch import Library

    with Library(settings=library[0]) as lib:
        cut = round(lib.search("a red circle", k=10)[9].score, 3)
        above = [h.path for h in lib.search("a red circle", k=54, min_score=cut)]
        at = open_url(page, q="a red circle", k="3", min=str(cut))
        at.text_input(key="w_album_name").input("warm")
        at.button(key="FormSubmitter:save-album-Save").click().run()
        try:
            assert len(above) > 3 and f"Saved album warm ({len(above)} photos)" in texts(at.success)
            album = lib.album("warm")
            assert [h.path for h in album.hits] == above and album.grows
        finally:
            lib.delete_album("warm")


def test_details_open_on_an_album_page(page, library):
    """An album's Details button put view= in the address, but the album page never showed the view: the
    click did nothing."""
    from imgsearch import Library

    with Library(settings=library[0]) as lib:
        lib.save_album("blues", "a blue square", k=4)
    try:
        at = open_url(page, page="albums", album="blues")
        first = result_names(at)[0]
        next(b for b in at.button if b.key and b.key.startswith("album-view-")).click().run()
        assert not at.exception and not at.error
        assert at.query_params["album"] == "blues" and "view" in at.query_params
        assert "**Similar images**" in texts(at.markdown)
        assert any(c.value.endswith(first) for c in at.code)  # the full path of the photo clicked
        at.button(key="detail-close").click().run()
        assert at.query_params == {"page": "albums", "album": "blues"}
        assert "**Similar images**" not in texts(at.markdown) and "Album: blues" in texts(at.header)
    finally:
        with Library(settings=library[0]) as lib:
            lib.delete_album("blues")


def test_a_long_result_list_is_drawn_a_page_at_a_time(page, monkeypatch):
    """Results 3000 on a library of a few thousand photos drew every thumbnail (and made every missing one
    first) with four buttons each: over a minute per redraw, and again for each 👍. The grid now shows a page
    and a button for the next; a new search starts at its first page again."""
    import imgsearch.ui.app as app

    monkeypatch.setattr(app, "PAGE", 20, raising=False)  # the library has 54 photos
    at = open_url(page, q="a red circle", k="54")
    assert len(result_names(at)) == 20
    assert "54 results for “a red circle”" in texts(at.caption)
    more = at.button(key="hit-more")
    assert more.label == "Show 20 more (20 of 54 shown)"
    more.click().run()
    first40 = result_names(at)
    assert len(first40) == 40 and at.button(key="hit-more").label == "Show 14 more (40 of 54 shown)"
    mark = [b for b in at.button if b.key.startswith("hit-up-")][30].key
    at.button(key=mark).click().run()  # a 👍 (or Details) refines this search: the page scrolled to stays
    assert len(result_names(at)) == 40 and "like" in at.query_params
    at.button(key=mark).click().run()
    next(b for b in at.button if b.key.startswith("hit-view-")).click().run()
    at.button(key="detail-close").click().run()
    assert result_names(at) == first40
    at.button(key="hit-more").click().run()
    assert result_names(at)[:40] == first40 and len(result_names(at)) == 54
    assert not [b for b in at.button if b.key == "hit-more"]
    at.query_params["q"] = "a blue square"
    at.run()
    assert len(result_names(at)) == 20  # another search: its first page


def test_a_relative_folder_typed_on_the_page_is_named_in_full(page, library, tmp_path, monkeypatch):
    """A page has no current folder its user can see: an album exported to 'beach' said 'Exported 4 photos to
    beach' while the copies went to the server's working folder, wherever that was."""
    from imgsearch import Library

    monkeypatch.chdir(tmp_path)  # where `imgsearch ui` was started
    with Library(settings=library[0]) as lib:
        lib.save_album("greens", "a green circle", k=4)
    try:
        at = open_url(page, page="albums", album="greens")
        at.text_input(key="w_album_export").input("beach")
        at.button(key="FormSubmitter:album-export-Export").click().run()
        assert f"Exported 4 photos to {tmp_path / 'beach'}" in texts(at.success)
        assert len(list((tmp_path / "beach").iterdir())) == 4
        at.text_input(key="w_index").input("nowhere")
        at.button(key="FormSubmitter:index-form-Index").click().run()
        assert f"No such folder: {tmp_path / 'nowhere'}" in texts(at.sidebar.error)
    finally:
        with Library(settings=library[0]) as lib:
            lib.delete_album("greens")
