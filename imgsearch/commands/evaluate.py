"""`imgsearch eval zeroshot|retrieval|parity`: measure models on the user's own data; never touches the library.

Images are encoded the way `index` encodes them (JPEG draft decode in a thread pool, the model's
preprocess, the configured device/precision, batches); recall@k comes from imgsearch.metrics, the
same code `finetune` reports with.
"""

from __future__ import annotations

import csv
import json
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional

import typer

from ..cli import app, err, handle_errors, settings_of
from ..errors import DataError, UsageError

grp = typer.Typer(help="Measure models on your own data: zero-shot accuracy, retrieval recall, fast-path parity.",
                  no_args_is_help=True, rich_markup_mode=None)
app.add_typer(grp, name="eval")


def eval_command(name: str):
    """grp.command with cli.command's error mapping: one line on stderr and an exit code."""

    def decorate(fn):
        return grp.command(name)(handle_errors(fn))

    return decorate


# --- shared helpers (no printing) -------------------------------------------------------------------

def model_specs(models: list[str] | None, settings) -> list:
    """--models values (local-dir:DIR, hf-hub:org/repo, NAME:PRETRAINED or NAME) -> ModelSpecs."""
    from ..encoder import HF_HUB, LOCAL_DIR, ModelSpec

    if not models:
        return [ModelSpec(settings.model, settings.pretrained)]
    specs = []
    for m in models:
        m = m.strip()
        if not m:
            raise UsageError("--models got an empty value")
        if m.startswith((LOCAL_DIR, HF_HUB)):
            specs.append(ModelSpec(m))
        elif ":" in m:
            name, tag = m.split(":", 1)
            specs.append(ModelSpec(name, tag))
        else:
            specs.append(ModelSpec(m, settings.pretrained if m == settings.model else None))
    return specs


def precision_list(precisions: str | None, settings) -> list[str]:
    """--precisions "fp32,int8" -> ["fp32", "int8"]; default: the global --precision alone."""
    if not precisions:
        return [settings.precision]
    out = [p.strip() for p in precisions.split(",") if p.strip()]
    bad = [p for p in out if p not in ("auto", "fp32", "bf16", "fp16", "int8")]
    if bad or not out:
        raise UsageError(f"--precisions got {precisions!r}; give a comma-separated list of auto, fp32, bf16, fp16, int8")
    return out


def load_for_images(spec, settings, precision: str | None = None):
    """The encoder with the image backend `index` would use (onnxruntime fp32/int8 on CPU where chosen)."""
    from .. import onnx_image
    from ..config import thread_budget
    from ..encoder import load

    enc = load(spec, settings.device, precision or settings.precision)
    if enc.device == "cpu":
        budget = thread_budget(device="cpu", workers=settings.workers)
        import torch

        torch.set_num_threads(budget.encoder)
        # eval never creates a library: without one, the exports go to a scratch folder instead.
        home = settings.home if settings.home.exists() else Path(tempfile.gettempdir()) / "imgsearch-eval-exports"
        onnx_image.attach(enc, home, settings.image_backend, budget.encoder)
    return enc


def encode_files(encoder, paths: list[str], settings, progress=None):
    """Encode image files the way the indexer does; returns (vectors [n_ok, dim], ok indices, failures)."""
    import numpy as np

    from ..images import open_image

    draft = encoder.draft_size

    def load(path):
        try:
            im, _ = open_image(path, draft_size=draft, max_pixels=settings.max_pixels)
            return encoder.preprocess(im), None
        except Exception as e:  # DecodeError or anything a broken file raises: report, skip
            return None, str(e)

    vecs, ok, failures = [], [], []
    batch, batch_idx = [], []
    done = 0

    def flush():
        if batch:
            import torch

            vecs.append(encoder.encode_image_tensors(torch.stack(batch)))
            ok.extend(batch_idx)
            batch.clear()
            batch_idx.clear()

    with ThreadPoolExecutor(settings.decode_workers(), thread_name_prefix="eval-decode") as pool:
        ahead = max(2 * settings.batch_size, 8)
        futures = {}
        for i in range(min(ahead, len(paths))):
            futures[i] = pool.submit(load, paths[i])
        for i in range(len(paths)):
            tensor, reason = futures.pop(i).result()
            if i + ahead < len(paths):
                futures[i + ahead] = pool.submit(load, paths[i + ahead])
            if tensor is None:
                failures.append((paths[i], reason))
            else:
                batch.append(tensor)
                batch_idx.append(i)
                if len(batch) >= settings.batch_size:
                    flush()
            done += 1
            if progress:
                progress(done, len(paths))
        flush()
    matrix = np.concatenate(vecs) if vecs else np.zeros((0, encoder.dim), dtype=np.float32)
    return matrix, ok, failures


def read_class_map(path: Path) -> dict[str, str]:
    """Folder -> class name from JSON ({"folder": "name"}) or a CSV of folder,name rows (header optional)."""
    if not path.is_file():
        raise DataError(f"classes file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"classes file {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise DataError(f"cannot read classes file {path}: {e.strerror or e}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise DataError(f"{path} is not valid JSON ({e}); expected {{\"folder\": \"class name\"}}") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise DataError(f"{path}: expected a JSON object mapping folder names to class names")
        empty = [k for k, v in data.items() if not v.strip()]
        if empty:
            raise DataError(f"{path}: folder {empty[0]!r} has an empty class name; give each folder a name")
        return {str(k): v.strip() for k, v in data.items()}
    out = {}
    try:
        rows = list(csv.reader(text.splitlines()))
    except csv.Error as e:
        raise DataError(f"classes file {path} is not a valid CSV ({e}); write one 'folder,name' line per class") from None
    for n, row in enumerate(rows, start=1):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 2:
            raise DataError(f"{path}:{n}: expected 'folder,name', found {len(row)} field(s)")
        if n == 1 and [c.strip().lower() for c in row] == ["folder", "name"]:
            continue
        if not row[0].strip() or not row[1].strip():
            raise DataError(f"{path}:{n}: empty {'folder' if not row[0].strip() else 'class name'}; "
                            "write 'folder,name'")
        out[row[0].strip()] = row[1].strip()
    if not out:
        raise DataError(f"{path} maps no folders; write one 'folder,name' line per class")
    return out


def read_image_folder(folder: Path, classes_file: Path | None):
    """ImageFolder layout -> (class names, [(path, class index)], notes about what was skipped)."""
    from ..files import FileEntry, walk

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
        classes.append(name)
        items.extend((f, len(classes) - 1) for f in sorted(files))
    if len(classes) < 2:
        raise DataError(f"{folder} has {len(classes)} class folder(s) with images; zero-shot evaluation needs at "
                        "least 2 subfolders, one per class, each holding images")
    return classes, items, notes


def _bar(desc: str, quiet: bool):
    if quiet:
        return None, None
    from ..progress import Bar

    bar = Bar(desc, leave=False)
    return bar, bar.close


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _report_skipped(skipped: list[tuple[str, str]], limit: int = 10) -> None:
    for where, reason in skipped[:limit]:
        err(f"skipped: {where}: {reason}")
    if len(skipped) > limit:
        err(f"... and {len(skipped) - limit} more skipped (--json lists all)")


# --- zeroshot -------------------------------------------------------------------------------------

@eval_command("zeroshot")
def zeroshot_cmd(
    ctx: typer.Context,
    folder: Path = typer.Argument(..., help="Folder with one subfolder of images per class (ImageFolder layout)."),
    classes: Optional[Path] = typer.Option(None, "--classes", help="Class names: JSON {\"folder\": \"name\"} or "
                                           "CSV folder,name [default: folder names, _ as spaces]"),
    template: Optional[List[str]] = typer.Option(None, "--template", help="Prompt template with {} for the class "
                                                 "(repeatable); replaces the default ensemble."),
    templates_file: Optional[Path] = typer.Option(None, "--templates-file", help="Prompt templates, one per line."),
    models: Optional[List[str]] = typer.Option(None, "--models", "-m", help="Model to compare (repeatable): "
                                               "local-dir:DIR, hf-hub:org/repo or NAME:PRETRAINED [default: the "
                                               "global --model]"),
    show: int = typer.Option(10, "--show", min=0, help="Worst classes and confused pairs listed per model."),
    precisions: Optional[str] = typer.Option(None, "--precisions", help="Compare precisions side by side, e.g. "
                                             "fp32,int8 [default: the global --precision]"),
    json_out: bool = typer.Option(False, "--json", help="Print results as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
):
    """Zero-shot top-1/top-5 accuracy on an ImageFolder, with per-class accuracy and confusions."""
    import numpy as np

    from ..metrics import classification_metrics
    from ..tagging import resolve_templates
    from ..zeroshot import label_embeddings

    settings = settings_of(ctx)
    templates = resolve_templates(template, templates_file)
    specs = model_specs(models, settings)
    class_names, items, skipped = read_image_folder(folder, classes)
    paths = [p for p, _ in items]
    truth_all = np.array([c for _, c in items])
    results = []
    precs = precision_list(precisions, settings)
    runs = [(spec, p) for spec in specs for p in precs]
    for spec, prec in runs:
        enc = load_for_images(spec, settings, prec)
        label = spec.label if len(precs) == 1 else f"{spec.label} [{prec}]"
        progress, close = _bar(f"encoding ({label})", quiet or json_out)
        try:
            vecs, ok, failures = encode_files(enc, paths, settings, progress)
        finally:
            if close:
                close()
        if not results:
            skipped += [(p, f"unreadable image: {r}") for p, r in failures]
        if not ok:
            raise DataError(f"none of the {len(paths)} images in {folder} could be read")
        scores = vecs @ label_embeddings(enc, class_names, templates).T
        m = classification_metrics(scores, truth_all[ok], class_names, top_confusions=max(show, 10))
        tower = enc.image_backend.describe() if enc.image_backend is not None else f"torch {enc.precision}"
        results.append({"model": label, "precision": enc.precision, "image_tower": tower, **m})
    if json_out:
        typer.echo(json.dumps({"folder": str(folder), "classes": class_names, "templates": templates,
                               "skipped": [{"where": w, "reason": r} for w, r in skipped], "models": results},
                              indent=2))
        return
    _report_skipped(skipped)
    width = max(len("model"), *(len(r["model"]) for r in results)) + 2
    k5 = results[0]["top5_k"]
    typer.echo(f"{'model':<{width}}{'top-1':>7} {'top-' + str(k5):>7} {'images':>7} {'classes':>7}")
    for r in results:
        typer.echo(f"{r['model']:<{width}}{_pct(r['top1']):>7} {_pct(r['top5']):>7} {r['images']:>7} "
                   f"{r['classes']:>7}")
    typer.echo(f"chance{'':<{width - 6}}{_pct(1 / len(class_names)):>7} {_pct(k5 / len(class_names)):>7}")
    if show:
        for r in results:
            prefix = f" ({r['model']})" if len(results) > 1 else ""
            typer.echo(f"\nworst classes{prefix}:")
            for c in r["per_class"][:show]:
                typer.echo(f"  {_pct(c['accuracy']):>6}  {c['class']} ({c['images']} images)")
            if r["confused"]:
                typer.echo(f"most confused{prefix} (true -> predicted):")
                for c in r["confused"][:show]:
                    typer.echo(f"  {c['count']:>4}  {c['true']} -> {c['predicted']}")


# --- retrieval ------------------------------------------------------------------------------------

def retrieval_eval(encoder, caption_set, settings, progress=None) -> tuple[dict, list[tuple[str, str]]]:
    """Recall@k / mean rank of ``encoder`` on a CaptionSet; returns (metrics, skipped unreadable images)."""
    from ..metrics import build_gallery, retrieval_metrics

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
    texts = encoder.encode_texts(gallery.texts)
    return retrieval_metrics(vecs, texts, gallery.matches), failures


@eval_command("retrieval")
def retrieval_cmd(
    ctx: typer.Context,
    captions: Path = typer.Argument(..., help="Captions in the finetune formats: .csv/.tsv (path,caption), .jsonl, "
                                    "or a folder of images with .txt sidecars."),
    image_col: str = typer.Option("path", "--image-col", help="Image path column/field name."),
    caption_col: str = typer.Option("caption", "--caption-col", help="Caption column/field name."),
    models: Optional[List[str]] = typer.Option(None, "--models", "-m", help="Model to compare (repeatable): "
                                               "local-dir:DIR, hf-hub:org/repo or NAME:PRETRAINED [default: the "
                                               "global --model]"),
    json_out: bool = typer.Option(False, "--json", help="Print results as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
):
    """Image→text and text→image recall@1/5/10 and mean rank on captioned images."""
    from ..captions import read_captions
    from ..encoder import load
    from ..metrics import table_rows

    settings = settings_of(ctx)
    cs = read_captions(captions, image_col=image_col, caption_col=caption_col)
    skipped = list(cs.problems)
    if not cs.pairs:
        detail = "; ".join(f"{w}: {r}" for w, r in skipped[:3])
        raise DataError(f"no usable image–caption pairs in {captions}" + (f" ({detail})" if detail else ""))
    results = []
    for spec in model_specs(models, settings):
        enc = load(spec, settings.device, settings.precision)
        progress, close = _bar(f"encoding ({spec.label})", quiet or json_out)
        try:
            m, failures = retrieval_eval(enc, cs, settings, progress)
        finally:
            if close:
                close()
        if not results:
            skipped += [(p, f"unreadable image: {r}") for p, r in failures]
        results.append((spec.label, m))
    if json_out:
        typer.echo(json.dumps({"captions": str(captions), "skipped": [{"where": w, "reason": r} for w, r in skipped],
                               "models": [{"model": label, **m} for label, m in results]}, indent=2))
        return
    _report_skipped(skipped)
    m0 = results[0][1]
    typer.echo(f"{m0['images']} images, {m0['texts']} distinct captions")
    for row in table_rows(results, with_loss=False):
        typer.echo(row)


# --- parity ---------------------------------------------------------------------------------------

def parity(spec, paths: list[str], settings, progress=None, precision: str | None = None) -> dict:
    """Cosine between the indexing pipeline's embeddings and open_clip's plain reference path, per file."""
    import numpy as np
    from PIL import Image, ImageOps

    from ..encoder import build

    fast = load_for_images(spec, settings, precision)
    vecs, ok, failures = encode_files(fast, paths, settings)
    ref = build(spec, fast.device, "fp32")  # same weights, full precision
    rows = []
    for n, (i, v) in enumerate(zip(ok, vecs), start=1):
        with Image.open(paths[i]) as im:  # full decode, no draft; orientation as every viewer shows it
            im = ImageOps.exif_transpose(im).convert("RGB")
        r = ref.encode_image_tensors(ref.preprocess(im)[None])[0]
        rows.append((paths[i], float(np.dot(v, r))))
        if progress:
            progress(n, len(ok))
    if not rows:
        first = f" (e.g. {failures[0][0]}: {failures[0][1]})" if failures else ""
        raise DataError(f"none of the images could be read{first}; nothing to compare")
    cos = np.array([c for _, c in rows])
    rows.sort(key=lambda x: x[1])
    tower = fast.image_backend.describe() if fast.image_backend is not None else f"torch {fast.precision}"
    return {"model": fast.spec.label, "device": fast.device, "precision": fast.precision, "image_tower": tower,
            "batch_size": settings.batch_size, "draft_size": fast.draft_size, "images": len(rows),
            "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
            "files": [{"path": p, "cosine": c} for p, c in rows],  # worst first
            "skipped": [{"where": p, "reason": r} for p, r in failures]}


@eval_command("parity")
def parity_cmd(
    ctx: typer.Context,
    folder: Path = typer.Argument(..., help="Folder (or image file) to sample images from."),
    n: int = typer.Option(50, "-n", min=1, help="Images to compare (an even sample when there are more)."),
    threshold: float = typer.Option(0.99, "--threshold", help="Exit with 1 when any cosine is below this."),
    worst: int = typer.Option(5, "--worst", min=0, help="Files listed with the lowest cosine."),
    precisions: Optional[str] = typer.Option(None, "--precisions", help="Check several precisions side by side, "
                                             "e.g. fp32,int8 [default: the global --precision]"),
    json_out: bool = typer.Option(False, "--json", help="Print results as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Check that fast paths (device, precision, JPEG draft, batching) give the reference embeddings."""
    from ..encoder import ModelSpec
    from ..files import FileEntry, walk

    settings = settings_of(ctx)
    if not folder.exists():
        raise UsageError(f"{folder} does not exist")
    files = sorted(e.path for e in walk([folder]) if isinstance(e, FileEntry))
    if not files:
        raise DataError(f"no images found under {folder}")
    if len(files) > n:  # evenly spread, so one burst of similar files does not fill the sample
        files = [files[int(i * len(files) / n)] for i in range(n)]
    results = []
    for prec in precision_list(precisions, settings):
        progress, close = _bar(f"comparing ({prec})", quiet or json_out)
        try:
            res = parity(ModelSpec(settings.model, settings.pretrained), files, settings, progress, prec)
        finally:
            if close:
                close()
        res["threshold"] = threshold
        res["passed"] = res["min_cosine"] >= threshold
        results.append(res)
    if json_out:
        typer.echo(json.dumps(results[0] if len(results) == 1 else {"precisions": results}, indent=2))
    else:
        for s in results[0]["skipped"]:
            err(f"skipped: {s['where']}: {s['reason']}")
        for res in results:
            typer.echo(f"{res['model']} on {res['device']} ({res['precision']}, {res['image_tower']}, batch "
                       f"{res['batch_size']}, JPEG draft {res['draft_size']}px) vs fp32 reference, one full-decode "
                       "image at a time")
            typer.echo(f"{res['images']} images: min cosine {res['min_cosine']:.6f}, mean {res['mean_cosine']:.6f}")
            for w in res["files"][:worst]:
                typer.echo(f"  {w['cosine']:.6f}  {w['path']}")
    failed = [r for r in results if not r["passed"]]
    if failed:
        r = failed[0]
        err(f"parity below threshold: min cosine {r['min_cosine']:.6f} < {threshold} ({r['precision']})")
        raise typer.Exit(1)
