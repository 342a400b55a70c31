"""Measuring models on the user's own data (the library side of `imgsearch eval`): no printing, no CLI. Images
are encoded by the indexer's decode stage, encoder, precision and batches; recall@k comes from imgsearch.metrics."""

from __future__ import annotations

import contextlib
import csv
from pathlib import Path

from .config import read_json, thread_budget
from .errors import DataError, DecodeError, ModelLoadError, UsageError


def load_for_images(spec, settings, precision: str | None = None):
    """The image encoder `index` would use (onnx_image.select: onnxruntime fp32/int8 on CPU where chosen)."""
    from . import onnx_image
    from .encoder import load, torch_installed

    budget = thread_budget(device="cpu", workers=settings.workers)
    # this spec's settings, not the global --model's: select may make exports from them
    settings = settings.without_library().with_(model=spec.name, pretrained=spec.pretrained,
                                                precision=precision or settings.precision)
    if not torch_installed():
        return onnx_image.query_encoder(settings, budget.encoder)
    enc = load(spec, settings.device, settings.precision)
    if enc.device != "cpu":
        return enc
    return onnx_image.select(enc, settings, budget.encoder)


def index_stage(encoder, settings, tensor: bool | None = None, device: str | None = None):
    """The indexer's decode stage for ``encoder``; ``tensor`` None: what IMGSEARCH_GPU_DECODE makes `index` use."""
    from .indexer import DecodeStage, tensor_decode_wanted

    if tensor is None:
        tensor = tensor_decode_wanted(settings.gpu_decode, encoder.device)
    return DecodeStage(encoder, settings.max_pixels, tensor, device)


def encode_files(encoder, paths: list[str], settings, progress=None, stage=None, each=None):
    """Encode image files the way the indexer does; returns (vectors [n_ok, dim], ok indices, failures).
    ``each(i, tensor)`` sees every decoded model input."""
    import numpy as np

    from .config import torch_threads

    stage = stage or index_stage(encoder, settings)
    budget = thread_budget(device=encoder.device, workers=settings.workers)
    vecs, ok, failures, batch = [], [], [], []
    torch_free = encoder.torch_free  # numpy inputs, onnxruntime's own threads

    def flush():
        if batch and torch_free:
            vecs.append(encoder.encode_image_tensors(batch))
        elif batch:
            import torch

            vecs.append(encoder.encode_image_tensors(torch.stack([t.to(encoder.device) for t in batch])))
        batch.clear()

    if progress:  # the bar starts with the work, so its rate counts the first batch too
        progress(0, len(paths))
    with torch_threads(settings, budget.encoder) if encoder.device == "cpu" and not torch_free \
            else contextlib.nullcontext():
        results = stage.decode_files(paths, budget.decode, settings.batch_size, budget.overlap)
        for i, t in enumerate(results):
            if isinstance(t, DecodeError):
                failures.append((paths[i], str(t)))
            else:
                if each:
                    each(i, t)
                ok.append(i)
                batch.append(t)
                if len(batch) >= settings.batch_size:
                    flush()
            if progress and not batch:  # images count once encoded, not when decoded ahead of the model
                progress(i + 1, len(paths))
        flush()
        if progress:
            progress(len(paths), len(paths))
    matrix = np.concatenate(vecs) if vecs else np.zeros((0, encoder.dim), dtype=np.float32)
    return matrix, ok, failures


def read_class_map(path: Path) -> dict[str, str]:
    """Folder -> class name from JSON ({"folder": "name"}) or a CSV of folder,name rows (header optional)."""
    from .captions import read_text

    text = read_text(path, "classes")
    if path.suffix.lower() == ".json":
        try:
            data = read_json(text)
        except ValueError as e:
            raise DataError(f"{path} is not valid JSON ({e}); expected {{\"folder\": \"class name\"}}") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise DataError(f"{path}: expected a JSON object mapping folder names to class names")
        if empty := [k for k, v in data.items() if not v.strip()]:
            raise DataError(f"{path}: folder {empty[0]!r} has an empty class name; give each folder a name")
        return {str(k): v.strip() for k, v in data.items()}
    out = {}
    try:
        rows = list(csv.reader(text.splitlines()))
    except csv.Error as e:
        raise DataError(f"classes file {path} is not a valid CSV ({e}); write one 'folder,name' line per class") from None
    for n, row in enumerate(rows, start=1):
        row = [c.strip() for c in row]
        if not any(row):
            continue
        if len(row) != 2:
            raise DataError(f"{path}:{n}: expected 'folder,name', found {len(row)} field(s)")
        if n == 1 and [c.lower() for c in row] == ["folder", "name"]:
            continue
        if not all(row):
            raise DataError(f"{path}:{n}: empty {'folder' if not row[0] else 'class name'}; write 'folder,name'")
        out[row[0]] = row[1]
    if not out:
        raise DataError(f"{path} maps no folders; write one 'folder,name' line per class")
    return out


def read_image_folder(folder: Path, classes_file: Path | None):
    """ImageFolder layout -> (class names, [(path, class index)], notes about what was skipped)."""
    from .files import FileEntry, walk

    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder; give a folder with one subfolder per class")
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    mapping = read_class_map(classes_file) if classes_file else None
    if mapping is not None:
        unknown = sorted(set(mapping) - {p.name for p in subdirs})
        if unknown:
            raise DataError(f"{classes_file} names folder(s) not in {folder}: {', '.join(unknown[:5])}"
                            + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
        unnamed = [p.name for p in subdirs if p.name not in mapping]
        if unnamed:
            raise DataError(f"{classes_file} has no name for folder(s) {', '.join(unnamed[:5])}; add a line each")
    notes, classes, items = [], [], []
    loose = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    if loose:
        notes.append((str(folder), f"{len(loose)} file(s) directly in the folder ignored; images go in class "
                                   "subfolders"))
    for sub in subdirs:
        files = []
        for item in walk([sub]):
            if isinstance(item, FileEntry):
                files.append(item.path)
            else:
                notes.append((item.path, item.reason))
        if not files:
            notes.append((str(sub), "class folder has no images; class skipped"))
            continue
        name = mapping[sub.name] if mapping else sub.name.replace("_", " ")
        if name not in classes:  # folders given one name (a --classes file mapping two to "cat") are one class
            classes.append(name)
        items.extend((f, classes.index(name)) for f in sorted(files))
    if len(classes) < 2:
        raise DataError(f"{folder} has {len(classes)} class folder(s) with images; zero-shot evaluation needs at "
                        "least 2 subfolders, one per class, each holding images")
    return classes, items, notes


def retrieval_eval(encoder, caption_set, settings, progress=None) -> tuple[dict, list[tuple[str, str]]]:
    """Recall@k / mean rank of ``encoder`` on a CaptionSet; returns (metrics, skipped unreadable images)."""
    from .metrics import build_gallery, retrieval_metrics

    gallery = build_gallery(caption_set.pairs)
    vecs, ok, failures = encode_files(encoder, gallery.images, settings, progress)
    bad = {p for p, _ in failures}
    pairs = [p for p in caption_set.pairs if p.path not in bad]
    if not pairs:
        raise DataError(f"no readable images among the captions in {caption_set.source}")
    if bad:  # rebuild without the unreadable images so every image and text still has a match
        row = {gallery.images[i]: r for r, i in enumerate(ok)}
        gallery = build_gallery(pairs)
        vecs = vecs[[row[p] for p in gallery.images]]
    if len(gallery.images) < 2:
        raise DataError(f"{caption_set.source} has {len(gallery.images)} readable image(s); retrieval needs at "
                        "least 2")
    return retrieval_metrics(vecs, encoder.encode_texts(gallery.texts), gallery.matches), failures


def parity_stages(encoder, settings) -> list[tuple[str, object]]:
    """(name, DecodeStage) for every decode path `index` may take on this machine, the one it takes first:
    "pillow", "tensor" (torchvision on the CPU), and "nvjpeg" when the encoder is on CUDA."""
    used = index_stage(encoder, settings)
    # A model the tensor path refused: `index` decodes with Pillow, and its stage says why.
    pillow = used if not used.tensor else index_stage(encoder, settings, False)
    stages = {"pillow": pillow, "tensor": index_stage(encoder, settings, True, "cpu")}
    if encoder.device.startswith("cuda"):
        stages["nvjpeg"] = index_stage(encoder, settings, True, encoder.device)
    first = "pillow" if not used.tensor else ("nvjpeg" if used.device.startswith("cuda") else "tensor")
    return [(first, stages.pop(first))] + list(stages.items())


def parity(spec, paths: list[str], settings, progress=None, precision: str | None = None) -> dict:
    """Cosine between the indexer's decode stage + encoder and open_clip's plain reference path, per file, for
    every stage of parity_stages (top-level numbers: the one `index` uses; a stage the model rules out: why)."""
    import numpy as np

    from . import images
    from .encoder import build, needs_torch, torch_installed

    if not torch_installed():  # before any export is made for the fast side: the reference is open_clip's
        raise ModelLoadError(needs_torch("eval parity"))
    fast = load_for_images(spec, settings, precision)
    ref = build(spec, fast.device, "fp32")  # same weights, full precision
    stages = parity_stages(fast, settings)
    refs, ref_inputs, failures = {}, {}, []
    for n, path in enumerate(paths, start=1):
        try:
            im, _ = images.open_image(path, max_pixels=settings.max_pixels)  # full decode, no draft, upright
            x = ref.preprocess(im)
        except Exception as e:
            failures.append((path, str(e) or type(e).__name__))
            continue
        ref_inputs[path] = x
        refs[path] = ref.encode_image_tensors(x[None])[0]
        if progress:
            progress(n, len(paths) * (1 + len(stages)))
    measured = []
    good = [p for p in paths if p in refs]
    for k, (name, stage) in enumerate(stages, start=1):
        if name != "pillow" and not stage.tensor:  # refused for this model; `index` uses Pillow instead
            measured.append({"stage": name, "refused": stage.refused})
            continue
        diffs = [0.0]
        vecs, ok, failed = encode_files(fast, good, settings, stage=stage, each=lambda i, t: diffs.append(
            float((t.float().cpu() - ref_inputs[good[i]]).abs().max())))
        failures += failed
        rows = [(good[i], float(np.dot(v, refs[good[i]]))) for i, v in zip(ok, vecs)]
        if progress:
            progress(len(paths) * (1 + k), len(paths) * (1 + len(stages)))
        if not rows:
            measured.append({"stage": name, "images": 0})
            continue
        cos = np.array([c for _, c in rows])
        rows.sort(key=lambda x: x[1])
        measured.append({"stage": name, "decode": stage.describe(), "images": len(rows),
                         "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
                         "max_abs_input_diff": max(diffs), "files": [{"path": p, "cosine": c} for p, c in rows]})
    main = measured[0]
    if "refused" in main or not main.get("images"):
        first = f" (e.g. {failures[0][0]}: {failures[0][1]})" if failures else ""
        raise DataError(f"none of the images could be read{first}; nothing to compare")
    seen = set()
    skipped = [(p, r) for p, r in failures if not (p in seen or seen.add(p))]
    return {"model": fast.spec.label, "device": fast.device, "precision": fast.precision,
            "image_tower": fast.image_tower, "batch_size": settings.batch_size, "draft_size": fast.draft_size,
            **{k: main[k] for k in ("stage", "decode", "images", "min_cosine", "mean_cosine", "files")},  # worst first
            "stages": [{k: v for k, v in s.items() if k != "files"} for s in measured],
            "skipped": [{"where": p, "reason": r} for p, r in skipped]}
