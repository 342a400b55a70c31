"""CLIP applications: classify (zero-shot tags), tags, score, duplicates, caption."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer

from . import command, err, flag_words, library_of, plural
from ..errors import UsageError
from ..output import human_bytes, shown, warn_if_escaped


# --- classify / tags --------------------------------------------------------------------------------
@command("classify")
def classify_cmd(
    ctx: typer.Context,
    paths: Optional[List[Path]] = typer.Argument(None, help="Image files or folders to label without touching "
                                                 "the library. Without them, the whole library is tagged."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Comma-separated labels, e.g. \"dog,cat,car\"."),
    labels_file: Optional[Path] = typer.Option(None, "--labels-file", help="Labels, one per line."),
    template: Optional[List[str]] = typer.Option(None, "--template", help="Prompt template with {} for the label "
                                                 "(repeatable); replaces the default ensemble."),
    templates_file: Optional[Path] = typer.Option(None, "--templates-file", help="Prompt templates, one per line."),
    top: int = typer.Option(1, "--top", min=1, help="Labels kept per image."),
    min_prob: float = typer.Option(0.0, "--min-prob", min=0.0, max=1.0, help="Keep labels at least this likely."),
    under: Optional[Path] = typer.Option(None, "--under", help="Only library images inside this folder."),
    json_out: bool = typer.Option(False, "--json", help="Print results as JSON."),
):
    """Zero-shot labels for images; stored as tags (for `query --tag`) when run on the library."""
    from ..library import labels_from, templates_from

    label_list = labels_from(labels, labels_file)
    templates = templates_from(template, templates_file)
    flags = {"min_prob": ("--min-prob", min_prob), "top": ("--top", top)}
    if paths:
        if under:
            raise UsageError("--under filters the library; it cannot be combined with FILE arguments")
        with library_of(ctx) as lib, flag_words(**flags):
            results = lib.classify_files(paths, label_list, templates, top, min_prob)
        if json_out:
            typer.echo(json.dumps([r.as_dict() for r in results], indent=2))
        for r in results:
            if r.error:
                err(f"error: {shown(r.path)}: {r.error}")
            elif not json_out:
                typer.echo(f"{shown(r.path)}\t" + (", ".join(f"{lab} {p:.2f}" for lab, p in r.labels)
                                                   or "(below --min-prob)"))
        warn_if_escaped("--json")
        if any(r.error for r in results):
            raise typer.Exit(1)
        return
    with library_of(ctx) as lib, flag_words(under=("--under", under), **flags):
        report = lib.classify(label_list, templates, top, min_prob, under=under, keep_results=json_out)
    if json_out:
        typer.echo(json.dumps(report.as_dict(), indent=2))
        return
    typer.echo(f"tagged {report.tagged} of {report.images} images with {len(report.labels)} labels "
               f"(set {report.set_id}, {report.model}, {len(report.templates)} prompt templates)")
    for label, n in report.counts:
        typer.echo(f"  {n:>6}  {label}")
    typer.echo("filter with: imgsearch query TEXT --tag LABEL")


@command("tags")
def tags_cmd(
    ctx: typer.Context,
    sets: bool = typer.Option(False, "--sets", help="List the label sets (model, labels, templates) instead."),
    drop_set: Optional[int] = typer.Option(None, "--drop-set", min=1, max=2**63 - 1,
                                           help="Delete the tags of this label set."),
    json_out: bool = typer.Option(False, "--json", help="Print as JSON."),
):
    """List zero-shot tags with how many images carry each."""
    with library_of(ctx) as lib:
        if drop_set is not None:
            if not lib.drop_tag_set(drop_set):
                raise UsageError(f"no label set {drop_set}; `imgsearch tags --sets` lists them")
            typer.echo(f"deleted label set {drop_set} and its tags")
            return
        rows = lib.tag_sets() if sets else lib.tags()
    if json_out:
        typer.echo(json.dumps(rows if sets else [{"tag": t, "images": n} for t, n in rows], indent=2))
        return
    for row in rows:
        typer.echo(f"{row[1]:>6}  {row[0]}" if not sets else
                   f"set {row['id']}: {row['images']} images, {row['model']}, {len(row['templates'])} templates, "
                   f"labels: {', '.join(row['labels'])}")
    if not rows:
        err("no tags yet: run `imgsearch classify --labels \"dog,cat,car\"`")


# --- score ------------------------------------------------------------------------------------------
@command("score")
def score_cmd(
    ctx: typer.Context,
    image: Path = typer.Argument(..., help="Image file (need not be in the library)."),
    texts: List[str] = typer.Argument(..., help="Texts to score the image against."),
    json_out: bool = typer.Option(False, "--json", help="Print as JSON."),
):
    """CLIP score: cosine similarity of an image with each text, and CLIPScore = 100*max(cos, 0)."""
    if not os.path.exists(image):  # False for a name too long to stat, too (Path.exists raises there)
        raise UsageError(f"image not found: {str(image)[:300]}")
    with library_of(ctx) as lib:
        scores = lib.score(image, texts)
        label = lib.model_label  # not lib.encoder: that would load torch for a name
    if json_out:
        typer.echo(json.dumps({"image": str(image), "model": label,
                               "scores": [s.as_dict() for s in scores]}, indent=2))
        return
    typer.echo(f"{'cosine':>7}  {'clipscore':>9}  text")
    for s in scores:
        typer.echo(f"{s.cosine:7.4f}  {s.clipscore:9.2f}  {s.text}")


# --- duplicates -------------------------------------------------------------------------------------
@command("duplicates")
def duplicates_cmd(
    ctx: typer.Context,
    under: Optional[Path] = typer.Option(None, "--under", help="Only images inside this folder."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="CLIP cosine for two images to be "
                                              "compared [default 0.90]."),
    similar: bool = typer.Option(False, "--similar", help="Group by CLIP similarity alone (similar shots, not "
                                 "only copies of one picture)."),
    min_match: float = typer.Option(0.96, "--min-match", help="Pixel likeness (0-1) that confirms a copy."),
    json_out: bool = typer.Option(False, "--json", help="Print as JSON."),
):
    """Group copies of the same picture (resized, re-encoded, converted, lightly cropped). Deletes nothing."""
    with library_of(ctx) as lib, flag_words(under=("--under", under), threshold=("--threshold", threshold),
                                            min_match=("--min-match", min_match)):
        report = lib.duplicates(under=under, threshold=threshold, similar=similar, min_match=min_match)
    if json_out:
        typer.echo(json.dumps(report.as_dict(), indent=2))
        return
    count, noun = len(report.groups), "group" if len(report.groups) == 1 else "groups"
    what = f"{count} {noun} of similar images" if similar else f"{count} duplicate {noun}"
    for n, g in enumerate(report.groups, 1):
        typer.echo(f"group {n} ({len(g.members)} images)")
        for m in g.members:
            res = f"{m.width}x{m.height}" if m.width else "?"
            typer.echo(f"  {'keep' if m.keeper else '    '}  {res:>11}  {human_bytes(m.size):>9}  {shown(m.path)}")
    for path, reason in report.unreadable:
        err(f"warning: could not compare {shown(path)}: {reason}")
    warn_if_escaped("--json")
    typer.echo(f"{what} among {plural(report.images, 'image')} ({plural(report.candidates, 'CLIP candidate pair')}, "
               f"{report.confirmed} confirmed) in {report.seconds:.1f}s; nothing was deleted")


# --- caption ----------------------------------------------------------------------------------------
@command("caption")
def caption_cmd(
    ctx: typer.Context,
    image: Optional[Path] = typer.Argument(None, help="A library image. Alone, prints its captions."),
    text: Optional[List[str]] = typer.Argument(None, help="Caption to attach (words are joined)."),
    import_file: Optional[Path] = typer.Option(None, "--import", help="Captions file (CSV/TSV/JSONL or a folder "
                                               "of .txt sidecars, as for finetune)."),
    image_col: str = typer.Option("path", "--image-col", help="Image column in CSV/TSV/JSONL."),
    caption_col: str = typer.Option("caption", "--caption-col", help="Caption column in CSV/TSV/JSONL."),
    replace: bool = typer.Option(False, "--replace", help="Replace the images' earlier captions."),
    json_out: bool = typer.Option(False, "--json", help="Print as JSON."),
):
    """Attach captions to library images; they are searched by `query --keyword`."""
    if import_file and image:
        raise UsageError("give either IMAGE TEXT or --import FILE, not both")
    if not import_file and not image:
        raise UsageError("give IMAGE \"caption text\", IMAGE alone to see its captions, or --import FILE")
    with library_of(ctx) as lib:
        if import_file:
            report = lib.import_captions(import_file, image_col, caption_col, replace)
            if json_out:
                typer.echo(json.dumps(report.as_dict(), indent=2))
                return
            typer.echo(f"added {plural(report.added, 'caption')} from {import_file}"
                       + (f" ({report.already} already present)" if report.already else ""))
            if report.not_in_library:
                missing = len(report.not_in_library)
                typer.echo(f"  {plural(missing, 'image')} {'is' if missing == 1 else 'are'} not in the library "
                           f"(run `imgsearch index` first), e.g. {report.not_in_library[0]}")
            for where, reason in report.problems[:10]:
                typer.echo(f"  skipped {where}: {reason}")
            if len(report.problems) > 10:
                typer.echo(f"  ... and {len(report.problems) - 10} more problems")
            return
        if not text:
            caps = lib.captions(image)
            if json_out:
                typer.echo(json.dumps({"image": str(image), "captions": caps}, indent=2))
            elif caps:
                typer.echo("\n".join(caps))
            else:
                err(f"no captions for {image}")
            return
        added = lib.add_caption(image, " ".join(text), replace)
        typer.echo("caption added" if added else "this caption is already there")
