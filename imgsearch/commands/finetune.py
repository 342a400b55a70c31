"""`imgsearch finetune`: contrastive fine-tuning on the user's captions, with progress and a result table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from . import command, err, pct, report_skipped, settings_of
from ..errors import UsageError


def _eval_line(label: str, m: dict) -> str:
    i2t, t2i = m["image_to_text"], m["text_to_image"]
    return (f"{label}: val loss {m['val_loss']:.4f} | image→text R@1 {pct(i2t['R@1'])} R@5 {pct(i2t['R@5'])} | "
            f"text→image R@1 {pct(t2i['R@1'])} R@5 {pct(t2i['R@5'])} (chance {pct(t2i['chance']['R@1'])})")


@command("finetune")
def finetune_cmd(
    ctx: typer.Context,
    captions: Optional[Path] = typer.Argument(None, help="Captions: .csv/.tsv with path,caption columns, .jsonl, or "
                                              "a folder of images with .txt sidecars. Optional with --resume."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the fine-tuned model (open_clip "
                                       "local-dir); load it with --model local-dir:DIR."),
    model: Optional[str] = typer.Option(None, "--model", help="Base model [default: the global --model]"),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="Base weights tag or file [default: the "
                                             "global --pretrained]"),
    val: Optional[Path] = typer.Option(None, "--val", help="Separate validation captions (same formats) instead "
                                       "of holding out --val-fraction of the images."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="Share of images held out for validation "
                                       "(split by image, all of an image's captions go together)."),
    image_col: str = typer.Option("path", "--image-col", help="Image path column/field name."),
    caption_col: str = typer.Option("caption", "--caption-col", help="Caption column/field name."),
    epochs: int = typer.Option(5, "--epochs", min=1, help="Passes over the training pairs."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Stop after this many optimizer "
                                            "steps (overrides --epochs)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=2, help="Pairs per micro-batch; each "
                                             "pair's negatives are the others [default: global --batch-size, 32]"),
    lr: float = typer.Option(1e-5, "--lr", help="Peak learning rate (fine-tuning wants small values)."),
    wd: float = typer.Option(0.1, "--wd", help="AdamW weight decay (not applied to biases, norms, temperature)."),
    warmup: Optional[int] = typer.Option(None, "--warmup", min=0, help="Linear warmup steps before cosine decay "
                                         "[default: 10% of the steps]"),
    lock_image: bool = typer.Option(False, "--lock-image", help="Freeze the image tower (LiT-style)."),
    lock_text: bool = typer.Option(False, "--lock-text", help="Freeze the text tower."),
    unlocked_layers: int = typer.Option(0, "--unlocked-layers", min=0, help="Leave the last N layer groups of a "
                                        "locked tower trainable."),
    grad_accum: int = typer.Option(1, "--grad-accum", min=1, help="Micro-batches per step; all of a step's pairs "
                                   "are negatives of each other (as one N x larger batch)."),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing", help="Recompute activations in the "
                                            "backward pass: less memory, ~30% slower."),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto, fp32, bf16 or fp16 [default auto: "
                                            "fp16 + grad scaler on CUDA, bf16 autocast on CPUs with native bf16]"),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda [default: the global --device]"),
    seed: int = typer.Option(0, "--seed", help="Seed for the split, the data order and augmentation."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run from its "
                                          "checkpoint folder with its settings; flags given now override those "
                                          "that can change (run length, --lr, --wd, --warmup, --device ...)."),
    wise_alpha: Optional[float] = typer.Option(None, "--wise-alpha", help="Write the WiSE-FT blend (1-A)*base + "
                                               "A*fine-tuned (e.g. 0.5) and evaluate all three."),
    json_out: bool = typer.Option(False, "--json", help="Print the training report as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
):
    """Fine-tune CLIP on your image–caption pairs so search speaks your vocabulary."""
    from ..metrics import table_rows
    from ..progress import Bar
    from ..train.loop import (CHECKPOINT_FILE, Interrupted, StopFlag, TrainConfig, checkpoint_dir_is_ours,
                              load_checkpoint, resumed_config, shown_setting, train)

    settings = settings_of(ctx)
    ckpt = None
    if resume is not None:
        from dataclasses import fields

        ckpt = load_checkpoint(resume)
        names = [f.name for f in fields(TrainConfig) if f.name in ctx.params]
        # Only what the user typed now overrides the checkpoint; an option's default must not. (By name:
        # Typer carries its own copy of click's ParameterSource.)
        given = {n: str(v) if isinstance(v, Path) else v for n, v in ctx.params.items()
                 if n in names and ctx.get_parameter_source(n).name == "COMMANDLINE"}
        cfg = resumed_config(ckpt, given)
        kept = [shown_setting(cfg, n) for n in names if n not in given]
        err(f"resuming {resume} with the checkpoint's settings: " + " ".join(k for k in kept if not k.startswith("no "))
            + (f"; given now: {' '.join(shown_setting(cfg, n) for n in given)}" if given else ""))
        # Checkpoints go on into the resumed folder only when imgsearch provably made it for this run;
        # a file given by name (or a folder a user filled) is read and left alone, never written or removed.
        folder = resume if resume.is_dir() else resume.parent
        ours = ((resume.is_dir() or resume.name == CHECKPOINT_FILE)
                and checkpoint_dir_is_ours(folder, ckpt.get("owner_token")))
        cfg.checkpoint_dir = str(folder.absolute()) if ours else None
    else:
        if captions is None:
            raise UsageError("give the captions file or folder to train on (or --resume CHECKPOINT)")
        if out is None:
            raise UsageError("give --out DIR, the folder the fine-tuned model is written to")
        if model is None:
            model, pretrained = settings.model, pretrained or settings.pretrained
        elif pretrained is None and model == settings.model:
            pretrained = settings.pretrained
        cfg = TrainConfig(
            captions=str(captions), out=str(out), model=model, pretrained=pretrained,
            val=str(val) if val else None, image_col=image_col, caption_col=caption_col, epochs=epochs,
            max_steps=max_steps, batch_size=batch_size or settings.batch_size, lr=lr, wd=wd, warmup=warmup,
            val_fraction=val_fraction, lock_image=lock_image, lock_text=lock_text, unlocked_layers=unlocked_layers,
            grad_accum=grad_accum, grad_checkpointing=grad_checkpointing,
            precision=precision or settings.precision, device=device or settings.device, seed=seed, wise_alpha=wise_alpha,
            workers=settings.workers, max_pixels=settings.max_pixels)

    check_bar = Bar("checking images", quiet=quiet, leave=False)
    train_bar: Bar | None = None
    rates: dict = {}

    def say(line: str) -> None:
        train_bar.write(line) if train_bar is not None and train_bar.open else err(line)

    def events(kind: str, **info) -> None:
        nonlocal train_bar
        if kind == "note":
            say(f"note: {info['message']}")
        elif kind == "check":
            check_bar(info["done"], info["total"])
        elif kind == "start":
            check_bar.close()
            c = info["counts"]
            report_skipped(info["skipped"], "all listed in training_report.json")
            err(f"training {info['model']} on {c['train_pairs']} pairs ({c['train_images']} images), validating on "
                f"{c['val_pairs']} pairs ({c['val_images']} images); {c['skipped']} skipped")
            err(f"{info['device']}, {info['precision']}, {info['trainable']:,} trainable parameters, "
                f"{info['total']} steps ({info['steps_per_epoch']} per epoch), {info['workers']} decode workers"
                + (f"; resuming at step {info['step']}" if info["resumed"] else ""))
            train_bar = Bar("fine-tuning", "step", quiet=quiet, initial=info["step"])
            train_bar.start(info["total"])
        elif kind == "step" and train_bar is not None and train_bar.open:
            # Smoothed, so one slow step (an evaluation, a checkpoint) does not make the figure jump.
            rate = rates.setdefault("ema", info["samples_per_s"])
            rates["ema"] = rate = 0.8 * rate + 0.2 * info["samples_per_s"]
            train_bar.advance(1, f"loss {info['loss']:.4f}, lr {info['lr']:.2e}, {rate:.1f} samples/s")
        elif kind == "eval":
            say(_eval_line(info["label"], info["metrics"]))
        elif kind == "save" and info["reason"] == "interrupted" and train_bar is not None:
            train_bar.close()

    def close_bars() -> None:
        for bar in (check_bar, train_bar):
            if bar is not None:
                bar.close()

    try:
        report = train(cfg, resume=ckpt, events=events, stop=StopFlag())
    except (Interrupted, KeyboardInterrupt) as e:
        close_bars()
        err(f"interrupted: {e}" if isinstance(e, Interrupted) else
            "interrupted before training started; nothing was written")
        raise typer.Exit(130) from None
    finally:
        close_bars()
    if json_out:
        typer.echo(json.dumps(report, indent=2))
        return
    res = report["results"]
    named = [("base", res["base"]), (f"fine-tuned (step {report['best_step']})", res["finetuned"])]
    if "wise" in res:
        named.append((f"WiSE-FT alpha {cfg.wise_alpha}", res["wise"]))
    for row in table_rows(named):
        typer.echo(row)
    typer.echo(report["summary"] + (f"; {report['samples_per_second']} samples/s" if report["samples_per_second"]
                                    else ""))
    if not report["improved"]:
        typer.echo("note: the result does not beat the base model on the validation set; try a lower --lr, more "
                   "data, or --wise-alpha")
    blend = f"the WiSE-FT alpha {cfg.wise_alpha} blend, " if "wise" in res else ""
    typer.echo(f"wrote {report['output']} ({blend}use it with --model local-dir:{report['output']})")
