"""`imgsearch export` / `import`: the round trip keeps search results, the clip-retrieval layout is exactly
what autofaiss and clip-retrieval read, models never mix, and a user's folder is never written over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
QUERIES = ("a red circle", "a blue square", "a green triangle")


def kind(path: str) -> str:
    return "_".join(os.path.basename(path).split("_")[:2])


def open_lib(home, model):
    import imgsearch

    return imgsearch.Library(home, model, device="cpu", precision="fp32", batch_size=16)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_model):
    """54 shapes indexed once for this module; each test gets a copy of the home (the files stay shared)."""
    import imgsearch.synthetic as synthetic

    base = tmp_path_factory.mktemp("exchange")
    synthetic.generate(base / "photos", per_class=3, size=96, fmt="jpg", seed=1, captions_file=None)
    with open_lib(base / "home", f"local-dir:{tiny_model}") as lib:
        assert lib.index(base / "photos").new == 54
    return base / "home", base / "photos"


@pytest.fixture()
def photos(indexed):
    return indexed[1]


@pytest.fixture()
def lib(home, model_id, indexed):
    import shutil

    shutil.copytree(indexed[0], home)
    with open_lib(home, model_id) as lib:
        yield lib


def results(lib, photos):
    """Text and image queries, as (path, score) lists: what a user sees, whatever the ids are."""
    example = sorted(photos.glob("green_triangle*"))[0]
    out = [[(h.path, h.score) for h in lib.search(q, k=12)] for q in QUERIES]
    out.append([(h.path, h.score) for h in lib.search(image=example, k=12)])
    return out


def assert_same_results(a, b):
    for ra, rb in zip(a, b, strict=True):
        assert [p for p, _ in ra] == [p for p, _ in rb]
        assert np.allclose([s for _, s in ra], [s for _, s in rb], atol=1e-5)


@pytest.mark.parametrize("fmt", ["parquet", "clip-retrieval"])
def test_round_trip_into_a_fresh_home_gives_the_same_results(lib, photos, tmp_path, model_id, fmt):
    before = results(lib, photos)
    assert [kind(p) for p, _ in before[0][:3]] == ["red_circle"] * 3  # the trained model ranks sensibly
    report = lib.export(tmp_path / "out", fmt)
    assert report.rows == 54 and report.format == fmt
    with open_lib(tmp_path / "home2", model_id) as other:
        first = other.import_(tmp_path / "out")
        assert (first.added, first.already, first.unreachable, first.changed) == (54, 0, [], [])
        assert_same_results(before, results(other, photos))
        again = other.import_(tmp_path / "out")  # idempotent: nothing is duplicated
        assert (again.added, again.vectors_added, again.already) == (0, 0, 54)
        assert other.store.image_count() == 54 and other.store.vector_count(other.model.id) == 54
        assert_same_results(before, results(other, photos))


def test_clip_retrieval_layout_is_exactly_what_autofaiss_reads(lib, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    lib.export(out, "clip-retrieval")
    assert sorted(p.name for p in (out / "img_emb").iterdir() if not p.name.startswith(".")) == ["img_emb_0.npy"]
    assert sorted(p.name for p in (out / "metadata").iterdir()
                  if not p.name.startswith(".")) == ["metadata_0.parquet"]
    emb = np.load(out / "img_emb" / "img_emb_0.npy")
    assert emb.dtype == np.float32 and emb.ndim == 2 and emb.shape == (54, lib.model.dim)
    assert emb.flags.c_contiguous and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    paths = pq.read_table(out / "metadata" / "metadata_0.parquet").column("image_path").to_pylist()
    assert len(paths) == 54 and len(set(paths)) == 54
    # Row i of the .npy is the vector of image_path[i]: compare with the library's own vectors.
    ids, vecs = lib.store.load_vectors(lib.model.id)
    rows = lib.store.get_images(ids)
    by_path = {rows[i].path: v for i, v in zip(ids.tolist(), vecs)}
    assert np.array_equal(emb, np.stack([by_path[p] for p in paths]))


def test_clip_retrieval_shards_pair_npy_and_metadata_row_for_row(lib, tmp_path):
    import pyarrow.parquet as pq

    from imgsearch.exchange import export_library

    out = tmp_path / "out"
    report = export_library(lib.settings, lib.store, out, "clip-retrieval", chunk=7, shard_rows=20)
    assert report.files == ["img_emb/img_emb_0.npy", "metadata/metadata_0.parquet", "img_emb/img_emb_1.npy",
                            "metadata/metadata_1.parquet", "img_emb/img_emb_2.npy", "metadata/metadata_2.parquet"]
    sizes = [np.load(out / "img_emb" / f"img_emb_{i}.npy").shape[0] for i in range(3)]
    assert sizes == [20, 20, 14]
    assert [pq.read_metadata(out / "metadata" / f"metadata_{i}.parquet").num_rows for i in range(3)] == sizes
    with open_lib(tmp_path / "home2", lib.settings.model) as other:
        assert other.import_(out).added == 54


def test_parquet_form_holds_fixed_size_vectors_metadata_and_the_model(lib, photos, tmp_path):
    import pyarrow as pa
    import pyarrow.dataset as ds

    out = tmp_path / "out"
    lib.export(out, "parquet")
    table = ds.dataset(out, format="parquet").to_table()  # the manifest and marker are not read as data
    assert table.num_rows == 54
    assert table.schema.field("vector").type == pa.list_(pa.float32(), lib.model.dim)
    for col in ("id", "path", "hash", "size", "mtime_ns", "width", "height", "taken_at"):
        assert col in table.schema.names
    row = table.slice(0, 1).to_pylist()[0]
    on_disk = Path(row["path"])
    assert on_disk.parent == photos and row["size"] == on_disk.stat().st_size and row["width"] == 96
    model = json.loads(table.schema.metadata[b"imgsearch"])["model"]
    assert (model["name"], model["fingerprint"], model["dim"]) == (lib.model.name, lib.model.fingerprint,
                                                                   lib.model.dim)
    manifest = json.loads((out / "_imgsearch_export.json").read_text())
    assert manifest["rows"] == 54 and manifest["format"] == "parquet" and manifest["model"] == model


def test_import_refuses_another_models_vectors_and_leaves_the_library_as_it_was(lib, tmp_path, photos,
                                                                                  random_tiny_model, cli):
    out = tmp_path / "out"
    lib.export(out, "clip-retrieval")
    other_model = f"local-dir:{random_tiny_model}"
    with open_lib(tmp_path / "home2", other_model) as other:
        other.index(sorted(photos.glob("red_*")))
        before = (other.store.image_count(), [(m.label, m.vectors) for m in other.store.models()])
    result = cli("--home", str(tmp_path / "home2"), "import", str(out), model=other_model)
    assert result.exit_code == 1
    line = result.output.strip()
    assert "\n" not in line and line.startswith("error: ") and "models never mix" in line
    assert str(random_tiny_model) in line and str(lib.model.name) in line  # names both models
    with open_lib(tmp_path / "home2", other_model) as other:
        assert (other.store.image_count(), [(m.label, m.vectors) for m in other.store.models()]) == before


def test_import_refuses_an_export_mixing_two_models(lib, tmp_path, photos, random_tiny_model):
    import shutil

    from imgsearch.errors import ModelMismatchError

    with open_lib(tmp_path / "home2", f"local-dir:{random_tiny_model}") as other:
        other.index(sorted(photos.glob("red_*")))
        other.export(tmp_path / "theirs", "parquet")
    lib.export(tmp_path / "mine", "parquet")
    shutil.copy(tmp_path / "theirs" / "part-00000.parquet", tmp_path / "mine" / "part-00001.parquet")
    with open_lib(tmp_path / "home3", lib.settings.model) as fresh:
        with pytest.raises(ModelMismatchError, match="mixes vectors of two models"):
            fresh.import_(tmp_path / "mine")
    assert not (tmp_path / "home3").exists()  # refused before the library was even created


def test_export_refuses_a_folder_holding_user_files_and_leaves_them_intact(lib, tmp_path, cli, home):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    result = cli("export", str(out), "--format", "clip-retrieval")
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: {out} is not empty: it holds files (notes.txt); export into a new or "
                                     "empty folder (imgsearch never writes over files it did not create)")
    assert sorted(os.listdir(out)) == ["notes.txt"] and (out / "notes.txt").read_text() == "my notes"
    # An earlier export is not written over either.
    done = tmp_path / "done"
    assert cli("export", str(done)).exit_code == 0
    listing = sorted(os.listdir(done))
    again = cli("export", str(done))
    assert again.exit_code == 2 and "holds an earlier export" in again.output
    assert sorted(os.listdir(done)) == listing


def test_failed_export_removes_only_what_it_wrote(lib, tmp_path, monkeypatch):
    from imgsearch import exchange

    calls = {"n": 0}
    real = exchange._unit

    def fail_on_second_chunk(vecs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(vecs)

    monkeypatch.setattr(exchange, "_unit", fail_on_second_chunk)
    new = tmp_path / "new"
    with pytest.raises(KeyboardInterrupt):
        exchange.export_library(lib.settings, lib.store, new, "clip-retrieval", chunk=10)
    assert not new.exists()  # made by the export, so removed with it
    empty = tmp_path / "empty"
    empty.mkdir()
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        exchange.export_library(lib.settings, lib.store, empty, "parquet", chunk=10)
    assert empty.is_dir() and os.listdir(empty) == []  # the user's folder stays, empty as it was


def test_a_killed_exports_leftovers_are_cleared_when_provably_imgsearchs(lib, tmp_path, monkeypatch):
    from imgsearch import exchange

    out = tmp_path / "out"
    out.mkdir()

    calls = {"n": 0}

    def killed(vecs):  # as if the process died on the second chunk: no cleanup runs
        calls["n"] += 1
        if calls["n"] == 2:
            raise SystemExit(9)
        return vecs

    with monkeypatch.context() as m:
        m.setattr(exchange, "_unit", killed)
        m.setattr(exchange, "_remove_temp", lambda *a: None)
        with pytest.raises(SystemExit):
            exchange.export_library(lib.settings, lib.store, out, "clip-retrieval", chunk=10)
    leftover = os.listdir(out)
    assert len(leftover) == 1 and leftover[0].startswith(".imgsearch-export-")
    from imgsearch.errors import DataError

    with open_lib(tmp_path / "home2", lib.settings.model) as other, pytest.raises(DataError, match="unfinished"):
        other.import_(out)
    report = lib.export(out, "clip-retrieval")  # the stale temporary folder is proven ours and removed
    assert report.rows == 54
    assert sorted(os.listdir(out)) == [".imgsearch-owned.json", "_imgsearch_export.json", "img_emb", "metadata"]
    # A leftover with a file imgsearch did not write is kept, and the export says why it won't go ahead.
    other = tmp_path / "other"
    other.mkdir()
    calls["n"] = 0
    with monkeypatch.context() as m:
        m.setattr(exchange, "_unit", killed)
        m.setattr(exchange, "_remove_temp", lambda *a: None)
        with pytest.raises(SystemExit):
            exchange.export_library(lib.settings, lib.store, other, "parquet", chunk=10)
    tmp = next(other.iterdir())
    (tmp / "precious.txt").write_text("mine")
    from imgsearch.errors import UsageError

    with pytest.raises(UsageError, match="cannot prove it wrote"):
        lib.export(other, "parquet")
    assert (tmp / "precious.txt").read_text() == "mine"


def test_import_skips_missing_and_changed_files_and_checks_hashes_unless_trusted(tmp_path, photos, model_id, home):
    import shutil

    own = tmp_path / "own"  # this test changes files: its own copies, indexed into its own library
    shutil.copytree(photos, own)
    out = tmp_path / "out"
    with open_lib(home, model_id) as lib:
        lib.index(sorted(own.glob("red_*")) + sorted(own.glob("blue_*")))
        lib.export(out, "parquet")
    files = [p.resolve() for p in sorted(own.glob("red_*"))]
    files[0].unlink()
    with open(files[1], "ab") as f:
        f.write(b"more")  # size differs: caught with and without --trust
    data = bytearray(files[2].read_bytes())
    data[-3] ^= 0xFF  # same size, other content: only the hash check sees it
    files[2].write_bytes(bytes(data))
    with open_lib(tmp_path / "checked", model_id) as other:
        r = other.import_(out)
        assert (r.added, len(r.unreachable), r.unreachable[0]) == (15, 1, str(files[0]))
        assert sorted(p for p, _ in r.changed) == [str(files[1]), str(files[2])]
        assert other.store.image_by_path(str(files[2])) is None
    with open_lib(tmp_path / "trusted", model_id) as other:
        r = other.import_(out, trust=True)
        assert r.added == 16 and [p for p, _ in r.changed] == [str(files[1])]


def test_foreign_clip_retrieval_export_needs_the_model_named(lib, tmp_path, model_id, cli, photos):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    lib.export(out, "clip-retrieval")
    # As clip-retrieval writes it: vectors and image_path only, nothing about the model.
    (out / "_imgsearch_export.json").unlink()
    meta = out / "metadata" / "metadata_0.parquet"
    paths = pq.read_table(meta).column("image_path")
    pq.write_table(pa.table({"image_path": paths}), meta)
    home2 = tmp_path / "home2"
    refused = cli("--home", str(home2), "import", str(out), model=None)
    assert refused.exit_code == 2 and "does not say which model made its vectors" in refused.output
    assert not (home2 / "library.db").exists()
    done = cli("--home", str(home2), "import", str(out), "-q")  # --model given: that model made them
    assert done.exit_code == 0, done.output
    assert done.output.startswith("imported 54 new images")
    with open_lib(home2, model_id) as other:
        assert [kind(h.path) for h in other.search("a red circle", k=3)] == ["red_circle"] * 3
    # Vectors of another dimension are refused even when the model is named.
    emb = np.load(out / "img_emb" / "img_emb_0.npy")
    np.save(out / "img_emb" / "img_emb_0.npy", np.hstack([emb, emb[:, :1]]))
    wrong = cli("--home", str(tmp_path / "home3"), "import", str(out))
    assert wrong.exit_code == 1 and f"holds {emb.shape[1] + 1}-dimensional vectors" in wrong.output


def test_export_picks_the_model_and_says_when_it_cannot(lib, tmp_path, photos, random_tiny_model, home):
    from imgsearch.errors import UsageError

    with open_lib(home, f"local-dir:{random_tiny_model}") as other:
        other.index(sorted(photos.glob("red_*")))
    assert lib.export(tmp_path / "current", "parquet").model == lib.model.label  # the Library's own model
    with open_lib(home, None) as default:  # the default model has no vectors here: which one is meant?
        with pytest.raises(UsageError, match=r"holds vectors of 2 models .*choose one with"):
            default.export(tmp_path / "x")
        random_row = [m for m in default.store.models() if m.name.endswith(str(random_tiny_model))][0]
        report = default.export(tmp_path / "by-id", model=str(random_row.id))
    assert report.rows == 9 and str(random_tiny_model) in report.model


def test_cli_export_then_import_and_help_stays_light(lib, cli, tmp_path):
    out = tmp_path / "out"
    r = cli("export", str(out), "--format", "clip-retrieval", "-q")
    assert r.exit_code == 0 and r.output.startswith("exported 54 vectors of ")
    r = cli("--home", str(tmp_path / "home2"), "import", str(out), "--json")
    assert r.exit_code == 0 and json.loads(r.output)["added"] == 54
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("x")
    r = cli("import", str(notes))
    assert r.exit_code == 1 and r.output.strip() == (
        f"error: {notes} is not an export: expected img_emb/ and metadata/ (clip-retrieval) or .parquet files "
        "with a vector column (`imgsearch export --format parquet`)")
    bad = cli("export", str(tmp_path / "y"), "--format", "csv")
    assert bad.exit_code == 2 and bad.output.strip() == "error: --format csv: choose parquet or clip-retrieval"
    code = "import sys, imgsearch.cli; print(sorted(m for m in sys.modules if m.split('.')[0] == 'pyarrow'))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


def test_import_gives_vectors_to_images_already_there_and_keeps_odd_names(lib, tmp_path, photos, model_id,
                                                                          random_tiny_model):
    import shutil

    odd_dir = tmp_path / "odd"
    odd_dir.mkdir()
    odd = os.path.join(os.fsencode(odd_dir), b"caf\xe9_red_circle.jpg")  # Latin-1 name: not UTF-8
    shutil.copy(sorted(photos.glob("red_circle*"))[0], os.fsdecode(odd))
    assert lib.index(odd_dir).new == 1
    out = tmp_path / "out"
    lib.export(out, "parquet")
    other_model = f"local-dir:{random_tiny_model}"
    with open_lib(tmp_path / "home2", other_model) as other:
        other.index(sorted(photos.glob("red_*")))
    with open_lib(tmp_path / "home2", model_id) as mine:
        r = mine.import_(out)
        assert (r.added, r.vectors_added, r.already) == (46, 9, 0)
        row = mine.store.image_by_path(os.fsdecode(odd))
        assert row is not None and os.fsencode(row.path) == odd  # the exact bytes, not a mangled name
        top = sorted(kind(h.path) for h in mine.search("a red circle", k=4))
        assert top == [os.fsdecode(b"caf\xe9_red")] + ["red_circle"] * 3
        counts = {m.name: m.vectors for m in mine.store.models()}
    assert counts == {other_model: 9, model_id: 55}  # the other model's vectors are untouched


@pytest.mark.slow
def test_when_and_where_survive_the_round_trip(tmp_path, model_id):
    """Import kept only taken_at: GPS, camera, time zone and taken_source were lost, so `near=` and `camera=`
    found nothing in the new library (and hits differed) until every folder was indexed again."""
    from test_when_where import EIFFEL, make_dated

    dated = make_dated(tmp_path / "dated")
    paths = [str(p) for p in sorted(dated.iterdir())]

    def seen(lib):
        near = [(h.path, h.score) for h in lib.search("a red circle", near=(*EIFFEL, 1), camera="canon", k=20)]
        later = [(h.path, h.score) for h in lib.search("a red circle", after="2023-03-10T02:00+01:00", k=20)]
        return near, later, {p: r.meta() for p, r in lib.store.images_at(paths).items()}

    with open_lib(tmp_path / "home", model_id) as lib:
        assert lib.index(dated).new == 11
        for fmt in ("parquet", "clip-retrieval"):
            lib.export(tmp_path / fmt, fmt)
        before = seen(lib)
    assert len(before[0]) == 2 and len(before[1]) == 5 and before[2][paths[0]]["taken_source"] == "exif"
    for fmt in ("parquet", "clip-retrieval"):
        with open_lib(tmp_path / f"home-{fmt}", model_id) as other:
            assert other.import_(tmp_path / fmt).added == 11
            assert seen(other) == before, fmt
