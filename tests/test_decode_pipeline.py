"""The one decode pipeline (images.decode_many) and a tensor decode path that follows the model's own preprocess."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from imgsearch import images, synthetic
from imgsearch.errors import DecodeError

# A preprocess far from open_clip's OpenAI default: squash (no crop), bilinear, its own mean/std.
SQUASH = {"size": 32, "mode": "RGB", "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear",
          "resize_mode": "squash", "fill_color": 0}


def _save_model(folder: Path, preprocess_cfg: dict) -> Path:
    from imgsearch.encoder import save_local_dir

    model, cfg = synthetic.build_tiny_clip(seed=3)
    return save_local_dir(model, cfg, folder, preprocess_cfg)


@pytest.fixture(scope="module")
def squash_model(tmp_path_factory) -> Path:
    return _save_model(tmp_path_factory.mktemp("squash") / "model", SQUASH)


@pytest.fixture()
def wide_photos(tmp_path) -> Path:
    """Non-square JPEGs (so a crop and a squash differ), one with EXIF orientation 6, one PNG."""
    folder = tmp_path / "wide"
    folder.mkdir()
    rng = random.Random(7)
    for i, (colour, shape) in enumerate([("red", "circle"), ("blue", "square"), ("green", "triangle"),
                                         ("yellow", "circle"), ("purple", "square"), ("white", "triangle")]):
        im = synthetic.draw_shape(colour, shape, 96, rng).resize((150, 90) if i % 2 else (84, 140))
        im.save(folder / f"{colour}_{shape}.jpg", quality=92)
    exif = Image.Exif()
    exif[274] = 6
    synthetic.draw_shape("red", "square", 96, rng).resize((160, 100)).save(folder / "sideways.jpg", quality=92,
                                                                            exif=exif.tobytes())
    synthetic.draw_shape("blue", "circle", 96, rng).resize((120, 70)).save(folder / "blue_circle.png")
    return folder


# --- decode_many ------------------------------------------------------------------------------------

def test_decode_many_keeps_order_and_yields_errors_in_place():
    def decode(i):
        time.sleep(random.random() / 200)  # finish out of order
        if i % 5 == 0:
            raise DecodeError(f"bad {i}")
        if i == 7:
            raise ValueError("decoder bug")
        return i * 10

    out = list(images.decode_many(range(23), decode, workers=3, ahead=4))
    assert len(out) == 23
    for i, r in enumerate(out):
        if i % 5 == 0:
            assert isinstance(r, DecodeError) and str(r) == f"bad {i}"
        elif i == 7:
            assert isinstance(r, DecodeError) and str(r) == "cannot decode: ValueError: decoder bug"
        else:
            assert r == i * 10
    assert list(images.decode_many([1, 2, 3], lambda i: -i, workers=0)) == [-1, -2, -3]


@pytest.mark.parametrize("overlap", [True, False])
def test_decode_many_keeps_at_most_ahead_items_in_flight(overlap):
    started, lock = [], threading.Lock()

    def decode(i):
        with lock:
            started.append(i)
        time.sleep(0.001)
        return i

    worst = 0
    for n, r in enumerate(images.decode_many(range(60), decode, workers=4, ahead=5, overlap=overlap)):
        assert r == n
        time.sleep(0.002)  # a slow consumer: an unbounded pipeline would run far ahead meanwhile
        with lock:
            worst = max(worst, len(started) - n)
    assert worst <= 5, worst
    assert worst >= 3  # it does decode ahead


def test_overlap_false_never_decodes_while_the_consumer_works():
    active, lock = [0], threading.Lock()
    threads = set()

    def decode(i):
        with lock:
            active[0] += 1
            threads.add(threading.current_thread().name)
        time.sleep(0.01)
        with lock:
            active[0] -= 1
        return i

    seen = []
    for r in images.decode_many(range(20), decode, workers=2, ahead=6, overlap=False):
        time.sleep(0.005)  # while this runs, a decode started ahead would be caught
        with lock:
            seen.append(active[0])
        assert r == len(seen) - 1
    assert max(seen) == 0, seen
    assert len(threads) == 2  # each chunk is still decoded by all the workers


# --- classify on files ------------------------------------------------------------------------------

def test_classify_files_decodes_in_worker_threads_in_batches(settings, tiny_model, photos, monkeypatch):
    from imgsearch import tagging
    from imgsearch.encoder import ModelSpec, load

    enc = load(ModelSpec(f"local-dir:{tiny_model}"), "cpu", "fp32")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    decoded_in, batches = [], []
    real_open, real_encode = images.open_image, enc.encode_image_tensors

    def open_image(*a, **k):
        decoded_in.append(threading.current_thread().name)
        return real_open(*a, **k)

    def encode(batch):
        batches.append(len(batch))
        return real_encode(batch)

    monkeypatch.setattr(images, "open_image", open_image)
    monkeypatch.setattr(enc, "encode_image_tensors", encode)
    colours = list(synthetic.COLORS)
    out = tagging.classify_files(settings.with_(batch_size=8, workers=2), [photos], colours, encoder=enc)
    assert [Path(r.path).name for r in out] == sorted(p.name for p in photos.iterdir())
    broken = next(r for r in out if r.path.endswith("broken.jpg"))
    assert broken.labels == [] and ("corrupt" in broken.error or "truncated" in broken.error), broken.error
    good = [r for r in out if r.error is None]
    assert len(good) == 54 and batches == [8] * 6 + [6]
    assert all(name.startswith("decode") for name in decoded_in), set(decoded_in)
    right = sum(r.labels[0][0] == Path(r.path).stem.split("_")[0] for r in good)
    assert right >= 0.8 * len(good)


# --- preprocessing from the model's preprocess_cfg --------------------------------------------------

def test_tensor_preprocess_refuses_what_it_cannot_reproduce():
    with pytest.raises(images.UnsupportedPreprocess, match="no mean, std"):
        images.tensor_preprocess({"size": 32})  # no silent OpenAI default
    with pytest.raises(images.UnsupportedPreprocess, match="resize_mode 'longest'"):
        images.tensor_preprocess({**SQUASH, "resize_mode": "longest"})
    with pytest.raises(images.UnsupportedPreprocess, match="interpolation 'lanczos'"):
        images.tensor_preprocess({**SQUASH, "interpolation": "lanczos"})
    pre = images.tensor_preprocess(SQUASH)
    assert (pre.size, pre.resize_mode, pre.interpolation, pre.mean) == ((32, 32), "squash", "bilinear", (0.5, 0.4, 0.3))


def test_tensor_path_matches_the_models_own_preprocess(squash_model, wide_photos, settings):
    import torch

    from imgsearch.encoder import ModelSpec, build
    from imgsearch.indexer import DecodeStage

    enc = build(ModelSpec(f"local-dir:{squash_model}"), "cpu", "fp32")
    assert type(enc.preprocess.transforms[0]).__name__ == "Resize"  # open_clip built a squash for this model
    stage = DecodeStage(enc, settings.max_pixels, tensor=True)
    assert stage.tensor and stage.refused is None
    paths = sorted(str(p) for p in wide_photos.iterdir())
    tensors = list(stage.decode_files(paths, workers=2, batch_size=3))
    ref = []
    for p in paths:
        im, _ = images.open_image(p)  # full decode, EXIF applied
        ref.append(enc.preprocess(im))
    diff = max(float((t - r).abs().max()) for t, r in zip(tensors, ref))
    assert diff < 0.25, diff  # normalised units (std 0.2-0.3): a few 8-bit levels of decoder difference
    mean_diff = max(float((t - r).abs().mean()) for t, r in zip(tensors, ref))
    assert mean_diff < 0.03, mean_diff
    a = enc.encode_image_tensors(torch.stack(tensors))
    b = enc.encode_image_tensors(torch.stack(ref))
    assert float((a * b).sum(1).min()) >= 0.999
    # The OpenAI-style crop and mean/std the tensor path used to hard-code are far from this model's input.
    openai = images.TensorPreprocess((32, 32), (0.48145466, 0.4578275, 0.40821073),
                                     (0.26862954, 0.26130258, 0.27577711), "bicubic", "shortest")
    from torchvision.io import decode_jpeg

    k = next(i for i, p in enumerate(paths) if p.endswith("red_circle.jpg"))
    t = decode_jpeg(torch.frombuffer(bytearray(Path(paths[k]).read_bytes()), dtype=torch.uint8))
    assert float((openai(t) - ref[k]).abs().mean()) > 0.2


def test_unsupported_preprocess_falls_back_to_pillow(tmp_path, wide_photos, settings):
    from imgsearch.encoder import ModelSpec, build
    from imgsearch.indexer import DecodeStage

    folder = _save_model(tmp_path / "longest", {**SQUASH, "resize_mode": "longest", "interpolation": "bicubic"})
    enc = build(ModelSpec(f"local-dir:{folder}"), "cpu", "fp32")
    stage = DecodeStage(enc, settings.max_pixels, tensor=True)
    assert not stage.tensor and "resize_mode 'longest'" in stage.refused
    assert "Pillow (batched tensor decode refused" in stage.describe()
    paths = sorted(str(p) for p in wide_photos.iterdir())
    for p, t in zip(paths, stage.decode_files(paths, workers=2, batch_size=4)):
        assert float((t - enc.preprocess(images.open_image(p, draft_size=enc.draft_size)[0])).abs().max()) == 0.0


def test_index_with_tensor_decode_on_cpu_gives_the_pillow_vectors(squash_model, wide_photos, settings, tmp_path):
    from imgsearch.indexer import index_paths
    from imgsearch.store import Store

    model = f"local-dir:{squash_model}"
    vecs = {}
    for mode in ("off", "on"):
        s = settings.with_(home=tmp_path / f"home-{mode}", model=model, gpu_decode=mode, batch_size=4)
        rep = index_paths(s, [wide_photos])
        assert rep.new == 8 and not rep.failed
        assert rep.decode.startswith("batched torchvision on cpu" if mode == "on" else "Pillow")
        store = Store(s.db_path)
        ids, v = store.load_vectors(store.models()[0].id)
        paths = {r.id: r.path for r in store.get_images(ids).values()}
        store.close()
        vecs[mode] = {paths[i]: x for i, x in zip(ids.tolist(), v)}
    cos = [float(vecs["on"][p] @ vecs["off"][p]) for p in vecs["off"]]
    assert min(cos) >= 0.999, cos


# --- eval parity measures the indexer's decode stage ------------------------------------------------

@pytest.mark.slow
def test_eval_parity_reports_every_index_decode_stage(cli, squash_model, wide_photos, tmp_path, monkeypatch):
    model = f"local-dir:{squash_model}"
    r = cli("eval", "parity", wide_photos, "--json", model=model)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["stage"] == "pillow" and res["decode"] == "Pillow" and res["images"] == 8
    stages = {s["stage"]: s for s in res["stages"]}
    assert list(stages) == ["pillow", "tensor"]  # no CUDA here: no nvjpeg stage
    assert stages["tensor"]["images"] == 8 and stages["tensor"]["decode"].startswith("batched torchvision")
    assert stages["tensor"]["min_cosine"] >= 0.999 and stages["pillow"]["min_cosine"] >= 0.999
    # 100x160 photos, 32 px input: decoded at 1/2 scale (short side 50 >= 1.5 x 32), a small input difference
    assert 0.0 < stages["pillow"]["max_abs_input_diff"] < 0.5
    monkeypatch.setenv("IMGSEARCH_GPU_DECODE", "on")
    res = json.loads(cli("eval", "parity", wide_photos, "--json", model=model).stdout)
    assert res["stage"] == "tensor" and res["min_cosine"] == stages["tensor"]["min_cosine"]
    text = cli("eval", "parity", wide_photos, model=model).stdout
    assert "through index's decode stage (batched torchvision" in text and "stage pillow (Pillow)" in text
    longest = _save_model(tmp_path / "longest", {**SQUASH, "resize_mode": "longest"})
    r = cli("eval", "parity", wide_photos, "--json", model=f"local-dir:{longest}")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["stage"] == "pillow" and res["decode"].startswith("Pillow (batched tensor decode refused")
    assert res["images"] == 8 and res["stages"][1]["stage"] == "tensor"
    assert "resize_mode 'longest'" in res["stages"][1]["refused"]
