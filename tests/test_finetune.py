"""`imgsearch finetune`: learning, reports, WiSE-FT, Ctrl-C + --resume, the output model, bad input."""

from __future__ import annotations

import csv
import json
import math
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest

from imgsearch import synthetic

FAST = ["--device", "cpu", "--precision", "fp32"]


def load_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "open_clip_model.safetensors"))


def report_of(folder: Path) -> dict:
    return json.loads((folder / "training_report.json").read_text())


def train_cfg(captions: Path, out: Path, base: Path, **kw):
    from imgsearch.train.loop import TrainConfig

    defaults = dict(captions=str(captions), out=str(out), model=f"local-dir:{base}", lr=1e-3, wd=0.0,
                    max_steps=8, batch_size=16, val_fraction=0.25, workers=2, device="cpu", precision="fp32")
    defaults.update(kw)
    return TrainConfig(**defaults)


def write_csv(path: Path, rows, header=("path", "caption")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


# --- pieces ----------------------------------------------------------------------------------------

def test_lr_schedule_warms_up_then_decays_to_zero():
    from imgsearch.train.loop import lr_at

    lrs = [lr_at(s, 1e-3, 10, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[55] == pytest.approx(5e-4, rel=0.05) and lrs[-1] < 1e-6


def test_no_weight_decay_on_biases_norms_and_temperature():
    from imgsearch.train.loop import param_groups

    model, _ = synthetic.build_tiny_clip()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert "logit_scale" in nd and "ln_final.weight" in nd and "visual.ln_post.bias" in nd
    assert not any("bias" in n or ".ln" in n or n.startswith("ln") for n in d)
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in d and decay["weight_decay"] == 0.1
    assert no_decay["weight_decay"] == 0.0


def test_loss_does_not_push_apart_pairs_sharing_a_caption_and_caps_the_temperature():
    import torch

    from imgsearch.train.loss import contrastive_loss

    # Pairs 0 and 1 are two images with the same caption; with perfect embeddings nothing is wrong.
    img = torch.eye(4)[[0, 0, 2, 3]] + torch.tensor([[0, 0.01, 0, 0], [0, -0.01, 0, 0], [0] * 4, [0] * 4])
    txt = torch.eye(4)[[0, 0, 2, 3]]
    scale = torch.tensor(math.log(100.0))
    with_ids = contrastive_loss(img, txt, scale, torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 2, 3]))
    naive = contrastive_loss(img, txt, scale, torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3]))
    assert float(with_ids) < 0.01 < math.log(2) / 2 < float(naive)
    # Same image with two captions is handled alike.
    same_img = contrastive_loss(txt, txt, scale, torch.tensor([0, 0, 2, 3]), torch.tensor([0, 1, 2, 3]))
    assert float(same_img) < 0.01
    huge = contrastive_loss(img, txt, torch.tensor(math.log(1e4)), torch.arange(4), torch.arange(4))
    assert float(huge) == pytest.approx(float(naive))  # scale clamped at 100


def test_wise_alpha_zero_and_one_are_exact():
    from imgsearch.train.wise import interpolate

    a, _ = synthetic.build_tiny_clip(seed=1)
    b, _ = synthetic.build_tiny_clip(seed=2)
    sa, sb = a.state_dict(), b.state_dict()
    zero, one, half = interpolate(sa, sb, 0.0), interpolate(sa, sb, 1.0), interpolate(sa, sb, 0.5)
    for k in sa:
        assert np.array_equal(zero[k].numpy(), sa[k].numpy()), k
        assert np.array_equal(one[k].numpy(), sb[k].numpy()), k
    k = "text_projection"
    assert np.allclose(half[k].numpy(), (sa[k].numpy() + sb[k].numpy()) / 2, atol=1e-6)


def test_metrics_with_several_captions_per_image_and_shared_captions():
    from imgsearch.metrics import build_gallery, retrieval_metrics
    from imgsearch.captions import Pair

    pairs = [Pair("a", "cat"), Pair("a", "kitten"), Pair("b", "dog"), Pair("c", "dog")]
    g = build_gallery(pairs)
    assert g.images == ["a", "b", "c"] and g.texts == ["cat", "kitten", "dog"]
    img = np.array([[1, 0, 0], [0, 1, 0], [0, 0.6, 0.8]], dtype=np.float32)
    txt = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], dtype=np.float32)  # "cat" points at c, "kitten" at a
    m = retrieval_metrics(img, txt, g.matches)
    t2i, i2t = m["text_to_image"], m["image_to_text"]
    # cat -> c (wrong), a (right): rank 2; kitten -> a: rank 1; dog -> b or c, both right: rank 1.
    assert t2i["R@1"] == pytest.approx(2 / 3) and t2i["mean_rank"] == pytest.approx(4 / 3)
    # a -> kitten rank 1; b -> dog rank 1; c -> cat (0.8) before dog (0.6): rank 2.
    assert i2t["R@1"] == pytest.approx(2 / 3) and i2t["R@5"] == 1.0
    # Chance R@1: cat 1/3, kitten 1/3, dog 2/3.
    assert t2i["chance"]["R@1"] == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)


def test_step_batches_resume_mid_run_gives_the_same_order():
    from imgsearch.train.data import StepBatches

    full = list(StepBatches(50, 8, 2, seed=3, start=0, total=9))
    tail = list(StepBatches(50, 8, 2, seed=3, start=4, total=9))
    assert tail == full[8:] and len(full) == 18
    per_epoch = 50 // 16
    first_epoch = [i for b in full[:per_epoch * 2] for i, _ in b]
    assert len(set(first_epoch)) == len(first_epoch)  # no pair twice within an epoch


# --- training through the CLI ----------------------------------------------------------------------

@pytest.mark.slow
def test_finetune_lifts_recall_from_chance_and_output_works_in_index_and_query(cli, captioned,
                                                                               random_tiny_model, tmp_path, photos):
    out = tmp_path / "ft-model"
    r = cli("finetune", captioned, "--out", out, "--model", f"local-dir:{random_tiny_model}", "--lr", "1e-3",
            "--wd", "0", "--max-steps", "12", "--batch-size", "32", "--val-fraction", "0.25", *FAST)
    assert r.exit_code == 0, r.output
    rep = report_of(out)
    base = rep["results"]["base"]["text_to_image"]
    final = rep["results"]["finetuned"]["text_to_image"]
    chance = final["chance"]["R@1"]
    assert base["R@1"] <= 2 * chance  # random weights: near chance
    assert final["R@1"] >= 3 * chance, rep["summary"]
    assert "x chance" in rep["summary"] and rep["improved"] is True
    assert rep["data"]["train_images"] + rep["data"]["val_images"] == 108 and rep["steps"] == 12
    assert rep["base_model"]["model"] == f"local-dir:{random_tiny_model}"
    assert rep["hyperparameters"]["lr"] == 1e-3 and rep["hyperparameters"]["batch_size"] == 32
    for key in ("val_loss", "image_to_text", "text_to_image"):
        assert key in rep["results"]["base"] and key in rep["results"]["finetuned"]
    assert {"R@1", "R@5", "R@10", "mean_rank"} <= set(final)
    # Evaluated before training and after every epoch; the best evaluation is the one kept.
    from imgsearch.metrics import headline

    assert [h["step"] for h in rep["history"]] == [2, 4, 6, 8, 10, 12]  # 81 training pairs: 2 steps/epoch
    best = max(rep["history"], key=headline)
    assert rep["best_step"] == best["step"] and rep["results"]["finetuned"]["text_to_image"] == best["text_to_image"]
    table = r.stdout.splitlines()
    assert "i2t R@1" in table[0] and table[1].startswith("base") and table[2].startswith("fine-tuned")
    assert "samples/s" in r.stderr and "lr" in r.stderr  # the progress bar's postfix
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["model_cfg"]["embed_dim"] == 64 and config["preprocess_cfg"]["size"] == [32, 32]
    assert not any(p.name.startswith(".ft-model") for p in tmp_path.iterdir())  # no temp folder left
    assert not (tmp_path / "ft-model.checkpoint").exists()

    # The output is a model every command loads; its vectors stay apart from the base model's.
    assert cli("index", photos, model=f"local-dir:{random_tiny_model}").exit_code == 0
    r = cli("index", photos, model=f"local-dir:{out}")
    assert r.exit_code == 0 and "new 0" in r.stdout, r.output  # images known, vectors are new
    r = cli("query", "a red circle", "--json", "-k", "5", model=f"local-dir:{out}")
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)) == 5
    st = json.loads(cli("status", "--json").stdout)
    models = {m["model"]: m["vectors"] for m in st["models"]}
    assert any(str(out) in k for k in models) and any(str(random_tiny_model) in k for k in models)
    assert all(v == 54 for v in models.values())


@pytest.mark.slow
def test_finetuned_model_learns_a_colour_word_it_never_saw(tiny_model, tmp_path):
    """The tiny model was trained without "cyan"; captions with it teach it the word."""
    from PIL import Image

    from imgsearch.encoder import ModelSpec, build
    from imgsearch.train.loop import train

    cyan = (0, 200, 200)

    def make(folder: Path, per: int, seed: int) -> Path:
        rng = random.Random(seed)
        folder.mkdir()
        rows = []
        for c in [*synthetic.COLORS, "cyan"]:
            for s in synthetic.SHAPES:
                for i in range(per):
                    synthetic.draw_shape(c, s, 48, rng, rgb=cyan if c == "cyan" else None).save(
                        folder / f"{c}_{s}_{i}.png")
                    rows.append((f"{c}_{s}_{i}.png", f"a {c} {s}"))
        return write_csv(folder / "captions.csv", rows)

    captions = make(tmp_path / "train", 4, 1)
    make(tmp_path / "test", 3, 2)
    test_paths = sorted((tmp_path / "test").glob("*.png"))

    def cyan_precision_at_3(model_dir: Path) -> float:
        enc = build(ModelSpec(f"local-dir:{model_dir}"), "cpu", "fp32")
        ims = enc.encode_images([Image.open(p).convert("RGB") for p in test_paths])
        hits = []
        for s in synthetic.SHAPES:
            top = np.argsort(-(ims @ enc.encode_texts([f"a cyan {s}"])[0]))[:3]
            hits += [test_paths[i].name.startswith("cyan_") for i in top]
        return float(np.mean(hits))

    before = cyan_precision_at_3(tiny_model)
    train(train_cfg(captions, tmp_path / "out", tiny_model, lr=5e-4, max_steps=8, batch_size=32, val_fraction=0.2))
    after = cyan_precision_at_3(tmp_path / "out")
    assert before <= 0.5 and after >= 0.75, (before, after)


@pytest.mark.slow
def test_ctrl_c_checkpoint_and_resume_reach_the_same_weights(cli, captioned, random_tiny_model, tmp_path):
    from imgsearch.train.loop import Interrupted, train

    out = tmp_path / "out"

    def press_ctrl_c_at_step_3(kind, **info):
        if kind == "step" and info["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, handled between steps

    with pytest.raises(Interrupted) as exc:
        train(train_cfg(captioned, out, random_tiny_model), events=press_ctrl_c_at_step_3)
    ckpt = tmp_path / "out.checkpoint"
    assert f"--resume {ckpt}" in str(exc.value) and "step 3/8" in str(exc.value)
    assert (ckpt / "checkpoint.pt").is_file() and not out.exists()  # nothing half-written under --out

    r = cli("finetune", "--resume", ckpt)
    assert r.exit_code == 0, r.output
    assert "resuming at step 3" in r.stderr
    resumed = report_of(out)
    assert resumed["steps"] == 8 and not ckpt.exists()

    ref_out = tmp_path / "reference"
    train(train_cfg(captioned, ref_out, random_tiny_model))
    ref = report_of(ref_out)
    assert [h["step"] for h in resumed["history"]] == [h["step"] for h in ref["history"]]
    a, b = load_weights(out), load_weights(ref_out)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


@pytest.mark.slow
def test_wise_alpha_zero_writes_the_base_weights_and_bad_rows_are_skipped_with_lines(cli, captioned,
                                                                                     random_tiny_model, tmp_path):
    folder = captioned.parent
    lines = captioned.read_text().splitlines()
    (folder / "corrupt.png").write_bytes(b"not really a png")
    lines += ["missing.png,a red circle", "corrupt.png,a red square", "red_circle_000.png,",
              "red_circle_001.png,a red circle,extra field"]
    captioned.write_text("\n".join(lines) + "\n")
    n = len(lines)
    out = tmp_path / "wise0"
    r = cli("finetune", captioned, "--out", out, "--model", f"local-dir:{random_tiny_model}", "--max-steps", "2",
            "--batch-size", "16", "--lr", "1e-3", "--wise-alpha", "0", *FAST)
    assert r.exit_code == 0, r.output
    for line, why in ((n - 3, "image not found"), (n - 2, "unreadable image"), (n - 1, "empty caption"),
                      (n, "expected 2 fields")):
        assert f"captions.csv:{line}" in r.stderr and why in r.stderr, (line, r.stderr)
    rep = report_of(out)
    assert rep["data"]["skipped"] == 4 and len(rep["data"]["skipped_reasons"]) == 4
    assert set(rep["results"]) == {"base", "finetuned", "wise"}
    assert "WiSE-FT alpha 0.0" in r.stdout
    assert f"wrote {out} (the WiSE-FT alpha 0.0 blend, use it with" in r.stdout  # not the fine-tuned weights
    base, got = load_weights(random_tiny_model), load_weights(out)
    assert all(np.array_equal(base[k].numpy(), got[k].numpy()) for k in base)


@pytest.mark.slow
def test_grad_accumulation_equals_one_big_batch(captioned, random_tiny_model, tmp_path):
    from imgsearch.train.loop import train

    train(train_cfg(captioned, tmp_path / "big", random_tiny_model, max_steps=1, batch_size=32))
    train(train_cfg(captioned, tmp_path / "acc", random_tiny_model, max_steps=1, batch_size=16, grad_accum=2))
    a, b = load_weights(tmp_path / "big"), load_weights(tmp_path / "acc")
    base = load_weights(random_tiny_model)
    moved = max(float((a[k] - base[k]).abs().max()) for k in a)
    assert moved > 1e-4  # it trained
    # Adam's first step is about lr * sign(grad), so float noise in near-zero gradients shows up a little;
    # splitting the contrastive batch naively (negatives only within each half) moves weights by ~moved.
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 2e-2 * moved


@pytest.mark.slow
def test_lock_image_tower_checkpointing_bf16_and_jsonl_with_renamed_fields(cli, captioned, random_tiny_model,
                                                                           tmp_path):
    rows = list(csv.reader(captioned.open()))[1:]
    jsonl = captioned.parent / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps({"file": p, "text": c}) + "\n" for p, c in rows))
    out = tmp_path / "locked"
    r = cli("finetune", jsonl, "--image-col", "file", "--caption-col", "text", "--out", out, "--max-steps", "2",
            "--batch-size", "16", "--lr", "1e-3", "--lock-image", "--grad-checkpointing", "--precision", "bf16",
            "--json", "--model", f"local-dir:{random_tiny_model}")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    hp = rep["hyperparameters"]
    assert hp["precision"] == "bf16" and hp["lock_image"] and hp["grad_checkpointing"]
    assert rep["data"]["train_pairs"] + rep["data"]["val_pairs"] == 108
    base, got = load_weights(random_tiny_model), load_weights(out)
    visual = [k for k in base if k.startswith("visual.")]
    text = [k for k in base if k.startswith(("transformer.", "token_embedding", "text_projection"))]
    assert all(np.array_equal(base[k].numpy(), got[k].numpy()) for k in visual)  # frozen tower untouched
    assert any(not np.array_equal(base[k].numpy(), got[k].numpy()) for k in text)
    assert hp["trainable_parameters"] < sum(v.numel() for v in base.values()) - sum(base[k].numel() for k in visual) + 1


# --- bad input: one clear line, exit code, nothing written ------------------------------------------

def _ft(cli, *args, base=None):
    return cli("finetune", *[str(a) for a in args], *FAST, model=f"local-dir:{base}" if base else "default")


def test_unknown_columns_name_the_header_and_the_fix(cli, captioned, tmp_path, random_tiny_model):
    r = _ft(cli, captioned, "--out", tmp_path / "o", "--caption-col", "text", base=random_tiny_model)
    assert r.exit_code == 1
    assert "no column 'text'" in r.stderr and "--caption-col" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_too_few_pairs_for_a_batch_or_a_validation_split(cli, tmp_path, random_tiny_model):
    folder = tmp_path / "few"
    synthetic.generate(folder, per_class=1, colors=["red", "blue"], size=32, seed=0)  # 6 images
    r = _ft(cli, folder / "captions.csv", "--out", tmp_path / "o", "--batch-size", "32", base=random_tiny_model)
    assert r.exit_code == 1 and "cannot fill one batch of 32" in r.stderr and "--batch-size" in r.stderr
    small = write_csv(tmp_path / "three.csv", [(f"few/{p.name}", "x") for p in sorted(folder.glob("*.png"))[:3]])
    r = _ft(cli, small, "--out", tmp_path / "o", "--batch-size", "2", base=random_tiny_model)
    assert r.exit_code == 1 and "too few to hold out a validation split" in r.stderr
    assert not (tmp_path / "o").exists()


def test_no_usable_pairs_and_missing_captions_file(cli, tmp_path, random_tiny_model):
    bad = write_csv(tmp_path / "bad.csv", [("nope.jpg", "a cat"), ("gone.png", "a dog")])
    r = _ft(cli, bad, "--out", tmp_path / "o", base=random_tiny_model)
    assert r.exit_code == 1 and "no usable image–caption pairs" in r.stderr and "bad.csv:2" in r.stderr
    r = _ft(cli, tmp_path / "absent.csv", "--out", tmp_path / "o", base=random_tiny_model)
    assert r.exit_code == 1 and "captions source not found" in r.stderr


def test_refuses_to_replace_a_folder_that_is_not_a_model(cli, captioned, tmp_path, random_tiny_model):
    precious = tmp_path / "photos-i-love"
    precious.mkdir()
    (precious / "a.jpg").write_bytes(b"x")
    r = _ft(cli, captioned, "--out", precious, base=random_tiny_model)
    assert r.exit_code == 2 and "not a model" in r.stderr
    assert (precious / "a.jpg").read_bytes() == b"x"


def test_usage_errors(cli, captioned, tmp_path, random_tiny_model):
    r = _ft(cli, captioned, base=random_tiny_model)
    assert r.exit_code == 2 and "--out" in r.stderr
    r = _ft(cli, "--resume", tmp_path, base=random_tiny_model)
    assert r.exit_code == 2 and "--resume takes the checkpoint folder" in r.stderr
    r = _ft(cli, captioned, "--out", tmp_path / "o", "--wise-alpha", "1.5", base=random_tiny_model)
    assert r.exit_code == 2 and "--wise-alpha must be between 0 and 1" in r.stderr
    r = _ft(cli, captioned, "--out", tmp_path / "o", "--lock-image", "--lock-text", base=random_tiny_model)
    assert r.exit_code == 2 and "--unlocked-layers" in r.stderr


def test_captions_all_alike_are_refused_before_training(cli, captioned, tmp_path, random_tiny_model):
    """Pairs sharing a caption are not each other's negatives, so with one caption the loss was 0 and the run
    wrote the base model back after the user's wait."""
    rows = [(path, "a photo") for path, _ in list(csv.reader(captioned.open()))[1:]]
    r = _ft(cli, write_csv(captioned.parent / "alike.csv", rows), "--out", tmp_path / "o", "--batch-size", "16",
            "-q", base=random_tiny_model)
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.output
    assert "the same caption ('a photo')" in r.stderr and "say how they differ" in r.stderr
    assert not (tmp_path / "o").exists()


def test_captions_longer_than_the_model_reads_are_said_to_be_cut(cli, captioned, tmp_path, random_tiny_model):
    """The tiny model reads 16 tokens; a caption past that was cut without a word, its colour and shape unseen."""
    rows = list(csv.reader(captioned.open()))[1:]
    rows = [(path, ("at the end of a long sunny day in the park " + caption) if i % 4 == 0 else caption)
            for i, (path, caption) in enumerate(rows)]
    r = _ft(cli, write_csv(captioned.parent / "long.csv", rows), "--out", tmp_path / "o", "--batch-size", "16",
            "--max-steps", "1", "-q", base=random_tiny_model)
    assert r.exit_code == 0, r.output
    assert f"note: {len(rows[::4])} of {len(rows)} captions fill all 16 tokens the model reads" in r.stderr


def test_training_leaves_the_callers_torch_random_state_and_threads_alone(captioned, random_tiny_model, tmp_path):
    """train() seeded torch's global generator with --seed, so a program embedding it drew the same 'random'
    numbers after every run."""
    import torch

    from imgsearch.train.loop import train

    torch.manual_seed(1234)
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    train(train_cfg(captioned, tmp_path / "o", random_tiny_model, max_steps=1))
    assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == threads
    assert (tmp_path / "o" / "open_clip_model.safetensors").exists()
