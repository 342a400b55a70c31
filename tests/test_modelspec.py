"""One canonical model spec: the encoder's library key and the server client's comparison agree."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from imgsearch import client, encoder
from imgsearch.config import Settings

CASES = [
    ("local-dir:models/mine", None),             # relative local folder
    ("local-dir:~/models/mine", "ignored"),       # ~ expanded; a local dir carries its own weights
    ("hf-hub:timm/ViT-B-16-SigLIP", "openai"),    # the hub repo decides; --pretrained does not apply
    ("ViT-B-32", "openai"),                       # open_clip tag stays a tag
    ("ViT-B-32", "weights.pt"),                   # checkpoint file named without a folder
    ("ViT-B-32", "ckpt/epoch_3.safetensors"),     # relative checkpoint path
    ("ViT-B-32", "~/ckpt.bin"),
]


@pytest.mark.parametrize("name,pretrained", CASES)
def test_client_matches_a_server_exactly_when_the_encoder_calls_it_the_same_model(
        name, pretrained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env(home=tmp_path / "home", model=name, pretrained=pretrained)
    # What a server for this model records: the canonical form the encoder keys the library by.
    spec = encoder.ModelSpec(name, pretrained).canonical()
    server = {"model": spec.name, "pretrained": spec.pretrained}
    mine = client.ModelSpec(settings.model, settings.pretrained)  # what find_server compares a server with
    assert mine.same_model(server["model"], server["pretrained"])
    # Launched from another folder, a relative local model is a different model; so is another tag.
    other = encoder.ModelSpec(name, "laion2b_s34b_b79k").canonical()
    if other != spec:
        assert not mine.same_model(other.name, other.pretrained)


def test_canonical_forms():
    cwd = os.getcwd()
    home = os.path.expanduser("~")
    assert encoder.ModelSpec("local-dir:m", "x").canonical() == encoder.ModelSpec(f"local-dir:{cwd}/m")
    assert encoder.ModelSpec("hf-hub:a/b", "openai").canonical() == encoder.ModelSpec("hf-hub:a/b")
    assert encoder.ModelSpec("ViT-B-32", "openai").canonical() == encoder.ModelSpec("ViT-B-32", "openai")
    assert encoder.ModelSpec("ViT-B-32", "w.pt").canonical() == encoder.ModelSpec("ViT-B-32", f"{cwd}/w.pt")
    assert encoder.ModelSpec("ViT-B-32", "~/w.bin").canonical() == encoder.ModelSpec("ViT-B-32", f"{home}/w.bin")


def test_client_stays_light():
    """The warm-server query path imports the client: it must not pull in numpy (or torch)."""
    code = ("import sys, imgsearch.client, imgsearch.modelspec; "
            "print(sorted(m for m in ('numpy', 'torch', 'sqlalchemy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
