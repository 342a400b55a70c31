"""Training throughput: `imgsearch.train` samples/s next to a bare forward+backward loop on the same batches.

The bare loop gets its batches already decoded in memory, so it is what the model alone can do; the
ratio shows how much data loading, logging and bookkeeping cost (target >= 0.8). Both run in this
process, one after the other, on the same generated JPEG photos, the same model and batch order.

    .venv/bin/python bench/train_throughput.py [--steps 30] [--batch-size 32] [--workers 2] [--size small]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

SIZES = {
    # The tiny test model is so cheap per image that any loader looks slow next to it; "small" keeps
    # the model-to-decode cost ratio closer to a real CLIP on real photos.
    "tiny": dict(embed_dim=64, image_size=32, width=64, layers=2),
    "small": dict(embed_dim=128, image_size=64, width=128, layers=4),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--photo-px", type=int, default=256, help="side of the generated JPEGs")
    ap.add_argument("--images", type=int, default=540)
    args = ap.parse_args()

    import open_clip
    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from imgsearch import synthetic
    from imgsearch.encoder import save_local_dir
    from imgsearch.train.data import PairDataset, StepBatches, prepare
    from imgsearch.train.loop import TrainConfig, lr_at, param_groups, train
    from imgsearch.train.loss import MAX_LOG_SCALE, contrastive_loss

    tmp = Path(tempfile.mkdtemp(prefix="imgsearch-bench-"))
    per_class = max(1, args.images // (len(synthetic.COLORS) * len(synthetic.SHAPES)))
    synthetic.generate(tmp / "photos", per_class=per_class, size=args.photo_px, fmt="jpg", seed=0)
    captions = tmp / "photos" / "captions.csv"
    model, cfg = synthetic.build_tiny_clip(seed=0, **SIZES[args.size])
    size = cfg["vision_cfg"]["image_size"]
    save_local_dir(model, cfg, tmp / "base", {"size": size})
    print(f"torch threads {torch.get_num_threads()}, {per_class * 18} JPEGs of {args.photo_px}px, model '{args.size}' "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {size}px), batch {args.batch_size}, "
          f"{args.steps} steps, {args.workers} decode workers")

    tc = TrainConfig(captions=str(captions), out=str(tmp / "out"), model=f"local-dir:{tmp / 'base'}", lr=1e-4,
                     max_steps=args.steps, batch_size=args.batch_size, workers=args.workers, device="cpu",
                     precision="fp32", val_fraction=0.05)

    # 1. the bare loop: same split, order, crops and optimizer, batches pre-decoded outside the timing
    data = prepare(str(captions), val_fraction=tc.val_fraction, seed=tc.seed, batch_size=args.batch_size,
                   draft_size=size * 2, workers=args.workers)
    tok = open_clip.get_tokenizer("ViT-B-32", context_length=cfg["text_cfg"]["context_length"])
    ds = PairDataset(data.train, image_transform_v2(PreprocessCfg(size=(size, size)), is_train=True), tok, size * 2)
    batches = []
    for idx in StepBatches(len(ds), args.batch_size, 1, tc.seed, 0, args.steps):
        items = [ds[i] for i in idx]
        batches.append((torch.stack([x for x, *_ in items]), torch.stack([t for _, t, *_ in items]),
                        torch.tensor([i for *_, i, _ in items]), torch.tensor([j for *_, j in items])))
    bare_model, _ = synthetic.build_tiny_clip(seed=0, **SIZES[args.size])
    bare_model.train()
    opt = torch.optim.AdamW(param_groups(bare_model, tc.wd), lr=tc.lr, betas=(0.9, 0.98), eps=1e-6)
    t0 = time.perf_counter()
    for step, (x, t, ii, ti) in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, tc.lr, 3, args.steps)
        loss = contrastive_loss(bare_model.encode_image(x), bare_model.encode_text(t), bare_model.logit_scale, ii, ti)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            bare_model.logit_scale.clamp_(0, MAX_LOG_SCALE)
    bare = args.steps * args.batch_size / (time.perf_counter() - t0)

    # 2. the real thing: decode workers, progress events, evaluation excluded from its samples/s
    report = train(tc)
    real = report["samples_per_second"]
    print(f"bare forward+backward+step on pre-decoded batches: {bare:8.1f} samples/s")
    print(f"imgsearch.train loop (decoding JPEGs in workers):   {real:8.1f} samples/s")
    print(f"ratio {real / bare:.2f} (target >= 0.8)")


if __name__ == "__main__":
    main()
