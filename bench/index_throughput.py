"""Indexing pipeline images/s vs model-only images/s (pre-decoded tensors, same batch, same process).

    python bench/index_throughput.py [--n1mp 300] [--n12mp 40] [--batch 32] [--model local-dir:...]

Target: pipeline / model-only >= 0.8 on 1 MP photos (decoding must hide behind encoding).
Also prints the JPEG draft-decode speed-up on 12 MP photos.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from common import make_photos, random_vit_b32


def model_only(enc, tensors, batch: int) -> float:
    import torch

    t = time.perf_counter()
    for i in range(0, len(tensors), batch):
        enc.encode_image_tensors(torch.stack(tensors[i:i + batch]))
    return len(tensors) / (time.perf_counter() - t)


def pipeline(enc, settings, folder: Path) -> float:
    from imgsearch.indexer import index_paths

    home = Path(tempfile.mkdtemp(prefix="imgsearch-bench-home-"))
    try:
        rep = index_paths(settings.with_(home=home), [folder], encoder=enc)
        assert rep.encoded == len(list(folder.glob("*.jpg"))), rep.as_dict()
        return rep.encoded / rep.seconds
    finally:
        shutil.rmtree(home, ignore_errors=True)


def decode_only(enc, settings, paths, batch: int) -> tuple[str, float]:
    """Decode + preprocess images/s as the pipeline does it: nvJPEG batches on CUDA, Pillow threads on CPU."""
    from imgsearch import images

    datas = [p.read_bytes() for p in paths]
    t = time.perf_counter()
    if enc.device.startswith("cuda"):
        import torch

        pre = images.tensor_preprocess(images.preprocess_cfg_of(enc.model), enc.preprocess)
        for i in range(0, len(datas), batch):
            part = datas[i:i + batch]
            images.decode_jpegs(part, [1] * len(part), pre, enc.device)
        torch.cuda.synchronize()
        how = "nvJPEG batches"
    else:
        def one(d):
            return enc.preprocess(images.open_image(d, draft_size=enc.draft_size)[0])

        list(images.decode_many(datas, one, settings.decode_workers()))
        how = f"Pillow draft, {settings.decode_workers()} threads"
    return how, len(datas) / (time.perf_counter() - t)


def decode_rate(paths, draft: int | None) -> float:
    from imgsearch.images import open_image

    t = time.perf_counter()
    for p in paths:
        open_image(p, draft_size=draft)
    return len(paths) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n1mp", type=int, default=300)
    ap.add_argument("--n12mp", type=int, default=40)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--model", default=None, help="default: random-weight ViT-B-32 (same compute as the real one)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "imgsearch-bench-photos"))
    args = ap.parse_args()

    import torch

    from imgsearch import encoder
    from imgsearch.config import Settings
    from imgsearch.images import open_image

    model = args.model or random_vit_b32()
    enc = encoder.load(encoder.ModelSpec(model), args.device, args.precision)
    settings = Settings.from_env(model=model, batch_size=args.batch, device=args.device, precision=args.precision)
    print(f"model {enc.describe()}, batch {args.batch}, decode workers {settings.decode_workers()}, "
          f"torch threads {torch.get_num_threads()}")
    data = Path(args.data)
    for label, n, (w, h) in (("1 MP", args.n1mp, (1152, 864)), ("12 MP", args.n12mp, (4000, 3000))):
        if n <= 0:
            continue
        folder = make_photos(data / label.replace(" ", ""), n, w, h)
        paths = sorted(folder.glob("*.jpg"))[:n]
        if len(list(folder.glob("*.jpg"))) > n:
            for extra in sorted(folder.glob("*.jpg"))[n:]:
                extra.unlink()
        tensors = [enc.preprocess(open_image(p, draft_size=enc.draft_size)[0]) for p in paths]
        model_rate = model_only(enc, tensors, args.batch)
        how, dec_rate = decode_only(enc, settings, paths, args.batch)
        pipe_rate = pipeline(enc, settings, folder)
        print(f"{label:>5} x{n}: end-to-end {pipe_rate:7.1f} img/s | encode-only {model_rate:7.1f} img/s | "
              f"decode-only {dec_rate:7.1f} img/s ({how}) | end-to-end / encode-only {pipe_rate / model_rate:.2f}")
        if label == "12 MP":
            sample = paths[: min(20, len(paths))]
            full = decode_rate(sample, None)
            draft = decode_rate(sample, enc.draft_size)
            print(f"12 MP JPEG decode: full {full:.1f} img/s, draft {draft:.1f} img/s, speed-up {draft / full:.2f}x")


if __name__ == "__main__":
    main()
