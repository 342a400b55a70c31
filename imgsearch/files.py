"""Find image files under folders and fingerprint them."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import stat
from contextlib import suppress
from dataclasses import dataclass
from typing import Iterable, Iterator

from . import formats
from .config import HOME_DB, HOME_MARKER, SKIP_DIR_NAMES


@dataclass(frozen=True)
class FileEntry:
    path: str  # absolute real path (symlinks resolved): one physical file has one library path
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass(frozen=True)
class Alias:
    """A second path (symlink or hard link) to a file already yielded as ``of`` in this walk."""

    path: str
    of: str


def heic_supported() -> bool:
    return importlib.util.find_spec("pillow_heif") is not None


def raw_supported() -> bool:
    """rawpy (the `raw` extra) is installed: RAW files can be decoded."""
    return importlib.util.find_spec("rawpy") is not None


def is_image_file(path: str, heic: bool = True) -> bool:
    """The walk's rule for one file: an image by extension, or by its first bytes when the extension says
    nothing (a known non-image type is never opened). Used where single paths arrive (watch). ``heic`` False:
    HEIC is not (the walk takes HEIC files without the extra too, so that decoding says what to install)."""
    kind = formats.kind_by_extension(path) or formats.sniff(formats.read_head(path))
    return kind in ("image", "raw") or (kind == "heic" and heic)


def is_hidden(name: str) -> bool:
    """Dot-files, macOS resource forks (``._x``) and NAS metadata folders."""
    return name.startswith(".") or name in SKIP_DIR_NAMES


def mtime_ns(st: os.stat_result) -> int:
    """A file's modification time as the library keeps it: within SQLite's integer range, so a file dated past
    2262 or before 1678 (a wrong clock, `touch -d`) is indexed instead of failing its whole batch."""
    return max(-(1 << 63), min(st.st_mtime_ns, (1 << 63) - 1))


def abspath(path: str | os.PathLike) -> str:
    """The library's name for a path: absolute with symlinks resolved. One physical file reached through
    ``lib`` and a symlink ``link-to-lib`` must be one library row, so every path the user gives is resolved."""
    return os.path.realpath(os.path.abspath(os.path.expanduser(os.fsdecode(path))))


def walk(roots: Iterable[str | os.PathLike], *, skip_homes: Iterable[str | os.PathLike] = (),
         aliases: bool = False) -> Iterator[FileEntry | Skipped | Alias]:
    """Yield every image file under ``roots`` (files or folders), and a Skipped for each problem. Paths come
    back with symlinks resolved, one physical file once (further paths dropped, or yielded as Alias when
    ``aliases``); a folder is never visited twice, so symlink loops end. Hidden files and folders and library
    homes (``skip_homes``, any folder holding a library database and its marker) are skipped silently."""
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: dict[tuple[int, int], str] = {}
    homes: set[tuple[int, int]] = set()
    for h in skip_homes:
        with suppress(OSError):
            st = os.stat(h)
            homes.add((st.st_dev, st.st_ino))

    def file_entry(shown: str, real: str) -> FileEntry | Skipped | Alias | None:
        kind = formats.kind_by_extension(shown)
        if kind == "other":
            return None
        try:
            st = os.stat(real)
        except FileNotFoundError:
            return Skipped(shown, "broken symlink" if os.path.islink(shown) else "file vanished")
        except OSError as e:
            return Skipped(shown, f"cannot stat: {e.strerror or e}")
        if not stat.S_ISREG(st.st_mode):
            return None
        if kind is None:  # an odd or missing extension: the first bytes decide (one small read)
            kind = formats.sniff(formats.read_head(real))
            if kind is None:
                return None
        key = (st.st_dev, st.st_ino)
        first = seen_files.get(key)
        if first is not None:
            return Alias(shown, first) if aliases else None
        seen_files[key] = real
        return FileEntry(real, st.st_size, mtime_ns(st))

    def visit_dir(path: str) -> Iterator[FileEntry | Skipped | Alias]:
        try:
            st = os.stat(path)
        except OSError as e:
            yield Skipped(path, f"cannot open folder: {e.strerror or e}")
            return
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs or key in homes:
            return  # symlink loop, a folder reached twice, or the library's own home
        seen_dirs.add(key)
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            yield Skipped(path, f"cannot list folder: {e.strerror or e}")
            return
        if {HOME_DB, HOME_MARKER} <= {e.name for e in entries}:  # an imgsearch home: its database and marker
            return
        for entry in entries:
            if is_hidden(entry.name):
                continue
            full = os.path.join(path, entry.name)
            try:
                link = entry.is_symlink()
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                link, is_dir = False, False
            # The parent is already real, so only a symlink entry needs resolving (no realpath per file).
            real = os.path.realpath(full) if link else full
            if is_dir:
                yield from visit_dir(real)
                continue
            result = file_entry(full, real)
            if result is not None:
                yield result

    for root in roots:
        root = abspath(root)
        if os.path.isdir(root):
            yield from visit_dir(root)
        elif os.path.lexists(root):
            yield file_entry(root, root) or Skipped(root, "not an image file (neither its extension nor its first "
                                                          "bytes name an image format imgsearch reads)"
                                                    if os.path.isfile(root) else "not a regular file")
        else:
            yield Skipped(root, "no such file or folder")


def hash_file(f, chunk: int = 1 << 20) -> str:
    """Content fingerprint of an open binary file, read in chunks (memory stays at one chunk)."""
    h = hashlib.blake2b(digest_size=16)
    for block in iter(lambda: f.read(chunk), b""):
        h.update(block)
    return h.hexdigest()


def under(path: str, folder: str) -> bool:
    """True when ``path`` is ``folder`` itself or inside it."""
    folder = folder.rstrip(os.sep) or os.sep
    return path == folder or path.startswith(folder + os.sep) or folder == os.sep
