"""Model loading: never a randomly initialised network; every failure is one clear line."""

from __future__ import annotations

import json

import pytest

from imgsearch.config import DEFAULT_MODEL, DEFAULT_PRETRAINED, Settings
from imgsearch.encoder import ModelSpec, build, resolve_weights
from imgsearch.errors import ModelLoadError


def one_line_error(result, code=1) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_local_dir_without_weights(cli, tmp_path, photos):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}}))
    msg = one_line_error(cli("index", photos, model=f"local-dir:{folder}"))
    assert "no weights" in msg and "random" in msg
    msg = one_line_error(cli("index", photos, model=f"local-dir:{tmp_path / 'absent'}"))
    assert "does not exist" in msg


def test_builtin_model_needs_weights(cli, photos):
    msg = one_line_error(cli("index", photos, model="ViT-B-16"))
    assert "needs weights" in msg and "--pretrained" in msg


def test_unknown_tag_and_missing_checkpoint(cli, photos, tmp_path):
    msg = one_line_error(cli("--pretrained", "no_such_tag", "index", photos, model="ViT-B-32"))
    assert "unknown pretrained tag" in msg and "laion2b_s34b_b79k" in msg
    msg = one_line_error(cli("--pretrained", str(tmp_path / "w.pt"), "index", photos, model="ViT-B-32"))
    assert "does not exist" in msg
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    msg = one_line_error(cli("--pretrained", str(bad), "index", photos, model="ViT-B-32"))
    assert "cannot load model" in msg


def test_default_model_offline_says_what_to_do(cli, photos, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = one_line_error(cli("index", photos, model=None))
    assert DEFAULT_MODEL in msg and "internet" in msg


def test_hf_hub_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="cannot get weights for hf-hub:"):
        resolve_weights(ModelSpec("hf-hub:someone/nothing-cached-here"))


def test_settings_defaults_and_env(monkeypatch, tmp_path):
    for var in ("IMGSEARCH_MODEL", "IMGSEARCH_PRETRAINED", "IMGSEARCH_HOME"):
        monkeypatch.delenv(var, raising=False)
    s = Settings.from_env()
    assert (s.model, s.pretrained) == (DEFAULT_MODEL, DEFAULT_PRETRAINED)
    monkeypatch.setenv("IMGSEARCH_MODEL", "local-dir:/x")
    monkeypatch.setenv("IMGSEARCH_HOME", str(tmp_path))
    s = Settings.from_env()
    assert (s.model, s.pretrained, s.home) == ("local-dir:/x", None, tmp_path)
    s = Settings.from_env(model="RN50", pretrained="openai")
    assert (s.model, s.pretrained) == ("RN50", "openai")


def test_trained_tiny_model_loads(tiny_model):
    enc = build(ModelSpec(f"local-dir:{tiny_model}"), "cpu", "fp32")
    assert enc.dim == 64 and enc.image_size == 32 and enc.precision == "fp32"
    v = enc.encode_texts(["a red circle", "a blue square"])
    assert v.shape == (2, 64)
    assert abs(float((v * v).sum(1)[0]) - 1) < 1e-5


def test_short_text_path_matches_full_context(tiny_model):
    """Running the causal text tower on the used tokens only gives the same embeddings as all 16/77."""
    import torch

    enc = build(ModelSpec(f"local-dir:{tiny_model}"), "cpu", "fp32")
    texts = ["a red circle", "a photo of a purple triangle on a dark background", "x"]
    assert enc._text_can_shorten()
    short = enc.encode_texts(texts)
    with torch.inference_mode():
        full = torch.nn.functional.normalize(enc.model.encode_text(enc.tokenizer(texts)).float(), dim=-1).numpy()
    assert abs(short - full).max() < 1e-5


def test_hf_cache_is_isolated_in_tests(tmp_path):
    """Tests never see the developer's Hugging Face cache: a popular hub model resolves to our message."""
    import os
    import subprocess
    import sys
    import tempfile

    import huggingface_hub.constants as hf

    HF_TEST_CACHE = os.environ["HF_HOME"]  # conftest's per-session folder
    assert os.path.basename(HF_TEST_CACHE).startswith("imgsearch-test-hf-")
    assert os.path.dirname(HF_TEST_CACHE) == tempfile.gettempdir()
    user_cache = os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    assert os.environ["HF_HUB_CACHE"].startswith(HF_TEST_CACHE)
    assert hf.HF_HUB_CACHE.startswith(HF_TEST_CACHE) and not hf.HF_HUB_CACHE.startswith(user_cache)
    with pytest.raises(ModelLoadError) as e:
        resolve_weights(ModelSpec("hf-hub:timm/ViT-B-16-SigLIP"))
    assert str(e.value) == ("cannot get weights for hf-hub:timm/ViT-B-16-SigLIP (no cached copy and the hub is "
                            "unreachable); connect to the internet once so they are cached, or use --model "
                            "local-dir:/path")
    # A separate imgsearch process started by a test inherits the isolation.
    code = "import huggingface_hub.constants as c; print(c.HF_HUB_CACHE)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith(HF_TEST_CACHE)
