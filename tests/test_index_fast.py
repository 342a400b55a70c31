"""Fast indexing: torch-free `index` from a verified ONNX export, numpy preprocess, skipped random init,
the cached int8 parity verdict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imgsearch import onnx_image
from imgsearch.synthetic import generate

ROOT = Path(__file__).resolve().parents[1]

# Runs `imgsearch ...` as the console script does and says on stderr whether torch & co. were imported, and
# whether a child process (such as onnxruntime's quantiser) was started.
PROBE = r"""
import atexit, subprocess, sys
heavy, children = ("torch", "torchvision", "open_clip", "onnxruntime.quantization"), []
popen = subprocess.Popen.__init__
subprocess.Popen.__init__ = lambda self, *a, **k: children.append(1) or popen(self, *a, **k)
atexit.register(lambda: print("HEAVY:" + ",".join([m for m in heavy if m in sys.modules]
                                                  + ["child process"] * bool(children)), file=sys.stderr))
sys.argv = ["imgsearch"] + sys.argv[1:]
from imgsearch.quickcli import main
main()
"""


def _process(home: Path, model: str, *args: str, env: dict | None = None, ok: bool = True):
    """(stdout, heavy modules imported, stderr) of `imgsearch --model MODEL --device cpu ARGS` in a fresh process."""
    full = dict(os.environ, PYTHONPATH=str(ROOT), IMGSEARCH_HOME=str(home), **(env or {}))
    out = subprocess.run([sys.executable, "-c", PROBE, "--model", model, "--device", "cpu", *args], env=full,
                         capture_output=True, text=True, timeout=300)
    assert (out.returncode == 0) == ok, out.stderr[-2000:]
    heavy = next(x for x in out.stderr.splitlines() if x.startswith("HEAVY:"))[len("HEAVY:"):]
    return out.stdout, heavy, out.stderr


def _index_process(home: Path, model: str, folder: Path, *args: str, env: dict | None = None):
    out, heavy, _ = _process(home, model, *args, "index", str(folder), "--json", "--quiet", env=env)
    return json.loads(out[out.index("{"):]), heavy


def _vectors_by_path(home: Path, model: str, fingerprint: str | None = None) -> dict[str, np.ndarray]:
    from imgsearch.store import Store

    store = Store(home / "library.db", create=False)
    try:
        (row,) = [m for m in store.models() if m.vectors and fingerprint in (None, m.fingerprint)]
        ids, vecs = store.load_vectors(row.id)
        paths = {r.id: p for p, r in store.images_under(["/"]).items()}
        return {paths[i]: v for i, v in zip(ids.tolist(), vecs)}
    finally:
        store.close()


def _photos(tmp_path: Path, name: str, seed: int) -> Path:
    folder = tmp_path / name
    generate(folder, per_class=2, size=96, fmt="jpg", seed=seed, captions_file=None)
    return folder


@pytest.mark.slow
def test_index_with_a_verified_export_never_imports_torch_and_gives_torch_vectors(settings, photos, tmp_path):
    from imgsearch.indexer import index_paths

    more = _photos(tmp_path, "more", seed=9)
    # First run on torch: makes and verifies the image export (onnx asked for) and the text export.
    first = index_paths(settings.with_(image_backend="onnx"), [photos])
    assert first.image_tower == "onnxruntime fp32"
    report, heavy = _index_process(settings.home, settings.model, more, "--precision", "fp32",
                                   env={"IMGSEARCH_IMAGE_BACKEND": "onnx"})
    assert heavy == "" and report["new"] == 36 and report["image_tower"] == "onnxruntime fp32"

    # The same photos through torch, in a library of their own.
    ref_home = tmp_path / "ref-home"
    ref = index_paths(settings.with_(home=ref_home, image_backend="torch", torch_free=False), [more])
    assert ref.image_tower == "torch fp32" and ref.new == 36
    got, want = _vectors_by_path(settings.home, settings.model), _vectors_by_path(ref_home, settings.model)
    mine = {p: v for p, v in got.items() if p.startswith(str(more))}
    assert sorted(mine) == sorted(want)
    assert min(float(mine[p] @ want[p]) for p in want) >= 0.9999
    # ids follow the walk order in both paths
    from imgsearch.store import Store

    def order(h):
        s = Store(h / "library.db", create=False)
        try:
            rows = s.images_under([str(more)])
            return [p for p, _ in sorted(rows.items(), key=lambda kv: kv[1].id)]
        finally:
            s.close()

    assert order(settings.home) == order(ref_home)
    # And a cold text query finds the new photos without torch either (the text export was made by run one).
    assert (settings.home / "exports").is_dir()


@pytest.mark.slow
def test_changed_checkpoint_is_never_served_by_the_stale_export(tiny_model, settings, photos, tmp_path):
    from imgsearch.encoder import ModelSpec, build, save_local_dir
    from imgsearch.indexer import index_paths
    from imgsearch.synthetic import build_tiny_clip

    model_dir = tmp_path / "model"
    base = build(ModelSpec(f"local-dir:{tiny_model}"), "cpu", "fp32")
    cfg = json.loads((tiny_model / "open_clip_config.json").read_text())
    save_local_dir(base.model, cfg["model_cfg"], model_dir, cfg.get("preprocess_cfg"))
    s = settings.with_(model=f"local-dir:{model_dir}", image_backend="onnx")
    index_paths(s, [photos])
    lite, why = onnx_image.torch_free_encoder(s, None, 2)
    assert lite is not None, why

    # A "fine-tune" into the same folder: same path, new weights.
    model, new_cfg = build_tiny_clip(seed=7)
    save_local_dir(model, new_cfg, model_dir, {"size": new_cfg["vision_cfg"]["image_size"]})
    assert onnx_image._lite_candidate(s, 2) == (None, "no image export for these weights")
    more = _photos(tmp_path, "more", seed=11)
    report, heavy = _index_process(s.home, s.model, more, "--precision", "fp32",
                                   env={"IMGSEARCH_IMAGE_BACKEND": "onnx"})
    assert report["new"] == 36 and heavy == ""  # the new weights' exports were made from their tensors
    new = build(ModelSpec(s.model), "cpu", "fp32")
    assert new.fingerprint != base.fingerprint
    got = _vectors_by_path(s.home, s.model, new.fingerprint)
    from PIL import Image

    for path in sorted(p for p in got if p.startswith(str(more)))[:4]:
        with Image.open(path) as im:
            assert float(got[path] @ new.encode_images([im.convert("RGB")])[0]) >= 0.999


def test_numpy_preprocess_matches_open_clips_torch_preprocess(tiny_model):
    import open_clip
    from PIL import Image

    from imgsearch.encoder import ModelSpec, build
    from imgsearch.images import numpy_preprocess, preprocess_cfg_of

    enc = build(ModelSpec(f"local-dir:{tiny_model}"), "cpu", "fp32")
    mean, std = list(open_clip.OPENAI_DATASET_MEAN), list(open_clip.OPENAI_DATASET_STD)
    cases = [(enc.preprocess, numpy_preprocess(preprocess_cfg_of(enc.model)))]
    for size, interp, mode in ((224, "bicubic", "shortest"), (256, "bilinear", "shortest"), (224, "bicubic", "squash")):
        torch_pre = open_clip.image_transform(size, is_train=False, mean=mean, std=std, resize_mode=mode,
                                              interpolation=interp)
        cases.append((torch_pre, numpy_preprocess({"size": size, "mean": mean, "std": std, "interpolation": interp,
                                                   "resize_mode": mode})))
    rng = np.random.default_rng(0)
    for torch_pre, np_pre in cases:
        for w, h in ((1024, 768), (768, 1024), (333, 517), (41, 40), (224, 224), (900, 120)):
            im = Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))
            want = torch_pre(im).numpy()
            got = np_pre(im)
            assert got.shape == want.shape and got.dtype == np.float32
            assert float(np.abs(got - want).max()) < 1e-5, (w, h)


def test_model_built_on_meta_loads_the_same_model_and_catches_unset_tensors(tiny_model, monkeypatch):
    import open_clip.factory as factory
    import torch

    from conftest import built_both_ways

    from imgsearch import encoder as encoder_mod

    fast, slow, _, spec, weights, on_meta = built_both_ways(monkeypatch, tiny_model)
    a, b = fast.state_dict(), slow.state_dict()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert torch.equal(fast.attn_mask, slow.attn_mask)  # computed in __init__, not in the checkpoint
    x = torch.randn(3, 3, 32, 32)
    tokens = torch.tensor([[49406, 320, 736, 49407] + [0] * 12])
    with torch.no_grad():
        assert torch.equal(fast.eval().encode_image(x), slow.eval().encode_image(x))
        assert torch.equal(fast.encode_text(tokens), slow.encode_text(tokens))
    assert all(p.requires_grad for p in fast.parameters())  # fine-tuning builds through here too

    # A loader that sets less than everything leaves a tensor without a value: built the ordinary way instead.
    def partial(model, path, strict=True, **kw):
        sd = factory.load_state_dict(path)
        sd.pop("visual.transformer.resblocks.0.mlp.c_fc.weight")
        return model.load_state_dict(sd, strict=False)

    monkeypatch.setattr(factory, "load_checkpoint", partial)
    model, _, _ = encoder_mod._create(spec, weights)
    assert on_meta[-1] is None and not any(t.is_meta for t in (*model.parameters(), *model.buffers()))


@pytest.mark.slow
def test_int8_parity_verdict_is_cached_per_library_and_a_refusal_still_refuses(cli, photos, home, tmp_path,
                                                                              monkeypatch):
    monkeypatch.setenv("IMGSEARCH_INT8_MIN_COSINE", "0.98")  # what the 32 px tiny model reaches (see test_image_ort)
    r = cli("--precision", "int8", "index", photos, "--json")
    assert r.exit_code == 0, r.output
    first = json.loads(r.output[r.output.index("{"):])
    assert first["image_tower"] == "onnxruntime int8" and first["parity_images"] == 32

    # New photos, torch path: the recorded verdict is used and no torch-vs-int8 pass runs.
    monkeypatch.setenv("IMGSEARCH_TORCH_FREE", "0")
    calls = []
    real = onnx_image.int8_parity
    monkeypatch.setattr(onnx_image, "int8_parity", lambda *a: calls.append(1) or real(*a))
    r = cli("--precision", "int8", "index", _photos(tmp_path, "more", seed=12), "--json")
    assert r.exit_code == 0, r.output
    second = json.loads(r.output[r.output.index("{"):])
    assert calls == [] and second["new"] == 36 and second["int8_parity"] == first["int8_parity"]
    assert second["parity_images"] == 0  # nothing measured in this run
    r = cli("--precision", "int8", "index", _photos(tmp_path, "again", seed=14))
    assert "min cosine" in r.output and "this library's images in an earlier run" in r.output and calls == []

    # The verdict belongs to this library: another library with the same export home measures again.
    from imgsearch.config import Settings
    from imgsearch.store import Store

    s = Settings.from_env(model=cli.model, device="cpu", precision="int8", home=home)
    store = Store(s.db_path, create=False)
    try:
        lib_id = store.library_id
    finally:
        store.close()
    monkeypatch.delenv("IMGSEARCH_TORCH_FREE")
    lite, why = onnx_image.torch_free_encoder(s, lib_id, 2)
    assert lite is not None and lite.precision == "int8", why
    assert onnx_image.cached_parity(home, lite.fingerprint, lib_id, 0.98) is not None
    assert onnx_image.cached_parity(home, lite.fingerprint, "another-library", 0.98) is None  # measures its own

    # A stricter gate than the recorded cosine: measured again, and refused as before, library untouched.
    monkeypatch.setenv("IMGSEARCH_INT8_MIN_COSINE", "1.01")
    monkeypatch.setenv("IMGSEARCH_TORCH_FREE", "0")
    before = json.loads(cli("status", "--json").output)["images"]
    r = cli("--precision", "int8", "index", _photos(tmp_path, "third", seed=13))
    assert r.exit_code != 0 and calls == [1]
    assert "--precision int8 is too far from fp32 on your images" in r.output.strip().splitlines()[-1]
    assert json.loads(cli("status", "--json").output)["images"] == before


def _top(home: Path, model: str, text: str, k: int) -> list[str]:
    out, heavy, _ = _process(home, model, "query", text, "-k", str(k), "--no-server", "--json")
    assert heavy == ""
    return [h["path"] for h in json.loads(out)]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_first_index_from_a_safetensors_checkpoint_makes_its_exports_without_torch(settings, photos, tmp_path,
                                                                                  precision, monkeypatch):
    from imgsearch.encoder import ModelSpec, known_fingerprint
    from imgsearch.indexer import index_paths

    monkeypatch.setenv("IMGSEARCH_INT8_MIN_COSINE", "0.98")  # what the 32 px tiny model reaches (see test_image_ort)
    env = {"IMGSEARCH_IMAGE_BACKEND": "onnx"}
    report, heavy = _index_process(settings.home, settings.model, photos, "--precision", precision, env=env)
    assert heavy == "" and report["new"] == 54 and report["failed"] == 0
    assert report["image_tower"] == f"onnxruntime {precision}"
    if precision == "int8":  # measured against the fp32 export on onnxruntime, and recorded for later runs
        assert report["parity_images"] == 32 and report["int8_parity"] >= 0.98
    exports = settings.home / "exports" / known_fingerprint(ModelSpec(settings.model).canonical())
    image = json.loads((exports / "image" / "manifest.json").read_text())
    text = json.loads((exports / "text" / "manifest.json").read_text())
    assert image["fp32"]["checked"] == text["checked"] == "numpy" and text["verified"]

    ref_home = tmp_path / "ref-home"
    ref = index_paths(settings.with_(home=ref_home, image_backend="torch", torch_free=False), [photos])
    assert ref.image_tower == "torch fp32"
    for query, kind in (("a red circle", "red_circle"), ("a green triangle", "green_triangle")):
        got, want = _top(settings.home, settings.model, query, 5), _top(ref_home, settings.model, query, 5)
        assert all(kind in Path(p).name for p in got[:3]) and set(got[:3]) == set(want[:3])
        if precision == "fp32":
            assert got == want

    if precision == "int8":  # a later run that loads torch anyway checks both exports against torch
        later = index_paths(settings.with_(precision="int8", torch_free=False),
                            [_photos(tmp_path, "more", seed=9)])
        assert later.new == 36 and later.parity_images == 0  # the verdict measured without torch is used
        image = json.loads((exports / "image" / "manifest.json").read_text())
        text = json.loads((exports / "text" / "manifest.json").read_text())
        assert image["fp32"]["checked"] == text["checked"] == "torch"  # int8: the parity verdict above
        assert image["fp32"]["passed"] and text["verified"] and text["parity"]["token_ids_identical"]


def test_a_torch_free_int8_run_holds_one_onnxruntime_session_at_a_time(settings, photos, monkeypatch):
    """Its export's check and the int8 parity pass on the user's images (fp32 export vs int8) load one
    image session at a time, so the first run's peak memory is one model's, not two."""
    import weakref

    from imgsearch.indexer import index_paths

    live, most, real = set(), [], onnx_image._new_session

    def tracked(*args):
        session = real(*args)
        live.add(id(session))
        weakref.finalize(session, live.discard, id(session))
        most.append(len(live))
        return session

    from imgsearch import textfast

    forward, beside = textfast.reference_features, []

    def reference(arrays, facts, tower, inputs):  # the numpy forward the image export is checked against maps
        if tower == "visual":  # every weight: never beside a session, nor the heap one leaves (trimmed after)
            beside.append(len(most))
        return forward(arrays, facts, tower, inputs)

    monkeypatch.setattr(onnx_image, "_new_session", tracked)
    monkeypatch.setattr(textfast, "reference_features", reference)
    monkeypatch.setenv("IMGSEARCH_INT8_MIN_COSINE", "0.98")  # what the 32 px tiny model reaches
    report = index_paths(settings.with_(precision="int8"), [photos])
    assert report.image_tower == "onnxruntime int8" and report.parity_images == 32 and report.new == 54
    assert len(most) == 3 and max(most) == 1  # the fp32 check, the fp32 parity reference, int8 (parity and run)
    assert beside and not any(beside)  # before any session was made


def test_the_int8_parity_samples_vectors_are_stored_as_encoded_and_not_encoded_twice(settings, photos, monkeypatch):
    from imgsearch.evaluation import encode_files
    from imgsearch.indexer import PARITY_SAMPLE, index_paths
    from imgsearch.store import Store

    encoded = []
    real = onnx_image.OrtEncoder.encode_image_tensors
    monkeypatch.setattr(onnx_image.OrtEncoder, "encode_image_tensors",
                        lambda self, batch: encoded.append(len(batch)) or real(self, batch))
    monkeypatch.setenv("IMGSEARCH_INT8_MIN_COSINE", "0.98")
    s = settings.with_(precision="int8")
    report = index_paths(s, [photos])
    assert report.image_tower == "onnxruntime int8" and report.parity_images == PARITY_SAMPLE == 32
    assert sum(encoded) == 54  # the parity pass's 32, then the other 22
    enc, _ = onnx_image.torch_free_encoder(s, None, 2)
    store = Store(s.db_path)
    try:
        rows, vecs = next(store.iter_image_vectors(store.models()[0].id))
    finally:
        store.close()
    again, ok, _ = encode_files(enc, [r.path for r in rows], s)  # the indexer's decode, one encode per file
    assert len(ok) == len(rows) == 54
    # each file's own vector (dynamic int8 scales by batch, so not bit-equal; another shape's is < 0.99)
    assert float((again * vecs).sum(1).min()) > 0.999


@pytest.mark.slow
def test_towers_and_checkpoints_it_cannot_read_go_through_torch(home, photos, tmp_path):
    import open_clip
    import torch

    from imgsearch.encoder import save_local_dir
    from imgsearch.synthetic import tiny_model_config

    cfg = tiny_model_config()
    cfg["vision_cfg"]["ls_init_value"] = 0.1  # layer scale: not a tower clipgraph describes
    torch.manual_seed(0)
    scaled = save_local_dir(open_clip.CLIP(**cfg), cfg, tmp_path / "scaled", {"size": 32})
    env = {"IMGSEARCH_INT8_MIN_COSINE": "0.5"}
    _, heavy, err = _process(home, f"local-dir:{scaled}", "--precision", "int8", "index", str(photos), env=env)
    assert "torch" in heavy.split(",") and "image tower is not" not in err
    assert err.count("cannot make the exports") == 1 and "ls_init_value" in err

    pickled = tmp_path / "pickled"  # a torch pickle, not safetensors: torch as before, and nothing said
    pickled.mkdir()
    (pickled / "open_clip_config.json").write_text((scaled / "open_clip_config.json").read_text())
    torch.save(open_clip.CLIP(**cfg).state_dict(), pickled / "open_clip_pytorch_model.bin")
    _, heavy, err = _process(tmp_path / "home2", f"local-dir:{pickled}", "--precision", "int8", "index",
                             str(photos), env=env)
    assert "torch" in heavy.split(",") and "cannot make the exports" not in err


@pytest.mark.slow
def test_a_config_that_does_not_fit_its_weights_is_refused_in_one_line_and_torch_decides(tiny_model, home, photos,
                                                                                        tmp_path):
    config = json.loads((tiny_model / "open_clip_config.json").read_text())
    config["model_cfg"]["vision_cfg"]["image_size"] = 48  # open_clip resizes the position table; we do not
    moved = tmp_path / "resized"
    moved.mkdir()
    (moved / "open_clip_config.json").write_text(json.dumps(config))
    (moved / "open_clip_model.safetensors").symlink_to(tiny_model / "open_clip_model.safetensors")
    out, heavy, err = _process(home, f"local-dir:{moved}", "--precision", "fp32", "index", str(photos), "--json",
                               env={"IMGSEARCH_IMAGE_BACKEND": "onnx"})
    notes = [line for line in err.splitlines() if "cannot make the exports" in line]
    assert len(notes) == 1 and "image tower shapes do not fit" in notes[0]
    assert "torch" in heavy.split(",") and json.loads(out[out.index("{"):])["new"] == 54

    (moved / "open_clip_config.json").write_text(json.dumps(config)[:-20])  # damaged: torch cannot read it either
    _, heavy, err = _process(tmp_path / "home2", f"local-dir:{moved}", "--precision", "int8", "index", str(photos),
                             ok=False)
    assert "no readable open_clip config (JSONDecodeError)" in err and "Traceback" not in err


def test_a_model_names_config_and_preprocess_are_open_clips_read_without_importing_it(tmp_path):
    import dataclasses

    import open_clip
    from open_clip.transform import PreprocessCfg

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    code = ("import json, sys; sys.modules['torch'] = None\n"
            "from imgsearch import onnx_image\n"
            "from imgsearch.modelspec import ModelSpec\n"
            "cfg, pre, path, bpe = onnx_image.checkpoint_source(ModelSpec('ViT-B-32-256', sys.argv[1]))\n"
            "assert 'open_clip' not in sys.modules\n"
            "print(json.dumps([cfg, pre, str(path), str(bpe)]))\n")
    done = subprocess.run([sys.executable, "-c", code, str(weights)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr[-800:]
    cfg, pre, path, bpe = json.loads(done.stdout)
    assert cfg == open_clip.get_model_config("ViT-B-32-256") and pre == {} and path == str(weights)
    assert Path(bpe).read_bytes() == Path(open_clip.tokenizer.default_bpe()).read_bytes()
    defaults = json.loads(json.dumps(dataclasses.asdict(PreprocessCfg())))  # tuples as JSON lists
    assert onnx_image.PREPROCESS_DEFAULTS == defaults


def _timer(calls: list, torch: float, int8: float, fp32: float = 5.0):
    """onnx_image._timed with fixed img/s per tower (no wall clock): torch at any precision, or an onnxruntime
    tower by its kind; ``calls`` collects what was timed."""
    def timed(fn, batch, runs=2):
        tower = getattr(fn, "__self__", None)
        calls.append(tower.kind if tower is not None else "torch")
        return {None: torch, "int8": int8, "fp32": fp32}[getattr(tower, "kind", None)]
    return timed


def _json(r):
    assert r.exit_code == 0, r.output
    return json.loads(r.output[r.output.index("{"):])


def _stderr(r) -> str:
    try:
        return r.stderr
    except ValueError:  # older click mixes stderr into output
        return r.output


@pytest.mark.slow
def test_auto_precision_runs_int8_where_timed_faster_and_later_runs_go_torch_free(cli, photos, home, tmp_path,
                                                                                  monkeypatch):
    calls = []
    monkeypatch.setattr(onnx_image, "ORT_MIN_RUN", 1)
    monkeypatch.setattr(onnx_image, "_timed", _timer(calls, torch=10.0, int8=20.0))
    monkeypatch.setenv("IMGSEARCH_INT8_MIN_COSINE", "0.98")  # what the 32 px tiny model reaches (see test_image_ort)
    onnx_image._said.clear()
    r = cli("--precision", "auto", "index", photos, "--json")
    first = _json(r)
    assert first["image_tower"] == "onnxruntime int8" and first["parity_images"] == 32 and first["new"] == 54
    assert first["int8_parity"] >= 0.98 and "torch" in calls and "int8" in calls
    assert [x for x in _stderr(r).splitlines() if "image tower timed" in x][0].endswith(
        "onnxruntime int8 is used from now on (recorded with the export)")

    # The next auto run of this library: the recorded timing and parity verdict, no torch at all.
    report, heavy = _index_process(home, cli.model, _photos(tmp_path, "more", seed=21), "--precision", "auto")
    assert heavy == "" and report["image_tower"] == "onnxruntime int8" and report["new"] == 36


@pytest.mark.slow
def test_auto_precision_keeps_torch_where_torch_is_faster_or_int8_fails_parity(cli, photos, home, tmp_path,
                                                                             monkeypatch):
    from imgsearch.encoder import pick_precision

    torch_tower = f"torch {pick_precision('auto', 'cpu')}"  # bf16 on CPUs with native bf16, else fp32
    calls = []
    monkeypatch.setattr(onnx_image, "ORT_MIN_RUN", 1)
    monkeypatch.setattr(onnx_image, "_timed", _timer(calls, torch=30.0, int8=20.0))
    monkeypatch.setenv("IMGSEARCH_INT8_MIN_COSINE", "0.98")
    report = _json(cli("--precision", "auto", "index", photos, "--json"))
    assert report["image_tower"] == torch_tower and report["int8_parity"] is None and "int8" in calls
    calls.clear()  # timed once for this machine and weights
    report = _json(cli("--precision", "auto", "index", _photos(tmp_path, "more", seed=22), "--json"))
    assert report["image_tower"] == torch_tower and report["new"] == 36 and calls == []

    # int8 faster, but too far from fp32 on these photos: the run stays on torch, one line says why.
    other = tmp_path / "other-home"
    monkeypatch.setattr(onnx_image, "_timed", _timer(calls, torch=10.0, int8=20.0))
    monkeypatch.setenv("IMGSEARCH_INT8_MIN_COSINE", "1.01")
    onnx_image._said.clear()
    r = cli("--home", other, "--precision", "auto", "index", photos, "--json")
    report = _json(r)
    assert report["image_tower"] == torch_tower and report["new"] == 54 and report["int8_parity"] is None
    (note,) = [x for x in _stderr(r).splitlines() if "too far from fp32" in x]
    assert note.startswith("note: int8 is too far from fp32 on your images") and note.endswith(torch_tower)


@pytest.mark.slow
def test_explicit_precisions_torch_backend_and_small_auto_runs_never_time_int8(cli, photos, home, tmp_path,
                                                                              monkeypatch):
    calls = []
    monkeypatch.setattr(onnx_image, "_timed", _timer(calls, torch=10.0, int8=99.0))
    monkeypatch.setenv("IMGSEARCH_INT8_MIN_COSINE", "0.98")
    from imgsearch.encoder import pick_precision

    # Fewer files than ORT_MIN_RUN (200): as before, torch at auto's precision, nothing exported or timed.
    assert _json(cli("--precision", "auto", "index", photos, "--json"))["image_tower"] == \
        f"torch {pick_precision('auto', 'cpu')}"
    assert calls == [] and not list(home.glob("exports/*/image"))
    monkeypatch.setattr(onnx_image, "ORT_MIN_RUN", 1)
    runs = {"bf16": ("torch bf16", []), "fp32": ("torch fp32", ["torch", "fp32"])}
    for precision, (tower, timed) in runs.items():
        calls.clear()
        r = cli("--home", tmp_path / precision, "--precision", precision, "index", photos, "--json")
        assert _json(r)["image_tower"] == tower and calls == timed, precision
    monkeypatch.setenv("IMGSEARCH_IMAGE_BACKEND", "torch")
    calls.clear()
    r = cli("--home", tmp_path / "torch", "--precision", "auto", "index", photos, "--json")
    assert _json(r)["image_tower"] == f"torch {pick_precision('auto', 'cpu')}" and calls == []


@pytest.mark.slow
def test_a_cold_image_query_runs_on_the_verified_fp32_export_without_importing_torch(settings, photos):
    report, heavy = _index_process(settings.home, settings.model, photos, "--precision", "int8",
                                   env={"IMGSEARCH_INT8_MIN_COSINE": "0.98"})
    assert heavy == "" and report["image_tower"] == "onnxruntime int8"  # the run made the fp32 export too
    red = str(photos / "red_circle_000.jpg")
    out, heavy, _ = _process(settings.home, settings.model, "query", "--image", red, "-k", "4", "--json")
    assert heavy == ""
    fast = [(Path(h["path"]).name, h["score"]) for h in json.loads(out)]
    out, heavy, _ = _process(settings.home, settings.model, "--precision", "fp32", "query", "--image", red,
                             "-k", "4", "--json", env={"IMGSEARCH_TORCH_FREE": "0"})
    assert "torch" in heavy.split(",")
    slow = [(Path(h["path"]).name, h["score"]) for h in json.loads(out)]
    assert fast[0][0] == "red_circle_000.jpg" and all(n.startswith("red_circle") for n, _ in fast[:3])
    assert [n for n, _ in fast] == [n for n, _ in slow]
    assert max(abs(a - b) for (_, a), (_, b) in zip(fast, slow)) < 1e-4  # the same fp32 tower, two runtimes
    out, heavy, _ = _process(settings.home, settings.model, "score", red, "a red circle", "a blue square", "--json")
    assert heavy == ""  # `score` named its model by loading the torch encoder (4.9 s, 950 MB for a name)
    scored = json.loads(out)
    assert scored["model"] == report["model"] and scored["scores"][0]["cosine"] > scored["scores"][1]["cosine"]


def test_without_torch_auto_runs_the_tower_timed_faster_on_the_parity_sample_and_remembers_it(settings, photos,
                                                                                            tmp_path, monkeypatch):
    """Without torch, auto times int8 and the fp32 export on the parity pass's own images (no extra encode)
    and runs the faster: here the fp32 export is made to look faster, so the run and the next use it."""
    from imgsearch import encoder as encoder_mod
    from imgsearch.indexer import index_paths

    monkeypatch.setattr(encoder_mod, "torch_installed", lambda: False)
    monkeypatch.setenv("IMGSEARCH_INT8_MIN_COSINE", "0.98")
    real, timed = onnx_image.int8_parity, []

    def parity(enc, tensors):
        cos, feats, speeds = real(enc, tensors)
        timed.append(dict(speeds))
        return cos, feats, {"onnxruntime fp32": 50.0, "onnxruntime int8": 40.0}

    monkeypatch.setattr(onnx_image, "int8_parity", parity)
    s = settings.with_(precision="auto")
    first = index_paths(s, [photos])
    assert first.new == 54 and first.image_tower == "onnxruntime fp32"
    assert timed and set(timed[0]) == {"onnxruntime fp32", "onnxruntime int8"} and min(timed[0].values()) > 0
    later = index_paths(s, [_photos(tmp_path, "more", seed=3)])
    assert later.new > 0 and later.image_tower == "onnxruntime fp32" and len(timed) == 1  # not timed again


def test_without_torch_a_gpu_machine_is_told_once_how_to_encode_on_its_gpu(settings, photos, monkeypatch, capsys):
    from imgsearch import encoder as encoder_mod
    from imgsearch.indexer import index_paths

    monkeypatch.setattr(encoder_mod, "torch_installed", lambda: False)
    monkeypatch.setattr(onnx_image, "_gpu_possible", lambda: True)
    monkeypatch.setattr(onnx_image, "_said", set())
    monkeypatch.setenv("IMGSEARCH_INT8_MIN_COSINE", "0.98")
    real = onnx_image.int8_parity  # the tiny model's towers are too close to time: int8 is made the faster
    monkeypatch.setattr(onnx_image, "int8_parity", lambda enc, t: (*real(enc, t)[:2], {"onnxruntime fp32": 1.0,
                                                                                      "onnxruntime int8": 2.0}))
    report = index_paths(settings.with_(precision="auto", device="auto"), [photos])
    assert report.new == 54 and report.image_tower == "onnxruntime int8"  # on the CPU, as before
    notes = [line for line in capsys.readouterr().err.splitlines() if "has a GPU" in line]
    assert len(notes) == 1 and "pip install 'imgsearch[" in notes[0]
