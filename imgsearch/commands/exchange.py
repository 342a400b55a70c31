"""`imgsearch export` and `imgsearch import`: vectors and metadata to and from files other tools read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from . import NO_WAIT, command, err, library_of, plural
from ..output import shown


@command("export")
def export_cmd(
    ctx: typer.Context,
    folder: Path = typer.Argument(..., help="New or empty folder to write the export into."),
    fmt: str = typer.Option("parquet", "--format", "-f", help="parquet: one dataset, vectors as fixed-size lists "
                            "with path, hash, size, dates and the model; clip-retrieval: img_emb/img_emb_0.npy + "
                            "metadata/metadata_0.parquet, which autofaiss and clip-retrieval index."),
    model: Optional[str] = typer.Option(None, "--model", help="Whose vectors, when the library holds several "
                                        "models: a name, or the id `imgsearch status` shows in brackets.",
                                        show_default=False),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Export the library's vectors and image metadata (parquet, or clip-retrieval's layout)."""
    from ..progress import Bar

    try:
        with Bar("exporting", "vec", quiet=quiet or json_out) as bar, library_of(ctx) as lib:
            report = lib.export(folder, fmt, model=model, progress=bar)
    except KeyboardInterrupt:  # not the generic "batches are saved": an unfinished export is removed
        err("interrupted: the unfinished export was removed; run the same command again")
        raise typer.Exit(130) from None
    if json_out:
        typer.echo(json.dumps(report.as_dict(), indent=2))
        return
    files = report.files
    listed = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    typer.echo(f"exported {report.rows} vectors of {report.model} (dim {report.dim}) to {shown(report.folder)} "
               f"as {report.format} in {report.seconds:.1f}s: {listed}")


@command("import")
def import_cmd(
    ctx: typer.Context,
    folder: Path = typer.Argument(..., help="A folder written by `imgsearch export` (either format) or "
                                  "clip-retrieval (then name its model with --model before `import`)."),
    trust: bool = typer.Option(False, "--trust", help="Take the export's content hashes instead of reading every "
                               "file: sizes are still checked, and a file must still be named like an image."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    no_wait: bool = NO_WAIT,
):
    """Add an export's images and vectors to the library (files must be reachable here; model must match)."""
    from ..progress import Bar

    named = (ctx.parent.params.get("model") if ctx.parent is not None else None) is not None
    with Bar("importing", quiet=quiet or json_out) as bar, library_of(ctx) as lib:
        report = lib.import_(folder, trust=trust, assume_model=named, progress=bar, wait=not no_wait)
    if json_out:
        typer.echo(json.dumps(report.as_dict(), indent=2))
        return
    parts = [f"imported {report.added} new images"]
    if report.vectors_added:
        parts.append(f"{report.vectors_added} vectors for images already in the library")
    if report.already:
        parts.append(f"{report.already} already present")
    if report.albums:
        parts.append(plural(report.albums, "album"))
    typer.echo(", ".join(parts) + f" with {report.model} from {shown(report.folder)} in {report.seconds:.1f}s")
    if report.unreachable:
        err(f"  {len(report.unreachable)} images are not reachable here (no such file), e.g. "
            f"{report.unreachable[0]}; they were skipped")
    if report.changed:
        path, why = report.changed[0]
        err(f"  {len(report.changed)} files differ from the export and were skipped, e.g. {path}: {why}; "
            "`imgsearch index` them to encode them again")
    if report.not_images:
        path, why = report.not_images[0]
        err(f"  {len(report.not_images)} paths name no image file imgsearch reads and were skipped, e.g. {path}: "
            f"{why}")
    if report.invalid:
        err(f"  {report.invalid} rows of the export hold unusable values and were skipped, e.g. "
            f"{report.invalid_examples[0]}")
