"""Proof that imgsearch made a folder, so it only ever removes or replaces what it wrote itself.

Such a folder gets a marker recording its kind, real path, a random token (also kept by the caller, so a
copied marker proves nothing) and every file written there with its size and mtime; it is imgsearch's only when
all of these still hold and nothing else is there. Removal unlinks those files by name and rmdir's the folder
(never a recursive delete), so anything that appears meanwhile keeps the folder in place.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path

from .config import read_json

MARKER = ".imgsearch-owned.json"


def new_token() -> str:
    return secrets.token_hex(16)


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(os.fspath(path))


def _write_marker(folder: Path, info: dict) -> None:
    """Written to a new file (O_EXCL: never through a link planted in a folder others can write to), renamed."""
    tmp = folder / (MARKER + ".tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w", encoding="utf-8") as f:
        f.write(json.dumps(info, indent=1))
    os.replace(tmp, folder / MARKER)


def read_marker(folder: str | os.PathLike) -> dict | None:
    try:
        info = read_json((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("files"), dict):
        return None
    # Each entry a plain name in this folder with [size, mtime_ns]: a marker anyone could have written must not
    # name "../../thesis.pdf" for removal.
    plain = all(isinstance(name, str) and name not in ("", ".", "..") and os.sep not in name and "\0" not in name
                and isinstance(st, list) and len(st) == 2 and all(type(v) is int for v in st)
                for name, st in info["files"].items())
    return info if plain else None


def start_marker(folder: str | os.PathLike, kind: str, token: str, where: str | os.PathLike | None = None) -> None:
    """Mark ``folder`` (which this process has just created) as imgsearch's; ``where`` is its final path."""
    _write_marker(Path(folder), {"kind": kind, "token": token, "path": _real(where or folder), "files": {}})


def create_dir(folder: str | os.PathLike, kind: str, token: str) -> Path:
    """Create ``folder`` (it must not exist: FileExistsError otherwise) and mark it as imgsearch's."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.mkdir(folder)
    start_marker(folder, kind, token)
    return folder


def record(folder: str | os.PathLike, *names: str, source: str | os.PathLike | None = None,
           suffix: str = "") -> None:
    """Note in the marker that imgsearch wrote these files (as they are now) in its own ``folder``; ``source``:
    the folder they are in, and ``suffix``: what their names end with, until imgsearch renames them into ``folder``
    (a rename keeps size and mtime), so no moment exists when they are there unrecorded."""
    folder = Path(folder)
    info = read_marker(folder)
    if info is None:
        raise FileNotFoundError(f"{folder} has no {MARKER}")
    for name in names:
        st = os.lstat(Path(source or folder) / (name + suffix))
        info["files"][name] = [st.st_size, st.st_mtime_ns]
    _write_marker(folder, info)


def why_not_ours(folder: str | os.PathLike, kind: str, token: str | None = None,
                 where: str | os.PathLike | None = None, transient: tuple[str, ...] = ()) -> str | None:
    """None when imgsearch provably made ``folder`` and it holds only what imgsearch wrote; else the reason.
    ``token``: the token the caller holds (None: only when it holds none, e.g. a model config without one).
    ``where``: the path the marker must name when the folder has just been renamed by imgsearch itself.
    ``transient``: names imgsearch writes and renames away (temp files of an interrupted write)."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return "it is not a plain folder"
    info = read_marker(folder)
    if info is None:
        return "it has no imgsearch ownership marker"
    if info.get("kind") != kind:
        return f"its marker says it is a {info.get('kind')!r} folder, not a {kind!r} folder"
    if info.get("path") != _real(where or folder):
        return f"its marker was written for {info.get('path')}, so it was moved or copied here"
    if token is not None and info.get("token") != token:
        return "its marker belongs to another run"
    files = info["files"]
    try:
        entries = os.listdir(folder)
    except OSError as e:
        return f"it cannot be listed ({e.strerror or e})"
    foreign = sorted(set(entries) - set(files) - {MARKER, MARKER + ".tmp"} - set(transient))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return f"it holds files imgsearch did not write ({shown})"
    for name, (size, mtime_ns) in files.items():
        try:
            st = os.lstat(folder / name)
        except FileNotFoundError:
            continue
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):  # a link is removed, never followed
            return f"{name} is no longer the file imgsearch wrote"
        if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
            return f"{name} was changed after imgsearch wrote it"
    return None


def remove(folder: str | os.PathLike, kind: str, token: str | None = None, where: str | os.PathLike | None = None,
           transient: tuple[str, ...] = ()) -> str | None:
    """Delete an imgsearch folder file by file; returns None when gone, else why it was left in place."""
    folder = Path(folder)
    if (reason := why_not_ours(folder, kind, token, where, transient)) is not None:
        return reason
    info = read_marker(folder) or {"files": {}}
    try:
        for name in [*info["files"], *transient, MARKER + ".tmp", MARKER]:
            (folder / name).unlink(missing_ok=True)
        os.rmdir(folder)  # fails, keeping the folder, if anything else appeared meanwhile
    except OSError as e:
        return f"it could not be removed ({e.strerror or e})"
    return None
