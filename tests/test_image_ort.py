"""The image tower on onnxruntime (fp32 export, int8 gate), the thread budget, and MPS device selection."""

from __future__ import annotations

import json
import sys
import threading
import time

import numpy as np
import pytest

from imgsearch import onnx_image


def _encoder(model_dir, precision="fp32"):
    from imgsearch.encoder import ModelSpec, build

    return build(ModelSpec(f"local-dir:{model_dir}"), "cpu", precision)


def _decoded(enc, folder, n=12):
    import torch

    from imgsearch.images import open_image

    paths = sorted(p for p in folder.rglob("*") if p.suffix in (".jpg", ".png"))[:n]
    return torch.stack([enc.preprocess(open_image(str(p), draft_size=enc.draft_size)[0]) for p in paths])


@pytest.mark.slow
def test_fp32_export_matches_torch_on_photos(tiny_model, home, photos):
    enc = _encoder(tiny_model)
    tower, manifest = onnx_image.ensure_export(enc, home, "fp32", threads=2)
    assert manifest["fp32"]["passed"] and manifest["fp32"]["min_cosine"] >= 0.9999
    folder = onnx_image.export_dir(home, enc.fingerprint)
    on_disk = json.loads((folder / "manifest.json").read_text())
    assert on_disk["fingerprint"] == enc.fingerprint and on_disk["input_size"] == enc.image_size
    batch = _decoded(enc, photos)
    ref = enc.encode_image_tensors(batch)
    ort = onnx_image.OrtEncoder(tower, enc.spec, enc.fingerprint, "fp32", enc.dim, enc.image_size, enc.preprocess, enc)
    got = ort.encode_image_tensors(batch)
    assert got.shape == ref.shape
    assert float((got * ref).sum(1).min()) >= 0.9999
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def test_export_graph_is_lean_and_built_without_touching_the_model(tiny_model, home, photos):
    """The ViT's graph is written from its tensors (3 Transposes per block where torch's trace has 8); the live
    model is not traced, keeps its modules and gives the same vectors afterwards."""
    import onnx
    import torch

    enc = _encoder(tiny_model)
    blocks = enc.model.visual.transformer.resblocks
    batch = _decoded(enc, photos, 4)
    before = enc.encode_image_tensors(batch)
    tower, manifest = onnx_image.ensure_export(enc, home, "fp32", threads=1)
    assert [type(b.attn) for b in blocks] == [torch.nn.MultiheadAttention] * 2
    assert np.array_equal(enc.encode_image_tensors(batch), before)
    assert manifest["format"] == onnx_image.FORMAT and manifest["fp32"]["min_cosine"] >= 0.9999
    model = onnx.load(str(onnx_image.export_dir(home, enc.fingerprint) / onnx_image.FP32_FILE))
    assert model.producer_name == "imgsearch"  # written by clipgraph, not traced
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Transpose") <= 3 * len(blocks) + 1, ops.count("Transpose")  # torch's own: 8 per block
    assert float((tower.encode(batch.numpy()) * before).sum(1).min()) >= 0.9999


@pytest.mark.slow
def test_export_is_rebuilt_for_changed_weights_and_never_used_after_a_failed_check(tiny_model, home, photos,
                                                                                    tmp_path):
    from imgsearch.encoder import save_local_dir
    from imgsearch.synthetic import build_tiny_clip

    model_dir = tmp_path / "model"
    # Written by imgsearch (a copy would carry another folder's ownership marker and could not be replaced).
    base = _encoder(tiny_model)
    base_cfg = json.loads((tiny_model / "open_clip_config.json").read_text())
    save_local_dir(base.model, base_cfg["model_cfg"], model_dir, base_cfg.get("preprocess_cfg"))
    enc = _encoder(model_dir)
    onnx_image.ensure_export(enc, home, "fp32")
    old_folder = onnx_image.export_dir(home, enc.fingerprint)

    # A "fine-tune" into the same folder: new weights, same path.
    model, cfg = build_tiny_clip(seed=7)
    save_local_dir(model, cfg, model_dir, {"size": cfg["vision_cfg"]["image_size"]})
    enc2 = _encoder(model_dir)
    assert enc2.fingerprint != enc.fingerprint
    tower2, manifest2 = onnx_image.ensure_export(enc2, home, "fp32")
    assert onnx_image.export_dir(home, enc2.fingerprint) != old_folder
    batch = _decoded(enc2, photos, 6)
    assert float((tower2.encode(batch.numpy()) * enc2.encode_image_tensors(batch)).sum(1).min()) >= 0.9999

    # A manifest from other weights in the folder (copied, or written by an older version) is not trusted.
    folder2 = onnx_image.export_dir(home, enc2.fingerprint)
    m = json.loads((folder2 / "manifest.json").read_text())
    m["fingerprint"] = "someone-else"
    (folder2 / "manifest.json").write_text(json.dumps(m))
    before = (folder2 / "image-fp32.onnx").stat().st_mtime_ns
    onnx_image.ensure_export(enc2, home, "fp32")
    assert (folder2 / "image-fp32.onnx").stat().st_mtime_ns != before
    assert json.loads((folder2 / "manifest.json").read_text())["fingerprint"] == enc2.fingerprint

    # A failed check is recorded; the export is then never used, and torch runs instead.
    m = json.loads((folder2 / "manifest.json").read_text())
    m["fp32"]["passed"] = False
    (folder2 / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(onnx_image.OnnxUnavailable, match="does not match torch"):
        onnx_image.ensure_export(enc2, home, "fp32")
    from imgsearch.config import Settings

    settings = Settings.from_env(home=home, image_backend="onnx")
    assert onnx_image.select(enc2, settings, 1) is enc2 and enc2.image_tower == "torch fp32"


@pytest.mark.slow
def test_index_int8_reports_parity_and_ranks_like_fp32(cli, photos, home, monkeypatch):
    # The 32 px tiny model quantises worse than ViT-B-32 (min cosine ~0.986 here): the gate is lowered to
    # what this model reaches, and the ranking check below is what the gate protects.
    monkeypatch.setenv("IMGSEARCH_INT8_MIN_COSINE", "0.98")
    r = cli("--precision", "int8", "index", photos)
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if "min cosine" in x)
    assert "onnxruntime int8" in line
    cos = float(line.split("min cosine ")[1].split()[0])
    assert 0.98 <= cos <= 1.0
    r = cli("--precision", "int8", "index", photos, "--json")
    assert json.loads(r.output)["encoded"] == 0  # nothing new: no parity run either
    # Same rankings as an fp32 library of the same photos, for several queries.
    fp32_home = home.parent / "fp32-home"
    assert cli("--home", fp32_home, "index", photos).exit_code == 0

    def top(h, q):
        hits = json.loads(cli("--home", h, "query", q, "-k", "5", "--json").output)
        return [x["path"] for x in (hits["results"] if isinstance(hits, dict) else hits)]

    for q in ("a red circle", "a blue square", "a green triangle"):
        assert len(set(top(home, q)) & set(top(fp32_home, q))) >= 4, q


@pytest.mark.slow
def test_int8_below_threshold_is_refused_and_library_untouched(cli, photos, home, monkeypatch):
    monkeypatch.setenv("IMGSEARCH_INT8_MIN_COSINE", "1.01")  # no quantised tower reaches this
    r = cli("--precision", "int8", "index", photos)
    assert r.exit_code != 0
    msg = r.output.strip().splitlines()[-1]
    assert "--precision int8 is too far from fp32 on your images" in msg and "--precision fp32" in msg
    r = cli("status", "--json")
    assert json.loads(r.output)["images"] == 0 if r.exit_code == 0 else True


@pytest.mark.slow
def test_without_onnxruntime_int8_falls_back_to_torch_with_one_note(cli, photos, monkeypatch, capfd):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    onnx_image._said.clear()
    r = cli("--precision", "int8", "index", photos, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index("{"):])
    assert report["new"] == 54 and report["image_tower"] == "torch fp32" and report["int8_parity"] is None
    try:
        err = r.stderr
    except ValueError:  # older click mixes stderr into output
        err = r.output
    assert err.count("onnxruntime is not installed") == 1 and "falls back to torch fp32" in err


def test_thread_budget_never_oversubscribes():
    from imgsearch.config import thread_budget, training_workers

    for cores in (1, 2, 4, 16):
        b = thread_budget(cores, "cpu")
        assert not b.overlap  # decode and encode take turns: at most max(encoder, decode) threads are busy
        assert max(b.encoder, b.decode) <= cores and b.encoder == cores and b.decode >= 1, b
        g = thread_budget(cores, "cuda")
        assert g.overlap and 1 <= g.decode <= min(8, cores)
        assert 1 <= training_workers("cpu", cores=cores) <= max(1, cores // 2)
    assert thread_budget(2, "cpu", workers=5).decode == 5  # --workers is honoured


@pytest.mark.slow
@pytest.mark.parametrize("own_process", [True, False])
def test_indexing_sets_torch_threads_only_in_its_own_process_and_never_decodes_while_encoding(
        settings, photos, monkeypatch, own_process):
    """The CLI (own_process) encodes with the budget's thread count and puts the count back after the run;
    inside someone else's program the count stays the program's own throughout."""
    import torch

    import imgsearch.config as config
    from imgsearch import encoder as encoder_mod
    from imgsearch import images
    from imgsearch.indexer import index_paths

    monkeypatch.setattr(config, "cpu_cores", lambda: 1)
    enc = encoder_mod.load(encoder_mod.ModelSpec(settings.model), "cpu", "fp32")
    settings = settings.with_(workers=0, image_backend="torch", own_process=own_process)
    decoding = []
    lock = threading.Lock()
    overlaps = []
    real_open = images.open_image

    def open_image(*a, **k):
        with lock:
            decoding.append(1)
        try:
            time.sleep(0.02)  # as slow as a real photo, so a decode running ahead would be caught mid-way
            return real_open(*a, **k)
        finally:
            with lock:
                decoding.pop()

    real_encode = enc.encode_image_tensors
    threads = []

    def encode(batch):
        with lock:
            overlaps.append(len(decoding))
        threads.append(torch.get_num_threads())
        return real_encode(batch)

    monkeypatch.setattr(images, "open_image", open_image)
    monkeypatch.setattr(enc, "encode_image_tensors", encode)
    saved = torch.get_num_threads()
    torch.set_num_threads(3)  # the program's own count, not the budget's 1
    try:
        report = index_paths(settings, [photos], encoder=enc)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(saved)
    assert threads and set(threads) == ({1} if own_process else {3})
    assert report.new == 54 and report.encoded == 54
    assert overlaps and max(overlaps) == 0, overlaps


def test_auto_device_picks_mps_after_cuda_with_faked_backends(monkeypatch):
    import torch

    from imgsearch.encoder import pick_device, pick_precision
    from imgsearch.errors import UsageError
    from imgsearch.train.loop import training_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto") == "mps" and pick_device("mps") == "mps"
    assert pick_precision("auto", "mps") == "fp32"
    assert pick_precision("fp16", "mps") == "fp16"
    assert training_precision("auto", "mps") == "fp32"
    with pytest.raises(UsageError, match="int8 runs on the CPU only"):
        pick_precision("int8", "mps")
    with pytest.raises(UsageError, match="bf16 is not supported on MPS"):
        pick_precision("bf16", "mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("auto") == "cpu"
    with pytest.raises(UsageError, match="--device mps was given but"):
        pick_device("mps")
    with pytest.raises(UsageError, match="int8 is for indexing only"):
        training_precision("int8", "cpu")


def test_device_mps_without_apple_gpu_is_one_line_error(cli, photos, monkeypatch):
    import torch

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    r = cli("--device", "mps", "index", photos)
    assert r.exit_code != 0
    assert "--device mps was given but" in r.output and len(r.output.strip().splitlines()) == 1


def test_prestarted_session_is_used_only_for_the_same_file(tiny_model, home, monkeypatch):
    """A session begun in the background (while the library opens) serves the tower that asks for that
    file; once the file is replaced (a rebuilt export), the tower loads the new file instead."""
    import os
    import threading

    enc = _encoder(tiny_model)
    onnx_image.ensure_export(enc, home, "fp32", threads=1)
    path = onnx_image.export_dir(home, enc.fingerprint) / onnx_image.FP32_FILE
    made = []
    real = onnx_image._new_session

    def counting(*args):
        made.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(onnx_image, "_new_session", counting)
    onnx_image.prestart(path, 1)
    tower = onnx_image.OrtImageTower(path, "fp32", 1)
    assert made == ["onnx-session_0"]  # loaded once, on the background thread
    probe = onnx_image.probe_batch(enc.image_size, 2)
    expected = tower.encode(probe)

    onnx_image.prestart(path, 1)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file changed after the head start
    tower = onnx_image.OrtImageTower(path, "fp32", 1)
    assert made == ["onnx-session_0", "onnx-session_0", "MainThread"]
    assert np.allclose(tower.encode(probe), expected, atol=1e-6)

    # A process that exits (an error, a Ctrl-C) while a head start is still loading exits cleanly.
    import subprocess

    code = ("import sys; from pathlib import Path; from imgsearch import onnx_image; "
            f"onnx_image.prestart(Path({str(path)!r}), 1); sys.exit(3)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 3 and out.stderr == "", out.stderr[-500:]


@pytest.mark.slow
def test_an_int8_index_run_leaves_the_librarys_shared_encoder_as_it_was(model_id, home, photos, monkeypatch):
    """Indexing picks an image encoder of its own: the Library's encoder, which its queries (a server's other
    threads) share, encodes a query image as before an int8 run, on the same backend."""
    import imgsearch
    from imgsearch.images import open_image

    monkeypatch.setenv("IMGSEARCH_INT8_MIN_COSINE", "0.98")  # what the 32 px tiny model reaches (see above)
    query = open_image(str(sorted(photos.rglob("*.jpg"))[0]))[0]
    with imgsearch.Library(home, model_id, device="cpu", precision="int8", batch_size=16) as lib:
        before, backend = lib.encoder.encode_images([query]), lib.encoder.describe()
        report = lib.index(photos)
        assert report.image_tower == "onnxruntime int8" and report.parity_images == 32
        after = lib.encoder.encode_images([query])
        # The same vector (torch fp32; other thread counts may reorder sums), where int8 moves it by ~1e-3.
        assert np.abs(after - before).max() < 1e-5, np.abs(after - before).max()
        assert lib.encoder.describe() == backend


@pytest.mark.slow
def test_an_export_made_twice_at_once_keeps_both_runs_manifest_entries(tiny_model, home, monkeypatch):
    """A query's fp32 export and a first index run's int8 one, made at once for the same weights: the query
    wrote its stale manifest last, the index run found no int8 entry and stopped ("needs torch"). Threads
    stand in for the two processes: the index run starts while the query writes its graph."""
    from imgsearch import clipgraph
    from imgsearch.config import Settings

    base = Settings.from_env(home=home, model=f"local-dir:{tiny_model}", device="cpu")
    real, index_run, done = clipgraph.write_image_graph, [], threading.Event()

    def write_graph(*args, **kw):
        if not index_run:
            index_run.append(threading.Thread(target=lambda: index_run.append(
                onnx_image.make_exports(base.with_(precision="int8"), 1, text=False)) or done.set()))
            index_run[0].start()
            done.wait(3)  # before the fix it finished meanwhile; now it waits for this export's lock
        return real(*args, **kw)

    monkeypatch.setattr(clipgraph, "write_image_graph", write_graph)
    assert onnx_image.make_exports(base.with_(precision="fp32", image_backend="onnx"), 1, text=False) == "ok"
    index_run[0].join()
    assert index_run[1] == "ok"
    manifest = json.loads(next(home.glob("exports/*/image/manifest.json")).read_text())
    assert manifest["fp32"]["passed"] and manifest["int8"]["file"] == onnx_image.INT8_FILE, manifest
