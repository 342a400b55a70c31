"""One engine: every door (a fresh CLI process, the Python API with torch loaded, a running server) answers a
text query with the same text encoder (the verified export) and the same vector backend, so ids and scores agree;
a cold process imports no torch, open_clip or FAISS to do it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from imgsearch import textfast

pytestmark = pytest.mark.real_export  # these tests are about making the text export

HEAVY = ("torch", "open_clip", "torchvision", "faiss")

# Run the console script's entry in a fresh interpreter and report which heavy modules it imported.
_WRAPPER = """
import json, sys
try:
    from imgsearch.quickcli import main
    sys.argv = ["imgsearch"] + sys.argv[1:]
    main()
except SystemExit as e:
    if e.code:
        raise
finally:
    heavy = sorted(m for m in sys.modules if m.split('.')[0] in %r)
    sys.stderr.write('\\nHEAVY=' + json.dumps(heavy) + '\\n')
""" % (HEAVY,)


def cold_run(home: Path, model_id: str, *args: str) -> tuple[str, list[str], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSEARCH_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, "--home", str(home), "--model", model_id, "--device",
                           "cpu", "--precision", "fp32", *args], capture_output=True, text=True, env=env, timeout=300)
    err, _, heavy = proc.stderr.rpartition("HEAVY=")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, json.loads(heavy), err


def cold_query(home: Path, model_id: str, *args: str) -> tuple[list[dict], list[str], str]:
    out, heavy, err = cold_run(home, model_id, "query", "--no-server", "--json", *args)
    return json.loads(out), heavy, err


def export_of(settings) -> Path:
    from imgsearch.encoder import ModelSpec, known_fingerprint

    return textfast.export_dir(settings.home, known_fingerprint(ModelSpec(settings.model).canonical()))


def torch_ranking(settings, text: str, k: int = 10) -> list[tuple[int, float]]:
    """The ranking torch itself gives: the torch text tower against the stored vectors, exactly."""
    from imgsearch import Library
    from imgsearch import encoder as E

    enc = E.load(E.ModelSpec(settings.model, settings.pretrained), "cpu", "fp32")
    with Library(settings=settings) as lib:
        ids, vecs = lib.store.load_vectors(lib.model.id)
    scores = vecs @ enc.encode_texts([text])[0]
    order = np.argsort(-scores, kind="stable")[:k]
    return [(int(ids[i]), float(scores[i])) for i in order]


def ranking(hits) -> list[tuple[int, float]]:
    return [(h["id"], h["score"]) if isinstance(h, dict) else (h.id, h.score) for h in hits]


HARD = textfast.PARITY_PROMPTS + ["a red circle", "A BLUE square.", "  green\u00a0triangle  ", "naïve 🍕", "\x7f",
                                  "ﬁ", "&amp;amp;", "don't stop", "日本語のテキスト" * 20]


def test_export_matches_open_clip_tokens_and_torch_vectors(tiny_model, tmp_path):
    from imgsearch import encoder as E

    enc = E.build(E.ModelSpec(f"local-dir:{tiny_model}"), "cpu", "fp32")
    folder = textfast.build_export(tmp_path, enc)
    meta = json.loads((folder / textfast.MANIFEST).read_text())
    assert meta["verified"] and meta["parity"]["token_ids_identical"] and meta["parity"]["min_cosine"] >= 0.9999
    tower = textfast.TextTower(folder, enc.fingerprint)
    ref = enc.tokenizer(HARD).tolist()
    ours = tower.tokenize(HARD)
    assert [r + [0] * (len(ref[0]) - len(r)) for r in ours] == ref
    assert max(len(r) for r in ours) == len(ref[0])  # long prompts truncated to the context length, eot kept
    got, want = tower.encode(HARD), enc.encode_texts(HARD)
    assert np.min(np.sum(got * want, axis=1)) >= 0.9999
    assert tower.logit_scale == pytest.approx(enc.logit_scale, rel=1e-6)


@pytest.mark.slow
def test_every_door_gives_the_same_ids_and_scores(cli, photos, settings, home, model_id):
    """A fresh CLI process, the Python API after an image query loaded torch, and a running server. The last two
    load the model at the machine's own precision (bf16 on CPUs with AVX512-BF16 or AMX), the first none."""
    from imgsearch import Library, client
    from imgsearch.config import Settings
    from imgsearch.request import SearchRequest
    from imgsearch.server import SearchServer

    assert cli("index", photos, "-q").exit_code == 0
    assert json.loads((export_of(settings) / textfast.MANIFEST).read_text())["verified"]
    probe, heavy, err = cold_query(home, model_id, "a red circle", "-k", "12")
    assert heavy == [] and "torch" not in err  # the cold door: numpy, SQLite and the export only
    floor = str(round((probe[8]["score"] + probe[9]["score"]) / 2, 6))
    args = ("a red circle", "--not", "0.5:a green square", "--under", str(photos), "--min-score", floor, "-k", "8")
    cold, heavy, _ = cold_query(home, model_id, *args)
    assert heavy == [] and len(cold) == 8 and "red_circle" in Path(cold[0]["path"]).name

    with Library(home, model_id, device="cpu") as lib:
        lib.search(image=cold[0]["path"], k=1)  # an image term loads the torch model
        assert lib._encoder is not None
        warm = lib.search("a red circle", not_text=(0.5, "a green square"), under=photos, min_score=float(floor), k=8)
    assert [i for i, _ in ranking(warm)] == [i for i, _ in ranking(cold)]
    assert np.allclose([s for _, s in ranking(warm)], [s for _, s in ranking(cold)], atol=1e-6, rtol=0)

    srv = SearchServer(Settings.from_env(model=model_id, device="cpu"), "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        host, port = srv.address
        served = client.search({"host": host, "port": port, "token": srv.token}, SearchRequest.build(
            "a red circle", not_text="0.5:a green square", under=photos, min_score=float(floor), k=8))
    finally:
        srv.shutdown()
        t.join(10)
    assert ranking(served) == ranking(cold)


@pytest.mark.slow
def test_missing_or_truncated_export_is_made_again_and_every_query_uses_it(cli, photos, settings, home, model_id):
    assert cli("index", photos, "-q").exit_code == 0
    want, _, _ = cold_query(home, model_id, "a blue square", "--not", "a red circle")
    folder = export_of(settings)
    weights = folder / textfast.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    # This process loads torch once to make the export again, then answers with the export, as every door does.
    hits, heavy, err = cold_query(home, model_id, "a blue square", "--not", "a red circle")
    assert "torch" in heavy and "using torch" not in err
    assert ranking(hits) == ranking(want)
    assert weights.stat().st_size == 4 * json.loads((folder / textfast.MANIFEST).read_text())["floats"]
    hits2, heavy2, _ = cold_query(home, model_id, "a blue square", "--not", "a red circle")
    assert heavy2 == [] and ranking(hits2) == ranking(want)

    import shutil

    shutil.rmtree(folder.parent.parent)  # no export at all: two queries in one process agree exactly
    from imgsearch import Library

    with Library(home, model_id, device="cpu", precision="fp32") as lib:
        first = lib.search("a blue square", not_text="a red circle")
        second = lib.search("a blue square", not_text="a red circle")
    assert ranking(first) == ranking(second) == ranking(want)


def test_a_model_whose_text_tower_cannot_be_exported_uses_torch_with_one_note(cli, photos, settings, home, model_id,
                                                                            monkeypatch, capsys):
    from imgsearch import Library

    assert cli("index", photos, "-q").exit_code == 0
    import shutil

    shutil.rmtree(export_of(settings).parent)

    def unsupported(*a, **k):
        raise textfast.ExportError("text tower is not open_clip's CLIP text transformer")

    monkeypatch.setattr(textfast, "_describe", unsupported)
    monkeypatch.setattr(textfast, "_warned", set())
    with Library(home, model_id, device="cpu", precision="fp32") as lib:
        capsys.readouterr()
        hits = lib.search("a red circle", k=3)
        again = lib.search("a red circle", k=3)
        assert lib._warm().text_encoder() is lib._encoder  # torch, chosen once for this library and model
    assert "red_circle" in Path(hits[0].path).name and ranking(again) == ranking(hits)
    err = capsys.readouterr().err
    assert err.count("using torch") == 1 and "not open_clip's CLIP text transformer" in err


@pytest.mark.slow
def test_changed_weights_get_a_new_export_and_never_use_the_old_one(tiny_model, photos, home, tmp_path):
    import shutil

    import torch

    from imgsearch import encoder as E
    from imgsearch.config import Settings

    folder = tmp_path / "model"
    # Written by imgsearch (not copied), so a later save into the same folder may replace it.
    base = E.build(E.ModelSpec(f"local-dir:{tiny_model}"), "cpu", "fp32")
    base_cfg = json.loads((tiny_model / E.CONFIG_FILE).read_text())
    E.save_local_dir(base.model, base_cfg["model_cfg"], folder, base_cfg.get("preprocess_cfg"))
    model_id = f"local-dir:{folder}"
    settings = Settings.from_env(model=model_id, device="cpu", precision="fp32", batch_size=16)
    from imgsearch.indexer import index_paths

    index_paths(settings, [photos])
    old = export_of(settings)
    assert (old / textfast.MANIFEST).is_file()

    # "Fine-tune": new text weights written into the same folder.
    enc = E.build(E.ModelSpec(model_id), "cpu", "fp32")
    with torch.no_grad():
        for p in enc.model.transformer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cfg = json.loads((folder / E.CONFIG_FILE).read_text())
    E.save_local_dir(enc.model, cfg["model_cfg"], folder, cfg.get("preprocess_cfg"))
    new = export_of(settings)
    assert new != old
    with pytest.raises(textfast.ExportError):
        textfast.open_tower(home, E.known_fingerprint(E.ModelSpec(model_id).canonical()))
    # A stale export copied under the new key is refused too (the manifest names its own weights).
    shutil.copytree(old, new)
    with pytest.raises(textfast.ExportError, match="other weights"):
        textfast.TextTower(new, E.known_fingerprint(E.ModelSpec(model_id).canonical()))
    shutil.rmtree(new)

    index_paths(settings, [photos])  # re-encodes with the new weights and exports their text tower
    assert json.loads((new / textfast.MANIFEST).read_text())["verified"]
    hits, heavy, _ = cold_query(home, model_id, "a green triangle", "-k", "5")
    assert heavy == []
    assert [h["id"] for h in hits] == [i for i, _ in torch_ranking(settings, "a green triangle", 5)]


@pytest.mark.slow
def test_classify_library_uses_the_export_without_torch(cli, photos, settings, home, model_id):
    assert cli("index", photos, "-q").exit_code == 0
    out, heavy, _ = cold_run(home, model_id, "classify", "--labels", "red,green,blue", "--json")
    assert not [m for m in heavy if m.split(".")[0] in ("torch", "open_clip", "torchvision")]
    got = {r["id"]: r["labels"][0] for r in json.loads(out)["results"]}

    from imgsearch import Library
    from imgsearch import encoder as E
    from imgsearch.tagging import classify_library

    with Library(settings=settings) as lib:
        want = {r["id"]: r["labels"][0] for r in classify_library(
            lib.store, lib.model, E.load(E.ModelSpec(model_id), "cpu", "fp32"), ["red", "green", "blue"],
            keep_results=True).results}
    assert len(got) == 54 and {i: g["label"] for i, g in got.items()} == {i: w["label"] for i, w in want.items()}
    assert [got[i]["prob"] for i in sorted(got)] == pytest.approx([want[i]["prob"] for i in sorted(want)], abs=2e-3)
