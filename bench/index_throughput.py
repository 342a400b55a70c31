"""Indexing pipeline images/s vs model-only images/s (pre-decoded tensors, same batch, same process).

    python bench/index_throughput.py [--n1mp 300] [--n12mp 40] [--batch 32] [--model local-dir:...]
    python bench/index_throughput.py --exif-only [--n1mp 300]   # just the EXIF cost, no model
    python bench/index_throughput.py --draft [--n1mp 96] [--n12mp 20]  # draft decode: time and embedding cosine

Target: pipeline / model-only >= 0.8 on 1 MP photos (decoding must hide behind encoding).
Also prints the JPEG draft-decode speed-up on 12 MP photos, and what reading the when/where EXIF fields
(capture time and offset, GPS, camera) adds per image in the decode pass.
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


def draft_quality(enc, folder: Path, n: int, label: str) -> None:
    """The JPEG draft decode against a full decode: ms per image (decode + the model's preprocess, one
    thread) and what it does to the model's input (PSNR) and to the embedding (cosine)."""
    import numpy as np
    import torch

    from imgsearch.images import open_image

    paths = sorted(folder.glob("*.jpg"))[:n]
    out = {}
    for name, draft in (("full", None), ("draft", enc.draft_size)):
        t = time.perf_counter()
        tensors = [enc.preprocess(open_image(p, draft_size=draft)[0]) for p in paths]
        ms = (time.perf_counter() - t) / len(paths) * 1e3
        x = torch.stack([torch.as_tensor(np.asarray(v)) for v in tensors])
        out[name] = (ms, x, np.asarray(enc.encode_image_tensors(x)))
    (fm, fx, fe), (dm, dx, de) = out["full"], out["draft"]
    from imgsearch.images import preprocess_cfg_of

    std = float(np.mean(preprocess_cfg_of(enc.model).get("std", (0.27, 0.26, 0.28))))  # back to 0..1 pixel units
    rms = float(((fx - dx) ** 2).mean().sqrt()) * std
    psnr = 20 * np.log10(1.0 / rms) if rms > 0 else float("inf")
    cos = (fe * de).sum(1)
    print(f"{label} draft decode (short side >= {enc.draft_size}): {dm:.1f} ms/img vs full {fm:.1f} ms/img "
          f"({fm / dm:.2f}x) | model input PSNR {psnr:.1f} dB | embedding cosine min {cos.min():.6f} "
          f"mean {cos.mean():.6f} ({len(paths)} photos)")


def exif_cost(folder: Path, n: int) -> None:
    """Per-image cost of the when/where EXIF parse, on copies of the photos carrying a full set of tags.

    Measured where it runs: inside the decode pass, after Pillow has parsed the EXIF block (which it does
    anyway for the orientation), so the added work is the sub-IFD reads and conversions.
    """
    import io

    from PIL import Image

    from imgsearch import images

    tagged = folder.parent / (folder.name + "-exif")
    tagged.mkdir(parents=True, exist_ok=True)
    paths = sorted(folder.glob("*.jpg"))[:n]
    datas = []
    for i, p in enumerate(paths):
        out = tagged / p.name
        if not out.exists():
            with Image.open(p) as im:
                exif = Image.Exif()
                exif[271], exif[272], exif[274] = "Canon", "Canon EOS R5", 1
                sub = exif.get_ifd(0x8769)
                sub[36867], sub[36881] = f"2023:06:{i % 28 + 1:02d} 14:30:00", "+02:00"
                gps = exif.get_ifd(0x8825)
                gps[1], gps[2], gps[3], gps[4] = "N", (48.0, 51.0, 30.24), "E", (2.0, 17.0, 40.2)
                im.save(out, quality=90, exif=exif)
        datas.append(out.read_bytes())
    from datetime import datetime

    def old_date(exif):  # what the decode pass read before: DateTimeOriginal, no offset
        raw = exif.get_ifd(0x8769).get(36867)
        return datetime.strptime(raw.strip("\x00 ")[:19], "%Y:%m:%d %H:%M:%S").isoformat()

    def per_image(extra) -> float:
        """Best of 3 passes, each on freshly parsed headers (Pillow caches sub-IFDs on its Exif object)."""
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for d in datas:
                exif = Image.open(io.BytesIO(d)).getexif()
                exif.get(274)
                extra(exif)
            best = min(best, (time.perf_counter() - t) / len(datas))
        return best

    header = per_image(lambda e: None)
    before = per_image(old_date)
    after = per_image(images._exif_meta)
    metas = [images._exif_meta(Image.open(io.BytesIO(d)).getexif()) for d in datas]
    assert all(m.get("gps_lat") and m.get("taken_utc") and m.get("camera_model") for m in metas)
    parse = after - before
    t = time.perf_counter()
    for d in datas[: min(50, len(datas))]:
        images.open_image(d, draft_size=224)
    decode = (time.perf_counter() - t) / min(50, len(datas))
    print(f"EXIF when/where: {parse * 1e6:.0f} us/image added ({len(datas)} 1 MP JPEGs with date, offset, GPS, "
          f"camera; date-only read {(before - header) * 1e6:.0f} us, full read {(after - header) * 1e6:.0f} us, "
          f"header+EXIF parse {header * 1e6:.0f} us) | Pillow draft decode {decode * 1e3:.1f} ms | "
          f"added / decode {parse / decode:.2%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n1mp", type=int, default=300)
    ap.add_argument("--n12mp", type=int, default=40)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--model", default=None, help="default: random-weight ViT-B-32 (same compute as the real one)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "imgsearch-bench-photos"))
    ap.add_argument("--exif-only", action="store_true", help="only measure the EXIF when/where parse cost")
    ap.add_argument("--draft", action="store_true", help="only measure the JPEG draft decode: time, PSNR, cosine")
    args = ap.parse_args()
    if args.exif_only:
        exif_cost(make_photos(Path(args.data) / "1MP", max(args.n1mp, 1), 1152, 864), max(args.n1mp, 1))
        return

    import torch

    from imgsearch import encoder
    from imgsearch.config import Settings
    from imgsearch.images import open_image

    model = args.model or random_vit_b32()
    enc = encoder.load(encoder.ModelSpec(model), args.device, args.precision)
    settings = Settings.from_env(model=model, batch_size=args.batch, device=args.device, precision=args.precision)
    if args.draft:
        for label, n, (w, h) in (("1 MP", args.n1mp, (1024, 768)), ("12 MP", args.n12mp, (4000, 3000))):
            if n > 0:
                draft_quality(enc, make_photos(Path(args.data) / f"draft-{w}x{h}", n, w, h), n, label)
        return
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
        if label == "1 MP":
            exif_cost(folder, n)
        if label == "12 MP":
            sample = paths[: min(20, len(paths))]
            full = decode_rate(sample, None)
            draft = decode_rate(sample, enc.draft_size)
            print(f"12 MP JPEG decode: full {full:.1f} img/s, draft {draft:.1f} img/s, speed-up {draft / full:.2f}x")


if __name__ == "__main__":
    main()
