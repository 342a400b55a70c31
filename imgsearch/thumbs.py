"""Thumbnails of library images, made once and cached under the library home, named by image id and content
hash (a changed photo gets a new one). Only the path the library recorded is read: nothing a user types (or
puts in a URL) can name a file to read. A home that cannot be written (read-only media, a library the user may
only read) gets its thumbnails in a private temporary folder instead, removed when the program ends.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import stat
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import images, owned
from .config import Settings, atomic_file
from .errors import DataError, DecodeError, ImgSearchError, UsageError
from .store import ImageRow, Store

THUMB = 256  # grid tiles
PREVIEW = 1024  # detail view
SIZES = (THUMB, PREVIEW)  # a fixed set, so the cache cannot be grown by asking for odd sizes
SPARE_KIND = "thumbnails"
_spare: dict[str, Path] = {}  # thumbs_dir -> this process's folder of thumbnails for a home it cannot write
_spare_lock = threading.Lock()  # making a spare folder; its marker's read-modify-write


def parse_id(raw: object) -> int:
    """A library image id from user input ('12', 12); anything else is a UsageError."""
    if isinstance(raw, bool):
        raise UsageError(f"not an image id: {raw!r}")
    if isinstance(raw, int):
        value = raw
    else:
        text = str(raw).strip()
        if not text.isdigit() or not text.isascii():
            raise UsageError(f"not an image id: {str(raw)[:40]!r} (ids are whole numbers)")
        value = int(text)
    if value < 1 or value >= 2 ** 63:
        raise UsageError(f"not an image id: {raw!r}")
    return value


def cache_path(settings: Settings, row: ImageRow, size: int) -> Path:
    """Where the thumbnail of ``row`` at ``size`` lives (id and hash only; no part of the image path)."""
    digest = row.hash if row.hash.isascii() and row.hash.isalnum() else "x"  # always hex when we wrote it
    return settings.thumbs_dir / str(size) / f"{row.id % 256:02x}" / f"{row.id}-{digest}.jpg"


def _spare_path(settings: Settings, row: ImageRow, size: int, make: bool = False) -> Path | None:
    """Where this process keeps the thumbnail of ``row`` when the home's cache cannot be written: a private
    (0700) temporary folder made on first need and removed at exit by owned.remove, which unlinks only the files
    recorded there as written here. None when there is no such folder and ``make`` is False."""
    with _spare_lock:
        folder = _spare.get(str(settings.thumbs_dir))
        if folder is None and make:
            folder, token = Path(tempfile.mkdtemp(prefix="imgsearch-thumbs-")), owned.new_token()
            owned.start_marker(folder, SPARE_KIND, token)
            atexit.register(owned.remove, folder, SPARE_KIND, token)
            _spare[str(settings.thumbs_dir)] = folder
    return None if folder is None else folder / f"{size}-{cache_path(settings, row, size).name}"


def _render(row: ImageRow, size: int, max_pixels: int):
    try:
        im, _ = images.open_image(row.path, draft_size=size, max_pixels=max_pixels)
    except DecodeError as e:
        if not os.path.exists(row.path):
            raise DataError(f"{row.path} is no longer on disk; re-run `imgsearch index` on its folder") from None
        raise DataError(f"cannot make a thumbnail of {row.path}: {e}") from None
    im.thumbnail((size, size))
    return im


def _save(im, dest: Path) -> None:
    with atomic_file(dest) as f:
        im.save(f, "JPEG", quality=85, optimize=True)


def _drop_stale(dest: Path, image_id: int) -> None:
    """Remove thumbnails of older contents of the same image (same id, other hash): only plain files named
    as cache_path() names them; anything else in the folder was not written here and stays."""
    own_name = re.compile(rf"{image_id}-(?:[0-9a-f]+|x)\.jpg")
    with contextlib.suppress(OSError):  # a leftover file costs disk space, nothing else
        for old in dest.parent.iterdir():
            if old != dest and own_name.fullmatch(old.name) and old.is_file() and not old.is_symlink():
                old.unlink(missing_ok=True)


def _usable(path: Path) -> bool:
    """Whether a thumbnail imgsearch wrote is cached at ``path`` (False: none, or a damaged one, made again over
    it). Anything else there (a link to a file of the user's, a folder) is a DataError and stays as it is."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"{path} is not a thumbnail imgsearch wrote (a link or a folder); remove it")
        with open(path, "rb") as f:  # a JPEG; not one left empty by a power cut before it reached the disk
            return f.read(3) == b"\xff\xd8\xff"
    except FileNotFoundError:
        return False
    except OSError as e:
        raise DataError(f"cannot read the thumbnail {path}: {e.strerror or e}") from None


def library_image(store: Store, image_id: object) -> ImageRow:
    """The library's record of image ``image_id`` (path, size, dimensions, date taken), or a UsageError."""
    image_id = parse_id(image_id)
    row = store.get_images([image_id]).get(image_id)
    if row is None:
        raise UsageError(f"image id {image_id} is not in the library")
    return row


def thumbnails(settings: Settings, ids, size: int = THUMB, store: Store | None = None,
               workers: int = 4) -> dict[int, Path | ImgSearchError]:
    """Thumbnails for many library images at once: {id: path, or the error that image gave}. Missing ones
    are made in parallel threads (decoding releases the GIL), so a fresh grid fills fast."""
    if size not in SIZES:
        raise UsageError(f"thumbnail size must be one of {', '.join(map(str, SIZES))}")
    wanted = [parse_id(i) for i in ids]  # before opening anything
    own = contextlib.closing(Store(settings.db_path, create=False)) if store is None else contextlib.nullcontext(store)
    with own as store:
        rows = store.get_images(wanted)
    out: dict[int, Path | ImgSearchError] = {}
    todo: list[ImageRow] = []
    for i in wanted:
        row = rows.get(i)
        if row is None:
            out[i] = UsageError(f"image id {i} is not in the library")
            continue
        try:
            cached = cache_path(settings, row, size)
            if not _usable(cached):
                cached = _spare_path(settings, row, size)
            if cached is not None and _usable(cached):
                out[i] = cached
            else:
                todo.append(row)
        except DataError as e:
            out[i] = e

    def make(row: ImageRow) -> Path | ImgSearchError:
        dest = cache_path(settings, row, size)
        try:
            im = _render(row, size, settings.max_pixels)
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                _save(im, dest)
            except OSError:  # read-only media, a home the user may only read: this process's spare cache
                _save(im, dest := _spare_path(settings, row, size, make=True))
                with _spare_lock:
                    owned.record(dest.parent, dest.name)
                return dest
        except ImgSearchError as e:
            return e
        except OSError as e:  # not even a temporary folder could be written
            return DataError(f"cannot write a thumbnail under {settings.thumbs_dir}: {e.strerror or e}")
        _drop_stale(dest, row.id)
        return dest

    with ThreadPoolExecutor(max(1, min(workers, len(todo))), thread_name_prefix="thumbs") as pool:
        out.update(zip([row.id for row in todo], pool.map(make, todo)))
    return out


def thumbnail(settings: Settings, image_id: object, size: int = THUMB, store: Store | None = None) -> Path:
    """Path of a cached JPEG thumbnail (longest side ``size``) of library image ``image_id``, made on first
    use. UsageError for a malformed or unknown id or size, DataError when the file is gone or unreadable."""
    made = thumbnails(settings, [image_id], size, store, workers=1)[parse_id(image_id)]
    if isinstance(made, ImgSearchError):
        raise made
    return made
