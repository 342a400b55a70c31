"""Hostile and unlucky use of `finetune` and the file readers: nothing the user made is ever deleted.

imgsearch removes or replaces only folders it created and can prove it did (ownership marker + token);
captions, labels and class files with nulls or in the wrong encoding get one clear line, not an internal
error or a caption "None".
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from imgsearch import owned, synthetic

FAST = ["--device", "cpu", "--precision", "fp32"]


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes, to compare before and after."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def train_cfg(captions: Path, out: Path, base: Path, **kw):
    from imgsearch.train.loop import TrainConfig

    defaults = dict(captions=str(captions), out=str(out), model=f"local-dir:{base}", lr=1e-3, wd=0.0,
                    max_steps=2, batch_size=16, val_fraction=0.25, workers=2, device="cpu", precision="fp32")
    defaults.update(kw)
    return TrainConfig(**defaults)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, random_tiny_model) -> Path:
    """The checkpoint folder of a run stopped by Ctrl-C at step 1 of 2 (its captions stay in place)."""
    from imgsearch.train.loop import Interrupted, train

    root = tmp_path_factory.mktemp("interrupted")
    synthetic.generate(root / "data", per_class=2, size=40, fmt="png", seed=5)

    def ctrl_c_at_step_1(kind, **info):
        if kind == "step" and info["step"] == 1:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        train(train_cfg(root / "data" / "captions.csv", root / "out", random_tiny_model), events=ctrl_c_at_step_1)
    ckpt = root / "out.checkpoint"
    assert (ckpt / "checkpoint.pt").is_file() and (ckpt / owned.MARKER).is_file()
    return ckpt


@pytest.fixture()
def cli(home, random_tiny_model):
    """The CLI with the untrained tiny model (these tests never need one that has learnt anything)."""
    from typer.testing import CliRunner

    from imgsearch.cli import app

    runner = CliRunner()

    def run(*args, model: str | None = f"local-dir:{random_tiny_model}"):
        pre = ["--home", str(home)] + (["--model", model] if model else [])
        return runner.invoke(app, pre + [str(a) for a in args])

    return run


def resume(cli, source: Path, out: Path):
    return cli("finetune", "--resume", source, "--out", out, *FAST, model=None)


# --- point 1: --resume never deletes the folder it reads from ------------------------------------------

def test_resume_from_a_checkpoint_file_among_user_files_keeps_every_file(cli, interrupted, tmp_path):
    docs = tmp_path / "Documents"
    docs.mkdir()
    shutil.copy(interrupted / "checkpoint.pt", docs / "run.pt")
    (docs / "letter.txt").write_text("dear bank")
    (docs / "taxes").mkdir()
    (docs / "taxes" / "2025.pdf").write_bytes(b"%PDF precious")
    before = tree(docs)
    r = resume(cli, docs / "run.pt", tmp_path / "model")
    assert r.exit_code == 0, r.output
    assert "resuming at step 1" in r.stderr
    assert tree(docs) == before  # the checkpoint file too: it is the user's copy
    assert (tmp_path / "model" / "open_clip_model.safetensors").is_file()


@pytest.mark.parametrize("name", ["mine", "model.checkpoint"])  # the second is where imgsearch would save
def test_a_folder_the_user_made_holding_only_a_checkpoint_survives(cli, interrupted, tmp_path, name):
    mine = tmp_path / name
    mine.mkdir()
    shutil.copy(interrupted / "checkpoint.pt", mine / "checkpoint.pt")
    before = tree(mine)
    r = resume(cli, mine, tmp_path / "model")
    assert r.exit_code == 0, r.output
    assert tree(mine) == before
    if name == "model.checkpoint":
        assert f"note: {mine} exists and is not this run's checkpoint folder" in r.stderr
    assert {p.name for p in tmp_path.iterdir()} <= {name, "model", "home"}  # no checkpoint folder left over


def test_own_checkpoint_folder_is_left_when_the_user_put_a_file_in_it(interrupted, random_tiny_model, tmp_path):
    from imgsearch.train.loop import _save_checkpoint, load_checkpoint, train

    ckpt = load_checkpoint(interrupted)
    ours = tmp_path / "run.checkpoint"
    _save_checkpoint(ours, ckpt, ckpt["owner_token"])
    cfg = train_cfg(ckpt["config"]["captions"], tmp_path / "model", random_tiny_model, checkpoint_dir=str(ours))
    notes = []

    def drop_a_file_mid_run(kind, **info):
        if kind == "step":
            (ours / "my-notes.txt").write_text("mine")
        if kind == "note":
            notes.append(info["message"])

    train(cfg, resume=ckpt, events=drop_a_file_mid_run)
    assert (ours / "my-notes.txt").read_text() == "mine" and (ours / "checkpoint.pt").is_file()
    assert notes == [f"left the checkpoint folder {ours} in place: it holds files imgsearch did not write "
                     "(my-notes.txt)"]


def test_resume_from_its_own_checkpoint_folder_removes_it_afterwards(cli, interrupted, tmp_path):
    from imgsearch.train.loop import _save_checkpoint, load_checkpoint

    ckpt = load_checkpoint(interrupted)
    ours = tmp_path / "run.checkpoint"
    _save_checkpoint(ours, ckpt, ckpt["owner_token"])
    r = resume(cli, ours / "checkpoint.pt", tmp_path / "model")
    assert r.exit_code == 0, r.output
    assert not ours.exists() and "note:" not in r.stderr


# --- issue 21 point 5: flags given with --resume are honoured, or refused in one line -----------------

def copy_of(checkpoint: Path, folder: Path) -> Path:
    folder.mkdir()
    shutil.copy(checkpoint / "checkpoint.pt", folder / "checkpoint.pt")
    return folder


def test_resume_honours_the_run_length_and_settings_given_now(cli, interrupted, tmp_path):
    out, ckpt = tmp_path / "model", copy_of(interrupted, tmp_path / "ckpt")
    # The checkpoint's run is 2 steps of 16 pairs; 8 x 2 accumulated is the same 16 pairs per step.
    r = cli("finetune", "--resume", ckpt, "--out", out, "--max-steps", "3", "--lr", "0.002",
            "--batch-size", "8", "--grad-accum", "2", model=None)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "training_report.json").read_text())
    hp = report["hyperparameters"]
    assert report["steps"] == 3 and hp["total_steps"] == 3
    assert (hp["lr"], hp["batch_size"], hp["grad_accum"]) == (0.002, 8, 2)
    said = next(line for line in r.stderr.splitlines() if line.startswith(f"resuming {ckpt} with the checkpoint's"))
    from_checkpoint, given_now = said.split("; given now: ")
    assert "--max-steps" not in from_checkpoint and "--lr" not in from_checkpoint
    for setting in ("--model local-dir:", "--seed 0", "--val-fraction 0.25", "--wd 0.0", "--device cpu"):
        assert setting in from_checkpoint, said
    assert given_now == f"--out {out} --max-steps 3 --lr 0.002 --batch-size 8 --grad-accum 2"


@pytest.mark.parametrize("args, message", [
    (["--seed", "7"], "--seed cannot change on --resume (the checkpoint's run has --seed 0)"),
    (["--model", "ViT-B-32"], "--model cannot change on --resume (the checkpoint's run has --model local-dir:"),
    (["--lock-text"], "--lock-text cannot change on --resume (the checkpoint's run has no --lock-text)"),
    (["--batch-size", "8"], "--batch-size x --grad-accum must stay 16 pairs per step on --resume"),
    (["--max-steps", "1"], "--max-steps 1 ends at step 1, but the checkpoint is already at step 1"),
])
def test_resume_refuses_a_flag_it_cannot_honour_in_one_line(cli, interrupted, tmp_path, args, message):
    ckpt = copy_of(interrupted, tmp_path / "ckpt")
    r = cli("finetune", "--resume", ckpt, "--out", tmp_path / "model", *args, model=None)
    assert r.exit_code == 2, r.output
    assert r.stderr.splitlines() == [r.stderr.strip()] and r.stderr.startswith(f"error: {message}"), r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"] and os.listdir(ckpt) == ["checkpoint.pt"]


# --- point 1: --out only replaces a model folder imgsearch wrote --------------------------------------

def looks_like_a_model(folder: Path) -> None:
    folder.mkdir()
    (folder / "open_clip_config.json").write_text('{"model_cfg": {}}')
    (folder / "thesis.docx").write_bytes(b"years of work")


@pytest.mark.parametrize("kind", ["documents", "user-model", "copied-model", "symlink"])
def test_finetune_out_on_a_folder_imgsearch_did_not_write_is_refused(cli, captioned, random_tiny_model, tmp_path,
                                                                      kind):
    target = tmp_path / "target"
    if kind == "documents":
        target.mkdir()
        (target / "letter.txt").write_text("keep me")
    elif kind == "user-model":
        looks_like_a_model(target)
    elif kind == "copied-model":  # an imgsearch model copied elsewhere (mtimes kept) is not proof
        shutil.copytree(random_tiny_model, target)
    else:
        (tmp_path / "real").mkdir()
        (tmp_path / "real" / "x.txt").write_text("keep")
        target.symlink_to(tmp_path / "real")
    before = tree(target.resolve())
    r = cli("finetune", captioned, "--out", target, *FAST, model=f"local-dir:{random_tiny_model}")
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a model imgsearch wrote" in lines[0] and str(target) in lines[0], r.stderr
    assert tree(target.resolve()) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_save_local_dir_never_renames_aside_or_deletes_a_user_folder(tmp_path):
    from imgsearch.encoder import save_local_dir
    from imgsearch.errors import UsageError

    model, cfg = synthetic.build_tiny_clip(seed=1)
    docs = tmp_path / "Documents"
    looks_like_a_model(docs)
    before = tree(docs)
    with pytest.raises(UsageError, match="not a model folder imgsearch wrote"):
        save_local_dir(model, cfg, docs)
    assert tree(docs) == before and sorted(p.name for p in tmp_path.iterdir()) == ["Documents"]


def test_rerunning_finetune_into_its_own_output_replaces_it_and_nothing_else(cli, captioned, random_tiny_model,
                                                                             tmp_path):
    out = tmp_path / "model"
    args = [captioned, "--out", out, "--max-steps", "1", "--batch-size", "16", "--val-fraction", "0.25", *FAST]
    neighbour = tmp_path / ".model.old"  # the name the old code cleared before renaming the model aside
    neighbour.mkdir()
    (neighbour / "keep.txt").write_text("not imgsearch's")
    r = cli("finetune", *args, "--seed", "1", model=f"local-dir:{random_tiny_model}")
    assert r.exit_code == 0, r.output
    first = (out / "open_clip_model.safetensors").read_bytes()
    r = cli("finetune", *args, "--seed", "2", model=f"local-dir:{random_tiny_model}")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "training_report.json").read_text())
    assert report["hyperparameters"]["seed"] == 2 and (out / "open_clip_model.safetensors").read_bytes() != first
    assert (neighbour / "keep.txt").read_text() == "not imgsearch's"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".model.old"]
    # The user adds a file to the model folder: from then on it is theirs, and is never replaced.
    (out / "README.md").write_text("my notes on this model")
    before = tree(out)
    r = cli("finetune", *args, model=f"local-dir:{random_tiny_model}")
    assert r.exit_code == 2 and "holds files imgsearch did not write (README.md)" in r.stderr, r.output
    assert tree(out) == before


def test_empty_out_folder_is_used(captioned, random_tiny_model, tmp_path):
    from imgsearch.train.loop import train

    out = tmp_path / "empty"
    out.mkdir()
    train(train_cfg(captioned, out, random_tiny_model, max_steps=1))
    assert (out / "open_clip_model.safetensors").is_file() and owned.why_not_ours(out, "model") is None


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_once_the_training_is_done_waits_for_the_model(captioned, random_tiny_model, tmp_path, presses):
    """Ctrl-C during the final evaluations or the save ended the run with "interrupted before training started;
    nothing was written": the finished training was lost. One Ctrl-C now waits for the model to be written, a
    second abandons it and says so."""
    from imgsearch.train.loop import Interrupted, train

    out, notes = tmp_path / "out", []

    def ctrl_c_at_the_wise_evaluation(kind, **info):
        if kind == "note":
            notes.append(info["message"])
        if kind == "eval" and info["label"].startswith("WiSE-FT"):
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, after the last training step

    cfg = train_cfg(captioned, out, random_tiny_model, max_steps=1, wise_alpha=0.5)
    if presses == 1:
        assert train(cfg, events=ctrl_c_at_the_wise_evaluation)["steps"] == 1
        assert (out / "open_clip_model.safetensors").is_file() and notes == [
            f"finishing: writing {out} first; Ctrl-C again abandons the run"]
    else:
        with pytest.raises(Interrupted, match=f"stopped before {out} was written .second Ctrl-C.; run the fine-"):
            train(cfg, events=ctrl_c_at_the_wise_evaluation)
        assert not out.exists()


# --- the ownership proof itself -----------------------------------------------------------------------

def test_marker_proves_nothing_when_copied_moved_or_joined_by_other_files(tmp_path):
    token = owned.new_token()
    ours = owned.create_dir(tmp_path / "ours", "finetune-checkpoint", token)
    (ours / "checkpoint.pt").write_bytes(b"weights")
    owned.record(ours, "checkpoint.pt")
    assert owned.why_not_ours(ours, "finetune-checkpoint", token) is None
    assert "another run" in owned.why_not_ours(ours, "finetune-checkpoint", owned.new_token())
    # a marker dropped into a user's folder
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy2(ours / owned.MARKER, docs / owned.MARKER)
    shutil.copy2(ours / "checkpoint.pt", docs / "checkpoint.pt")
    assert "moved or copied" in owned.remove(docs, "finetune-checkpoint", token)
    assert sorted(os.listdir(docs)) == sorted([owned.MARKER, "checkpoint.pt"])
    # the user overwrote imgsearch's file with their own of the same name
    (ours / "checkpoint.pt").write_bytes(b"user's own file")
    assert "changed after imgsearch wrote it" in owned.remove(ours, "finetune-checkpoint", token)
    assert (ours / "checkpoint.pt").read_bytes() == b"user's own file"


# --- point 15: null captions and non-UTF-8 class files ------------------------------------------------

def test_a_quote_left_open_in_a_caption_csv_is_named_not_swallowed(tmp_path):
    """A caption that opens a quote and never closes it read the rows after it, up to the next quote, as its
    own caption, silently: those images were left out of training. Captions over several lines still work."""
    from imgsearch.captions import read_captions

    for name in "abcde":
        (tmp_path / f"{name}.png").write_bytes(b"x")
    src = tmp_path / "captions.csv"
    src.write_text('path,caption\na.png,a red circle\nb.png,"a blue square\nc.png,a green triangle\n'
                   'd.png,a red square\ne.png,"two\nlines"\n')
    cs = read_captions(src)
    assert [(p.caption, p.line) for p in cs.pairs] == [("a red circle", 2)]
    assert cs.problems == [(f"{src}:3", "a quote opened in this row is not closed at its end, so the rows up to "
                                        "line 6 were read as its caption; close the quote"),
                           (f"{src}:7", "expected 2 fields, found 1")]
    src.write_text('path,caption\na.png,a red circle\ne.png,"two\nlines, on purpose"\nb.png,"Sunset" at dusk\n')
    cs = read_captions(src)
    assert [(p.caption, p.line) for p in cs.pairs] == [("a red circle", 2), ("two\nlines, on purpose", 3),
                                                       ("Sunset at dusk", 5)] and cs.problems == []


def test_jsonl_null_and_non_text_captions_are_skipped_with_their_line(tmp_path):
    from imgsearch.captions import read_captions

    (tmp_path / "a.png").write_bytes(b"x")
    lines = [{"path": "a.png", "caption": "a red circle"},
             {"path": "a.png", "caption": None},
             {"path": "a.png", "caption": [None, "a round red thing"]},
             {"path": "a.png", "caption": 5},
             {"path": None, "caption": "a blue square"},
             {"path": "a.png", "caption": {"text": "nested"}},
             {"path": "a.png"}]
    src = tmp_path / "caps.jsonl"
    src.write_text("".join(json.dumps(obj) + "\n" for obj in lines))
    cs = read_captions(src)
    assert [p.caption for p in cs.pairs] == ["a red circle", "a round red thing"]
    assert dict(cs.problems) == {
        f"{src}:2": "field 'caption' is null; a caption must be text",
        f"{src}:3": "caption 1 in 'caption' is null; a caption must be text",
        f"{src}:4": "field 'caption' is the number 5; a caption must be text",
        f"{src}:5": "field 'path' is null; it must be the image path as text",
        f"{src}:6": "field 'caption' is an object; a caption must be text",
        f"{src}:7": "missing field 'caption'",
    }


def test_a_json_array_of_captions_is_read_like_jsonl(tmp_path):
    """captions.json holding the usual JSON array (pretty-printed) gave one "not valid JSON" problem per line and
    no pairs, so finetune, eval retrieval and caption --import all refused it."""
    from imgsearch.captions import read_captions
    from imgsearch.errors import DataError

    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"x")
    src = tmp_path / "captions.json"
    src.write_text(json.dumps([{"path": "a.png", "caption": "a red circle"}, "b.png",
                               {"path": "b.png", "caption": ["a blue square", "a square"]}], indent=2))
    cs = read_captions(src)
    assert [(Path(p.path).name, p.caption) for p in cs.pairs] == [
        ("a.png", "a red circle"), ("b.png", "a blue square"), ("b.png", "a square")]
    assert cs.problems == [(f"{src}:2", "expected a JSON object")]  # by item number
    src.write_text('[{"path": "a.png", "caption": "x"},')
    with pytest.raises(DataError, match=r"captions.json is not valid JSON \(Expecting value: line 1 column 36"):
        read_captions(src)


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_eval_zeroshot_classes_file_not_utf8_is_one_line(cli, tmp_path, suffix):
    folder = tmp_path / "classes"
    synthetic.generate(folder, per_class=1, colors=["red", "blue"], shapes=("circle",), size=32, fmt="png",
                       seed=3, captions_file=None, subfolders=True)
    classes = tmp_path / f"names{suffix}"
    body = "red_circle,rouge cercle\nblue_circle,bleu cercle\n" if suffix == ".csv" else \
        '{"red_circle": "rouge cercle", "blue_circle": "bleu cercle"}'
    classes.write_bytes(body.replace("rouge", "\xe9carlate").encode("latin-1"))
    r = cli("eval", "zeroshot", folder, "--classes", classes)
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(classes) in lines[0] and "not UTF-8" in lines[0], r.stderr
    assert "internal error" not in r.output and "Traceback" not in r.output


def test_class_file_with_an_empty_name_is_refused(tmp_path):
    from imgsearch.evaluation import read_class_map
    from imgsearch.errors import DataError

    f = tmp_path / "names.csv"
    f.write_text("red_circle,\nblue_circle,blue\n")
    with pytest.raises(DataError, match=r"names.csv:1: empty class name"):
        read_class_map(f)


# --- other writes in the package: thumbnails and the FAISS cache --------------------------------------

def test_stale_thumbnail_cleanup_only_touches_thumbnail_names(tmp_path):
    from imgsearch import thumbs

    folder = tmp_path / "thumbs" / "256" / "07"
    folder.mkdir(parents=True)
    dest = folder / "7-00ff.jpg"
    for name in ("7-00ff.jpg", "7-abc123.jpg", "7-holiday.jpg", "7-abc123.jpg.bak"):
        (folder / name).write_bytes(b"x")
    thumbs._drop_stale(dest, 7)
    assert sorted(os.listdir(folder)) == ["7-00ff.jpg", "7-abc123.jpg.bak", "7-holiday.jpg"]


def test_faiss_save_never_clobbers_a_file_named_like_its_old_temp_file(tmp_path):
    from imgsearch.vectors import VectorIndex

    vecs = np.eye(4, dtype=np.float32)
    index = VectorIndex.build(np.arange(1, 5, dtype=np.int64), vecs, 4)
    path = tmp_path / "model-1.faiss"
    bystander = path.with_name(path.name + f".{os.getpid()}.tmp")
    bystander.write_text("someone else's")
    index.save(path, {"state": 1})
    assert bystander.read_text() == "someone else's"
    assert sorted(os.listdir(tmp_path)) == sorted([path.name, bystander.name])
    assert len(VectorIndex.load(path)[0]) == 4


def interrupt_at_step_1(cfg) -> Path:
    """Train ``cfg`` until Ctrl-C at step 1; its checkpoint folder."""
    from imgsearch.train.loop import Interrupted, train

    def ctrl_c(kind, **info):
        if kind == "step" and info["step"] == 1:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        train(cfg, events=ctrl_c)
    return cfg.checkpoint_path


def test_a_run_started_with_relative_paths_resumes_from_another_folder(cli, random_tiny_model, tmp_path,
                                                                     monkeypatch):
    """The checkpoint kept captions.csv and --out as typed, so a resume from anywhere else failed with "captions
    source not found" (or would have written the model under the new folder)."""
    synthetic.generate(tmp_path / "shoot", per_class=2, size=40, fmt="png", seed=5)
    monkeypatch.chdir(tmp_path / "shoot")
    ckpt = interrupt_at_step_1(train_cfg(Path("captions.csv"), Path("tuned"), random_tiny_model))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = cli("finetune", "--resume", ckpt, *FAST, model=None)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "shoot" / "tuned" / "open_clip_model.safetensors").is_file() and not os.listdir(elsewhere)


def test_resume_after_the_base_model_folder_changed_is_one_line(cli, random_tiny_model, captioned, tmp_path):
    """A base folder holding other weights now (here another architecture) was an internal error from
    load_state_dict; the checkpoint records the base weights' fingerprint and resume compares it."""
    from imgsearch.encoder import save_local_dir

    base = Path(shutil.copytree(random_tiny_model, tmp_path / "base"))
    ckpt = interrupt_at_step_1(train_cfg(captioned, tmp_path / "tuned", base, max_steps=3))
    model, cfg = synthetic.build_tiny_clip(seed=3, layers=3)
    shutil.rmtree(base)
    save_local_dir(model, cfg, base, {"size": cfg["vision_cfg"]["image_size"]})
    r = cli("finetune", "--resume", ckpt, *FAST, model=None)
    assert r.exit_code == 1 and r.stderr.splitlines()[-1] == (
        f"error: the weights of local-dir:{base} changed since the checkpoint was trained from them; --resume needs "
        "the same base model (or start a new run without --resume)"), r.output
    assert (ckpt / "checkpoint.pt").is_file() and not (tmp_path / "tuned").exists()


def test_a_training_image_moved_away_mid_run_stops_with_a_checkpoint_to_resume(cli, random_tiny_model, tmp_path):
    """A photo moved while training ran ended the run with the decode worker's whole traceback as the "error"
    and no checkpoint: every step done was lost. It now saves one and says which file to put back."""
    from imgsearch.captions import read_captions
    from imgsearch.errors import DataError
    from imgsearch.train.data import split_by_image
    from imgsearch.train.loop import train

    synthetic.generate(tmp_path / "shoot", per_class=2, size=40, fmt="png", seed=5)
    cfg = train_cfg(tmp_path / "shoot" / "captions.csv", tmp_path / "tuned", random_tiny_model, max_steps=4)
    training, _ = split_by_image(read_captions(cfg.captions).pairs, cfg.val_fraction, cfg.seed)
    away = tmp_path / "away"
    away.mkdir()

    def move_the_training_images_once_checked(kind, **info):
        if kind == "start":
            for path in {p.path for p in training}:
                shutil.move(path, away)

    with pytest.raises(DataError) as e:
        train(cfg, events=move_the_training_images_once_checked)
    message = str(e.value)
    assert message.startswith("stopped at step 0/4: ") and "cannot read file: No such file or directory" in message
    assert message.endswith(f"checkpoint saved. Put the image back, then continue with: imgsearch finetune --resume "
                            f"{cfg.checkpoint_path}") and "\n" not in message
    for f in away.iterdir():
        shutil.move(f, tmp_path / "shoot")
    r = cli("finetune", "--resume", cfg.checkpoint_path, *FAST, model=None)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "tuned" / "training_report.json").read_text())["steps"] == 4
