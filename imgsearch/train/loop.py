"""The fine-tuning loop: one flat function, nanoGPT style, the same on a laptop CPU and a GPU. train(cfg) loads
the base model, checks and splits the data, evaluates the base, trains with AdamW and warmup+cosine, evaluates
after every epoch keeping the best weights, survives Ctrl-C with a checkpoint that --resume continues exactly,
optionally blends with WiSE-FT, and writes an open_clip local-dir model."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .. import owned
from ..config import MAX_PIXELS, VERSION, thread_budget, training_workers
from ..encoder import LOCAL_DIR, ModelSpec, build, pick_device, pick_precision, read_local_config, save_local_dir
from ..encoder import autocast_for, why_not_replaceable
from ..errors import DataError, DecodeError, ImgSearchError, UsageError
from ..metrics import headline, retrieval_metrics
from .data import PairDataset, StepBatches, decode_for_eval, make_loader, prepare
from .loss import MAX_LOG_SCALE, contrastive_loss
from .wise import interpolate

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "imgsearch-finetune-checkpoint"
REPORT_FILE = "training_report.json"
SAVE_EVERY_S = 600  # epoch-end checkpoints at most this often


class Interrupted(ImgSearchError):
    """Training stopped by Ctrl-C; the message says where the checkpoint is and how to continue."""

    exit_code = 130


@dataclass
class TrainConfig:
    """Everything that defines a run; stored in checkpoints and in the report."""

    captions: str
    out: str
    model: str
    pretrained: str | None = None
    val: str | None = None
    image_col: str = "path"
    caption_col: str = "caption"
    epochs: int = 5
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 1e-5
    wd: float = 0.1
    warmup: int | None = None  # steps; None = 10% of the run
    val_fraction: float = 0.1
    lock_image: bool = False
    lock_text: bool = False
    unlocked_layers: int = 0
    grad_accum: int = 1
    grad_checkpointing: bool = False
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    wise_alpha: float | None = None
    workers: int = 0  # decode processes; 0 = half the cores
    max_pixels: int = MAX_PIXELS
    checkpoint_dir: str | None = None  # None = "<out>.checkpoint" next to --out

    def __post_init__(self):
        # Absolute paths and model: a checkpoint is resumed from wherever the user is then, not where the run began.
        for name in ("captions", "out", "val"):
            if getattr(self, name) is not None:
                setattr(self, name, os.path.abspath(getattr(self, name)))
        spec = ModelSpec(self.model, self.pretrained).canonical()
        self.model, self.pretrained = spec.name, spec.pretrained

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint_dir or (str(Path(self.out).absolute()) + ".checkpoint"))


# What --resume cannot change: the weights and optimizer state are of this model with these towers
# trainable, and the step count and data order are of this split and seed.
FIXED_ON_RESUME = ("model", "pretrained", "val", "val_fraction", "image_col", "caption_col", "seed", "lock_image",
                   "lock_text", "unlocked_layers")


def flag_of(name: str) -> str:
    return name if name == "captions" else "--" + name.replace("_", "-")  # captions: the positional argument


def shown_setting(cfg: TrainConfig, name: str) -> str:
    """``--lr 0.001`` as the user would type it (a bare flag for a switch that is on; "no --val" if unset)."""
    value = getattr(cfg, name)
    if value is None or value is False:
        return f"no {flag_of(name)}"
    return flag_of(name) if value is True else f"{flag_of(name)} {value}"


def resumed_config(ckpt: dict, changes: dict) -> TrainConfig:
    """The checkpoint's settings with ``changes`` (TrainConfig fields the user gave anew) applied; a
    UsageError names the first change a resumed run cannot honour."""
    old = TrainConfig(**ckpt["config"])
    if "epochs" in changes and "max_steps" not in changes:
        changes = {**changes, "max_steps": None}  # a run length given now replaces the checkpoint's
    cfg = replace(old, **changes)  # paths and model in the checkpoint's form, to compare
    for name in FIXED_ON_RESUME:
        if name in changes and getattr(cfg, name) != getattr(old, name):
            raise UsageError(f"{flag_of(name)} cannot change on --resume (the checkpoint's run has "
                             f"{shown_setting(old, name)}); leave it out, or start a new run without --resume")
    per_step = old.batch_size * old.grad_accum
    if cfg.batch_size * cfg.grad_accum != per_step:
        # The step count, the data order and each step's negatives are all in steps of this many pairs.
        raise UsageError(f"--batch-size x --grad-accum must stay {per_step} pairs per step on --resume (the checkpoint "
                         f"has {shown_setting(old, 'batch_size')} {shown_setting(old, 'grad_accum')}); e.g. halve "
                         "--batch-size and double --grad-accum to use less memory")
    total, step = cfg.max_steps or cfg.epochs * ckpt["steps_per_epoch"], ckpt["step"]
    if total <= step:
        raise UsageError(f"{shown_setting(cfg, 'max_steps' if cfg.max_steps else 'epochs')} ends at step {total}, but the checkpoint is already at step "
                         f"{step}; give a longer run to train on")
    return cfg


@dataclass
class StopFlag:
    """Set by the first Ctrl-C (or by a caller); the loop stops after the optimizer step in flight."""

    requested: bool = False

    @contextlib.contextmanager
    def catching_sigint(self, notice=None):
        """``notice()`` is called on the first Ctrl-C (say what is being finished first)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame):
            if self.requested:  # a second Ctrl-C means stop now, unsaved
                raise KeyboardInterrupt
            self.requested = True
            if notice is not None:
                notice()

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def lr_at(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to zero at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model, wd: float) -> list[dict]:
    """AdamW groups: weight decay on matrices only; biases, norms and the logit scale are left alone."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "bias" in name or "ln" in name or "norm" in name or "logit_" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def training_precision(precision: str, device: str) -> str:
    """auto: fp16 autocast + grad scaler on CUDA, bf16 autocast on CPUs with native bf16, else fp32."""
    if precision == "int8":
        raise UsageError("--precision int8 is for indexing only (a quantised copy of the image tower); "
                         "fine-tune with auto, fp32, bf16 or fp16")
    return pick_precision(precision, device)  # the same rule as inference


def base_model_config(spec, model) -> tuple[dict, dict]:
    """(model_cfg, preprocess_cfg) of the base, so the written config rebuilds the same network."""
    import open_clip

    model_cfg = (read_local_config(spec.name[len(LOCAL_DIR):]).get("model_cfg") if spec.name.startswith(LOCAL_DIR)
                 else open_clip.get_model_config(spec.name))
    if not model_cfg:
        raise UsageError(f"cannot find the architecture config of {spec.label}; fine-tuning needs a model "
                         "whose open_clip config is known")
    pp = getattr(model.visual, "preprocess_cfg", None) or {}
    return model_cfg, {k: list(v) if isinstance(v, tuple) else v for k, v in pp.items()}


def check_out_dir(out: Path) -> None:
    """Refuse before training to write over anything but an empty folder or a model imgsearch wrote."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder path for the fine-tuned model")
    reason = why_not_replaceable(out)
    if reason is not None:
        raise UsageError(f"--out {out} is a non-empty folder that is not a model imgsearch wrote ({reason}); "
                         "pick a new folder (imgsearch only replaces a model folder it wrote itself)")
    parent = out.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write to {parent}; choose another --out")


CHECKPOINT_KIND = "finetune-checkpoint"
_CHECKPOINT_TMP = CHECKPOINT_FILE + ".tmp"


def checkpoint_dir_is_ours(folder: str | os.PathLike, token: str | None) -> bool:
    """Whether ``folder`` is a checkpoint folder imgsearch made for the run holding ``token``."""
    return token is not None and owned.why_not_ours(folder, CHECKPOINT_KIND, token, transient=(_CHECKPOINT_TMP,)) is None


def pick_checkpoint_dir(preferred: Path, token: str) -> tuple[Path, str | None]:
    """(folder for this run's checkpoints, why ``preferred`` was passed over or None). A folder that is not
    this run's own (a user's, or another run's checkpoint that may still be resumed) is never written to."""
    candidate, n = preferred, 1
    while os.path.lexists(candidate) and not checkpoint_dir_is_ours(candidate, token):
        n += 1
        candidate = preferred.with_name(f"{preferred.name}-{n}")
    if candidate == preferred:
        return candidate, None
    reason = owned.why_not_ours(preferred, CHECKPOINT_KIND, token, transient=(_CHECKPOINT_TMP,))
    return candidate, f"{preferred} exists and is not this run's checkpoint folder ({reason})"


def validate(cfg: TrainConfig) -> None:
    checks = [
        (cfg.batch_size >= 2, "--batch-size must be at least 2 (contrastive training needs negatives)"),
        (cfg.grad_accum >= 1, "--grad-accum must be at least 1"),
        (cfg.epochs >= 1, "--epochs must be at least 1"),
        (cfg.max_steps is None or cfg.max_steps >= 1, "--max-steps must be at least 1"),
        (cfg.lr > 0, "--lr must be positive"),
        (cfg.wd >= 0, "--wd must be zero or positive"),
        (cfg.warmup is None or cfg.warmup >= 0, "--warmup must be zero or positive"),
        (cfg.unlocked_layers >= 0, "--unlocked-layers must be zero or positive"),
        (cfg.wise_alpha is None or 0.0 <= cfg.wise_alpha <= 1.0, "--wise-alpha must be between 0 and 1"),
        (not (cfg.lock_image and cfg.lock_text and cfg.unlocked_layers == 0),
         "--lock-image and --lock-text together freeze everything but the temperature; unlock layers with "
         "--unlocked-layers N or lock one tower only"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UsageError(msg)


def evaluate(model, val, preprocess, device: str, precision: str, batch_size: int, draft_size: int,
             workers: int, max_pixels: int, overlap: bool = True) -> dict:
    """Validation loss (over fixed batches of pairs) and retrieval metrics on ``val`` (a PairDataset)."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    with torch.inference_mode(), autocast_for(precision, device):
        batches = decode_for_eval(val.gallery.images, preprocess, draft_size, workers, batch_size, max_pixels, overlap)
        img = torch.cat([F.normalize(model.encode_image(b.to(device)).float(), dim=-1) for b in batches])
        txt = torch.cat([F.normalize(model.encode_text(val.tokens[i:i + batch_size].to(device)).float(), dim=-1)
                         for i in range(0, len(val.tokens), batch_size)])
        idx = val.index.to(img.device)
        total, count = 0.0, 0
        for lo in range(0, len(idx), batch_size):
            chunk = idx[lo:lo + batch_size]
            if len(chunk) < 2:
                continue
            loss = contrastive_loss(img[chunk[:, 0]], txt[chunk[:, 1]], model.logit_scale, chunk[:, 0], chunk[:, 1])
            if torch.isfinite(loss):
                total += float(loss) * len(chunk)
                count += len(chunk)
    model.train(was_training)
    return {**retrieval_metrics(img.cpu().numpy(), txt.cpu().numpy(), val.gallery.matches),
            "val_loss": total / count if count else float("nan")}


def _save_checkpoint(path: Path, payload: dict, token: str) -> None:
    import torch

    try:
        owned.create_dir(path, CHECKPOINT_KIND, token)
    except FileExistsError:
        reason = owned.why_not_ours(path, CHECKPOINT_KIND, token, transient=(_CHECKPOINT_TMP,))
        if reason is not None:
            raise DataError(f"not writing the checkpoint into {path}: {reason}") from None
    tmp = path / _CHECKPOINT_TMP
    torch.save(payload, tmp)
    os.replace(tmp, path / CHECKPOINT_FILE)  # a Ctrl-C mid-save leaves the previous checkpoint intact
    owned.record(path, CHECKPOINT_FILE)


def load_checkpoint(folder: str | os.PathLike) -> dict:
    """Read a checkpoint written by train(); raise UsageError when the folder does not hold one."""
    import torch

    path = Path(folder)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.is_file():
        raise UsageError(f"no {CHECKPOINT_FILE} in {folder}; --resume takes the checkpoint folder that an "
                         "interrupted `imgsearch finetune` printed")
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"checkpoint {file} cannot be read ({type(e).__name__}); it may be damaged") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{file} is not an imgsearch fine-tuning checkpoint")
    return ckpt


def _state_cpu(model) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def train(cfg: TrainConfig, *, resume: dict | None = None, events=None, stop: StopFlag | None = None) -> dict:
    """Fine-tune, evaluate, write ``cfg.out``; returns the report (also written as training_report.json).
    ``events(kind, **info)`` receives progress: "check" (done, total), "start", "step", "eval", "save".
    ``resume`` is a checkpoint from load_checkpoint(); the run then continues at its step."""
    from ..encoder import needs_torch, torch_installed

    if not torch_installed():
        raise UsageError(needs_torch("fine-tuning"))
    import torch

    # Seeded in a fork of torch's random state: the calling program's own state is as it was afterwards.
    cuda = pick_device(cfg.device) == "cuda"
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
        torch.manual_seed(cfg.seed)
        return _train(cfg, resume, events, stop)


def _train(cfg: TrainConfig, resume: dict | None, events, stop: StopFlag | None) -> dict:
    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2

    emit = events or (lambda kind, **info: None)
    stop = stop or StopFlag()
    validate(cfg)
    out = Path(cfg.out).absolute()
    check_out_dir(out)
    # The token ties this run's checkpoint folder to its checkpoints: only a folder whose marker carries
    # it is ever written to or removed, and a resumed run keeps the token of the run it continues.
    token = (resume or {}).get("owner_token") or owned.new_token()
    ckdir, passed_over = pick_checkpoint_dir(cfg.checkpoint_path.absolute(), token)
    if passed_over:
        emit("note", message=f"{passed_over}; this run's checkpoints go to {ckdir}")
    device = pick_device(cfg.device)
    precision = training_precision(cfg.precision, device)
    workers = training_workers(device, cfg.workers)
    # Checking and evaluating decode outside the training step: the indexing thread budget applies.
    budget = thread_budget(device=device, workers=cfg.workers)

    # --- model: fp32 master weights; mixed precision comes from autocast ----------------------------
    spec = ModelSpec(cfg.model, cfg.pretrained).canonical()
    enc = build(spec, device, "fp32")
    if resume is not None and resume["base"]["fingerprint"] != enc.fingerprint:
        raise DataError(f"the weights of {spec.label} changed since the checkpoint was trained from them; --resume "
                        "needs the same base model (or start a new run without --resume)")
    model, preprocess, tokenizer = enc.model, enc.preprocess, enc.tokenizer
    model_cfg, preprocess_cfg = base_model_config(spec, model)
    # open_clip's own training transform (RandomResizedCrop 0.9-1.0 of the image, no colour jitter):
    # mild enough that colour and layout words in captions stay true of the crop.
    train_transform = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=True)
    draft = enc.draft_size  # same JPEG draft decode as the indexer

    # --- data ------------------------------------------------------------------------------------------
    data = prepare(cfg.captions, val_source=cfg.val, image_col=cfg.image_col, caption_col=cfg.caption_col,
                   val_fraction=cfg.val_fraction, seed=cfg.seed, batch_size=cfg.batch_size * cfg.grad_accum,
                   draft_size=draft, max_pixels=cfg.max_pixels, workers=budget.decode,
                   progress=lambda d, t: emit("check", done=d, total=t))
    if resume is not None and resume["data"]["fingerprint"] != data.fingerprint():
        raise DataError("the captions or images changed since the checkpoint was written; --resume needs the "
                        "same data (start a new run without --resume to use the new data)")
    # Captions tokenized as eval and queries tokenize texts (NLLB: the language its script shows, else English),
    # not in whatever language the tokenizer was last set to.
    train_set = PairDataset(data.train, train_transform, enc.tokenize, draft, cfg.max_pixels)
    val = PairDataset(data.val, preprocess, enc.tokenize, draft, cfg.max_pixels)
    # The tokenizer cuts a caption at the text tower's context length without a word; the words cut are not learnt.
    pad, context = enc.tokenize([""])[0, -1], train_set.tokens.shape[1]
    cut = sum(int((ds.tokens[ds.index[:, 1], -1] != pad).sum()) for ds in (train_set, val))
    steps_per_epoch = StepBatches(len(train_set), cfg.batch_size, cfg.grad_accum, cfg.seed, 0, 0).steps_per_epoch
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    warmup = cfg.warmup if cfg.warmup is not None else max(1, round(0.1 * total))
    epochs = math.ceil(total / steps_per_epoch)

    # --- what trains -----------------------------------------------------------------------------------
    base_state = _state_cpu(model) if cfg.wise_alpha is not None else None
    if cfg.lock_image:
        model.lock_image_tower(unlocked_groups=cfg.unlocked_layers)
    if cfg.lock_text:
        model.lock_text_tower(unlocked_layers=cfg.unlocked_layers)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    groups = param_groups(model, cfg.wd)
    trainable = sum(p.numel() for g in groups for p in g["params"])
    # CLIP's AdamW settings (beta2 0.98, eps 1e-6) are steadier with large contrastive logits.
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    scaler = torch.amp.GradScaler("mps" if device.startswith("mps") else "cuda", enabled=(precision == "fp16"))
    autocast = lambda: autocast_for(precision, device)  # noqa: E731

    def run_eval(label: str) -> dict:
        t0 = time.perf_counter()
        m = evaluate(model, val, preprocess, device, precision, cfg.batch_size, draft, budget.decode, cfg.max_pixels,
                     budget.overlap)
        m["seconds"] = round(time.perf_counter() - t0, 3)
        emit("eval", label=label, metrics=m)
        return m

    step, history, best, base_metrics, train_seconds = 0, [], None, None, 0.0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        for group, wanted in zip(optimizer.param_groups, groups):
            group["weight_decay"] = wanted["weight_decay"]  # loading restored the checkpoint's; --wd may be new
        if resume["scaler"]:  # empty when saved without fp16 (another device or precision than now)
            scaler.load_state_dict(resume["scaler"])
        step, history, base_metrics = resume["step"], resume["history"], resume["base_metrics"]
        best, train_seconds = resume["best"], resume["train_seconds"]
    emit("start", model=spec.label, step=step, total=total, epochs=epochs, steps_per_epoch=steps_per_epoch, counts=data.counts(),
         skipped=data.skipped, precision=precision, device=device, trainable=trainable, workers=workers,
         resumed=resume is not None)
    if cut:
        emit("note", message=f"{cut} of {len(train_set) + len(val)} captions fill all {context} tokens the model "
                             "reads and are cut there; words after that are not learnt: put what matters first")
    if base_metrics is None:
        base_metrics = run_eval("base")

    def save_checkpoint(reason: str) -> None:
        _save_checkpoint(ckdir, {
            "format": CHECKPOINT_FORMAT, "version": 1, "imgsearch": VERSION, "created": time.time(),
            "config": asdict(cfg), "step": step, "total_steps": total, "steps_per_epoch": steps_per_epoch,
            "base": {"model": spec.name, "pretrained": spec.pretrained, "fingerprint": enc.fingerprint},
            "model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg,
            "data": {"fingerprint": data.fingerprint(), **data.counts()},
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "history": history, "base_metrics": base_metrics, "best": best, "train_seconds": train_seconds,
            "owner_token": token,
        }, token)
        emit("save", path=str(ckdir), reason=reason, step=step)

    # --- the loop --------------------------------------------------------------------------------------
    batches = StepBatches(len(train_set), cfg.batch_size, cfg.grad_accum, cfg.seed, step, total)
    loader = make_loader(train_set, batches, workers, pin_memory=device.startswith("cuda"))
    model.train()
    it = iter(loader)
    per_step = cfg.batch_size * cfg.grad_accum
    last_save = time.monotonic()
    try:
        with stop.catching_sigint():
            t_last = time.perf_counter()
            while step < total:
                lr = lr_at(step, cfg.lr, warmup, total)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                micro = [(x.to(device, non_blocking=True), t.to(device, non_blocking=True), ii.to(device),
                          ti.to(device)) for x, t, ii, ti in (next(it) for _ in range(cfg.grad_accum))]
                if cfg.grad_accum == 1:
                    x, t, ii, ti = micro[0]
                    with autocast():
                        loss = contrastive_loss(model.encode_image(x), model.encode_text(t), model.logit_scale,
                                                ii, ti)
                    scaler.scale(loss).backward()
                else:
                    # Every pair of the step stays a negative (open_clip's accum_freq trick): all features without
                    # a graph, then each micro-batch again with one, spliced in (2x forward, 1/N memory).
                    with torch.no_grad(), autocast():
                        cached = [(model.encode_image(x), model.encode_text(t)) for x, t, _, _ in micro]
                    ids_i, ids_t = torch.cat([m[2] for m in micro]), torch.cat([m[3] for m in micro])
                    for j, (x, t, _, _) in enumerate(micro):
                        with autocast():
                            fi, ft = model.encode_image(x), model.encode_text(t)
                            imgs = torch.cat([c[0] for c in cached[:j]] + [fi] + [c[0] for c in cached[j + 1:]])
                            txts = torch.cat([c[1] for c in cached[:j]] + [ft] + [c[1] for c in cached[j + 1:]])
                            # The temperature sees the whole-step loss once, not once per micro-batch.
                            scale = model.logit_scale if j == 0 else model.logit_scale.detach()
                            loss = contrastive_loss(imgs, txts, scale, ids_i, ids_t)
                        scaler.scale(loss).backward()
                if not torch.isfinite(loss.detach()) and precision != "fp16":
                    raise DataError(f"the loss became {float(loss.detach())} at step {step + 1}; lower --lr")
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    model.logit_scale.clamp_(0, MAX_LOG_SCALE)
                step += 1
                now = time.perf_counter()
                dt, t_last = now - t_last, now
                train_seconds += dt
                emit("step", step=step, total=total, loss=float(loss.detach()), lr=lr,
                     samples_per_s=per_step / dt if dt > 0 else 0.0, scale=float(model.logit_scale.detach().exp()))
                if step % steps_per_epoch == 0 or step == total:
                    m = run_eval(f"epoch {math.ceil(step / steps_per_epoch)}")
                    m.update(step=step, epoch=step / steps_per_epoch)
                    history.append(m)
                    if best is None or headline(m) > best["score"]:
                        # Training goes on and would overwrite these weights, so keep a copy (None = final).
                        best = {"score": headline(m), "step": step, "metrics": m,
                                "model": _state_cpu(model) if step < total else None}
                    if step < total and time.monotonic() - last_save > SAVE_EVERY_S:
                        save_checkpoint("epoch")  # crash insurance on long runs; Ctrl-C saves anyway
                        last_save = time.monotonic()
                    t_last = time.perf_counter()
                if stop.requested and step < total:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        if not stop.requested:  # a second Ctrl-C, possibly mid-update: nothing consistent to save
            raise Interrupted("stopped immediately (second Ctrl-C); the last epoch checkpoint, if any, is in "
                              f"{ckdir}") from None
        save_checkpoint("interrupted")
        raise Interrupted(f"stopped at step {step}/{total}; checkpoint saved. Continue with: imgsearch finetune "
                          f"--resume {ckdir}") from None
    except DecodeError as e:  # an image gone since it was checked; raised between steps, so the state is whole
        save_checkpoint("interrupted")
        why = str(e).strip().splitlines()[-1].removeprefix(f"{DecodeError.__module__}.DecodeError: ")  # a worker's
        raise DataError(f"stopped at step {step}/{total}: {why}; checkpoint saved. Put the image back, then "
                        f"continue with: imgsearch finetune --resume {ckdir}") from None
    finally:
        del it, loader  # stop the decode workers now, not at garbage collection

    # --- result ----------------------------------------------------------------------------------------
    # Training is done: a first Ctrl-C waits for the model to be written (the evaluations and WiSE-FT take a
    # while, and nothing else holds the run), a second one abandons it.
    stop.requested = False
    try:
        with stop.catching_sigint(lambda: emit("note", message=f"finishing: writing {out} first; Ctrl-C again "
                                                                "abandons the run")):
            if best is not None and best["model"] is not None:
                model.load_state_dict(best["model"])
            result_metrics = best["metrics"] if best is not None else history[-1]
            results = {"base": base_metrics, "finetuned": result_metrics}
            if cfg.wise_alpha is not None:
                if base_state is None:  # resumed run: the original weights come from the base model again
                    base_state = _state_cpu(build(spec, "cpu", "fp32").model)
                model.load_state_dict(interpolate(base_state, _state_cpu(model), cfg.wise_alpha))
                results["wise"] = run_eval(f"WiSE-FT alpha {cfg.wise_alpha}")
            model.eval()
            if cfg.grad_checkpointing:
                model.set_grad_checkpointing(False)
            final = results.get("wise", result_metrics)
            report = {
                "imgsearch": VERSION,
                "base_model": {"model": spec.name, "pretrained": spec.pretrained, "fingerprint": enc.fingerprint},
                "output": str(out),
                "data": {"source": data.source, "val_source": data.val_source, **data.counts(),
                         "skipped_reasons": [{"where": w, "reason": r} for w, r in data.skipped]},
                "hyperparameters": {**{k: v for k, v in asdict(cfg).items() if k not in ("captions", "out", "val")},
                                    "warmup": warmup, "total_steps": total, "steps_per_epoch": steps_per_epoch,
                                    "epochs_run": round(step / steps_per_epoch, 3), "precision": precision,
                                    "device": device, "trainable_parameters": trainable},
                "steps": step, "best_step": best["step"] if best else step, "train_seconds": round(train_seconds, 3),
                "samples_per_second": round(step * per_step / train_seconds, 2) if train_seconds > 0 else None,
                "results": results, "history": history, "improved": headline(final) > headline(base_metrics),
                "summary": _summary(base_metrics, final),
            }
            save_local_dir(model, model_cfg, out, preprocess_cfg,
                           extra_files={REPORT_FILE: json.dumps(report, indent=2, default=_jsonable)},
                           tokenizer=tokenizer)
    except KeyboardInterrupt:
        raise Interrupted(f"stopped before {out} was written (second Ctrl-C); run the fine-tuning again"
                          + (f", or continue from the last checkpoint: imgsearch finetune --resume {ckdir}"
                             if (ckdir / CHECKPOINT_FILE).is_file() else "")) from None
    if os.path.lexists(ckdir):
        if (left := owned.remove(ckdir, CHECKPOINT_KIND, token, transient=(_CHECKPOINT_TMP,))) is not None:
            emit("note", message=f"left the checkpoint folder {ckdir} in place: {left}")
    emit("done", report=report)
    return report


def _summary(base: dict, final: dict) -> str:
    a, b = base["text_to_image"], final["text_to_image"]
    chance = b["chance"]["R@1"]
    times = b["R@1"] / chance if chance > 0 else float("inf")
    return (f"held-out text→image R@1 {100 * a['R@1']:.1f}% -> {100 * b['R@1']:.1f}% "
            f"({times:.1f}x chance of {100 * chance:.1f}%)")


def _jsonable(x):
    return None if isinstance(x, float) and not math.isfinite(x) else str(x)
