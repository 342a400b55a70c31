"""Hostile pass, issue 21 points 3 and 6: `import` trusts nothing it reads (crafted values, paths naming
system files, devices and FIFOs, relative paths, bogus dates); the home is private to its user; a
non-regular file says so; `kill` during `export` removes its temporary folder."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from imgsearch import synthetic

ROOT = Path(__file__).resolve().parents[1]


def open_lib(home, model):
    import imgsearch

    return imgsearch.Library(home, model, device="cpu", precision="fp32", batch_size=16)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, random_tiny_model):
    """18 shapes indexed with an untrained tiny model (quick to make; these tests need no ranking) and
    exported as parquet: (model, photos, home, export)."""
    base = tmp_path_factory.mktemp("hostile-import")
    synthetic.generate(base / "photos", per_class=1, size=64, fmt="jpg", seed=1, captions_file=None)
    model = f"local-dir:{random_tiny_model}"
    with open_lib(base / "home", model) as lib:
        assert lib.index(base / "photos").new == 18
        lib.export(base / "export", "parquet")
    return model, base / "photos", base / "home", base / "export"


@pytest.fixture()
def cli(home, exported):
    """The CLI with the untrained model (so these tests never wait for the trained one)."""
    from conftest import Cli

    return Cli(home, exported[0])


def craft(exported, folder: Path, *parts: dict, base: dict | None = None) -> Path:
    """A copy of the export into ``folder``: ``base`` replaces columns of its own part, and each of ``parts``
    (column name -> values; ``vector`` rows as lists or None) becomes one more part file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(exported[3], folder)
    first = folder / "part-00000.parquet"
    table = pq.read_table(first)
    meta, dim = table.schema.metadata, table.schema.field("vector").type.list_size
    for name, values in (base or {}).items():
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values))
    pq.write_table(table, first)
    for i, cols in enumerate(parts, 1):
        cols = dict(cols)
        cols["vector"] = pa.array(cols["vector"], pa.list_(pa.float32(), dim))
        pq.write_table(pa.table(cols).replace_schema_metadata(meta), folder / f"part-{i:05d}.parquet")
    return folder


def good_vector(exported) -> list[float]:
    import pyarrow.parquet as pq

    return pq.read_table(exported[3] / "part-00000.parquet").column("vector")[0].as_py()


def understate(part: Path, column: str, size: int) -> None:
    """Rewrite ``column``'s total_uncompressed_size in the parquet footer as ``size`` (a Thrift varint of the
    same length, so nothing moves): metadata that lies about what the pages unpack to."""
    import struct

    import pyarrow.parquet as pq

    def chunk():
        meta = pq.ParquetFile(part).metadata.row_group(0)
        return next(meta.column(c) for c in range(meta.num_columns) if meta.column(c).path_in_schema == column)

    real = chunk()

    def varint(n: int, length: int = 0) -> bytes:
        groups = [(n >> shift) & 0x7F for shift in range(0, max(n.bit_length(), 1), 7)]
        groups += [0] * (length - len(groups))
        return bytes([g | 0x80 for g in groups[:-1]] + [groups[-1]])

    data = bytearray(part.read_bytes())
    footer = len(data) - 8 - struct.unpack("<I", data[-8:-4])[0]
    old = varint(real.total_uncompressed_size * 2)  # zigzag of a positive i64
    at = data.index(old, footer)
    assert data.count(old, footer) == 1
    data[at:at + len(old)] = varint(size * 2, len(old))
    part.write_bytes(bytes(data))
    assert chunk().total_uncompressed_size == size


@pytest.mark.parametrize("column, lie", [("path", False), ("path_raw", False), ("hash", False), ("path", True)])
def test_a_column_that_unpacks_to_gigabytes_is_refused_before_it_is_read(exported, tmp_path, cli, column, lie):
    """A zstd part whose one value is 12 MB of a single letter is a few kB on disk (a 1.5 GB one, 50 kB, took
    6 GB to import): each page's header says what it unpacks to, and the import stops before reading any row,
    even where the file's metadata understates it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "export"
    shutil.copytree(exported[3], out)
    part = out / "part-00000.parquet"
    table = pq.read_table(part)
    values = table.column(column).to_pylist()
    values[1] = ("/" + "a" * (12 << 20)).encode() if column == "path_raw" else "/" + "a" * (12 << 20)
    field = table.schema.field(column)
    table = table.set_column(table.schema.get_field_index(column), column, pa.array(values, field.type))
    pq.write_table(table, part, compression="zstd", use_dictionary=False)
    assert part.stat().st_size < 1 << 20
    if lie:
        understate(part, column, 1000)
    r = cli("--home", str(tmp_path / "home"), "import", str(out))
    assert r.exit_code == 1, r.output
    assert r.stderr.strip() == (f"error: part-00000.parquet: its {column} column unpacks to 12 MB for 18 rows, more "
                                "than such values can hold; the export is damaged or was made to exhaust memory")
    assert not (tmp_path / "home" / "library.db").exists()  # nothing imported, nothing made


def test_rows_with_bad_values_are_skipped_counted_and_named(exported, tmp_path, cli):
    vec = good_vector(exported)
    photo = str(sorted(exported[1].glob("*.jpg"))[0])
    nan, zero = [float("nan")] * len(vec), [0.0] * len(vec)
    out = craft(exported, tmp_path / "export",
                {"path": [1, 2], "vector": [vec, vec]},  # an integer path column
                {"path": [photo, photo], "size": ["big", "1"], "vector": [vec, vec]},  # size as text
                {"path": [photo] * 6, "path_raw": [b"/etc/\x00passwd", None, None, None, None, None],
                 "width": [None, None, None, None, 2 ** 62, -5],
                 "vector": [vec, None, nan, zero, vec, vec]},
                {"path": [photo], "width": [1e300], "vector": [vec]})
    r = cli("--home", str(tmp_path / "home"), "import", str(out))
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("imported 18 new images")
    assert "11 rows of the export hold unusable values and were skipped, e.g. row 19: its path is int" in r.stderr
    with open_lib(tmp_path / "home", exported[0]) as lib:
        report = lib.import_(out)
        assert (report.added, report.already, report.invalid) == (0, 18, 11)
        reasons = "\n".join(report.invalid_examples)
        for why in ("its path is int, not text", "size 'big' is not a whole number", "NUL character",
                    "its vector is missing, all zeros or not finite", "width 4611686018427387904 is not",
                    "width -5 is not"):
            assert why in reasons
        assert lib.store.image_count() == 18 and lib.store.vector_count(lib.model.id) == 18
        assert sorted(r.width for r in lib.store.images_at([photo]).values()) == [64]


def test_only_image_files_are_imported_and_relative_paths_are_the_exports(exported, tmp_path, cli,
                                                                           monkeypatch):
    import io

    from imgsearch.files import hash_file

    vec = good_vector(exported)
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    notes = tmp_path / "notes.txt.jpg"
    notes.write_text("not a picture\n")
    targets = ["/etc/passwd", "../" * 40 + "etc/hostname", "/proc/self/environ", "/dev/zero", str(fifo),
               str(notes), "photos/mine.jpg"]
    out = craft(exported, tmp_path / "export", {"path": targets, "vector": [vec] * len(targets)})
    red = sorted(exported[1].glob("red_circle*"))[0]
    (out / "photos").mkdir()
    shutil.copy(red, out / "photos" / "mine.jpg")  # beside the export: that is where its relative path points
    decoy = tmp_path / "cwd" / "photos" / "mine.jpg"
    decoy.parent.mkdir(parents=True)
    shutil.copy(sorted(exported[1].glob("blue_square*"))[0], decoy)
    monkeypatch.chdir(decoy.parent.parent)  # and not where the user happens to stand
    r = cli("--home", str(tmp_path / "home"), "import", str(out))
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("imported 19 new images")
    assert "6 paths name no image file imgsearch reads and were skipped, e.g. /etc/passwd: not an image" in r.stderr

    with open_lib(tmp_path / "home", exported[0]) as lib:
        paths = {h.path for h in lib.search("a red circle", k=50)}
        assert len(paths) == 19 and str(out / "photos" / "mine.jpg") in paths and str(decoy) not in paths
        assert not any(p.startswith(("/etc", "/proc", "/dev")) or "pipe" in p or "notes" in p for p in paths)
        trusting = tmp_path / "trusting"
        hashes = [hash_file(io.BytesIO(Path(p).read_bytes())) if p.startswith("/etc") else None for p in targets]
        out2 = craft(exported, trusting, {"path": targets[:4], "hash": hashes[:4], "vector": [vec] * 4})
        report = lib.import_(out2, trust=True)
        assert [p for p, _ in report.not_images] == ["/etc/passwd", "/etc/hostname", f"/proc/{os.getpid()}/environ",
                                                     "/dev/zero"]
        assert report.not_images[3][1] == "not a regular file"
        assert lib.store.image_count() == 19


def test_bogus_capture_times_are_dropped_not_stored(exported, tmp_path, cli):
    import pyarrow.parquet as pq

    paths = pq.read_table(exported[3] / "part-00000.parquet").column("path").to_pylist()
    taken = ["not a date", "9999-99-99T99:99", "'; DROP TABLE images; --", "2023-06-01T10:00:00+02:00",
             "2023-06-02"] + [None] * (len(paths) - 5)
    out = craft(exported, tmp_path / "export", base={"taken_at": taken})
    assert cli("--home", str(tmp_path / "home"), "import", str(out)).exit_code == 0
    with open_lib(tmp_path / "home", exported[0]) as lib:
        rows = lib.store.images_at(paths)
        assert [rows[p].taken_at for p in paths[:5]] == [None, None, None, "2023-06-01T10:00:00",
                                                         "2023-06-02T00:00:00"]
        dated = {h.path for h in lib.search("a red circle", after="2020", k=50)}
        assert dated == set(paths[3:5])
    status = cli("--home", str(tmp_path / "home"), "status")
    assert status.exit_code == 0 and "taken     2023-06-01 to 2023-06-02" in status.stdout


def test_bogus_places_cameras_and_time_zones_are_dropped_not_stored(exported, tmp_path, cli):
    import pyarrow.parquet as pq

    paths = pq.read_table(exported[3] / "part-00000.parquet").column("path").to_pylist()

    def column(*values):
        return [*values] + [None] * (len(paths) - len(values))

    out = craft(exported, tmp_path / "export", base={
        "gps_lat": column(95.0, float("nan"), 48.8584, 48.8584), "gps_lon": column(2.0, 2.0, float("inf"), 2.2945),
        "camera_make": column("Canon\x1b[31m", "x" * 500, "", "Canon"),
        "taken_offset": column("+01:00; --", "+1", "+01:00", "-05:00"),
        "taken_source": column("gps", "exif", "file", "exif")})
    assert cli("--home", str(tmp_path / "home"), "import", str(out)).exit_code == 0
    with open_lib(tmp_path / "home", exported[0]) as lib:
        rows = lib.store.images_at(paths)
        got = [(r.gps_lat, r.gps_lon, r.camera_make, r.taken_offset, r.taken_source)
               for r in (rows[p] for p in paths[:4])]
        assert got == [(None, None, None, None, None), (None, None, "x" * 64, None, "exif"),
                       (None, None, None, "+01:00", "file"), (48.8584, 2.2945, "Canon", "-05:00", "exif")]
        assert [h.path for h in lib.search("a red circle", near=(48.8584, 2.2945, 1), k=50)] == [paths[3]]


def test_the_home_and_its_database_are_private(exported, tmp_path, cli):
    home = tmp_path / "new" / "home"
    assert cli("--home", str(home), "import", str(exported[3])).exit_code == 0
    mode = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (home, *home.iterdir())}
    assert mode["home"] == 0o700
    assert mode["library.db"] == mode["write.lock"] == 0o600
    assert mode.get("library.db-wal", 0o600) == 0o600
    # A folder the user made keeps the permissions the user gave it; what imgsearch creates in it is private.
    mine = tmp_path / "mine"
    mine.mkdir()
    mine.chmod(0o755)
    assert cli("--home", str(mine), "import", str(exported[3])).exit_code == 0
    assert stat.S_IMODE(mine.stat().st_mode) == 0o755
    assert stat.S_IMODE((mine / "library.db").stat().st_mode) == 0o600


def test_a_device_is_not_a_regular_file(exported, tmp_path, cli):
    from imgsearch.captions import read_captions

    r = cli("--home", str(exported[2]), "query", "--image", "/dev/zero", "--no-server")
    assert r.exit_code != 0 and r.stderr.strip() == "error: cannot use query image /dev/zero: not a regular file"
    table = tmp_path / "captions.csv"
    table.write_text(f"path,caption\n/dev/zero,zeros\n{tmp_path / 'gone.jpg'},nothing\n")
    problems = [why for _, why in read_captions(table).problems]
    assert problems == ["not a regular file: /dev/zero", f"image not found: {tmp_path / 'gone.jpg'}"]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM")
def test_kill_during_export_removes_its_temporary_folder(exported, tmp_path, cli):
    home = tmp_path / "home"
    shutil.copytree(exported[2], home)
    out = tmp_path / "out"
    out.mkdir()
    # The process signals itself once the export's temporary folder exists: no race against a sleep.
    code = ("import os, signal, sys\n"
            "from imgsearch import exchange, quickcli\n"
            "real = exchange._unit\n"
            "def unit(v):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return real(v)\n"
            "exchange._unit = unit\n"
            "sys.argv = ['imgsearch'] + sys.argv[1:]\n"
            "quickcli.main()\n")
    proc = subprocess.run([sys.executable, "-c", code, "--home", str(home), "--model", exported[0], "export",
                           str(out), "-q"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 130, proc.stderr
    assert "interrupted: the unfinished export was removed" in proc.stderr
    assert os.listdir(out) == []
    # Only the entry point of a CLI process takes SIGTERM over; the commands, run inside this process, do not.
    before = signal.getsignal(signal.SIGTERM)
    assert cli("--home", str(home), "export", str(tmp_path / "out2"), "-q").exit_code == 0
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_part_whose_page_headers_are_garbled_is_refused_in_one_line(exported, tmp_path, cli):
    import pyarrow.parquet as pq

    out = tmp_path / "export"
    shutil.copytree(exported[3], out)
    part = out / "part-00000.parquet"
    chunk = pq.ParquetFile(part).metadata.row_group(0).column(0)
    data = bytearray(part.read_bytes())
    data[chunk.dictionary_page_offset or chunk.data_page_offset] = 0x1F  # field 1 of Thrift type 15: no such type
    part.write_bytes(bytes(data))
    r = cli("--home", str(tmp_path / "home"), "import", str(out))
    assert r.exit_code == 1, r.output
    assert r.stderr.strip() == ("error: part-00000.parquet: the pages of its path column cannot be read; the export "
                                "is damaged")


@pytest.mark.parametrize("fmt, damage", [("parquet", "part-00001.parquet missing"),
                                         ("parquet", "part-00001.parquet cut"),
                                         ("clip-retrieval", "img_emb/img_emb_1.npy cut"),
                                         ("clip-retrieval", "metadata/metadata_1.parquet cut")])
def test_an_export_copied_in_part_is_refused_in_one_line_before_anything_is_imported(exported, tmp_path, cli, fmt,
                                                                                     damage):
    """A shard missing from a finished export imported the rest as if it were all; a parquet file cut short was
    an 'internal error: ArrowInvalid'; a cut .npy was found only after the shards before it were imported."""
    from imgsearch import exchange

    out = tmp_path / "export"
    with open_lib(exported[2], exported[0]) as lib:
        exchange.export_library(lib.settings, lib.store, out, fmt, shard_rows=8)  # 3 shards
    name, how = damage.split()
    if how == "missing":
        (out / name).unlink()
    else:
        os.truncate(out / name, (out / name).stat().st_size // 2)
    r = cli("--home", str(tmp_path / "home"), "import", str(out))
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert r.stderr.startswith(f"error: {out / name} ") and "the export is" in r.stderr, r.stderr
    assert not (tmp_path / "home" / "library.db").exists()


def test_a_vector_too_long_for_float32_is_imported_at_unit_length_without_a_warning(exported, tmp_path):
    """Its length overflowed float32: numpy warned on stderr and the vector was stored as all zeros."""
    import warnings

    import numpy as np

    photo = tmp_path / "photo.jpg"
    shutil.copy(sorted(exported[1].glob("*.jpg"))[0], photo)
    vec = good_vector(exported)
    out = craft(exported, tmp_path / "export", {"path": [str(photo)], "vector": [[3e38] * len(vec)]})
    with open_lib(tmp_path / "home", exported[0]) as lib, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert lib.import_(out).added == 19
        ids, vecs = lib.store.load_vectors(lib.model.id)
        stored = vecs[list(ids).index(lib.store.images_at([str(photo)])[str(photo)].id)]
    assert caught == [] and np.allclose(stored, 1 / np.sqrt(len(vec)), atol=1e-6)


@pytest.mark.parametrize("damage", ["vector pages", "text not UTF-8", "column name not UTF-8"])
def test_a_part_damaged_inside_is_refused_in_one_line(exported, tmp_path, cli, damage):
    """Pages that cannot be unpacked, or text holding bytes that are not UTF-8 (readers do not check), were an
    'internal error: OSError' or 'UnicodeDecodeError', before or halfway through the import."""
    import struct

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "export"
    shutil.copytree(exported[3], out)
    part = out / "part-00000.parquet"
    if damage == "vector pages":
        group = pq.ParquetFile(part).metadata.row_group(0)
        chunk = next(group.column(c) for c in range(group.num_columns)
                     if group.column(c).path_in_schema.startswith("vector"))
        data = bytearray(part.read_bytes())
        at = (chunk.dictionary_page_offset or chunk.data_page_offset) + chunk.total_compressed_size * 9 // 10
        assert at + 64 < len(data) - 8 - struct.unpack("<I", data[-8:-4])[0]  # the footer stays whole
        data[at:at + 64] = b"\xff" * 64
        part.write_bytes(bytes(data))
    elif damage == "column name not UTF-8":  # in a column chunk's metadata, not in the schema before it
        data = bytearray(part.read_bytes())
        footer = len(data) - 8 - struct.unpack("<I", data[-8:-4])[0]
        at = [i for i in range(footer, len(data)) if data.startswith(b"camera_model", i)][1]
        data[at + 11] = 0xFF
        part.write_bytes(bytes(data))
    else:
        table = pq.read_table(part)
        bad = pa.array([b"/photos/\xff.jpg"] * table.num_rows, pa.binary()).view(pa.string())
        pq.write_table(table.set_column(table.schema.get_field_index("path"), "path", bad), part)
    r = cli("--home", str(tmp_path / "home"), "import", str(out), "-q")
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert r.stderr.startswith("error: ") and r.stderr.strip().endswith("the export is damaged"), r.stderr
