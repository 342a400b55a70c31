"""A cold text query answers without torch/open_clip/SQLAlchemy/FAISS, from a verified text export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imgsearch import textfast

HEAVY = ("torch", "open_clip", "torchvision", "sqlalchemy", "faiss")

# Run the CLI in a fresh interpreter and report which heavy modules it imported (stdout: the CLI's JSON).
# QUICK=1 runs it as the console script does (app() reading sys.argv: the pre-Typer path), else through
# Typer's command (the query command's own cold path).
_WRAPPER = """
import json, os, sys
try:
    if os.environ.get("QUICK"):  # as the console script and `python -m imgsearch` run it
        from imgsearch.quickcli import main
        sys.argv = ["imgsearch"] + sys.argv[1:]
        main()
    else:
        from imgsearch.cli import app
        app(sys.argv[1:], standalone_mode=False)
finally:
    heavy = sorted(m for m in sys.modules if m.split('.')[0] in %r)
    sys.stderr.write('\\nHEAVY=' + json.dumps(heavy) + '\\n')
""" % (HEAVY + ("pydantic",),)


def cold_query(home: Path, model_id: str, *args: str, quick: bool = False) -> tuple[list[dict], list[str], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSEARCH_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    if quick:
        env["QUICK"] = "1"
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, "--home", str(home), "--model", model_id, "--device",
                           "cpu", "--precision", "fp32", "query", "--no-server", "--json", *args],
                          capture_output=True, text=True, env=env, timeout=300)
    err, _, heavy = proc.stderr.rpartition("HEAVY=")
    assert proc.returncode == 0, proc.stderr
    heavy = json.loads(heavy)
    return json.loads(proc.stdout), heavy if quick else [m for m in heavy if not m.startswith("pydantic")], err


def torch_ranking(settings, text: str, k: int = 10) -> list[tuple[int, float]]:
    from imgsearch import encoder as E
    from imgsearch.search import Query, Searcher

    enc = E.load(E.ModelSpec(settings.model, settings.pretrained), "cpu", "fp32")
    s = Searcher(settings, encoder=enc)
    try:
        return [(h.id, h.score) for h in s.search(Query.build([text]), k)]
    finally:
        s.store.close()


def export_of(settings) -> Path:
    from imgsearch.encoder import ModelSpec, known_fingerprint

    return textfast.export_dir(settings.home, known_fingerprint(ModelSpec(settings.model).canonical()))


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


def test_cold_query_imports_no_torch_and_ranks_like_torch(cli, photos, settings, home, model_id):
    assert cli("index", photos, "-q").exit_code == 0
    assert json.loads((export_of(settings) / textfast.MANIFEST).read_text())["verified"]
    hits, heavy, err = cold_query(home, model_id, "a red circle", "-k", "8")
    assert heavy == []
    assert "torch" not in err
    want = torch_ranking(settings, "a red circle", 8)
    assert [h["id"] for h in hits] == [i for i, _ in want]
    assert [h["score"] for h in hits] == pytest.approx([s for _, s in want], abs=1e-4)
    assert "circle" in Path(hits[0]["path"]).name
    # As the console script runs it: answered before Typer, so not even pydantic is imported.
    quick, heavy_q, _ = cold_query(home, model_id, "a red circle", "-k", "8", quick=True)
    assert heavy_q == [] and quick == hits

    # Filters and deleted files behave as on the full path, still without torch.
    victim = Path(hits[0]["path"])
    victim.unlink()
    hits2, heavy2, _ = cold_query(home, model_id, "a red circle", "-k", "8", "--under", str(photos),
                                  "--min-score", str((hits[4]["score"] + hits[5]["score"]) / 2))
    assert heavy2 == []
    assert str(victim) not in [h["path"] for h in hits2]
    assert [h["id"] for h in hits2] == [h["id"] for h in hits[1:5]]


def test_missing_or_truncated_export_falls_back_to_torch_once_then_rebuilds(cli, photos, settings, home, model_id):
    assert cli("index", photos, "-q").exit_code == 0
    folder = export_of(settings)
    weights = folder / textfast.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    hits, heavy, err = cold_query(home, model_id, "a blue square", "--not", "a red circle")
    assert "torch" in heavy
    assert err.count("using torch (slower start)") == 1 and "truncated" in err
    assert [h["id"] for h in hits][:3] == [i for i, _ in torch_ranking_not(settings)][:3]
    # The fallback query repaired the export: the next process is cold again.
    assert weights.stat().st_size == 4 * json.loads((folder / textfast.MANIFEST).read_text())["floats"]
    hits2, heavy2, err2 = cold_query(home, model_id, "a blue square", "--not", "a red circle")
    assert heavy2 == [] and "torch" not in err2
    assert [h["id"] for h in hits2] == [h["id"] for h in hits]

    import shutil

    shutil.rmtree(folder.parent.parent)  # no export at all
    hits3, heavy3, err3 = cold_query(home, model_id, "a blue square", "--not", "a red circle")
    assert "torch" in heavy3 and err3.count("export missing") == 1
    assert [h["id"] for h in hits3] == [h["id"] for h in hits]


def torch_ranking_not(settings):
    from imgsearch import encoder as E
    from imgsearch.search import Query, Searcher

    enc = E.load(E.ModelSpec(settings.model, settings.pretrained), "cpu", "fp32")
    s = Searcher(settings, encoder=enc)
    try:
        return [(h.id, h.score) for h in s.search(Query.build(["a blue square"], not_texts=["a red circle"]), 10)]
    finally:
        s.store.close()


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


def test_classify_library_uses_the_export_without_torch(cli, photos, settings, home, model_id):
    assert cli("index", photos, "-q").exit_code == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSEARCH_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, "--home", str(home), "--model", model_id, "classify",
                           "--labels", "red,green,blue", "--json"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    heavy = json.loads(proc.stderr.rpartition("HEAVY=")[2])
    assert not [m for m in heavy if m.split(".")[0] in ("torch", "open_clip", "torchvision")]
    got = {r["id"]: r["labels"][0] for r in json.loads(proc.stdout)["results"]}

    from imgsearch import encoder as E
    from imgsearch.search import Searcher
    from imgsearch.tagging import classify_library

    s = Searcher(settings, encoder=E.load(E.ModelSpec(model_id), "cpu", "fp32"))
    try:
        want = {r["id"]: r["labels"][0] for r in classify_library(s.store, s.model, s.encoder, ["red", "green", "blue"],
                                                                   keep_results=True).results}
    finally:
        s.store.close()
    assert len(got) == 54 and {i: g["label"] for i, g in got.items()} == {i: w["label"] for i, w in want.items()}
    assert [got[i]["prob"] for i in sorted(got)] == pytest.approx([want[i]["prob"] for i in sorted(want)], abs=2e-3)


def test_quick_parser_leaves_everything_unusual_to_typer():
    from imgsearch.quickcli import _parse

    ok = _parse(["--home", "/h", "query", "a red car", "2:night", "-k", "3", "--min-score", "0.2", "--under", "/p",
                 "--tag", "dog", "--not", "cat", "--json", "--no-server"])
    assert ok == {"globals": {"home": "/h"}, "texts": ["a red car", "2:night"], "not": ["cat"], "tag": ["dog"],
                  "k": 3, "min_score": 0.2, "under": "/p", "json": True, "paths": False, "print0": False, "server": False}
    for argv in (["query", "-h"], ["query", "x", "--image", "a.jpg"], ["query", "x", "--keyword", "k"],
                 ["query", "x", "-k", "0"], ["query", "x", "-k", "many"], ["query", "x", "--json", "--paths"],
                 ["query"], ["--verbose", "query", "x"], ["index", "x"], ["query", "x", "--top=3"],
                 ["query", "x", "--daemon"], ["--home", "query", "x"]):
        assert _parse(argv) is None, argv
