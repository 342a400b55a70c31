"""Multilingual search: a Hugging Face text tower (XLM-R style, local tokenizer) end to end, --lang, the
English-only hint and the `multilingual` preset. All offline: the tiny model's tokenizer is trained here."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import imgsearch.synthetic as synthetic
from imgsearch import lang

from conftest import trained_once
from test_cold_query import cold_query

STEPS = 300


@pytest.fixture(scope="session")
def ml_model(request) -> Path:
    """A tiny CLIP with a locally trained BPE tokenizer and a 2-layer XLM-R text tower, trained on English
    and Korean captions of generated shapes; cached like conftest's tiny model, keyed by the recipe."""
    import torch

    torch.set_num_threads(2)
    key = hashlib.sha1(Path(synthetic.__file__).read_bytes() + f"ml{STEPS}".encode()).hexdigest()[:12]
    cache = Path(request.config.cache.mkdir("imgsearch-tiny-multilingual")) / key
    return trained_once(cache, lambda out: synthetic.pretrain_tiny_multilingual_clip(out, steps=STEPS, seed=0))


@pytest.fixture()
def ml_id(ml_model) -> str:
    return f"local-dir:{ml_model}"


@pytest.fixture()
def cli(home, ml_id):
    """The CLI with the multilingual model (conftest's `cli` uses the English tiny model)."""
    from conftest import Cli

    return Cli(home, ml_id)


def _colours(hits) -> list[str]:
    return [Path(h["path"]).name.rsplit("_", 1)[0] for h in hits]


def test_korean_query_finds_red_circles_through_cli_cold_path_and_api(cli, photos, home, ml_id, ml_model):
    r = cli("index", str(photos), model=ml_id)
    assert r.exit_code == 0, r.output
    # The index run exported the XLM-R tower for torch-free queries and verified it against torch.
    from imgsearch.config import model_exports_dir
    from imgsearch.encoder import file_fingerprint

    fp = file_fingerprint(ml_model / "open_clip_model.safetensors")
    manifest = json.loads((model_exports_dir(home, fp) / "text" / "manifest.json").read_text())
    assert manifest["kind"] == "hf-onnx" and manifest["verified"], manifest
    assert manifest["parity"]["token_ids_identical"] and manifest["parity"]["min_cosine"] >= 0.9999

    r = cli("query", "빨간 원", "-k", "3", "--json", "--no-server", model=ml_id)
    assert r.exit_code == 0, r.output
    warm = json.loads(r.stdout)
    # The 300-step tiny model knows colours for sure and shapes mostly: red circles fill the top 3 but one.
    assert {c.split("_")[0] for c in _colours(warm)} == {"red"} and _colours(warm).count("red_circle") >= 2
    blue = _colours(json.loads(cli("query", "파란 사각형", "-k", "3", "--json", "--no-server", model=ml_id).stdout))
    assert {c.split("_")[0] for c in blue} == {"blue"} and blue.count("blue_square") >= 2

    # A fresh process answers from the ONNX export without importing torch, with the same ranking.
    hits, heavy, err = cold_query(home, ml_id, "빨간 원", "-k", "3")
    assert heavy == [] and "hint" not in err
    assert [h["id"] for h in hits] == [h["id"] for h in warm]
    assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in warm], abs=1e-4)


def test_score_and_classify_read_korean_labels(cli, photos, home, ml_id):
    from imgsearch import Library

    red = sorted(photos.glob("red_circle_*"))[0]
    with Library(home=home, model=ml_id, device="cpu", precision="fp32") as lib:
        scores = lib.score(red, ["빨간 원", "파란 사각형", "노란 삼각형"])
        cos = [s.cosine if hasattr(s, "cosine") else s["cosine"] for s in scores]
        assert cos[0] == max(cos)
        lib.index(photos)
        report = lib.classify(["빨간 원", "파란 사각형", "초록 삼각형"])
        assert report is not None
        tagged = [Path(h.path).name.rsplit("_", 1)[0] for h in lib.search(tag="빨간 원", text="원", k=54)]
    # Every red circle carries the Korean tag; the classes of the other labels never do.
    assert tagged.count("red_circle") == 3 and not {"blue_square", "green_triangle"} & set(tagged)


@pytest.mark.slow
def test_finetuned_multilingual_model_keeps_its_tokenizer_and_still_reads_korean(cli, captioned, tmp_path, ml_id):
    out = tmp_path / "tuned"
    r = cli("finetune", str(captioned), "--out", str(out), "--epochs", "1", "--batch-size", "16", model=ml_id)
    assert r.exit_code == 0, r.output
    for name in ("tokenizer.json", "config.json", "open_clip_model.safetensors"):
        assert (out / name).is_file(), name
    moved = tmp_path / "moved"
    out.rename(moved)  # the tower config is named relative to the folder: a moved model still loads
    from imgsearch import Library

    red = sorted(captioned.parent.glob("red_circle_*"))[0]
    with Library(home=tmp_path / "h", model=f"local-dir:{moved}", device="cpu", precision="fp32") as lib:
        cos = [s.cosine if hasattr(s, "cosine") else s["cosine"] for s in lib.score(red, ["빨간 원", "파란 사각형"])]
    assert cos[0] > cos[1]


def test_lang_is_checked_recorded_with_the_library_and_used(cli, photos, home, ml_id):
    r = cli("--lang", "kor_Hangul", "query", "x", model=ml_id)
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [
        "error: unknown language code 'kor_Hangul' (did you mean kor_Hang?); use an NLLB code such as kor_Hang, "
        "deu_Latn or jpn_Jpan (see README, Multilingual search)"]
    assert cli("--lang", "kor_hang", "index", str(photos), model=ml_id).exit_code == 0
    from imgsearch import Library

    with Library(home=home, model=ml_id) as lib:
        assert lib.lang == "kor_Hang"  # recorded (the spelling NLLB uses), read back by a later process
    with Library(home=home, model=ml_id, lang="deu_Latn") as lib:
        assert lib.lang == "deu_Latn"  # an explicit --lang wins over the recorded one


def test_english_only_model_prints_one_hint_naming_the_preset(cli, photos, home, random_tiny_model, ml_id):
    # An English-only model (CLIP's BPE tower); an untrained one is enough: the hint is about the model kind.
    model_id = f"local-dir:{random_tiny_model}"
    assert cli("index", str(photos), model=model_id).exit_code == 0
    r = cli("query", "빨간 원", "--no-server", model=model_id)
    assert r.exit_code == 0
    hints = [line for line in r.stderr.splitlines() if line.startswith("hint:")]
    assert len(hints) == 1 and "--model multilingual" in hints[0]
    assert "hint" not in cli("query", "a red circle", "--no-server", model=model_id).stderr
    from imgsearch import Library

    assert Library(home=home, model=ml_id).language_hint(["빨간 원"]) is None  # a multilingual model reads it
    _, _, err = cold_query(home, model_id, "빨간 원")  # a fresh process says it too
    assert [line for line in err.splitlines() if line.startswith("hint:")] == hints


def test_script_detection_and_language_codes():
    assert lang.detect("빨간 원") == "kor_Hang"
    assert lang.detect("東京の夜景") == "jpn_Jpan"
    assert lang.detect("红色的圆") == "zho_Hans"
    assert lang.detect("красный круг") == "rus_Cyrl"
    assert lang.detect("червоне коло і квадрат") == "ukr_Cyrl"
    assert lang.detect("κόκκινος κύκλος") == "ell_Grek"
    assert lang.detect("roter Kreis") is None  # Latin script: --lang or the library's language decides
    assert lang.query_language("roter Kreis", None, "deu_Latn") == "deu_Latn"
    assert lang.query_language("빨간 원", None, "deu_Latn") == "kor_Hang"
    assert lang.query_language("빨간 원", "eng_Latn", "deu_Latn") == "eng_Latn"
    assert lang.check("DEU_LATN") == "deu_Latn" and len(lang.NLLB_CODES) == 202


def test_multilingual_preset_names_xlm_roberta_and_fails_offline_in_one_line(cli, photos):
    from imgsearch.modelspec import ModelSpec, english_only

    spec = ModelSpec("multilingual").canonical()
    assert (spec.name, spec.pretrained) == ("xlm-roberta-base-ViT-B-32", "laion5b_s13b_b90k")
    assert not english_only(ModelSpec("multilingual")) and english_only(ModelSpec("ViT-B-32", "openai"))
    r = cli("index", str(photos), model="multilingual")
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "xlm-roberta-base-ViT-B-32" in lines[0] and "internet" in lines[0], r.stderr


def test_hf_text_tower_built_on_meta_equals_the_ordinary_build(ml_model, monkeypatch):
    """The fast load (meta device, checkpoint assigned) makes the Hugging Face tower's buffers that the
    checkpoint does not hold (position and token type ids) as the tower's own __init__ does."""
    import torch

    from conftest import built_both_ways

    fast, slow, tokenizer, *_ = built_both_ways(monkeypatch, ml_model)
    a, b = dict(fast.named_buffers()), dict(slow.named_buffers())
    assert "text.transformer.embeddings.position_ids" in a and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    a, b = fast.state_dict(), slow.state_dict()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    tokens = tokenizer(["빨간 원", "a red circle"])
    with torch.no_grad():
        assert torch.equal(fast.eval().encode_text(tokens), slow.eval().encode_text(tokens))
