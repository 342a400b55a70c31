"""Shared fixtures: a tiny CLIP trained on generated shapes, generated photo folders, isolated homes."""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

# Before anything imports huggingface_hub (it reads these once, at import): every test, and every
# imgsearch subprocess a test starts, sees an empty Hugging Face cache of its own, so no test passes
# because of weights the developer happens to have cached, and none writes into that cache.
HF_TEST_CACHE = tempfile.mkdtemp(prefix="imgsearch-test-hf-")
atexit.register(shutil.rmtree, HF_TEST_CACHE, True)
for _var, _sub in (("HF_HOME", ""), ("HF_HUB_CACHE", "hub"), ("HUGGINGFACE_HUB_CACHE", "hub"),
                   ("HF_XET_CACHE", "xet"), ("HF_ASSETS_CACHE", "assets")):
    os.environ[_var] = os.path.join(HF_TEST_CACHE, _sub) if _sub else HF_TEST_CACHE
os.environ.pop("HF_TOKEN", None)  # and no developer credentials
os.environ["XDG_CACHE_HOME"] = os.path.join(HF_TEST_CACHE, "cache")  # `eval` without a library keeps exports there
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download

import pytest  # noqa: E402
import typer.testing  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import imgsearch.synthetic as synthetic  # noqa: E402


_click_commands: dict[int, tuple[object, object]] = {}


def _click_command_once(app):
    """typer's CliRunner turns the Typer app into a click command on every invoke (~10 ms of CPU, paid on
    each of the suite's in-process CLI calls); a real process does it once. The app is complete once
    imported, so the command is built once per app and reused, as click's own CliRunner is used."""
    made = _click_commands.get(id(app))
    if made is None or made[0] is not app:
        made = _click_commands[id(app)] = (app, _build_click_command(app))
    return made[1]


_build_click_command = typer.testing._get_command
typer.testing._get_command = _click_command_once


def trained_once(cache: Path, train) -> Path:
    """``cache``, made by ``train(cache)`` unless it is there already. Test runs sharing the cache dir (several
    at once on one machine) wait for the one that trains instead of each training a copy of its own."""
    import fcntl

    if not (cache / "open_clip_model.safetensors").exists():
        with open(cache.parent / f"{cache.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed
            if not (cache / "open_clip_model.safetensors").exists():
                train(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_model(request) -> Path:
    """A tiny open_clip model trained for a few seconds on coloured shapes (local-dir format).

    Cached in pytest's cache dir, keyed by the generator's source, so reruns skip the training.
    """
    import torch

    torch.set_num_threads(2)
    steps = 600
    key = hashlib.sha1(Path(synthetic.__file__).read_bytes() + str(steps).encode()).hexdigest()[:12]
    cache = Path(request.config.cache.mkdir("imgsearch-tiny-model")) / key
    return trained_once(cache, lambda out: synthetic.pretrain_tiny_clip(out, steps=steps, seed=0))


def pytest_configure(config):
    config.addinivalue_line("markers", "real_export: every text export is built and verified, none copied")


_made_exports: dict[tuple[str, str], Path] = {}  # (weights fingerprint, model label) -> a verified export


@pytest.fixture(autouse=True)
def text_export_made_once(request, monkeypatch, tmp_path_factory):
    """The CLIP text export (textfast) of a model is built and verified against torch once per test session,
    then copied into each fresh library home that asks for it (0.2-0.5 s of CPU per index run saved). The copy
    is what the build writes for the same weights and label; tests about making exports are marked real_export."""
    if request.node.get_closest_marker("real_export"):
        return
    from imgsearch import textfast

    build = textfast.build_export

    def build_or_copy(home, encoder):
        key = (encoder.fingerprint, encoder.spec.label)
        final = textfast.export_dir(home, encoder.fingerprint)
        made = _made_exports.get(key)
        if made is None or final.exists() or encoder.precision != "fp32":
            folder = build(home, encoder)
            meta = json.loads((folder / textfast.MANIFEST).read_text(encoding="utf-8"))
            if made is None and meta.get("verified") and meta.get("kind") is None:
                _made_exports[key] = Path(shutil.copytree(folder, tmp_path_factory.mktemp("text-export") / "text"))
            return folder
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".text.", dir=final.parent))
        shutil.copytree(made, tmp, dirs_exist_ok=True)
        tmp.rename(final)
        return final

    monkeypatch.setattr(textfast, "build_export", build_or_copy)


@pytest.fixture()
def model_id(tiny_model) -> str:
    return f"local-dir:{tiny_model}"


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    """An isolated library home; IMGSEARCH_* variables from the developer's shell never leak in."""
    for var in list(os.environ):
        if var.startswith("IMGSEARCH_"):
            monkeypatch.delenv(var)
    h = tmp_path / "home"
    monkeypatch.setenv("IMGSEARCH_HOME", str(h))
    monkeypatch.setenv("IMGSEARCH_WORKERS", "2")
    return h


@pytest.fixture()
def settings(home, model_id):
    from imgsearch.config import Settings

    return Settings.from_env(model=model_id, device="cpu", precision="fp32", batch_size=16)


def make_photos(folder: Path) -> Path:
    """54 generated JPEG shapes (3 per colour x shape) in ``folder``."""
    synthetic.generate(folder, per_class=3, size=96, fmt="jpg", seed=1, captions_file=None)
    return folder


@pytest.fixture()
def photos(tmp_path) -> Path:
    return make_photos(tmp_path / "photos")


class Cli:
    """Runs the CLI in-process (the model stays loaded between calls, like a warm process)."""

    def __init__(self, home: Path, model: str):
        self.home = home
        self.model = model
        self.runner = CliRunner()

    def __call__(self, *args: str, model: str | None = "default", input: str | None = None):
        from imgsearch.cli import app

        pre = ["--home", str(self.home), "--device", "cpu", "--precision", "fp32"]
        if model == "default":
            pre += ["--model", self.model]
        elif model is not None:
            pre += ["--model", model]
        return self.runner.invoke(app, pre + [str(a) for a in args], input=input)


@pytest.fixture()
def cli(home, model_id) -> Cli:
    return Cli(home, model_id)



@pytest.fixture(scope="session")
def random_tiny_model(tmp_path_factory) -> Path:
    """An untrained tiny open_clip model saved as local-dir: its retrieval is at chance level."""
    from imgsearch.encoder import save_local_dir

    model, cfg = synthetic.build_tiny_clip(seed=1)
    folder = tmp_path_factory.mktemp("random-model") / "model"
    return save_local_dir(model, cfg, folder, {"size": cfg["vision_cfg"]["image_size"]})


@pytest.fixture()
def captioned(tmp_path) -> Path:
    """captions.csv ("a red circle", ...) for 108 generated 40 px shape PNGs (6 per colour x shape)."""
    folder = tmp_path / "captioned"
    synthetic.generate(folder, per_class=6, size=40, fmt="png", seed=5)
    return folder / "captions.csv"


def built_both_ways(monkeypatch, model_dir: Path):
    """The local-dir model built on the meta device (checked that this path was taken, not its fallback) and
    built the plain way, for tests that compare the two: (fast, slow, tokenizer, spec, weights, on_meta), where
    on_meta records what each later meta-device build returned."""
    from imgsearch import encoder as encoder_mod

    spec = encoder_mod.ModelSpec(f"local-dir:{model_dir}").canonical()
    weights = encoder_mod.resolve_weights(spec)[1]
    on_meta, real = [], encoder_mod._load_on_meta
    monkeypatch.setattr(encoder_mod, "_load_on_meta", lambda *a: on_meta.append(real(*a)) or on_meta[-1])
    fast, _, tokenizer = encoder_mod._create(spec, weights)
    slow, _, _ = encoder_mod._create(spec, weights, on_meta=False)
    assert on_meta and on_meta[0] is fast  # the fast path was taken, not the fallback
    return fast, slow, tokenizer, spec, weights, on_meta
