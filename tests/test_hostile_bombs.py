"""Tiny files that decode, or scale to the model's input, to gigabytes are refused before any pixel is
decoded, with one line saying why, at every door; and imgsearch leaves Pillow's process-wide settings alone."""

from __future__ import annotations

import io
import json
import struct
import threading
import time
import urllib.error
import urllib.request
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageFile

import imgsearch
from imgsearch import images
from imgsearch.errors import DecodeError, UsageError


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def claimed_png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` greyscale pixels, with a few rows of data at most."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + _chunk(b"IEND", b""))


def ico_holding(payload: bytes) -> bytes:
    """An ICO whose one directory entry says 256x256 (stored as 0, 0) and points at ``payload``."""
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(payload), 6 + 16)
    return struct.pack("<HHH", 0, 1, 1) + entry + payload


def icns_holding(payload: bytes) -> bytes:
    """An ICNS whose one entry is a 256x256 icon ('ic08') holding ``payload``."""
    block = b"ic08" + struct.pack(">I", 8 + len(payload)) + payload
    return b"icns" + struct.pack(">I", 8 + len(block)) + block


def wide_png() -> bytes:
    """1x120000 pixels, 0.12 MP and a few hundred bytes: scaling its short side to the model's input makes a
    strip millions of pixels long."""
    buf = io.BytesIO()
    Image.linear_gradient("L").resize((1, 120000)).save(buf, "PNG")
    return buf.getvalue()


HIDDEN_ICO = ico_holding(claimed_png(40000, 40000))
HIDDEN_ICNS = icns_holding(claimed_png(40000, 40000))


def test_hidden_payloads_are_measured_before_decoding():
    for data in (HIDDEN_ICO, HIDDEN_ICNS):
        with pytest.raises(DecodeError) as e:
            images.open_image(data)
        # The picture's own size, not the directory's 256x256 and not a failure met while decoding it.
        assert "too large: 40000x40000" in str(e.value) and "\n" not in str(e.value)
    # With our cap raised past it, Pillow's own decompression-bomb check still refuses before decoding.
    with pytest.raises(DecodeError, match="too large.*exceeds limit"):
        images.open_image(HIDDEN_ICO, max_pixels=10 ** 10)


def test_elongated_pictures_are_refused_and_ordinary_icons_still_open(tmp_path):
    with pytest.raises(DecodeError, match=r"too elongated: 1x120000"):
        images.open_image(wide_png(), draft_size=224)
    strip = io.BytesIO()
    Image.new("RGB", (2000, 25), "red").save(strip, "JPEG")  # 80:1, a long panorama: kept
    assert images.open_image(strip.getvalue())[0].size == (2000, 25)
    icon = Image.new("RGBA", (48, 48), (0, 0, 255, 255))
    for fmt, extra in (("ICO", {}), ("ICO", {"bitmap_format": "bmp"}), ("ICNS", {})):
        buf = io.BytesIO()
        icon.save(buf, fmt, **extra)
        im, info = images.open_image(buf.getvalue())
        assert im.mode == "RGB" and min(im.size) >= 48 and im.getpixel((10, 10)) == (0, 0, 255), (fmt, extra)


def claimed_jpeg(width: int, height: int, one_component_scan: bool = False) -> bytes:
    """A sequential JPEG whose frame claims ``width`` x ``height``, cut 1 kB into its scan; with
    ``one_component_scan`` its first scan holds one of its three components (the others would come later)."""
    buf = io.BytesIO()
    Image.linear_gradient("L").convert("RGB").save(buf, "JPEG", subsampling=0)
    data = bytearray(buf.getvalue())
    sof, sos = data.index(b"\xff\xc0"), data.index(b"\xff\xda")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    if one_component_scan:  # FFDA, length 8, 1 component (its id and tables), spectral selection, approximation
        data[sos:sos + 14] = b"\xff\xda\x00\x08\x01" + data[sos + 5:sos + 7] + data[sos + 11:sos + 14]
    return bytes(data[:sos + 1024])


def test_a_camera_jpeg_decoded_reduced_may_pass_the_cap(tmp_path):
    """A 100 MP camera JPEG needs ~25 MB decoded at 1/8 (bench: 414 MB in full): where it is decoded reduced
    for the model, twice the cap applies; a progressive one, whose decoder holds every coefficient of the
    full picture, and a full decode keep the cap. Here the cap is 1 MP and the photo 1.5 MP."""
    gradient = Image.linear_gradient("L").convert("RGB").resize((1500, 1000))
    for name, extra in (("camera.jpg", {}), ("progressive.jpg", {"progressive": True})):
        gradient.save(tmp_path / name, "JPEG", **extra)
    # A phone's HDR photo (its gain map a second picture after it: Pillow says MPO) is decoded the same way.
    gradient.save(tmp_path / "ultra_hdr.jpg", "MPO", save_all=True, append_images=[gradient.resize((375, 250))])
    for name in ("camera.jpg", "ultra_hdr.jpg"):
        im, info = images.open_image(tmp_path / name, draft_size=224, max_pixels=1_000_000)
        assert (info.width, info.height) == (1500, 1000) and max(im.size) <= 750, name  # decoded at 1/2 or less
    for path, draft, why in ((tmp_path / "progressive.jpg", 224, "1500x1000 = 2 MP exceeds the 1 MP cap"),
                             (tmp_path / "camera.jpg", None, "1500x1000 = 2 MP exceeds the 1 MP cap")):
        with pytest.raises(DecodeError, match=why):
            images.open_image(path, draft_size=draft, max_pixels=1_000_000)
    with pytest.raises(DecodeError, match=r"1500x1000 = 2 MP exceeds the 1 MP cap"):  # twice the cap at most
        images.open_image(tmp_path / "camera.jpg", draft_size=224, max_pixels=700_000)
    # Components in separate scans: libjpeg holds the whole picture's coefficients (1 GB for a 1.8 kB file
    # claiming 169 MP, where a host lets Pillow load truncated files), so the cap is not doubled.
    with pytest.raises(DecodeError, match="truncated"):  # within the doubled cap: decoding starts
        images.open_image(claimed_jpeg(1500, 1000), draft_size=224, max_pixels=1_000_000)
    with pytest.raises(DecodeError, match="1500x1000 = 2 MP exceeds the 1 MP cap"):
        images.open_image(claimed_jpeg(1500, 1000, one_component_scan=True), draft_size=224, max_pixels=1_000_000)


def test_index_records_each_bomb_and_indexes_the_rest(cli, photos):
    (photos / "wide.png").write_bytes(wide_png())
    (photos / "hidden.ico").write_bytes(HIDDEN_ICO)
    (photos / "hidden.icns").write_bytes(HIDDEN_ICNS)
    r = cli("index", photos, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    reasons = {Path(f["path"]).name: f["reason"] for f in rep["failures"]}
    assert rep["new"] == 54 and set(reasons) == {"wide.png", "hidden.ico", "hidden.icns"}
    assert "too elongated: 1x120000" in reasons["wide.png"]
    assert "too large: 40000x40000" in reasons["hidden.ico"] and "too large: 40000x40000" in reasons["hidden.icns"]
    hits = json.loads(cli("query", "a red circle", "-k", "3", "--json").stdout)
    assert [Path(h["path"]).name.rsplit("_", 1)[0] for h in hits] == ["red_circle"] * 3


@pytest.fixture()
def lib(home, model_id, photos):
    with imgsearch.Library(home, model_id, device="cpu", precision="fp32", batch_size=16) as lib:
        assert lib.index(photos).new == 54
        yield lib


def test_search_refuses_bomb_images_in_one_line(lib):
    for image, why in ((wide_png(), "too elongated: 1x120000"), (HIDDEN_ICO, "too large: 40000x40000"),
                       (Image.new("RGB", (1, 500)), "too elongated: 1x500")):
        with pytest.raises(UsageError) as e:
            lib.search(image=image, k=3)
        assert why in str(e.value) and "\n" not in str(e.value)


def test_pillow_process_settings_are_left_alone(lib, photos):
    """A host program's Pillow keeps its own bomb limit, truncated-image policy and plugin registry."""
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, sorted(Image.OPEN), list(warnings.filters))
    assert before[0] is not None  # nothing earlier in this process switched Pillow's bomb check off either
    (photos / "extra").mkdir()
    Image.new("RGB", (64, 48), "blue").save(photos / "extra" / "blue.png")
    assert lib.index(photos).new == 1
    lib.search(image=(photos / "extra" / "blue.png").read_bytes(), k=3)
    lib.search(image=str(photos / "red_circle_000.jpg"), k=3)
    after = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, sorted(Image.OPEN), list(warnings.filters))
    assert after == before and "HEIF" not in Image.OPEN


def test_server_image_search_refuses_a_bomb_with_400(lib, settings):
    from imgsearch.server import SearchServer

    srv = SearchServer(settings, "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        for _ in range(600):
            if (settings.home / "server.json").exists():
                break
            time.sleep(0.05)
        host, port = srv.address
        req = urllib.request.Request(f"http://{host}:{port}/api/search/image?k=3", data=wide_png(), method="POST",
                                     headers={"Authorization": f"Bearer {srv.token}", "Content-Type": "image/png"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
        assert e.value.code == 400 and "too elongated: 1x120000" in json.loads(e.value.read())["error"]
    finally:
        srv.shutdown()
        t.join(10)
