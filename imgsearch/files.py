"""Find image files under folders and fingerprint them."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import stat
from dataclasses import dataclass
from typing import Iterable, Iterator

from .config import HEIC_EXTENSIONS, IMAGE_EXTENSIONS, SKIP_DIR_NAMES


@dataclass(frozen=True)
class FileEntry:
    path: str  # absolute, symlinks in the path kept as the user sees them
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


def heic_supported() -> bool:
    return importlib.util.find_spec("pillow_heif") is not None


def image_extensions() -> frozenset[str]:
    return IMAGE_EXTENSIONS | HEIC_EXTENSIONS if heic_supported() else IMAGE_EXTENSIONS


def is_hidden(name: str) -> bool:
    """Dot-files, macOS resource forks (``._x``) and NAS metadata folders."""
    return name.startswith(".") or name in SKIP_DIR_NAMES


def abspath(path: str | os.PathLike) -> str:
    """Absolute, normalised path without resolving symlinks (users see the path they gave)."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def walk(roots: Iterable[str | os.PathLike]) -> Iterator[FileEntry | Skipped]:
    """Yield every image file under ``roots`` (files or folders), and a Skipped for each problem.

    Follows symlinked folders but never visits the same folder twice, so symlink loops end.
    Hidden files and folders are skipped silently: they are not photos the user meant to index.
    """
    exts = image_extensions()
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[str] = set()

    def file_entry(path: str) -> FileEntry | Skipped | None:
        if os.path.splitext(path)[1].lower() not in exts:
            return None
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return Skipped(path, "broken symlink" if os.path.islink(path) else "file vanished")
        except OSError as e:
            return Skipped(path, f"cannot stat: {e.strerror or e}")
        if not stat.S_ISREG(st.st_mode):
            return None
        return FileEntry(path, st.st_size, st.st_mtime_ns)

    def visit_dir(path: str) -> Iterator[FileEntry | Skipped]:
        try:
            st = os.stat(path)
        except OSError as e:
            yield Skipped(path, f"cannot open folder: {e.strerror or e}")
            return
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:
            return  # symlink loop or a folder reached twice
        seen_dirs.add(key)
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            yield Skipped(path, f"cannot list folder: {e.strerror or e}")
            return
        for entry in entries:
            if is_hidden(entry.name):
                continue
            full = os.path.join(path, entry.name)
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                yield from visit_dir(full)
                continue
            result = file_entry(full)
            if result is not None and full not in seen_files:
                seen_files.add(full)
                yield result

    for root in roots:
        root = abspath(root)
        if os.path.isdir(root):
            yield from visit_dir(root)
        elif os.path.lexists(root):
            result = file_entry(root)
            if result is None:
                yield Skipped(root, "not an image file (unknown extension)")
            elif root not in seen_files:
                seen_files.add(root)
                yield result
        else:
            yield Skipped(root, "no such file or folder")


def content_hash(data: bytes) -> str:
    """Content fingerprint of a file's bytes (BLAKE2b-128, hex)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def under(path: str, folder: str) -> bool:
    """True when ``path`` is ``folder`` itself or inside it."""
    folder = folder.rstrip(os.sep) or os.sep
    return path == folder or path.startswith(folder + os.sep) or folder == os.sep


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"



__all__ = ["FileEntry", "Skipped", "walk", "content_hash", "under", "abspath", "human_bytes",
           "image_extensions", "is_hidden"]
