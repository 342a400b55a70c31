"""Command line: parse, call the library, print. Heavy modules load inside commands, so --help is instant."""

from __future__ import annotations

import importlib
import json
from contextlib import suppress
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperCommand

from . import __version__
from .commands import (JSON_HITS, NO_WAIT, PATHS, PRINT0, app, command, err, handle_errors, hits_format, kept_lines,
                       library_of, plural, search_options, settings_of, when)
from .config import DEFAULT_MODEL, DEFAULT_PRETRAINED, Settings, is_ray_address
from .errors import UsageError
from .output import print_hits, shell_word, shown, warn_if_escaped


def _version(value: bool):
    if value:
        typer.echo(f"imgsearch {__version__}")
        raise typer.Exit()


@app.callback()
@handle_errors
def main(
    ctx: typer.Context,
    home: Optional[Path] = typer.Option(None, "--home", help="Library folder [env IMGSEARCH_HOME; default "
                                        "~/.local/share/imgsearch]", show_default=False),
    model: Optional[str] = typer.Option(None, "--model", help=f"open_clip model: a built-in name, hf-hub:org/repo, "
                                        f"local-dir:/path or `multilingual` (XLM-R ViT-B-32, any language) "
                                        f"[env IMGSEARCH_MODEL; default {DEFAULT_MODEL}]",
                                        show_default=False),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="Weights for a built-in model: a tag or a "
                                             f"checkpoint file [env IMGSEARCH_PRETRAINED; default {DEFAULT_PRETRAINED}"
                                             " for the default model]", show_default=False),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or mps [default auto: cuda, "
                                         "then Apple mps, then cpu]",
                                         show_default=False),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per model batch [default 32]",
                                             show_default=False),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto, fp32, bf16, fp16 or int8 [default auto: "
                                            "fp16 on CUDA, fp32 on MPS, bf16 on CPUs with AMX/AVX512-BF16, else fp32; a "
                                            "CPU index of 200+ files uses int8 where timed faster and close enough; "
                                            "without torch installed: int8 where close enough, else fp32]"
                                            "; int8 = quantised image tower on CPU, for index",
                                            show_default=False),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Decode threads [env IMGSEARCH_WORKERS; "
                                          "default: one per core, up to 8 on a GPU]", show_default=False),
    lang: Optional[str] = typer.Option(None, "--lang", help="Query language as an NLLB code, e.g. kor_Hang, "
                                       "deu_Latn [env IMGSEARCH_LANG; default: guessed from the query's script, "
                                       "else the language `index --lang` recorded, else eng_Latn]",
                                       show_default=False),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
):
    """Semantic image search on your own machine."""
    import warnings

    # This process is imgsearch's own: Pillow's notes on odd files (corrupt EXIF, palette transparency) are
    # not the user's business here. The library leaves the filters to the program it runs in.
    warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
    ctx.obj = Settings.from_env(home=home, model=model, pretrained=pretrained, device=device,
                                batch_size=batch_size, precision=precision, workers=workers, lang=lang,
                                own_process=True)
    if ctx.obj.lang is not None:
        library_of(ctx)  # checks the code: a typo fails before any work, in one line


# --- index -------------------------------------------------------------------------------------
class _OptionalRay(TyperCommand):
    """`--ray` with no address (last, before another option, or before a folder) means a local Ray."""

    def parse_args(self, ctx, args):
        out: list[str] = []
        for k, a in enumerate(args):
            out.append(a)
            if a == "--":
                out.extend(args[k + 1:])
                break
            if a == "--ray" and (k + 1 == len(args) or not is_ray_address(args[k + 1])):
                out.append("local")
        return super().parse_args(ctx, out)


@command("index", cls=_OptionalRay)
def index_cmd(
    ctx: typer.Context,
    paths: List[Path] = typer.Argument(..., help="Folders or image files (recursive)."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    failures_log: Optional[Path] = typer.Option(None, "--log", help="Also write failed files and reasons here."),
    no_wait: bool = NO_WAIT,
    ray: Optional[str] = typer.Option(None, "--ray", metavar="[ADDRESS]",
                                      help="Decode and encode on Ray Data: alone, a local Ray sized to this "
                                      "machine; with auto or ray://HOST:10001, a cluster whose workers see the "
                                      "files at the same paths (needs the distributed extra)."),
):
    """Add images under PATHS to the library; re-runs only encode what changed."""
    from .progress import Bar

    settings = settings_of(ctx)
    if failures_log:  # a path it cannot write fails now, not once the run is done
        try:
            failures_log.write_text("", encoding="utf-8")
        except OSError as e:
            raise UsageError(f"--log {failures_log}: cannot write it ({e.strerror or e})") from None
    bar = Bar("indexing", quiet=quiet, skip_empty=True, smoothing=0.1)
    build_bar: Bar | None = None

    def progress(done: int, total: int) -> None:
        bar(done, total)
        if done == total:  # closed now: a close after the index is saved would redraw it with that time too
            bar.close()

    def build_progress(stage: str, done: int, total: int) -> None:
        nonlocal build_bar
        if quiet:
            return
        bar.close()  # the files are done; the FAISS index is being rebuilt
        if build_bar is None or build_bar.desc != stage:
            if build_bar is not None:
                build_bar.close()
            build_bar = Bar(stage, "vec", unit_scale=True)
        build_bar(done, total)

    try:
        with library_of(ctx) as lib:
            report = lib.index(paths, progress=progress, build_progress=build_progress, wait=not no_wait, ray=ray)
    finally:
        for b in (bar, build_bar):
            if b is not None:
                b.close()
    if failures_log:
        failures_log.write_text("".join(f"{p}\t{r}\n" for p, r in report.failed), encoding="utf-8",
                                errors="surrogateescape")
    if json_out:
        typer.echo(json.dumps(report.as_dict(), indent=2))
        return
    rate = report.encoded / report.seconds if report.seconds > 0 else 0.0
    typer.echo(f"indexed with {report.model} in {report.seconds:.1f}s"
               + (f" ({report.encoded} encoded, {rate:.1f} images/s)" if report.encoded else ""))
    typer.echo(f"  new {report.new}, updated {report.updated}, unchanged {report.unchanged}, moved {report.moved}, "
               f"removed {report.removed}, failed {len(report.failed)}"
               + (f" (vectors reused for {plural(report.reused, 'identical file')})" if report.reused else ""))
    for line in kept_lines(report):
        typer.echo(f"  {line}")
    if report.found_nothing:
        typer.echo(f"  no images found under {', '.join(shown(str(p)) for p in paths)} (hidden folders and "
                   "imgsearch libraries are skipped)")
    if report.aliases:
        one = report.aliases == 1
        typer.echo(f"  {plural(report.aliases, 'path')} {'was a second name' if one else 'were second names'} "
                   "(symlinks, hard links) of files indexed once")
    if report.failed_before:
        one = report.failed_before == 1
        typer.echo(f"  {report.failed_before} file{'' if one else 's'} that failed before and {'is' if one else 'are'} "
                   f"unchanged {'was' if one else 'were'} not retried (`imgsearch status --failures`)")
    if report.int8_parity is not None and report.image_tower.endswith("int8"):  # moot when the faster fp32 export ran
        where = (f"{report.parity_images} of these images" if report.parity_images
                 else "this library's images in an earlier run")  # a remembered verdict
        typer.echo(f"  image tower {report.image_tower}: min cosine {report.int8_parity:.4f} to fp32 on "
                   f"{where} (refused below {settings.int8_min_cosine})")
    elif report.image_tower and report.encoded:
        typer.echo(f"  image tower: {report.image_tower}")
    if report.failed:
        first = report.failed[:20]
        for path, reason in first:
            typer.echo(f"  failed: {shown(path)}: {shown(reason)}")
        if len(report.failed) > len(first):
            typer.echo(f"  ... and {len(report.failed) - len(first)} more (`imgsearch status --failures` lists all"
                       + (f", or see {failures_log}" if failures_log else "") + ")")
        warn_if_escaped("--json")


# --- query -------------------------------------------------------------------------------------
@command("query")
@search_options
def query_cmd(
    ctx: typer.Context,
    search: dict,
    json_out: bool = JSON_HITS,
    paths_out: bool = PATHS,
    print0: bool = PRINT0,
    use_server: bool = typer.Option(True, "--server/--no-server", help="Use a running `imgsearch serve` for this "
                                    "library and model when there is one (much faster start)."),
    daemon: bool = typer.Option(False, "--daemon", help="Start a background server (exits after 10 minutes idle) "
                                "when none runs, so the following queries are fast."),
):
    """Find the images closest to text and/or example images (--relevant: when none pass, says so and shows
    the closest)."""
    from .request import SearchRequest

    fmt = hits_format(json_out, paths_out, print0)
    request = SearchRequest.build(**{**search, "k": 10 if search["k"] is None else search["k"]})
    rows = _query_rows(ctx, request, use_server, daemon)
    if request.relevance:
        rows = _relevant_rows(rows, request)
    print_hits(rows, fmt, min_score=request.min_score, tag=request.tags, keyword=request.keyword)


def _relevant_rows(rows: list[dict], request) -> list[dict]:
    """--relevant: the hits above the floor; none above it is not an error, the closest are shown anyway
    (stderr says so, so --json and --paths output stays clean)."""
    good = [r for r in rows if r.get("relevant")]
    if good or not rows:
        return good
    if any(r.get("relevant") is None for r in rows):
        # Images alone get the image floor (relevance.query_kind), measured on pairs: a library of one has none.
        why = ("keyword ranking" if request.blend is not None or request.keyword_only else
               "the image floor is measured on pairs of images; index a second one"
               if set(request.term_kinds) <= {"image", "id"} else
               "text and images mixed, --not terms or unliked images")
        err(f"--relevant: no relevance floor for this query ({why}); showing all results")
    else:
        err("no good matches; closest results:")
    return rows


def _query_rows(ctx: typer.Context, request, use_server: bool, daemon: bool) -> list[dict]:
    """Hits as dicts: from a running server for this library and model when there is one, else in-process.
    Both answer the same SearchRequest with the same engine."""
    with library_of(ctx) as lib:
        rows = None
        if use_server and not request.keyword_only:
            from . import client

            info = client.find_server(lib.settings) or (client.start_daemon(lib.settings) if daemon else None)
            if info is not None:
                with suppress(OSError):  # the server went away mid-request: answer in-process below
                    rows = client.search(info, request)
        hint = lib.language_hint(request.texts)  # said here, on the user's terminal, whoever answers
        if hint:
            typer.echo(hint, err=True)
        return rows if rows is not None else [h.as_dict() for h in lib.run(request)]


# --- status / forget ---------------------------------------------------------------------------
@command("status")
def status_cmd(
    ctx: typer.Context,
    json_out: bool = typer.Option(False, "--json", help="Print as JSON."),
    failures: bool = typer.Option(False, "--failures", help="List every failed file with its reason (PATH, tab, "
                                  "REASON; with --json, an array of {path, reason})."),
):
    """What the library holds: images, failures, models and their vectors, index files, disk use."""
    from .output import human_bytes

    if failures:
        with library_of(ctx) as lib:
            rows = lib.failures()
        if json_out:  # the same objects as `status --json`'s failed_files
            typer.echo(json.dumps([{"path": p, "reason": r} for p, r in rows], indent=2))
            return
        for path, reason in rows:
            typer.echo(f"{shown(path)}\t{shown(reason)}")
        warn_if_escaped("--json")
        return
    with library_of(ctx) as lib:
        st = lib.status().as_dict()
    if json_out:
        typer.echo(json.dumps(st, indent=2))
        return
    typer.echo(f"library   {st['home']}")
    typer.echo(f"images    {st['images']}")
    typer.echo(f"failures  {st['failures']}" + ("  (imgsearch status --failures lists them)" if st["failures"] else ""))
    typer.echo(f"disk      {human_bytes(st['disk_bytes'])}")
    ww = st.get("when_where") or {}
    if ww.get("taken_first"):
        typer.echo(f"taken     {ww['taken_first'][:10]} to {ww['taken_last'][:10]} ({ww['taken_exif']} from EXIF, "
                   f"{ww['taken_file']} from file times)")
    if st["images"]:
        typer.echo(f"places    {ww.get('with_gps', 0)} with GPS, {ww.get('with_camera', 0)} with camera make/model"
                   + (f"; {ww['without_meta']} not read yet (the next `imgsearch index` reads them)"
                      if ww.get("without_meta") else ""))
    if st.get("read_only"):
        typer.echo("access    read-only (queries work; index, forget, captions and tags need write access)")
    run = st["last_run"]
    if run and run["finished_at"]:
        typer.echo(f"last run  {when(run['finished_at'])}: new {run['new']}, updated {run['updated']}, "
                   f"moved {run['moved']}, removed {run['removed']}, failed {run['failed']}"
                   + (" (interrupted)" if run["interrupted"] else ""))
    elif run and run["state"] == "running":
        typer.echo(f"last run  started {when(run['started_at'])}, still running (pid {run['pid']})")
    elif run:
        typer.echo(f"last run  started {when(run['started_at'])}: interrupted (process ended before "
                   "finishing; finished batches are kept, re-run `imgsearch index` to complete it)")
    typer.echo("models")
    if not st["models"]:
        typer.echo("  none yet: run `imgsearch index PATH`")
    for m in st["models"]:
        detail = ""
        if m["index_bytes"]:
            recall = m.get("recall_at_10")
            detail = (f" ({m['index_type'] + ', ' if m['index_type'] else ''}{human_bytes(m['index_bytes'])}"
                      + (f", recall@10 {recall:.3f} at nprobe {m['nprobe']}" if recall is not None and m["nprobe"]
                         else "") + ")")
        typer.echo(f"  [{m['id']}] {m['model']}: {m['vectors']} vectors, dim {m['dim']}, index {m['index_state']}"
                   + detail)
        floor = m.get("relevance_floor")
        if floor:
            image = f", image queries {floor['image']:.3f}" if floor.get("image") is not None else ""
            typer.echo(f"      relevance floor: text queries {floor['text']:.3f}{image} (measured on "
                       f"{floor['vectors']} images" + ("; re-measured on the next index or query" if floor["stale"]
                                                       else "") + ")")


@command("forget")
def forget_cmd(
    ctx: typer.Context,
    paths: List[str] = typer.Argument(..., help="Files or folders to remove from the library (files stay on disk)."),
    no_wait: bool = NO_WAIT,
):
    """Remove files or folders from the library. Nothing on disk is touched."""
    with library_of(ctx) as lib:
        removed = lib.forget(paths, wait=not no_wait)
    if removed == 0:
        names = ", ".join(shell_word(p) for p in paths)
        err(f"error: nothing in the library under {names}; name files or folders that `imgsearch index` added")
        raise typer.Exit(1)
    typer.echo(f"removed {plural(removed, 'image')} from the library")


# Command groups in their own modules register on `app` when imported (kept last: --help lists the
# core commands first).
for _group in ("albums", "apps", "evaluate", "exchange", "finetune", "serve", "ui", "watch"):
    importlib.import_module(f".commands.{_group}", __package__)
