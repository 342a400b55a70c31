"""Every kind of bad input gets a reason, the run continues, and nothing already indexed is lost."""

from __future__ import annotations

import json
import os
import random
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgsearch import synthetic
from imgsearch.cli import app


def report(cli, *paths) -> dict:
    r = cli("index", *paths, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def png_with_declared_size(width: int, height: int) -> bytes:
    """A PNG whose header claims huge dimensions (a decompression bomb) with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_bad_files_are_reported_and_good_ones_indexed(cli, photos):
    first = report(cli, photos)
    assert first["new"] == 54
    bad = photos / "bad"
    bad.mkdir()
    good_bytes = (photos / "red_circle_000.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(good_bytes[: len(good_bytes) // 3])
    (bad / "empty.png").write_bytes(b"")
    (bad / "notes.jpg").write_text("these are my notes, not a picture")
    (bad / "bomb.png").write_bytes(png_with_declared_size(40000, 40000))
    os.symlink(bad / "does-not-exist.jpg", bad / "dangling.jpg")
    rep = report(cli, photos)
    reasons = {Path(f["path"]).name: f["reason"] for f in rep["failures"]}
    assert set(reasons) == {"truncated.jpg", "empty.png", "notes.jpg", "bomb.png", "dangling.jpg"}
    assert "truncated" in reasons["truncated.jpg"]
    assert "empty file" in reasons["empty.png"]
    assert "not an image" in reasons["notes.jpg"]
    assert "too large" in reasons["bomb.png"]  # refused by Pillow's own limit, which our cap never lifts
    assert "broken symlink" in reasons["dangling.jpg"]
    assert rep["unchanged"] == 54 and rep["removed"] == 0
    # The library still answers and still holds everything that was indexed before.
    st = json.loads(cli("status", "--json").stdout)
    assert st["images"] == 54 and st["failures"] == 5
    # Failures are listed in the human report too.
    # Unchanged files that failed are not read again (the broken symlink is seen by the walk each time).
    text = cli("index", photos).stdout
    assert "failed 1" in text and "dangling.jpg" in text
    assert "4 files that failed before and are unchanged were not retried" in text
    assert "bomb.png" in cli("status", "--failures").stdout
    # Fixing a file clears its failure.
    (bad / "notes.jpg").unlink()
    (bad / "notes.jpg").write_bytes(good_bytes)
    rep = report(cli, photos)
    assert rep["new"] == 1 and (rep["failed"], rep["failed_before"]) == (1, 3)


def test_pixel_cap_is_configurable(cli, tmp_path, monkeypatch):
    folder = tmp_path / "p"
    folder.mkdir()
    Image.new("RGB", (200, 200), (200, 20, 20)).save(folder / "big.png")
    monkeypatch.setenv("IMGSEARCH_MAX_PIXELS", "10000")
    rep = report(cli, folder)
    reason = rep["failures"][0]["reason"]
    assert rep["failed"] == 1 and "too large: 200x200" in reason and "IMGSEARCH_MAX_PIXELS" in reason
    assert "1 file that failed before and is unchanged was not retried" in cli("index", folder).stdout
    monkeypatch.setenv("IMGSEARCH_MAX_PIXELS", "100000")
    assert report(cli, folder)["new"] == 1


def test_unreadable_file_is_reported(cli, photos, monkeypatch):
    from imgsearch import formats

    real_open = formats.open_regular

    def guarded_open(path):
        if str(path).endswith("blue_circle_001.jpg"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path)

    # Root reads everything, so permission errors are simulated at the point the indexer reads files.
    monkeypatch.setattr(formats, "open_regular", guarded_open)
    rep = report(cli, photos)
    assert rep["new"] == 53
    assert rep["failures"] == [{"path": str(photos / "blue_circle_001.jpg"),
                                "reason": "cannot read file: Permission denied"}]


def test_hidden_system_folders_and_symlink_loops(cli, tmp_path):
    root = tmp_path / "root"
    synthetic.generate(root, per_class=1, colors=["red"], size=64, captions_file=None)
    for hidden in (".git", "@eaDir", ".thumbnails"):
        synthetic.generate(root / hidden, per_class=1, colors=["blue"], size=64, captions_file=None)
    Image.new("RGB", (32, 32)).save(root / "._red_circle_000.jpg")  # macOS resource fork
    (root / "sub").mkdir()
    os.symlink(root, root / "sub" / "loop")  # a folder that contains itself
    os.symlink(root / "red_square_000.png", root / "sub" / "link.png")  # a second name for one file: one row
    rep = report(cli, root)
    assert rep["new"] == 3 and rep["aliases"] == 1 and rep["failed"] == 0
    hits = json.loads(cli("query", "a blue circle", "-k", "20", "--json").stdout)
    assert not any(part.startswith((".", "@")) for h in hits for part in Path(h["path"]).parts)


def test_odd_image_modes_and_formats(cli, tmp_path):
    folder = tmp_path / "modes"
    folder.mkdir()
    rgb = synthetic.draw_shape("red", "circle", 64, random.Random(3))
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgb.convert("L").save(folder / "gray.png")
    rgb.convert("P", palette=Image.ADAPTIVE).save(folder / "palette.gif")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(200)
    rgba.save(folder / "alpha.png")
    rgba.save(folder / "alpha.webp")
    Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 200)).save(folder / "deep.tiff")
    rgb.save(folder / "plain.bmp")
    rep = report(cli, folder)
    assert rep["new"] == 7 and rep["failed"] == 0, rep["failures"]
    hits = json.loads(cli("query", "a red circle", "-k", "7", "--json").stdout)
    assert {Path(h["path"]).name for h in hits[:3]} <= {"cmyk.jpg", "palette.gif", "alpha.png", "alpha.webp",
                                                       "plain.bmp"}


def test_heic_photos_are_indexed_and_usable_as_queries(cli, tmp_path):
    """iPhone photos (HEIC) go through pillow-heif (the `heic` extra, part of the dev install)."""
    import pillow_heif

    assert pillow_heif.libheif_info()["encoders"], "pillow-heif without an encoder cannot write the test file"
    folder = tmp_path / "phone"
    synthetic.generate(folder, per_class=1, size=64, captions_file=None, seed=21)
    circle = folder / "red_circle_000.png"
    # Written through pillow-heif's own API: the library must read it without Pillow registering it.
    pillow_heif.from_pillow(Image.open(circle).convert("RGB").resize((80, 64))).save(folder / "IMG_0001.HEIC",
                                                                                   quality=95)
    circle.unlink()
    rep = report(cli, folder)
    assert rep["failed"] == 0, rep["failures"]
    hits = json.loads(cli("query", "a red circle", "-k", "3", "--json").stdout)
    assert hits[0]["path"].endswith("IMG_0001.HEIC") and (hits[0]["width"], hits[0]["height"]) == (80, 64)
    hits = json.loads(cli("query", "--image", folder / "IMG_0001.HEIC", "-k", "1", "--json").stdout)
    assert hits[0]["path"].endswith("IMG_0001.HEIC") and hits[0]["score"] > 0.99


def test_exif_orientation_is_applied(cli, tmp_path, settings):
    """A sideways-stored photo with an orientation tag is encoded as displayed and reports displayed size."""
    from imgsearch import encoder, images

    folder = tmp_path / "exif"
    folder.mkdir()
    upright = Image.new("RGB", (120, 60), (20, 20, 20))
    upright.paste(synthetic.draw_shape("green", "triangle", 60, random.Random(1)), (0, 0))
    upright.save(folder / "upright.jpg", quality=95)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote: 60x120
    exif = Image.Exif()
    exif[274] = 6  # rotate 90 CW to display
    stored.save(folder / "sideways.jpg", quality=95, exif=exif.tobytes())
    im, info = images.open_image(folder / "sideways.jpg")
    assert (info.width, info.height) == (120, 60) and im.size == (120, 60)
    cli("index", folder)
    hits = {Path(h["path"]).name: h for h in json.loads(cli("query", "--image", folder / "upright.jpg",
                                                              "--json").stdout)}
    assert (hits["sideways.jpg"]["width"], hits["sideways.jpg"]["height"]) == (120, 60)
    assert hits["sideways.jpg"]["score"] > 0.98
    enc = encoder.load(encoder.ModelSpec(settings.model), "cpu", "fp32")
    wrong = enc.encode_images([stored])[0] @ enc.encode_images([upright])[0]
    assert hits["sideways.jpg"]["score"] > wrong  # applying the tag matters


def test_bad_paths_and_arguments_exit_2(cli, photos):
    r = cli("index", photos / "missing-folder")
    assert r.exit_code == 2 and "no such file or folder" in r.stderr
    # before the run, not after it as an internal error
    r = cli("index", photos, "--log", photos / "missing-folder" / "failures.txt")
    assert r.exit_code == 2 and r.stderr.strip() == \
        f"error: --log {photos / 'missing-folder' / 'failures.txt'}: cannot write it (No such file or directory)"
    a_file = photos / "red_circle_000.jpg"
    r = cli.runner.invoke(app, ["--home", str(a_file), "--model", cli.model, "index", str(photos)])
    assert r.exit_code == 1 and r.stderr.strip() == f"error: cannot write to the library at {a_file} (a file, not " \
        "a folder); give --home a folder you can write to"
    cli("index", photos)
    r = cli("query", "--image", photos / "nope.jpg")
    assert r.exit_code == 2 and r.stderr.strip() == f"error: query image not found: {photos / 'nope.jpg'}"
    r = cli("query")
    assert r.exit_code == 2 and "nothing to search for: give query text, an image or a keyword" in r.stderr
    r = cli("query", "x", "--json", "--paths")
    assert r.exit_code == 2
    r = cli("query", "x", "--bogus-option")
    assert r.exit_code == 2
    notimg = photos / "readme.jpg"
    notimg.write_text("hello")
    r = cli("query", "--image", notimg)
    assert r.exit_code == 2 and "cannot use query image" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_an_unknown_device_or_precision_is_refused_at_every_door(cli, home):
    """A text query ignored them; without torch, `index` took them for a reason it "needs torch" (exit 1)."""
    from imgsearch import Library
    from imgsearch.errors import UsageError

    for flag, value, refusal in (("--precision", "bf61", "unknown precision 'bf61'; use auto, fp32, bf16, fp16 or int8"),
                                 ("--device", "gpu", "unknown device 'gpu'; use auto, cpu, cuda or mps")):
        r = cli.runner.invoke(app, ["--home", str(home), "--model", cli.model, flag, value, "query", "a red circle"])
        assert r.exit_code == 2 and r.stderr.strip() == f"error: {refusal}", r.output
        with pytest.raises(UsageError, match=re.escape(refusal)):
            Library(home, cli.model, **{flag[2:]: value})


def test_batched_tensor_jpeg_decode_matches_pillow(cli, photos, tmp_path, monkeypatch, settings):
    """The nvJPEG path (run here with torchvision on the CPU) gives the same vectors as Pillow, applies EXIF
    orientation, and hands files it cannot decode back to Pillow."""
    from imgsearch.store import Store

    rotated = synthetic.draw_shape("green", "triangle", 96, random.Random(4)).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[274] = 6
    rotated.save(photos / "sideways.jpg", quality=92, exif=exif.tobytes())
    synthetic.draw_shape("red", "circle", 96, random.Random(4)).convert("CMYK").save(photos / "cmyk.jpg")
    good = (photos / "red_square_000.jpg").read_bytes()
    (photos / "cut.jpg").write_bytes(good[: len(good) // 2])
    # over the full-decode cap: the batch decoder leaves it to Pillow, which decodes it reduced (twice the cap)
    Image.open(photos / "red_square_000.jpg").resize((600, 600)).save(photos / "big.jpg")
    monkeypatch.setenv("IMGSEARCH_MAX_PIXELS", "300000")
    assert cli("index", photos).exit_code == 0
    store = Store(settings.db_path)
    m = store.models()[0]
    ids, pil_vecs = store.load_vectors(m.id)
    store.close()
    other = tmp_path / "home2"
    monkeypatch.setenv("IMGSEARCH_GPU_DECODE", "on")
    r = cli("--home", other, "index", photos, "--json")
    rep = json.loads(r.stdout)
    assert rep["new"] == 57 and [Path(f["path"]).name for f in rep["failures"]] == ["cut.jpg"]
    store = Store(other / "library.db")
    ids2, tensor_vecs = store.load_vectors(store.models()[0].id)
    paths = {r.id: r.path for r in store.get_images(ids2).values()}
    store.close()
    store = Store(settings.db_path)
    pil_paths = {r.id: r.path for r in store.get_images(ids).values()}
    store.close()
    by_path = {pil_paths[i]: v for i, v in zip(ids.tolist(), pil_vecs)}
    cos = [float(v @ by_path[paths[i]]) for i, v in zip(ids2.tolist(), tensor_vecs)]
    assert min(cos) > 0.995


def test_an_error_naming_a_crafted_file_stays_on_one_line(cli, photos, tmp_path):
    """A newline in a file's name split the error naming it over two lines (`query --image`, `--like` of a path
    the library does not hold): the CLI prints every error escaped, as one line."""
    assert cli("index", photos).exit_code == 0
    bad = tmp_path / "bad\nname.jpg"
    bad.write_bytes(b"not a picture")
    for argv in (["--image", bad], ["red", "--like", bad]):
        r = cli("query", *argv, "--no-server")
        assert r.exit_code != 0
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
        assert "bad\\nname.jpg" in r.stderr
