"""`imgsearch eval zeroshot|retrieval|parity`: measure models on the user's own data; never touches the library.
Parses options, calls imgsearch.evaluation (the library side) and prints."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import List, Optional

import typer

from . import app, command, err, pct, report_skipped, settings_of
from ..errors import DataError, UsageError
from ..evaluation import encode_files, load_for_images, parity, read_image_folder, retrieval_eval
from ..progress import Bar

grp = typer.Typer(help="Measure models on your own data: zero-shot accuracy, retrieval recall, fast-path parity.",
                  no_args_is_help=True, rich_markup_mode=None)
app.add_typer(grp, name="eval")
MODELS_OPTION = typer.Option(None, "--models", "-m", help="Model to compare (repeatable): local-dir:DIR, "
                             "hf-hub:org/repo or NAME:PRETRAINED [default: the global --model]")


# --- shared helpers (no printing) -------------------------------------------------------------------
def model_specs(models: list[str] | None, settings) -> list:
    """--models values (local-dir:DIR, hf-hub:org/repo, NAME:PRETRAINED or NAME) -> ModelSpecs."""
    from ..encoder import HF_HUB, LOCAL_DIR, ModelSpec

    def spec(m: str):
        if not m:
            raise UsageError("--models got an empty value")
        if m.startswith((LOCAL_DIR, HF_HUB)):
            return ModelSpec(m)
        if ":" in m:
            return ModelSpec(*m.split(":", 1))
        return ModelSpec(m, settings.pretrained if m == settings.model else None)

    return [spec(m.strip()) for m in models] if models else [ModelSpec(settings.model, settings.pretrained)]


def precision_list(precisions: str | None, settings) -> list[str]:
    """--precisions "fp32,int8" -> ["fp32", "int8"]; default: the global --precision alone."""
    if not precisions:
        return [settings.precision]
    out = [p.strip() for p in precisions.split(",") if p.strip()]
    if not out or any(p not in ("auto", "fp32", "bf16", "fp16", "int8") for p in out):
        raise UsageError(f"--precisions got {precisions!r}; give a comma-separated list of auto, fp32, bf16, fp16, int8")
    return out


# --- zeroshot -------------------------------------------------------------------------------------
@command("zeroshot", group=grp)
def zeroshot_cmd(
    ctx: typer.Context,
    folder: Path = typer.Argument(..., help="Folder with one subfolder of images per class (ImageFolder layout)."),
    classes: Optional[Path] = typer.Option(None, "--classes", help="Class names: JSON {\"folder\": \"name\"} or "
                                           "CSV folder,name [default: folder names, _ as spaces]"),
    template: Optional[List[str]] = typer.Option(None, "--template", help="Prompt template with {} for the class "
                                                 "(repeatable); replaces the default ensemble."),
    templates_file: Optional[Path] = typer.Option(None, "--templates-file", help="Prompt templates, one per line."),
    models: Optional[List[str]] = MODELS_OPTION,
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
    for spec, prec in itertools.product(specs, precs):
        enc = load_for_images(spec, settings, prec)
        label = spec.label if len(precs) == 1 else f"{spec.label} [{prec}]"
        with Bar(f"encoding ({label})", leave=False, quiet=quiet or json_out) as bar:
            vecs, ok, failures = encode_files(enc, paths, settings, bar)
        if not results:
            skipped += [(p, f"unreadable image: {r}") for p, r in failures]
        if not ok:
            raise DataError(f"none of the {len(paths)} images in {folder} could be read")
        scores = vecs @ label_embeddings(enc, class_names, templates).T
        m = classification_metrics(scores, truth_all[ok], class_names, top_confusions=max(show, 10))
        results.append({"model": label, "precision": enc.precision, "image_tower": enc.image_tower, **m})
    if json_out:
        typer.echo(json.dumps({"folder": str(folder), "classes": class_names, "templates": templates,
                               "skipped": [{"where": w, "reason": r} for w, r in skipped], "models": results},
                              indent=2))
        return
    report_skipped(skipped, "--json lists all")
    width = max(len("model"), *(len(r["model"]) for r in results)) + 2
    k5 = results[0]["top5_k"]
    typer.echo(f"{'model':<{width}}{'top-1':>7} {'top-' + str(k5):>7} {'images':>7} {'classes':>7}")
    for r in results:
        typer.echo(f"{r['model']:<{width}}{pct(r['top1']):>7} {pct(r['top5']):>7} {r['images']:>7} "
                   f"{r['classes']:>7}")
    typer.echo(f"chance{'':<{width - 6}}{pct(1 / len(class_names)):>7} {pct(k5 / len(class_names)):>7}")
    if show:
        for r in results:
            prefix = f" ({r['model']})" if len(results) > 1 else ""
            typer.echo(f"\nworst classes{prefix}:")
            for c in r["per_class"][:show]:
                typer.echo(f"  {pct(c['accuracy']):>6}  {c['class']} ({c['images']} images)")
            if r["confused"]:
                typer.echo(f"most confused{prefix} (true -> predicted):")
                for c in r["confused"][:show]:
                    typer.echo(f"  {c['count']:>4}  {c['true']} -> {c['predicted']}")


# --- retrieval ------------------------------------------------------------------------------------
@command("retrieval", group=grp)
def retrieval_cmd(
    ctx: typer.Context,
    captions: Path = typer.Argument(..., help="Captions in the finetune formats: .csv/.tsv (path,caption), .jsonl, "
                                    "or a folder of images with .txt sidecars."),
    image_col: str = typer.Option("path", "--image-col", help="Image path column/field name."),
    caption_col: str = typer.Option("caption", "--caption-col", help="Caption column/field name."),
    models: Optional[List[str]] = MODELS_OPTION,
    json_out: bool = typer.Option(False, "--json", help="Print results as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
):
    """Image→text and text→image recall@1/5/10 and mean rank on captioned images."""
    from ..captions import read_captions
    from ..metrics import table_rows

    settings = settings_of(ctx)
    cs = read_captions(captions, image_col=image_col, caption_col=caption_col)
    skipped = list(cs.problems)
    if not cs.pairs:
        detail = "; ".join(f"{w}: {r}" for w, r in skipped[:3])
        raise DataError(f"no usable image–caption pairs in {captions}" + (f" ({detail})" if detail else ""))
    results = []
    for spec in model_specs(models, settings):
        enc = load_for_images(spec, settings)
        with Bar(f"encoding ({spec.label})", leave=False, quiet=quiet or json_out) as bar:
            m, failures = retrieval_eval(enc, cs, settings, bar)
        if not results:
            skipped += [(p, f"unreadable image: {r}") for p, r in failures]
        results.append((spec.label, m))
    if json_out:
        typer.echo(json.dumps({"captions": str(captions), "skipped": [{"where": w, "reason": r} for w, r in skipped],
                               "models": [{"model": label, **m} for label, m in results]}, indent=2))
        return
    report_skipped(skipped, "--json lists all")
    typer.echo(f"{results[0][1]['images']} images, {results[0][1]['texts']} distinct captions")
    typer.echo("\n".join(table_rows(results, with_loss=False)))


# --- parity ---------------------------------------------------------------------------------------
@command("parity", group=grp)
def parity_cmd(
    ctx: typer.Context,
    folder: Path = typer.Argument(..., help="Folder (or image file) to sample images from."),
    n: int = typer.Option(50, "-n", min=1, help="Images to compare (an even sample when there are more)."),
    threshold: float = typer.Option(0.99, "--threshold", min=-1.0, max=1.0,
                                    help="Exit with 1 when any cosine is below this."),
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
    if not os.path.exists(folder):
        raise UsageError(f"{str(folder)[:300]} does not exist")
    files = sorted(e.path for e in walk([folder]) if isinstance(e, FileEntry))
    if not files:
        raise DataError(f"no images found under {folder}")
    if len(files) > n:  # evenly spread, so one burst of similar files does not fill the sample
        files = [files[int(i * len(files) / n)] for i in range(n)]
    results = []
    for prec in precision_list(precisions, settings):
        with Bar(f"comparing ({prec})", leave=False, quiet=quiet or json_out) as bar:
            res = parity(ModelSpec(settings.model, settings.pretrained), files, settings, bar, prec)
        res["threshold"] = threshold
        # Every decode stage `index` may take must pass, not only today's: a drifting tensor path is a bug.
        res["passed"] = all(st["min_cosine"] >= threshold for st in res["stages"] if st.get("images"))
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
            typer.echo(f"{res['images']} images through index's decode stage ({res['decode']}): min cosine "
                       f"{res['min_cosine']:.6f}, mean {res['mean_cosine']:.6f}")
            for w in res["files"][:worst]:
                typer.echo(f"  {w['cosine']:.6f}  {w['path']}")
            for st in res["stages"][1:]:
                if "refused" in st:
                    typer.echo(f"  stage {st['stage']}: not used for this model ({st['refused']}); index uses Pillow")
                elif st.get("images"):
                    typer.echo(f"  stage {st['stage']} ({st['decode']}): min cosine {st['min_cosine']:.6f}, mean "
                               f"{st['mean_cosine']:.6f}, max input difference {st['max_abs_input_diff']:.4f}")
    if failed := [(r, st) for r in results for st in r["stages"] if st.get("images") and st["min_cosine"] < threshold]:
        r, st = failed[0]
        err(f"parity below threshold: min cosine {st['min_cosine']:.6f} < {threshold} ({r['precision']}, decode "
            f"stage {st['stage']})")
        raise typer.Exit(1)
