"""`imgsearch album save|list|show|pin|unpin|rename|delete|export`: smart albums, saved searches that stay
current (imgsearch.Library's album methods; albums.py says how)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import typer

from . import (JSON_HITS, PATHS, PRINT0, app, command, err, hits_format, library_of, plural, search_options,
               when)
from ..output import print_hits, shown

grp = typer.Typer(help="Smart albums: saved searches whose photos stay current as the library changes.",
                  no_args_is_help=True, rich_markup_mode=None)
app.add_typer(grp, name="album")

NAME = typer.Argument(..., help="The album's name.")


@command("save", group=grp)
@search_options
def save_cmd(ctx: typer.Context, search: dict, name: str = NAME):
    """Save a search as an album: the search is kept, not a list, so its photos stay current. With
    --min-score or --relevant (or --keyword alone) every photo that passes is in it, and new ones join;
    otherwise it is the top -k (10) now."""
    with library_of(ctx) as lib:
        album = lib.save_album(name, **search)
    how = ("new photos that pass join it" if album.grows else
           f"the top {album.request['k']} now (--min-score or --relevant lets new photos join)")
    typer.echo(f"saved album {album.name}: {plural(album.count, 'photo')}; {how}")


@command("list", group=grp)
def list_cmd(ctx: typer.Context, json_out: bool = typer.Option(False, "--json", help="Print a JSON array.")):
    """Every album: name, photos now, when a photo last joined or left, and its search."""
    with library_of(ctx) as lib:
        albums = lib.albums()
    if json_out:
        typer.echo(json.dumps([a.as_dict() for a in albums], indent=2))
        return
    if not albums:
        err("no albums yet; `imgsearch album save NAME QUERY...` makes one")
        return
    width = max(len(a.name) for a in albums)
    typer.echo(f"{'album':<{width}}  {'photos':>6}  {'changed':<16}  search")
    for a in albums:
        count = a.count if not a.problem else "?"
        typer.echo(f"{a.name:<{width}}  {count:>6}  {when(a.changed_at)}  {a.query}")
    for a in albums:
        if a.problem:
            err(f"warning: {a.problem}")


@command("show", group=grp)
def show_cmd(
    ctx: typer.Context,
    name: str = NAME,
    json_out: bool = JSON_HITS,
    paths_out: bool = PATHS,
    print0: bool = PRINT0,
):
    """The album's photos now, best first (as `imgsearch query` prints hits)."""
    fmt = hits_format(json_out, paths_out, print0)
    with library_of(ctx) as lib:
        album = lib.album(name)
    if fmt == "table":
        typer.echo(f"album {album.name}: {plural(album.count, 'photo')}, last change "
                   f"{when(album.changed_at)}; search: {album.query}")
        if not album.hits:
            return
    print_hits([h.as_dict() for h in album.hits], fmt)


def _pin(ctx: typer.Context, name: str, paths: List[Path], keep: bool) -> None:
    with library_of(ctx) as lib:
        n, album = (lib.pin if keep else lib.unpin)(name, paths)
    typer.echo(f"{'pinned' if keep else 'dropped'} {plural(n, 'photo')} {'in' if keep else 'from'} album "
               f"{album.name} ({plural(album.count, 'photo')} now)")


@command("pin", group=grp)
def pin_cmd(ctx: typer.Context, name: str = NAME,
            paths: List[Path] = typer.Argument(..., help="Library photos, or folders of them.")):
    """Keep photos in the album whatever its search says."""
    _pin(ctx, name, paths, True)


@command("unpin", group=grp)
def unpin_cmd(ctx: typer.Context, name: str = NAME,
              paths: List[Path] = typer.Argument(..., help="Library photos, or folders of them.")):
    """Drop photos from the album whatever its search says (`album pin` brings them back)."""
    _pin(ctx, name, paths, False)


@command("rename", group=grp)
def rename_cmd(ctx: typer.Context, name: str = NAME, new_name: str = typer.Argument(..., help="Its new name.")):
    """Rename an album."""
    with library_of(ctx) as lib:
        lib.rename_album(name, new_name)
    typer.echo(f"renamed album {name} to {new_name.strip()}")


@command("delete", group=grp)
def delete_cmd(ctx: typer.Context, name: str = NAME):
    """Delete an album: its saved search and pins, never a photo."""
    with library_of(ctx) as lib:
        lib.delete_album(name)
    typer.echo(f"deleted album {name} (no photo was touched)")


@command("export", group=grp)
def export_cmd(
    ctx: typer.Context,
    name: str = NAME,
    folder: Path = typer.Argument(..., help="A new or empty folder."),
    link: bool = typer.Option(False, "--link/--copy", show_default=False,
                              help="Symlinks to the photos, or copies that stand on their own [default --copy]."),
):
    """Put the album's photos into a new or empty folder; a name taken twice gets " (2)"; nothing is
    overwritten."""
    with library_of(ctx) as lib:
        written = lib.export_album(name, folder, link=link)
        root = None if link or not written else lib.indexed_folder_of(folder)
    typer.echo(f"{'linked' if link else 'copied'} {plural(len(written), 'photo')} of album {name} into "
               f"{shown(str(folder))}")
    if root is not None:  # the walk takes links as the photos they point to, copies as new images
        err(f"note: {shown(str(folder))} is inside the indexed folder {shown(root)}: its next `imgsearch index` "
            "adds these copies as new images; --link or a folder outside it avoids that")
