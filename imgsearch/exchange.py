"""Export a library's vectors and metadata in formats other tools read, and import such exports back.

Two forms, both streamed a chunk at a time: ``parquet`` (``part-NNNNN.parquet``, a row per image with its
vector as ``fixed_size_list<float32>[dim]``, the model in every file's schema metadata) and ``clip-retrieval``
(``img_emb/img_emb_{i}.npy`` float32 unit rows beside ``metadata/metadata_{i}.parquet`` with ``image_path``
in the same order, what autofaiss and clip-retrieval index). ``_imgsearch_export.json``, written last, marks
a finished export (the underscore keeps pyarrow.dataset from reading it). An export is built in a temporary
folder marked as imgsearch's (owned.py), so a failed one is removed file by file, nothing else touched.

Import trusts nothing it reads: the model must be the library's (fingerprint, dimension); a bad row is
skipped and counted; a path must name a regular image file of the exported size, and by default of the
exported content (``trust`` takes the exported hash and judges the file by its name, as the walk does).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import stat
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import albums, files, formats, owned
from .config import VERSION, Settings, read_json
from .encoder import known_fingerprint
from .errors import DataError, ModelMismatchError, UsageError
from .geo import stored_time
from .lock import write_lock
from .modelspec import ModelSpec
from .pathtext import display

FORMATS = ("parquet", "clip-retrieval")
MANIFEST = "_imgsearch_export.json"
FORMAT_VERSION = 1
META_KEY = b"imgsearch"
CHUNK = 10_000  # rows read from SQLite and written per step on export
IMPORT_CHUNK = 2_000  # rows per import transaction: hashing the files is the slow part
SHARD_ROWS = 1_000_000
PARTIAL = ".partial"  # a data file still being written
EXPORT_KIND, PART_KIND, TEMP_KIND = "export", "export-part", "export-temp"
TEMP_PREFIX = ".imgsearch-export-"
SUBFOLDERS = ("img_emb", "metadata")
MAX_PATH_BYTES = 4096  # PATH_MAX on Linux: a longer name is not a path anything here can open
MAX_SIDE = 1 << 20  # pixels per side: far beyond any photo, far below what overflows a product
MAX_SIZE = 1 << 50  # bytes
WANTED = ("path", "image_path", "path_raw", "hash", "size", "width", "height", "taken_at",  # what import reads
          "taken_utc", "taken_offset", "taken_source", "gps_lat", "gps_lon", "camera_make", "camera_model")
HASH = re.compile(r"[0-9a-f]{32}")  # files.hash_file's BLAKE2b-128 in hex
EXAMPLES = 10  # problems kept by name in an ImportReport; the rest are counted

ProgressFn = Callable[[int, int], None]


@dataclass
class ExportReport:
    folder: str
    format: str
    model: str
    dim: int
    rows: int = 0
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "seconds": round(self.seconds, 3)}


@dataclass
class ImportReport:
    folder: str
    format: str
    model: str
    rows: int = 0  # rows in the export
    added: int = 0  # new library images, with their vectors
    vectors_added: int = 0  # images already in the library that got this model's vector
    already: int = 0  # image and vector already there (a second import adds nothing)
    unreachable: list[str] = field(default_factory=list)  # paths with no file here
    changed: list[tuple[str, str]] = field(default_factory=list)  # (path, why) skipped: not what was exported
    not_images: list[tuple[str, str]] = field(default_factory=list)  # (path, why): no image file imgsearch reads
    invalid: int = 0  # rows skipped for a bad value (vector, path, size, width, height)
    invalid_examples: list[str] = field(default_factory=list)  # "row N: why", the first few
    albums: int = 0  # albums of the export added (those whose name was free here)
    seconds: float = 0.0

    def bad_row(self, row: int, why: str) -> None:
        self.invalid += 1
        if len(self.invalid_examples) < EXAMPLES:
            self.invalid_examples.append(f"row {row + 1}: {why}")

    def as_dict(self) -> dict:
        def examples(pairs):
            return [{"path": p, "reason": r} for p, r in pairs[:EXAMPLES]]

        return {"folder": self.folder, "format": self.format, "model": self.model, "rows": self.rows,
                "added": self.added, "vectors_added": self.vectors_added, "already": self.already,
                "unreachable": len(self.unreachable), "unreachable_examples": self.unreachable[:EXAMPLES],
                "changed": len(self.changed), "changed_examples": examples(self.changed),
                "not_images": len(self.not_images), "not_images_examples": examples(self.not_images),
                "invalid": self.invalid, "invalid_examples": self.invalid_examples, "albums": self.albums,
                "seconds": round(self.seconds, 3)}


def _arrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError("export and import need pyarrow; install it with `pip install 'imgsearch[exchange]'`"
                         ) from None
    return pa, pq


# --- which model -------------------------------------------------------------------------------------
def pick_model(store, settings: Settings, model: str | None = None):
    """The model row whose vectors to export: the one named, the only one, or the settings' model."""
    present = [m for m in store.models() if m.vectors]
    if not present:
        raise ModelMismatchError("the library holds no vectors to export; run `imgsearch index PATH` first")
    listed = ", ".join(f"[{m.id}] {m.label}" for m in present)
    if model:
        want = ModelSpec(model).canonical().name
        found = [m for m in present if model in (m.name, m.label, f"[{m.id}]", str(m.id)) or want == m.name]
        if len(found) == 1:
            return found[0]
        if not found:
            raise ModelMismatchError(f"the library has no vectors for {model} (it has: {listed}); "
                                     "give --model one of those names or ids")
        raise UsageError(f"--model {model} matches {len(found)} models ({listed}); give the id in brackets")
    if len(present) == 1:
        return present[0]
    spec = ModelSpec(settings.model, settings.pretrained).canonical()
    current = [m for m in present if m.name == spec.name and (m.pretrained or None) == spec.pretrained]
    if len(current) == 1:
        return current[0]
    raise UsageError(f"the library holds vectors of {len(present)} models ({listed}); choose one with "
                     "`imgsearch export DIR --model NAME-OR-ID`")


# --- export --------------------------------------------------------------------------------------------
def _npy_header(rows: int, dim: int) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (rows, dim)})
    return buf.getvalue()


def _meta_columns(pa, rows, path_col: str) -> dict:
    shown = [display(r.path) for r in rows]
    return {
        path_col: pa.array(shown, pa.string()),
        # A non-UTF-8 name is shown as \xNN; its exact bytes are kept beside it.
        "path_raw": pa.array([None if s == r.path else os.fsencode(r.path) for s, r in zip(shown, rows)],
                             pa.binary()),
        **{name: pa.array([getattr(r, name) for r in rows], getattr(pa, kind)()) for name, kind in (
            ("id", "int64"), ("hash", "string"), ("size", "int64"), ("mtime_ns", "int64"), ("width", "int32"),
            ("height", "int32"), ("taken_at", "string"), ("taken_utc", "string"), ("taken_offset", "string"),
            ("taken_source", "string"), ("gps_lat", "float64"), ("gps_lon", "float64"), ("camera_make", "string"),
            ("camera_model", "string"), ("added_at", "float64"))},
    }


def _unit(vecs: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; rows already unit length (as the library stores them) kept bit for bit."""
    norms = np.linalg.norm(vecs.astype(np.float64), axis=1)  # a float32 length can overflow (then stored as zeros)
    off = np.abs(norms - 1.0) > 1e-4
    if not off.any():
        return vecs
    vecs = vecs.copy()
    fix = off & (norms > 0)
    vecs[fix] /= norms[fix, None]
    return vecs


class _ShardWriter:
    """Writes rows into shard files in the temporary folder; each finished file is recorded as imgsearch's.
    A .npy header is rewritten with the final count: numpy pads a version 1.0 header to a multiple of 64
    bytes, so the rewrite never moves the data."""

    def __init__(self, pa, pq, tmp: Path, fmt: str, dim: int, model: dict, shard_rows: int):
        self.pa, self.pq, self.tmp, self.dim, self.shard_rows = pa, pq, tmp, dim, shard_rows
        self.clip = fmt == "clip-retrieval"
        self.path_col = "image_path" if self.clip else "path"
        fields = [pa.field(k, v.type) for k, v in _meta_columns(pa, [], self.path_col).items()]
        if not self.clip:
            fields.append(pa.field("vector", pa.list_(pa.float32(), dim)))
        meta = {META_KEY: json.dumps({"format_version": FORMAT_VERSION, "model": model}).encode()}
        self.schema = pa.schema(fields, metadata=meta)
        self.shard, self.in_shard = -1, 0
        self.writer = self.npy = None
        self.files: list[str] = []  # relative to the export folder, in order

    def _names(self) -> list[str]:
        if self.clip:
            return [f"img_emb/img_emb_{self.shard}.npy", f"metadata/metadata_{self.shard}.parquet"]
        return [f"part-{self.shard:05d}.parquet"]

    def _open_shard(self) -> None:
        self.shard, self.in_shard = self.shard + 1, 0
        *emb, meta = self._names()
        if emb:
            self.npy = open(str(self.tmp / emb[0]) + PARTIAL, "wb")
            self.npy.write(_npy_header(0, self.dim))
        self.writer = self.pq.ParquetWriter(str(self.tmp / meta) + PARTIAL, self.schema)

    def add(self, rows, vecs: np.ndarray) -> None:
        pa, i = self.pa, 0
        while i < len(rows):
            if self.writer is None or self.in_shard >= self.shard_rows:
                self._finish_shard()
                self._open_shard()
            take = min(len(rows) - i, self.shard_rows - self.in_shard)
            cols = _meta_columns(pa, rows[i:i + take], self.path_col)
            if self.npy:
                self.npy.write(np.ascontiguousarray(vecs[i:i + take], dtype="<f4").tobytes())
            else:
                flat = pa.array(np.ascontiguousarray(vecs[i:i + take], dtype=np.float32).reshape(-1), pa.float32())
                cols["vector"] = pa.FixedSizeListArray.from_arrays(flat, self.dim)
            self.writer.write_table(pa.table(cols, schema=self.schema))
            self.in_shard += take
            i += take

    def _finish_shard(self) -> None:
        if self.writer is None:
            return
        if self.npy:
            header = _npy_header(self.in_shard, self.dim)
            if len(header) != len(_npy_header(0, self.dim)):  # would need ~10^50 rows; never write a broken file
                raise RuntimeError(f"npy header grew to {len(header)} bytes")
            self.npy.seek(0)
            self.npy.write(header)
            self.npy.close()
        self.writer.close()
        self.writer = self.npy = None
        for rel in self._names():  # each finished ``.partial`` file renamed and recorded in its folder's marker
            path = self.tmp / rel
            os.replace(str(path) + PARTIAL, path)
            owned.record(path.parent, path.name)
            self.files.append(rel)

    def close(self) -> list[str]:
        if self.shard < 0:  # an empty export still has one (empty) shard, so readers find the layout
            self._open_shard()
        self._finish_shard()
        return self.files


def _remove_temp(tmp: Path, target: Path, token: str | None) -> str | None:
    """Remove an export's temporary folder (its data subfolders first); None when gone, else why it stays."""
    def transient(folder: Path) -> tuple[str, ...]:
        return tuple(n for n in os.listdir(folder) if n.endswith(PARTIAL))

    for sub in SUBFOLDERS:
        part = tmp / sub
        if part.exists() or part.is_symlink():
            why = owned.remove(part, PART_KIND, token, where=target / sub,
                               transient=transient(part) if part.is_dir() and not part.is_symlink() else ())
            if why is not None:
                return f"{part}: {why}"
    if not tmp.is_dir() or tmp.is_symlink():
        return f"{tmp}: it is not a plain folder"
    why = owned.remove(tmp, TEMP_KIND, token, transient=transient(tmp))
    return None if why is None else f"{tmp}: {why}"


def _unpublish(target: Path, token: str | None) -> str | None:
    """Take back a publish that did not finish (``target`` has imgsearch's export marker but no manifest): the
    data moved in, then the marker; the folder stays. None when done or when there is nothing to take back."""
    info = owned.read_marker(target)
    if info is None or info.get("kind") != EXPORT_KIND or (target / MANIFEST).exists():
        return None
    token = token or info.get("token")
    for sub in SUBFOLDERS:
        if os.path.lexists(target / sub) and (why := owned.remove(target / sub, PART_KIND, token)) is not None:
            return f"{target / sub}: {why}"
    if (why := owned.why_not_ours(target, EXPORT_KIND, token)) is not None:
        return f"{target}: {why}"
    for name in [*info["files"], owned.MARKER]:
        (target / name).unlink(missing_ok=True)
    return None


def prepare_target(target: Path) -> bool:
    """Make sure ``target`` may receive an export; True when this call created it."""
    if target.is_symlink():  # never written through: a link can be swapped for another while the export runs
        raise UsageError(f"{target} is a symbolic link; give the folder it points to ({os.path.realpath(target)}), "
                         "or a new or empty folder")
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target} exists and is not a folder; give a new or empty folder for the export")
    if not target.exists():
        try:
            target.mkdir(parents=True)
        except OSError as e:
            raise UsageError(f"cannot create {target} ({e.strerror or e}); give a folder you can write to") from None
        return True
    # The temporary folder of an export that was killed: removed only when provably imgsearch's own.
    for name in sorted(os.listdir(target)):
        if name.startswith(TEMP_PREFIX) and name.endswith(".tmp"):
            why = _remove_temp(target / name, target, None)
            if why is not None:
                raise UsageError(f"{target} holds an unfinished export that imgsearch cannot prove it wrote "
                                 f"({why}); remove it yourself or export into another folder")
    if (why := _unpublish(target, None)) is not None:  # killed while moving its files into place
        raise UsageError(f"{target} holds an unfinished export that imgsearch cannot prove it wrote ({why}); "
                         "remove it yourself or export into another folder")
    if names := sorted(os.listdir(target)):
        listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        what = "an earlier export" if (target / MANIFEST).exists() else f"files ({listed})"
        raise UsageError(f"{target} is not empty: it holds {what}; export into a new or empty folder "
                         "(imgsearch never writes over files it did not create)")
    return False


def _appeared(path) -> UsageError:
    return UsageError(f"{path} appeared while the export was being written; export into another folder")


def _move_new(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``, which must not exist: a file that appeared there meanwhile is never replaced."""
    appeared = _appeared(dst)
    if not src.is_dir():
        try:
            os.link(src, dst, follow_symlinks=False)  # fails if dst exists, unlike rename; a link stays a link
        except FileExistsError:
            raise appeared from None
        except OSError:  # a file system without hard links: check, then rename
            pass
        else:
            os.unlink(src)
            return
    if os.path.lexists(dst):
        raise appeared
    os.rename(src, dst)


def _publish(tmp: Path, target: Path, names: list[str], token: str) -> None:
    """Move the finished export from its temporary folder into ``target``; the manifest, if any, goes last."""
    top = sorted({n.split("/")[0] for n in names}, key=lambda n: (n == MANIFEST, n))
    try:
        owned.start_marker(target, EXPORT_KIND, token)
    except FileExistsError as e:
        raise _appeared(e.filename) from None
    # Recorded before they move: killed in between, a file in target is still provably ours.
    owned.record(target, *[n for n in top if n not in SUBFOLDERS], source=tmp)
    for name in top:
        _move_new(tmp / name, target / name)
    why = _remove_temp(tmp, target, token)
    if why is not None:  # harmless leftovers of our own; say so rather than fail a complete export
        warnings.warn(f"export finished but its temporary folder stayed: {why}", stacklevel=2)


def export_library(settings: Settings, store, folder: str | os.PathLike, fmt: str = "parquet", *,
                   model: str | None = None, progress: ProgressFn | None = None, chunk: int = CHUNK,
                   shard_rows: int = SHARD_ROWS) -> ExportReport:
    """Write one model's vectors and image metadata into ``folder`` (new or empty) as ``fmt``; the manifest
    also carries the library's albums (their saved searches and pins by path)."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt}: choose parquet or clip-retrieval")
    pa, pq = _arrow()
    t0 = time.perf_counter()
    row = pick_model(store, settings, model)
    info = {"name": row.name, "pretrained": row.pretrained, "fingerprint": row.fingerprint, "dim": row.dim,
            "label": row.label}
    total = store.vector_count(row.id)
    with _export_into(folder) as (target, tmp, token):
        report = ExportReport(str(target), fmt, row.label, row.dim)
        if fmt == "clip-retrieval":
            for sub in SUBFOLDERS:
                os.mkdir(tmp / sub)
                owned.start_marker(tmp / sub, PART_KIND, token, where=target / sub)
        writer = _ShardWriter(pa, pq, tmp, fmt, row.dim, info, shard_rows)
        if progress:
            progress(0, total)
        for rows, vecs in store.iter_image_vectors(row.id, chunk):
            writer.add(rows, _unit(vecs))
            report.rows += len(rows)
            if progress:
                progress(report.rows, max(total, report.rows))
        report.files = writer.close()
        manifest = {"imgsearch_export": FORMAT_VERSION, "format": fmt, "model": info, "rows": report.rows,
                    "files": report.files, "library_id": store.library_id, "imgsearch": VERSION,
                    "created_at": time.time(), "albums": albums.dump(store)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        owned.record(tmp, MANIFEST)
        _publish(tmp, target, report.files + [MANIFEST], token)
    report.seconds = time.perf_counter() - t0
    return report


@contextlib.contextmanager
def _export_into(folder: str | os.PathLike) -> Iterator[tuple[Path, Path, str]]:
    """(target, temporary folder, token) of an export into ``folder``, a new or empty folder (what a killed export
    left there, provably imgsearch's, is taken back first). The block writes into the temporary folder and
    publishes; when it fails, what it wrote goes, moved files included, and the target when this call made it."""
    target = Path(os.path.abspath(os.path.expanduser(os.fspath(folder))))
    created = prepare_target(target)
    token = owned.new_token()
    tmp = target / f"{TEMP_PREFIX}{token[:12]}.tmp"
    try:
        try:
            owned.create_dir(tmp, TEMP_KIND, token)
        except OSError as e:
            raise UsageError(f"cannot write into {target} ({e.strerror or e}); give a folder you can write to"
                             ) from None
        yield target, tmp, token
    except BaseException:
        if tmp.exists():
            _remove_temp(tmp, target, token)
        _unpublish(target, token)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(target)  # made by this call; rmdir keeps it if anything else is inside
        raise


def export_album(album: albums.Album, folder: str | os.PathLike, link: bool = False) -> list[str]:
    """The album's photos into ``folder``, a new or empty folder, copied (modification times kept) or symlinked; a
    name taken twice gets " (2)". Made as `export` is (temporary folder, then published), so an export that fails
    or is killed is taken back (by the next export into that folder); never overwrites. The paths written."""
    import shutil

    names: list[str] = []
    taken: set[str] = set()
    with _export_into(folder) as (target, tmp, token):
        longest = 255  # bytes in a file name, ours (the PARTIAL suffix, " (2)") included
        with contextlib.suppress(OSError, ValueError):
            longest = os.pathconf(tmp, "PC_NAME_MAX")
        for h in album.hits:
            stem, ext = os.path.splitext(os.path.basename(h.path))
            n = 1
            while True:
                name = f"{stem} ({n}){ext}" if n > 1 else stem + ext
                if len(os.fsencode(name + PARTIAL)) > longest and stem:
                    stem = stem[:-1]  # a name near the limit loses its end rather than fail the export
                elif name.lower() in taken:  # case-blind: the folder may be on a case-insensitive disk
                    n += 1
                else:
                    break
            taken.add(name.lower())
            part = tmp / (name + PARTIAL)  # until the marker names it
            try:
                if link:
                    os.symlink(h.path, part)
                else:
                    with open(h.path, "rb") as src, open(part, "xb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                    st = os.stat(h.path)
                    os.utime(part, ns=(st.st_atime_ns, st.st_mtime_ns))
            except OSError as e:
                raise UsageError(f"cannot export {h.path} to {target / name}: {e.strerror or e}"
                                 f"{'; try --copy' if link else ''}; nothing was left in {target}") from None
            names.append(name)
        owned.record(tmp, *names, suffix=PARTIAL)
        for name in names:
            os.replace(tmp / (name + PARTIAL), tmp / name)
        _publish(tmp, target, names, token)
        os.unlink(target / owned.MARKER)  # finished: the folder and the photos are the user's now
    return [str(target / name) for name in names]


# --- reading an export --------------------------------------------------------------------------------
@dataclass
class _Source:
    folder: Path
    format: str
    dim: int
    rows: int
    model: dict | None
    shards: list  # parquet: [parquet path]; clip-retrieval: [(npy path, metadata path)]
    albums: list = field(default_factory=list)  # from the manifest (albums.dump)


def _shard_no(path: Path) -> int:
    m = re.search(r"_(\d+)$", path.stem)
    return int(m.group(1)) if m else -1


def _npy_open(path: Path):
    """(open file positioned at the data, rows, dim, dtype) of a 2-D .npy, read without loading it."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror or e})") from None
    try:
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0(f))
    except (ValueError, OSError) as e:
        f.close()
        raise DataError(f"{path} is not a readable .npy file ({e})") from None
    if len(shape) != 2 or fortran or dtype.kind != "f":
        f.close()
        raise DataError(f"{path} holds a {dtype} array of shape {shape}; expected float rows x dim (C order)")
    return f, int(shape[0]), int(shape[1]), dtype


@contextlib.contextmanager
def _readable(pa, path: Path):
    """What reading ``path`` raises when it is cut short or damaged, as a DataError naming it (ValueError: text
    or names that are not UTF-8, which parquet readers do not check)."""
    try:
        yield
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{path} cannot be read ({' '.join(str(e).split())}); the export is damaged") from None


def _checked_model(model, where: Path) -> dict | None:
    """An export's record of the model that made it (None: it names none); a DataError when it is garbled."""
    if model is None or (isinstance(model, dict) and isinstance(model.get("fingerprint"), str)
                         and type(model.get("dim")) is int and model["dim"] > 0
                         and all(isinstance(model.get(k), (str, type(None))) for k in ("name", "pretrained", "label"))):
        return model
    raise DataError(f"{where}: its record of the model that made the vectors is damaged; export again")


def _file_model(pq, path: Path) -> dict | None:
    meta = pq.read_schema(path).metadata or {}
    try:
        info = read_json(meta[META_KEY]) if META_KEY in meta else None
    except ValueError:
        return None
    return _checked_model(info.get("model") if isinstance(info, dict) else None, path)


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte, pos, value, shift = buf[pos], pos + 1, value | (buf[pos] & 0x7F) << shift, shift + 7
        if not byte & 0x80:
            return value, pos
        if shift > 70:
            raise ValueError("varint too long")


def _skip(buf, pos: int, kind: int) -> int:
    """Past one Thrift compact value of type ``kind`` (a bool is in its field header, or a byte in a list)."""
    if kind in (1, 2):
        return pos
    if kind in (3, 7):
        return pos + (1 if kind == 3 else 8)
    if kind in (4, 5, 6):
        return _varint(buf, pos)[1]
    if kind == 8:
        n, pos = _varint(buf, pos)
        return pos + n
    if kind in (9, 10, 11):
        if kind == 11:
            n, pos = _varint(buf, pos)
            kinds, pos = ((buf[pos] >> 4, buf[pos] & 0x0F), pos + 1) if n else ((), pos)
        else:
            n, kinds, pos = buf[pos] >> 4, (buf[pos] & 0x0F,), pos + 1
            if n == 15:
                n, pos = _varint(buf, pos)
        for _ in range(n):
            for k in kinds:
                pos = pos + 1 if k in (1, 2) else _skip(buf, pos, k)
        return pos
    if kind == 12:
        return _fields(buf, pos)[1]
    raise ValueError(f"Thrift type {kind}")


def _fields(buf, pos: int) -> tuple[dict, int]:
    """A Thrift compact struct's top-level i32 fields (id -> value), and the position past it."""
    fields, fid = {}, 0
    while head := buf[pos]:
        pos, kind = pos + 1, head & 0x0F
        if head >> 4:
            fid += head >> 4
        else:
            fid, pos = _varint(buf, pos)
            fid = (fid >> 1) ^ -(fid & 1)
        if kind == 5:
            value, pos = _varint(buf, pos)
            fields[fid] = (value >> 1) ^ -(value & 1)
        else:
            pos = _skip(buf, pos, kind)
    return fields, pos + 1


def _pages_unpack_to(buf, start: int, length: int) -> int:
    """What a column chunk's pages unpack to by their own headers (Thrift PageHeader: 2 = uncompressed size, 3 =
    compressed size): what the reader allocates, whatever the chunk's metadata claims."""
    pos, end, total = start, start + length, 0
    while pos < end:
        header, pos = _fields(buf, pos)
        unpacked, packed = header.get(2, -1), header.get(3, -1)
        if unpacked < 0 or packed < 0:
            raise ValueError("a page header without its sizes")
        total, pos = total + unpacked, pos + packed
    return total


def _sizes_fit(pq, path: Path, dim: int) -> None:
    """Refuse a parquet file whose columns that import reads unpack to more than their values can hold (a path
    is at most MAX_PATH_BYTES, a vector ``dim`` float64s), as each page's header says, before any page is read:
    zstd makes a 1.5 GB path of one letter 50 KB, and reading it took 6 GB."""
    import mmap

    meta = pq.ParquetFile(path).metadata
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                column = group.column(c)
                name = column.path_in_schema.split(".")[0]
                per_row = MAX_PATH_BYTES + 64 if name in WANTED else 8 * dim + 64 if name == "vector" else None
                if per_row is None:
                    continue
                start = column.dictionary_page_offset if column.has_dictionary_page and \
                    column.dictionary_page_offset else column.data_page_offset
                try:
                    size = max(column.total_uncompressed_size,
                               _pages_unpack_to(buf, start, column.total_compressed_size))
                except (IndexError, ValueError, RecursionError):
                    raise DataError(f"{path.name}: the pages of its {name} column cannot be read; the export is "
                                    "damaged") from None
                if size > per_row * group.num_rows + (1 << 20):
                    raise DataError(f"{path.name}: its {name} column unpacks to {size >> 20} MB for "
                                    f"{group.num_rows} rows, more than such values can hold; the export is damaged "
                                    "or was made to exhaust memory")


def open_export(folder: str | os.PathLike) -> _Source:
    """What an export folder holds (format, model, size), checked before anything is imported."""
    pa, pq = _arrow()
    root = Path(os.path.abspath(os.path.expanduser(os.fspath(folder))))
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder; give the folder `imgsearch export` (or clip-retrieval) wrote")
    manifest = None
    if (root / MANIFEST).is_file():
        try:
            manifest = read_json((root / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"{root / MANIFEST} is unreadable ({e}); export again") from None
    elif any(n.startswith(TEMP_PREFIX) for n in os.listdir(root)):
        raise DataError(f"{root} holds an unfinished export (it was interrupted); export again")
    listed = manifest.get("files") if isinstance(manifest, dict) and isinstance(manifest.get("files"), list) else []
    if missing := [n for n in listed if isinstance(n, str) and not (root / n).is_file()]:  # a copy cut short
        raise DataError(f"{root / missing[0]} is missing ({len(missing)} of the {len(listed)} files the export lists "
                        "are); the export is incomplete: copy it again, or export again")
    pieces = []  # (shard, the parquet file that names its model, rows, dim)
    if (root / "img_emb").is_dir():
        fmt = "clip-retrieval"
        npys = sorted((root / "img_emb").glob("*.npy"), key=_shard_no)
        metas = {_shard_no(p): p for p in (root / "metadata").glob("*.parquet")}  # none when it is not a folder
        if not npys:
            raise DataError(f"{root / 'img_emb'} holds no .npy files; nothing to import")
        for npy in npys:
            meta = metas.get(_shard_no(npy))
            if meta is None:
                raise DataError(f"{npy.name} has no matching metadata/metadata_{_shard_no(npy)}.parquet "
                                "(it names the images); the export is incomplete")
            f, n, d, dtype = _npy_open(npy)
            with f:
                if os.fstat(f.fileno()).st_size < f.tell() + n * d * dtype.itemsize:
                    raise DataError(f"{npy} ends early; the export is damaged")
            with _readable(pa, meta):
                pf = pq.ParquetFile(meta)
            if "image_path" not in pf.schema_arrow.names:
                raise DataError(f"{meta} has no image_path column; it cannot say which image a vector is")
            meta_rows = pf.metadata.num_rows
            if meta_rows != n:
                raise DataError(f"{meta.name} names {meta_rows} images but {npy.name} holds {n} vectors; "
                                "the export is damaged")
            pieces.append(((npy, meta), meta, n, d))
    else:
        fmt = "parquet"
        parts = sorted(p for p in root.glob("*.parquet") if not p.name.startswith((".", "_")))
        if not parts:
            raise DataError(f"{root} is not an export: expected img_emb/ and metadata/ (clip-retrieval) or "
                            ".parquet files with a vector column (`imgsearch export --format parquet`)")
        for part in parts:
            with _readable(pa, part):
                pf = pq.ParquetFile(part)
            schema = pf.schema_arrow
            if "vector" not in schema.names or not any(c in schema.names for c in ("path", "image_path")):
                raise DataError(f"{part.name} has no vector and path columns; it is not an imgsearch parquet export")
            vtype = schema.field("vector").type
            if not pa.types.is_fixed_size_list(vtype) or not pa.types.is_floating(vtype.value_type):
                raise DataError(f"{part.name}: its vector column is {vtype}, expected fixed_size_list<float32>")
            pieces.append((part, part, pf.metadata.num_rows, vtype.list_size))
    dim = pieces[0][3]
    for _, path, _, _ in pieces:
        with _readable(pa, path):
            _sizes_fit(pq, path, dim)
    model = _checked_model(manifest.get("model") if isinstance(manifest, dict) else None, root / MANIFEST)
    for shard, path, _, d in pieces:
        if d != dim:
            name = (shard[0] if fmt == "clip-retrieval" else shard).name
            raise DataError(f"{name} holds {d}-dimensional vectors, the others {dim}; the export is damaged")
        m = _file_model(pq, path)
        if m is None:
            continue
        if model is None:
            model = m
        elif (model.get("fingerprint"), int(model.get("dim", 0))) != (m.get("fingerprint"), int(m.get("dim", 0))):
            raise ModelMismatchError(f"{root} mixes vectors of two models ({model.get('label')} and, in "
                                     f"{path.name}, {m.get('label')}); import each model's export separately")
    if model is not None and int(model.get("dim", -1)) != dim:
        raise DataError(f"{root}: the export says its model makes {model.get('dim')}-dimensional vectors but the "
                        f"files hold {dim}-dimensional ones; the export is damaged")
    return _Source(root, fmt, int(dim), sum(p[2] for p in pieces), model, [p[0] for p in pieces],
                   manifest.get("albums") or [] if isinstance(manifest, dict) else [])


def _whole(value, name: str, low: int, high: int) -> int | None:
    """An exported count as an int in [low, high] (None when absent); ValueError saying why otherwise."""
    if value is None or (isinstance(value, float) and value != value):  # NaN: how pandas writes "absent"
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{name} {value!r:.40} is not a whole number from {low} to {high}")
    return value


def _when_where(taken, utc, offset, source, lat, lon, make, model) -> dict:
    """An exported row's when/where columns, each kept only in the form the indexer writes it, else None
    (without a taken_source, the next `imgsearch index` of its folder reads them from the file)."""
    gps = all(type(v) is float and -limit <= v <= limit for v, limit in ((lat, 90), (lon, 180)))
    taken = stored_time(taken)
    return {"taken_at": taken, "taken_utc": stored_time(utc),
            "taken_source": source if taken and source in ("exif", "file") else None,
            "taken_offset": offset if isinstance(offset, str) and re.fullmatch(r"[+-]\d\d:\d\d", offset) else None,
            "gps_lat": lat if gps else None, "gps_lon": lon if gps else None,
            **{k: isinstance(v, str) and v.isprintable() and v[:64] or None
               for k, v in (("camera_make", make), ("camera_model", model))}}


def _record(path, raw, digest, size, width, height, *when_where) -> dict:
    """One exported row's metadata checked by type and range; ValueError saying what is wrong."""
    if raw is not None:
        if not isinstance(raw, bytes):
            raise ValueError(f"path_raw is {type(raw).__name__}, not bytes")
        path = os.fsdecode(raw)
    if not isinstance(path, str) or not path:
        raise ValueError("its path is missing" if path in (None, "") else f"its path is {type(path).__name__}, "
                                                                             "not text")
    if "\0" in path:
        raise ValueError("its path holds a NUL character")
    if len(os.fsencode(path)) > MAX_PATH_BYTES:
        raise ValueError(f"its path is longer than {MAX_PATH_BYTES} bytes")
    return {"path": path, "size": _whole(size, "size", 0, MAX_SIZE), "width": _whole(width, "width", 1, MAX_SIDE),
            "height": _whole(height, "height", 1, MAX_SIDE),
            "hash": digest if isinstance(digest, str) and HASH.fullmatch(digest) else None,  # else: read the file
            **_when_where(*when_where)}


def _float32(values: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf, and its row is refused
        return np.asarray(values, dtype=np.float32)


def _iter_rows(src: _Source, chunk: int) -> Iterator[tuple[list[dict | str], np.ndarray]]:
    """(rows, float32 vectors) a chunk at a time, in file order. A row is {path, size, hash, width, height,
    taken_at}, checked, or the text saying why it is unusable; a null vector comes back as NaN."""
    pa, pq = _arrow()
    wanted = WANTED

    def records(batch) -> list[dict | str]:
        cols = {name: batch.column(name).to_pylist() for name in wanted if name in batch.schema.names}
        absent = [None] * batch.num_rows
        paths = cols["path"] if "path" in cols else cols["image_path"]
        out: list[dict | str] = []
        for values in zip(paths, *(cols.get(c, absent) for c in wanted[2:])):
            try:
                out.append(_record(*values))
            except ValueError as e:
                out.append(str(e))
        return out

    if src.format == "parquet":
        for part in src.shards:
            with _readable(pa, part):
                pf = pq.ParquetFile(part)
                cols = [c for c in (*wanted, "vector") if c in pf.schema_arrow.names]
                for batch in pf.iter_batches(batch_size=chunk, columns=cols):
                    vec = batch.column("vector")
                    # .values, not .flatten(): flatten drops null rows and would shift every vector after one.
                    flat = vec.values.slice(vec.offset * src.dim, len(vec) * src.dim).to_numpy(zero_copy_only=False)
                    vecs = _float32(flat).reshape(len(vec), src.dim)
                    if vec.null_count:
                        vecs = np.where(vec.is_null().to_numpy(zero_copy_only=False)[:, None], np.nan, vecs)
                    yield records(batch), vecs
        return
    for npy, meta in src.shards:
        f, n, dim, dtype = _npy_open(npy)
        with f, _readable(pa, meta):
            pf = pq.ParquetFile(meta)
            cols = [c for c in wanted if c in pf.schema_arrow.names]
            for batch in pf.iter_batches(batch_size=chunk, columns=cols):
                k = batch.num_rows
                data = f.read(k * dim * dtype.itemsize)
                if len(data) != k * dim * dtype.itemsize:
                    raise DataError(f"{npy} ends early; the export is damaged")
                yield records(batch), _float32(np.frombuffer(data, dtype=dtype)).reshape(k, dim)


# --- import --------------------------------------------------------------------------------------------
def _target_identity(settings: Settings, src: _Source, assume_model: bool, encoder: Callable | None, open_store):
    """(ModelSpec, fingerprint, dim) the imported vectors are stored under, after checking they fit."""
    spec = ModelSpec(settings.model, settings.pretrained).canonical()
    exp = src.model
    if exp is None and not assume_model:
        raise UsageError(f"{src.folder} does not say which model made its vectors; name it: "
                         f"`imgsearch --model NAME [--pretrained TAG] import {src.folder}`")
    fp = known_fingerprint(spec)  # a tag, or the hash of the weights file: no model load
    if fp is None and encoder is not None:  # hf-hub: the hub cache knows which weights it is
        fp = encoder().fingerprint
    if exp is not None:
        if fp != exp.get("fingerprint"):
            how = f"--model {exp.get('name')}" + (f" --pretrained {exp['pretrained']}" if exp.get("pretrained")
                                                   else "")
            raise ModelMismatchError(
                f"{src.folder} holds vectors of {exp.get('label') or exp.get('name')} "
                f"(weights {exp.get('fingerprint')}), not of {spec.label} (weights {fp}); models never mix in a "
                f"library: import with the model that made them (`imgsearch {how} import {src.folder}`)")
        dim = int(exp["dim"])
    else:
        row = open_store().find_model(spec.name, spec.pretrained, fp) if fp and settings.db_path.exists() else None
        dim = row.dim if row else None
        if dim is None or fp is None:
            enc = encoder() if encoder else None
            if enc is None:
                raise UsageError(f"cannot tell which vectors {spec.label} makes without loading it")
            fp, dim = enc.fingerprint, enc.dim
    if dim != src.dim:
        raise ModelMismatchError(f"{src.folder} holds {src.dim}-dimensional vectors but {spec.label} makes "
                                 f"{dim}-dimensional ones; models never mix in a library: import with the model "
                                 "that made them")
    return spec, fp, dim


def _check_file(rec: dict, folder: Path, trust: bool, heic: bool
                ) -> tuple[str, str | None, os.stat_result | None, str | tuple[str, str] | None]:
    """(library path, content hash, stat, why skipped) for one exported image, checked against the disk;
    ``why`` is None (import it), "unreachable", or (the ImportReport list it goes to, the reason)."""
    path = os.path.realpath(os.path.join(folder, rec["path"]))  # a relative path is the export's, not the cwd's
    digest = rec["hash"] if trust else None
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):  # never opened: opening a device or a FIFO can block or act
            return path, None, None, ("not_images", "not a regular file")
        if digest:  # trusted: judged by its name as the walk does (the first bytes only if the name says nothing)
            is_image = files.is_image_file(path, heic)
        else:
            with os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
                st = os.fstat(f.fileno())  # the file opened, not whatever the path named a moment ago
                kind = formats.sniff(f.read(formats.HEAD_BYTES)) if stat.S_ISREG(st.st_mode) else "other"
                if kind is None and formats.kind_by_extension(path) == "raw":
                    kind = "raw"  # libraw reads RAW formats whose signature sniff does not know (CRW, MRW, X3F)
                is_image = kind in ("image", "raw") or (kind == "heic" and heic)
                if is_image and rec["size"] in (None, st.st_size):
                    f.seek(0)
                    digest = files.hash_file(f)
    except OSError as e:
        gone = isinstance(e, (FileNotFoundError, NotADirectoryError))
        return path, None, None, "unreachable" if gone else ("changed", f"cannot read: {e.strerror or e}")
    if not is_image:
        return path, None, st, ("not_images", "not an image file imgsearch reads")
    if rec["size"] is not None and rec["size"] != st.st_size:
        return path, None, st, ("changed", f"size is {st.st_size} bytes, the export says {rec['size']}")
    if rec["hash"] and digest != rec["hash"]:
        return path, None, st, ("changed", "content differs from the exported image")
    return path, digest, st, None


def import_library(settings: Settings, folder: str | os.PathLike, *, trust: bool = False,
                   assume_model: bool = False, encoder: Callable | None = None, open_store: Callable = None,
                   progress: ProgressFn | None = None, chunk: int = IMPORT_CHUNK, wait: bool = True) -> ImportReport:
    """Insert an export's images (those whose files are here) and their vectors into the library.
    ``trust``: take the exported content hashes instead of reading every file (size is still checked).
    ``assume_model``: the export does not name its model and the settings' model is the one that made it.
    ``encoder``: returns the loaded encoder, called only when the model's fingerprint or dimension needs it.
    ``open_store``: returns the library's Store, creating the library when there is none (the Library's)."""
    t0 = time.perf_counter()
    src = open_export(folder)
    spec, fp, dim = _target_identity(settings, src, assume_model, encoder, open_store)
    report = ImportReport(str(src.folder), src.format, spec.label, rows=src.rows)
    with write_lock(settings.home, wait=wait):
        store = open_store()
        model = store.get_or_create_model(spec.name, spec.pretrained, fp, dim)
        done = 0
        if progress:
            progress(0, src.rows)
        heic = files.heic_supported()
        with ThreadPoolExecutor(max_workers=settings.decode_workers()) as pool:
            for recs, vecs in _iter_rows(src, chunk):
                usable = np.isfinite(vecs).all(axis=1) & vecs.any(axis=1)
                keep = []
                for k, rec in enumerate(recs):
                    if isinstance(rec, str) or not usable[k]:
                        report.bad_row(done + k, rec if isinstance(rec, str)
                                       else "its vector is missing, all zeros or not finite")
                    else:
                        keep.append(k)
                checked = list(pool.map(lambda k: _check_file(recs[k], src.folder, trust, heic), keep))
                _import_chunk(store, model.id, [recs[k] for k in keep], vecs[keep], checked, report)
                done += len(recs)
                if progress:
                    progress(done, src.rows)
        report.albums = albums.restore(store, src.albums)
    report.seconds = time.perf_counter() - t0
    return report


def _import_chunk(store, model_id: int, recs: list[dict], vecs: np.ndarray, checked: list, report: ImportReport):
    ok = []
    for k, (path, digest, st, why) in enumerate(checked):
        if why is None:
            ok.append(k)
        elif why == "unreachable":
            report.unreachable.append(display(path))
        else:
            getattr(report, why[0]).append((display(path), why[1]))
    if not ok:
        return
    existing = store.images_at(checked[k][0] for k in ok)
    with_vec = store.image_ids_with_vectors(model_id, (r.id for r in existing.values()))
    unit = _unit(vecs[ok])
    new, vectors, seen = [], [], set()
    for j, k in enumerate(ok):
        path, digest, st, _ = checked[k]
        if path in seen:  # the same file twice in one export: the first row wins
            report.already += 1
            continue
        seen.add(path)
        row = existing.get(path)
        if row is not None:
            if row.hash != digest:
                report.changed.append((display(path), "the library holds other content for this path; "
                                                      "run `imgsearch index` on it"))
            elif row.id in with_vec:
                report.already += 1
            else:
                vectors.append((row.id, unit[j]))
                report.vectors_added += 1
            continue
        rec = recs[k]
        new.append({**rec, "path": path, "size": st.st_size, "mtime_ns": files.mtime_ns(st), "hash": digest})
        vectors.append((path, unit[j]))
        report.added += 1
    if new or vectors:
        store.write_batch(model_id, new=new, vectors=vectors)
