"""Every format Pillow opens is indexed (found by content when the extension says nothing), and camera RAW
through the `raw` extra: a DNG written here, read with rawpy, and reported as "install the raw extra"
(then retried once it is installed) when rawpy is missing."""

from __future__ import annotations

import io
import json
import os
import random
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from imgsearch import synthetic
from imgsearch.config import HEIC_NEEDS_EXTRA, RAW_NEEDS_EXTRA


# --- a minimal DNG, written from scratch: a 16-bit RGGB mosaic, optionally an embedded JPEG preview ----
def _ifd(entries: list[tuple[int, int, int, bytes]], base: int) -> bytes:
    """One TIFF IFD laid out at file offset ``base``, its out-of-line values right after it."""
    entries = sorted(entries)
    size = 2 + 12 * len(entries) + 4
    out, extra = struct.pack("<H", len(entries)), b""
    for tag, typ, count, data in entries:
        if len(data) <= 4:
            out += struct.pack("<HHI", tag, typ, count) + data.ljust(4, b"\0")
        else:
            out += struct.pack("<HHII", tag, typ, count, base + size + len(extra))
            extra += data + b"\0" * (len(data) % 2)
    return out + struct.pack("<I", 0) + extra


def make_dng(rgb: np.ndarray, preview: bool = True) -> bytes:
    SHORT, LONG, ASCII, RATIONAL, SRATIONAL, BYTE = 3, 4, 2, 5, 10, 1
    h, w, _ = rgb.shape
    level = (rgb.astype(np.float32) / 255 * 4000).astype("<u2")
    mosaic = np.empty((h, w), "<u2")
    mosaic[0::2, 0::2], mosaic[0::2, 1::2] = level[0::2, 0::2, 0], level[0::2, 1::2, 1]
    mosaic[1::2, 0::2], mosaic[1::2, 1::2] = level[1::2, 0::2, 1], level[1::2, 1::2, 2]
    raw = mosaic.tobytes()
    buf = io.BytesIO()
    from PIL import Image

    Image.fromarray(rgb).save(buf, "JPEG", quality=92)
    jpeg = buf.getvalue() if preview else b""

    def ascii_(t):
        return (ASCII, len(t) + 1, t.encode() + b"\0")

    def srat(*v):
        return b"".join(struct.pack("<ii", int(x * 10000), 10000) for x in v)

    dng = [(50706, BYTE, 4, bytes([1, 4, 0, 0])), (50707, BYTE, 4, bytes([1, 1, 0, 0])),
           (50708, *ascii_("imgsearch test DNG")), (271, *ascii_("imgsearch")), (272, *ascii_("test DNG")),
           (50721, SRATIONAL, 9, srat(1, 0, 0, 0, 1, 0, 0, 0, 1)),
           (50728, RATIONAL, 3, b"".join(struct.pack("<II", 1, 1) for _ in range(3))), (50778, SHORT, 1, b"\x15\0")]

    def cfa_ifd(kind: int) -> list:
        return [(254, LONG, 1, struct.pack("<I", kind)), (256, LONG, 1, struct.pack("<I", w)),
                (257, LONG, 1, struct.pack("<I", h)), (258, SHORT, 1, b"\x10\0"), (259, SHORT, 1, b"\x01\0"),
                (262, SHORT, 1, struct.pack("<H", 32803)), (273, LONG, 1, struct.pack("<I", 8)),
                (277, SHORT, 1, b"\x01\0"), (278, LONG, 1, struct.pack("<I", h)),
                (279, LONG, 1, struct.pack("<I", len(raw))), (284, SHORT, 1, b"\x01\0"),
                (33421, SHORT, 2, b"\x02\0\x02\0"), (33422, BYTE, 4, bytes([0, 1, 1, 2])),
                (50710, BYTE, 3, bytes([0, 1, 2])), (50714, LONG, 1, b"\0" * 4),
                (50717, LONG, 1, struct.pack("<I", 4095))]

    off0 = 8 + len(raw) + len(jpeg)
    off0 += off0 % 2
    if not preview:  # the mosaic is the main image
        return (b"II*\0" + struct.pack("<I", off0) + raw).ljust(off0, b"\0") + _ifd(cfa_ifd(0) + dng, off0)

    def ifd0(sub: int) -> bytes:
        return _ifd([(254, LONG, 1, b"\x01\0\0\0"), (256, LONG, 1, struct.pack("<I", w)),
                     (257, LONG, 1, struct.pack("<I", h)), (258, SHORT, 3, b"\x08\0\x08\0\x08\0"),
                     (259, SHORT, 1, b"\x07\0"), (262, SHORT, 1, b"\x06\0"),
                     (273, LONG, 1, struct.pack("<I", 8 + len(raw))), (274, SHORT, 1, b"\x01\0"),
                     (277, SHORT, 1, b"\x03\0"), (278, LONG, 1, struct.pack("<I", h)),
                     (279, LONG, 1, struct.pack("<I", len(jpeg))), (284, SHORT, 1, b"\x01\0"),
                     (330, LONG, 1, struct.pack("<I", sub))] + dng, off0)

    sub = off0 + len(ifd0(0))
    sub += sub % 2
    head = (b"II*\0" + struct.pack("<I", off0) + raw + jpeg).ljust(off0, b"\0") + ifd0(sub)
    return head.ljust(sub, b"\0") + _ifd(cfa_ifd(0), sub)


def shape(color: str, kind: str, seed: int, size: int = 64):
    return synthetic.draw_shape(color, kind, size, random.Random(seed))


def write_dng(path: Path, color: str, kind: str, seed: int, preview: bool = True) -> Path:
    path.write_bytes(make_dng(np.asarray(shape(color, kind, seed)), preview))
    return path


# Each format, saved the way Pillow writes it (mode conversions where the format needs them).
FORMATS = {"jp2": ("JPEG2000", "RGB"), "pnm": ("PPM", "RGB"), "ppm": ("PPM", "RGB"), "pgm": ("PPM", "L"),
           "pbm": ("PPM", "1"), "tga": ("TGA", "RGB"), "ico": ("ICO", "RGB"), "webp": ("WEBP", "RGB"),
           "gif": ("GIF", "P"), "bmp": ("BMP", "RGB"), "tiff": ("TIFF", "RGB"), "qoi": ("QOI", "RGB"),
           "pcx": ("PCX", "RGB"), "sgi": ("SGI", "RGB")}


def save_as(im, path: Path, fmt: str, mode: str) -> Path:
    im.convert(mode).save(path, fmt)
    return path


def hits(cli, text: str, k: int = 3) -> list[str]:
    r = cli("query", text, "-k", str(k), "--json")
    assert r.exit_code == 0, r.output
    return [Path(h["path"]).name for h in json.loads(r.stdout)]


def index_json(cli, folder) -> dict:
    r = cli("index", folder, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


# --- tests -----------------------------------------------------------------------------------------------
def test_every_pillow_format_and_files_found_by_content_are_indexed(cli, tmp_path):
    folder = tmp_path / "formats"
    folder.mkdir()
    expected = set()
    for n, (ext, how) in enumerate(FORMATS.items()):
        expected.add(save_as(shape("red", "circle", n), folder / f"red_circle.{ext}", *how).name)
    png = io.BytesIO()
    shape("blue", "square", 99).save(png, "PNG")
    (folder / "blue_square.dat").write_bytes(png.getvalue())  # a PNG with a wrong extension
    (folder / "blue_square_no_extension").write_bytes(png.getvalue())
    expected |= {"blue_square.dat", "blue_square_no_extension"}
    # Not images, or not photos: never opened as such, never reported as failures.
    (folder / "notes").write_text("P1 is not a bitmap here, just a note\n")
    (folder / "random.dat").write_bytes(bytes(random.Random(1).randrange(256) for _ in range(500)))
    (folder / "clip.thm").write_bytes(png.getvalue())  # a video's thumbnail sidecar
    (folder / "readme.txt").write_bytes(png.getvalue())

    report = index_json(cli, folder)
    assert report["failures"] == []
    assert report["new"] == len(expected), report
    r = cli("query", "a red circle", "-k", "50", "--json")
    found = {Path(h["path"]).name for h in json.loads(r.stdout)}
    assert found == expected


def test_red_circle_saved_as_ppm_is_found_by_its_description(cli, tmp_path):
    folder = tmp_path / "mixed"
    synthetic.generate(folder, per_class=2, colors=["blue", "green", "yellow", "white"], fmt="jpg", seed=3,
                       captions_file=None)
    for i in range(3):
        save_as(shape("red", "circle", 100 + i), folder / f"red_circle_{i}.ppm", "PPM", "RGB")
    assert index_json(cli, folder)["new"] == 4 * 3 * 2 + 3
    assert sorted(hits(cli, "a red circle")) == ["red_circle_0.ppm", "red_circle_1.ppm", "red_circle_2.ppm"]


def test_dng_is_indexed_through_rawpy_and_found_by_what_it_shows(cli, tmp_path):
    pytest.importorskip("rawpy", reason="the raw extra (rawpy) is part of the dev install")
    folder = tmp_path / "raw"
    synthetic.generate(folder, per_class=2, colors=["blue", "green", "white"], fmt="png", seed=4,
                       captions_file=None)
    for i in range(2):
        write_dng(folder / f"red_circle_{i}.dng", "red", "circle", 200 + i)
    report = index_json(cli, folder)
    assert report["failures"] == [] and report["new"] == 3 * 3 * 2 + 2
    assert sorted(hits(cli, "a red circle", 2)) == ["red_circle_0.dng", "red_circle_1.dng"]
    status = json.loads(cli("status", "--json").stdout)
    assert status["failures"] == 0


def test_dng_decodes_from_its_preview_or_by_demosaicing(tmp_path):
    pytest.importorskip("rawpy", reason="the raw extra (rawpy) is part of the dev install")
    from imgsearch import images

    with_preview = write_dng(tmp_path / "p.dng", "red", "square", 1)
    im, info = images.open_image(with_preview, draft_size=32)
    assert (im.size, (info.width, info.height)) == ((32, 32), (64, 64))  # the JPEG preview, draft-decoded
    r, g, b = im.getpixel((16, 16))
    assert r > 150 and g < 90 and b < 90  # the red square, as the preview shows it
    bare = write_dng(tmp_path / "bare.dng", "red", "square", 1, preview=False)
    im, info = images.open_image(bare, draft_size=32)
    assert im.mode == "RGB" and im.size == (32, 32) and (info.width, info.height) == (64, 64)  # half size
    im, info = images.open_image(with_preview.read_bytes())  # an upload: bytes, no extension to go by
    assert im.size == (64, 64) and im.getpixel((32, 32))[0] > 150
    truncated = tmp_path / "cut.dng"
    truncated.write_bytes(with_preview.read_bytes()[:300])
    with pytest.raises(images.DecodeError, match="corrupt or unsupported RAW file"):
        images.open_image(truncated)


def test_raw_without_the_extra_is_reported_then_retried_once_it_is_installed(cli, tmp_path, monkeypatch):
    rawpy = pytest.importorskip("rawpy", reason="the raw extra (rawpy) is part of the dev install")
    folder = tmp_path / "raw"
    synthetic.generate(folder, per_class=1, colors=["blue"], fmt="png", seed=6, captions_file=None)
    dng = write_dng(folder / "red_circle.dng", "red", "circle", 7)
    monkeypatch.setitem(sys.modules, "rawpy", None)  # as if the extra were not installed
    report = index_json(cli, folder)
    assert report["new"] == 3
    assert report["failures"] == [{"path": str(dng), "reason": RAW_NEEDS_EXTRA}]
    assert "install the raw extra" in RAW_NEEDS_EXTRA and "corrupt" not in RAW_NEEDS_EXTRA
    again = index_json(cli, folder)  # unchanged and still no rawpy: not re-read
    assert again["failed_before"] == 1 and again["new"] == 0
    monkeypatch.setitem(sys.modules, "rawpy", rawpy)  # the extra is installed now
    after = index_json(cli, folder)
    assert after["new"] == 1 and after["failures"] == [], after
    status = json.loads(cli("status", "--json").stdout)
    assert status["failures"] == 0 and status["images"] == 4


def test_heic_without_the_extra_is_reported_then_indexed_once_it_is_installed(cli, tmp_path, monkeypatch):
    """Without pillow-heif a folder of iPhone photos was indexed as if it held none of them, without a word
    (RAW files say what to install); now they are reported like RAW and read once the extra is there."""
    pillow_heif = pytest.importorskip("pillow_heif", reason="the heic extra is part of the dev install")
    shape("blue", "square", 8).save(tmp_path / "blue_square.png")
    photo = tmp_path / "IMG_0001.HEIC"
    pillow_heif.from_pillow(shape("red", "circle", 9)).save(photo, quality=90)
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # as if the extra were not installed
    report = index_json(cli, tmp_path)
    assert report["new"] == 1
    assert report["failures"] == [{"path": str(photo), "reason": HEIC_NEEDS_EXTRA}]
    assert "install the heic extra" in HEIC_NEEDS_EXTRA
    monkeypatch.setitem(sys.modules, "pillow_heif", pillow_heif)  # the extra is installed now
    after = index_json(cli, tmp_path)
    assert after["new"] == 1 and after["failures"] == [], after
    assert hits(cli, "a red circle", 1) == ["IMG_0001.HEIC"]


def psd(rgb: np.ndarray, depth: int) -> bytes:
    """A flat RGB Photoshop file, uncompressed, at 8 or 16 bits per channel (Lightroom's "Edit in Photoshop"
    writes 16)."""
    h, w, _ = rgb.shape
    planes = (rgb.astype(">u2") * 257 if depth == 16 else rgb).transpose(2, 0, 1).tobytes()
    return b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, h, w, depth, 3) + bytes(4 + 4 + 4 + 2) + planes


def test_a_16_bit_photoshop_file_is_not_called_corrupt(cli, tmp_path):
    """Pillow reads 8-bit PSDs only: a photographer's 16-bit edits were each reported 'unknown or corrupt format'."""
    rgb = np.asarray(shape("red", "square", 12))
    (tmp_path / "red_square.psd").write_bytes(psd(rgb, 8))
    edit = tmp_path / "IMG_0001-Edit.psd"
    edit.write_bytes(psd(rgb, 16))
    report = index_json(cli, tmp_path)
    assert report["new"] == 1
    assert report["failures"] == [{"path": str(edit), "reason": "16-bit Photoshop file: Pillow reads 8-bit PSDs "
                                                                "only (save an 8-bit copy or a TIFF to index it)"}]


def test_an_explicit_file_that_is_no_image_says_so(cli, tmp_path):
    note = tmp_path / "notes.bin"
    note.write_bytes(b"hello, not a picture")
    r = cli("index", note, "--json")
    out = json.loads(r.stdout)
    assert out["failures"] == [{"path": str(note), "reason": "not an image file (neither its extension nor its "
                                                                "first bytes name an image format imgsearch reads)"}]
    fifo = tmp_path / "clip.jpg"  # named like a photo, but a pipe: the reason said its extension named no image
    os.mkfifo(fifo)
    out = json.loads(cli("index", fifo, "--json").stdout)
    assert out["failures"] == [{"path": str(fifo), "reason": "not a regular file"}]


def test_a_photo_swapped_for_a_pipe_after_the_walk_never_hangs_the_run(home, model_id, tmp_path, monkeypatch):
    """Between the walk (which skips pipes) and the read, a photo replaced by a FIFO made `open` wait for a
    writer forever: the run hung, holding the write lock. Every photo is now opened without blocking and checked
    once open."""
    import threading

    import imgsearch
    from imgsearch import files, synthetic

    synthetic.generate(tmp_path / "p", per_class=2, colors=["red"], shapes=("circle",), captions_file=None)
    victim = sorted((tmp_path / "p").rglob("*.png"))[0]
    walk = files.walk

    def swapping_walk(*a, **kw):
        for entry in walk(*a, **kw):
            if getattr(entry, "path", None) == str(victim):
                victim.unlink()
                os.mkfifo(victim)
            yield entry

    monkeypatch.setattr(files, "walk", swapping_walk)
    done = {}
    with imgsearch.Library(home, model_id, device="cpu", precision="fp32") as lib:
        run = threading.Thread(target=lambda: done.setdefault("report", lib.index(tmp_path / "p")), daemon=True)
        run.start()
        run.join(300)  # only the old, blocking read ever waits here
        hung = run.is_alive()
        if hung:  # a writer ends the blocked read, so the library closes
            open(victim, "wb").close()
            run.join()
        assert not hung, "index blocked reading a FIFO"
    assert done["report"].failed == [(str(victim), "cannot read file: not a regular file")]
    assert done["report"].new == 1


def test_sniffing_reads_only_files_without_a_telling_extension(tmp_path, monkeypatch):
    from imgsearch import files, formats

    opened = []
    real = formats.read_head
    monkeypatch.setattr(formats, "read_head", lambda p: opened.append(Path(p).name) or real(p))
    for name in ("a.jpg", "b.mp4", "c.txt", "d.json", "e", "f.xyz"):
        (tmp_path / name).write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 40)
    found = sorted(Path(e.path).name for e in files.walk([tmp_path]) if isinstance(e, files.FileEntry))
    assert found == ["a.jpg", "e", "f.xyz"]
    assert sorted(opened) == ["e", "f.xyz"]


# --- pixels: what the model sees is the picture a viewer shows ----------------------------------------------
def upright() -> np.ndarray:
    """An asymmetric 120 x 200 picture (gradients, a red block top left): every turn and flip shows."""
    a = np.zeros((120, 200, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, 200)[None, :]
    a[..., 1] = np.linspace(0, 255, 120)[:, None]
    a[:30, :40] = (255, 0, 0)
    return a


# What a camera stores for each EXIF orientation: the upright picture turned back by the inverse transform.
STORED = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_90",
          7: "TRANSVERSE", 8: "ROTATE_270"}


def tagged(rgb: np.ndarray, orientation: int, fmt: str, exif: bytes | None = None) -> bytes:
    from PIL import Image

    im = Image.fromarray(rgb)
    if orientation != 1:
        im = im.transpose(getattr(Image.Transpose, STORED[orientation]))
    if exif is None:
        tags = Image.Exif()
        tags[274] = orientation
        exif = tags.tobytes()
    buf = io.BytesIO()
    im.save(buf, fmt, exif=exif, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_every_exif_orientation_decodes_upright_at_its_displayed_size(fmt):
    from imgsearch import images

    want = upright()
    for orientation in range(1, 9):
        im, info = images.open_image(tagged(want, orientation, fmt))
        # TIFF: Pillow turns it itself; it used to be turned (and its size swapped) twice
        assert (im.size, (info.width, info.height)) == ((200, 120), (200, 120)), (fmt, orientation)
        assert np.abs(np.asarray(im, np.float32) - want).mean() < 3, (fmt, orientation)


def odd_exif(orientation: int) -> bytes:
    """EXIF with an orientation and XResolution (a rational) written as the text "72", as some tools do."""
    entries = [(274, 3, 1, struct.pack("<HH", orientation, 0)), (282, 2, 3, b"72\0\0")]
    ifd = struct.pack("<H", 2) + b"".join(struct.pack("<HHI", t, kind, n) + v for t, kind, n, v in entries)
    return b"Exif\0\0II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)


def test_a_rotated_photo_with_a_malformed_exif_field_is_read_upright_not_failed():
    """Pillow's exif_transpose writes the EXIF back and fails on a field it cannot write: such a portrait photo
    was refused as 'corrupt image'."""
    from imgsearch import images

    want = upright()
    im, info = images.open_image(tagged(want, 6, "JPEG", odd_exif(6)))
    assert (im.size, (info.width, info.height)) == ((200, 120), (200, 120))
    assert np.abs(np.asarray(im, np.float32) - want).mean() < 3


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grayscale_keeps_its_brightness(fmt):
    """A dark 16-bit scan was stretched to full contrast (a night shot turned grey-white), a flat one turned black."""
    from PIL import Image

    from imgsearch import images

    gray = np.asarray(Image.fromarray(upright()).convert("L"), np.float32)
    for level in (gray / 4, np.full_like(gray, 91.0)):  # dark (0..63 of 255), and one flat mid grey
        buf = io.BytesIO()
        Image.fromarray((level * 257).astype(np.uint16)).save(buf, fmt)
        assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I;16")
        im, _ = images.open_image(buf.getvalue())
        assert np.abs(np.asarray(im.convert("L"), np.float32) - level).max() <= 1


def test_transparency_is_white_however_the_file_stores_it():
    """An alpha channel, a palette's transparent entry and a PNG colour key (tRNS in an RGB, grayscale or 1-bit
    PNG) all show the background; the colour key's pixels were kept as they are stored (black here)."""
    from PIL import Image

    from imgsearch import images

    logo = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    logo.paste((200, 30, 30, 255), (10, 5, 30, 25))
    gray = Image.new("LA", (40, 30), (0, 0))
    gray.paste((120, 255), (10, 5, 30, 25))
    palette = logo.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    saved = {"RGBA": (logo, {}), "P": (palette, {"transparency": palette.getpixel((0, 0))}),
             "RGB": (logo.convert("RGB"), {"transparency": (0, 0, 0)}), "LA": (gray, {}),
             "L": (gray.convert("L"), {"transparency": 0}),
             "1": (gray.convert("L").point(lambda v: 255 * (v > 0)).convert("1"), {"transparency": 0})}  # 1-bit art
    for mode, (im, options) in saved.items():
        buf = io.BytesIO()
        im.save(buf, "PNG", **options)
        out, _ = images.open_image(buf.getvalue())
        assert Image.open(io.BytesIO(buf.getvalue())).mode == mode
        ink = {"L": 120, "LA": 120, "1": 255}.get(mode, 200)
        assert (out.getpixel((2, 2)), out.getpixel((20, 15))[0]) == ((255, 255, 255), ink), mode


def test_a_jpeg_with_a_second_picture_is_draft_decoded_like_any_jpeg():
    """Phones write HDR gain maps (and stereo cameras a second view) after the photo: Pillow calls that MPO, and
    it was decoded at full size (4 to 64 times the pixels and memory of a draft decode)."""
    from PIL import Image

    from imgsearch import images

    photo, extra = Image.fromarray(upright()).resize((2000, 1200)), Image.new("RGB", (500, 300), "blue")
    mpo, jpeg = io.BytesIO(), io.BytesIO()
    photo.save(mpo, "MPO", save_all=True, append_images=[extra])
    photo.save(jpeg, "JPEG")
    assert Image.open(io.BytesIO(mpo.getvalue())).format == "MPO"
    im, info = images.open_image(mpo.getvalue(), draft_size=224)
    assert im.size == images.open_image(jpeg.getvalue(), draft_size=224)[0].size == (500, 300)
    assert (info.width, info.height) == (2000, 1200) and im.getpixel((5, 5))[0] > 200  # the photo, not the map


def test_rotated_tiffs_and_photos_with_odd_exif_are_indexed_at_their_displayed_size(cli, tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "portrait.tif").write_bytes(tagged(upright(), 6, "TIFF"))
    (folder / "odd_exif.jpg").write_bytes(tagged(upright(), 8, "JPEG", odd_exif(8)))
    report = index_json(cli, folder)
    assert (report["new"], report["failures"]) == (2, [])
    r = cli("query", "a red square", "-k", "5", "--json")
    sizes = {Path(h["path"]).name: (h["width"], h["height"]) for h in json.loads(r.stdout)}
    assert sizes == {"portrait.tif": (200, 120), "odd_exif.jpg": (200, 120)}


def test_a_half_copied_heic_is_called_truncated_in_one_line(cli, tmp_path):
    """libheif ends its messages with a newline: the report showed an escaped $'corrupt image: ...\\n' instead
    of the line every other cut-off photo gets."""
    pillow_heif = pytest.importorskip("pillow_heif", reason="the heic extra is part of the dev install")
    buf = io.BytesIO()
    pillow_heif.from_pillow(shape("red", "circle", 3)).save(buf, quality=90)
    cut = tmp_path / "IMG_0002.HEIC"
    cut.write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    report = index_json(cli, tmp_path)
    assert report["failures"] == [{"path": str(cut), "reason": "truncated image file (incomplete download or copy?)"}]


def test_raw_of_every_common_camera_is_read_as_raw(cli, tmp_path, monkeypatch):
    """Hasselblad .3FR and Phase One .IIQ (TIFF-based) went to Pillow, which called them 'not an image', and an
    old Canon .CRW was passed over without a word; rawpy reads them all."""
    pytest.importorskip("rawpy", reason="the raw extra (rawpy) is part of the dev install")
    for i, ext in enumerate(("3FR", "IIQ")):
        write_dng(tmp_path / f"red_square.{ext}", "red", "square", 30 + i, preview=False)
    report = index_json(cli, tmp_path)
    assert (report["new"], report["failures"]) == (2, [])
    crw = tmp_path / "old" / "IMG_0001.CRW"  # a CRW is no TIFF: nothing in its first bytes says image
    crw.parent.mkdir()
    crw.write_bytes(b"II\x1a\0\0\0HEAPCCDR" + bytes(200))
    monkeypatch.setitem(sys.modules, "rawpy", None)
    assert index_json(cli, crw.parent)["failures"] == [{"path": str(crw), "reason": RAW_NEEDS_EXTRA}]


def test_a_camera_name_written_in_utf8_is_read_and_found_by_camera(cli, tmp_path):
    """EXIF text was decoded as latin-1 only: a phone that names itself in UTF-8 ("Xiaomi 红米") was stored as
    'Xiaomi çº¢ç±³' and `--camera 红米` never found its photos. A latin-1 name still reads as latin-1."""
    from PIL import Image

    def photo(name: str, make: bytes, model: bytes, color: str) -> None:
        exif = Image.Exif()
        exif[0x010F], exif[0x0110] = make, model  # bytes: Pillow writes them as they are
        shape(color, "circle", 1).save(tmp_path / name, quality=95, exif=exif)

    photo("phone.jpg", b"Xiaomi", "Xiaomi 红米".encode(), "red")
    photo("old.jpg", b"Caf\xe9 Cam", b"Mod\xe8le 1", "blue")
    assert index_json(cli, tmp_path)["new"] == 2
    for camera, found in (("红米", ["phone.jpg"]), ("café cam modèle", ["old.jpg"])):
        r = cli("query", "a red circle", "--camera", camera, "--json", "--no-server")
        assert r.exit_code == 0, r.output
        assert [Path(h["path"]).name for h in json.loads(r.stdout)] == found, camera
