"""The SQLite library (images, models, vectors, failures, runs): all SQL lives here, but the schema
(migrations.py, applied on open). SQLite is the source of truth, vectors included; FAISS files are caches.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import sqlite3
import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .errors import LibraryError, disk_full_message
from .pathtext import display as _shown


@dataclass(frozen=True)
class ImageRow:
    id: int
    path: str
    size: int
    mtime_ns: int
    hash: str
    width: int | None = None
    height: int | None = None
    taken_at: str | None = None
    added_at: float | None = None
    taken_utc: str | None = None
    taken_offset: str | None = None
    taken_source: str | None = None  # 'exif' | 'file' (the file's mtime) | None (indexed before schema 5)
    gps_lat: float | None = None
    gps_lon: float | None = None
    camera_make: str | None = None
    camera_model: str | None = None

    def meta(self) -> dict:
        """The when/where columns, as ImageInfo.meta() gives them (a copy of a file carries them over)."""
        return {k: getattr(self, k) for k in META_COLUMNS}

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


@dataclass(frozen=True)
class ModelRow:
    id: int
    name: str
    pretrained: str | None
    fingerprint: str
    dim: int
    version: int
    vectors: int = 0

    @property
    def label(self) -> str:
        return f"{self.name} ({self.pretrained})" if self.pretrained else self.name


# When/where columns (migration 5), in the order _IMAGE_COLS reads them after added_at.
META_COLUMNS = ("taken_at", "taken_utc", "taken_offset", "taken_source", "gps_lat", "gps_lon", "camera_make",
                "camera_model")
# What an index run writes about a file's content (its path, folder and name come from _path_params).
_CONTENT = ("size", "mtime_ns", "hash", "width", "height", *META_COLUMNS)


def _set(columns) -> str:
    return ", ".join(f"{c} = :{c}" for c in columns)


def meta_filter_sql(f) -> tuple[str, dict]:
    """SQL selecting (id, lat, lon, make, model) of a geo.MetaFilter's candidates, narrowed with the indexes
    (time ranges, a lat/lon box around --near); geo.MetaFilter.keeps makes the exact decision on them."""
    where: list[str] = []
    params: dict = {}

    def bind(value) -> str:
        params[f"p{len(params)}"] = value
        return f":p{len(params) - 1}"

    for bound, op in ((f.after, ">="), (f.before, "<")):
        if bound is not None:
            where.append(f"{bound.column} {op} {bind(bound.value)}")
    if f.near is not None:
        (lat0, lat1), lon_ranges = f.near.box()  # no lon ranges: the circle reaches a pole
        where.append(f"gps_lat BETWEEN {bind(lat0)} AND {bind(lat1)}")
        boxes = [f"gps_lon BETWEEN {bind(a)} AND {bind(b)}" for a, b in lon_ranges or ()]
        where.append("(" + " OR ".join(boxes) + ")" if boxes else "gps_lon IS NOT NULL")
    if f.camera is not None:
        where.append("(camera_make IS NOT NULL OR camera_model IS NOT NULL)")
    return ("SELECT id, gps_lat, gps_lon, camera_make, camera_model FROM images"
            + (" WHERE " + " AND ".join(where) if where else "")), params


def vector_to_blob(v: np.ndarray) -> bytes:
    return np.ascontiguousarray(v, dtype="<f4").tobytes()


def _matrix(blobs: list[bytes], dim: int, ids: Sequence[int] = ()) -> np.ndarray:
    """Stacked float32 vectors from their SQLite blobs ([0, dim] when there are none); a blob of another length
    (a damaged library) is a LibraryError, never read as a vector (nor as the start of the next one)."""
    if not blobs:
        return np.zeros((0, dim), dtype=np.float32)
    wrong = np.fromiter(map(len, blobs), np.int64, len(blobs)) != 4 * dim
    if dim and wrong.any():
        k = int(np.argmax(wrong))
        raise LibraryError(f"the stored vector of image {ids[k] if ids else '?'} is damaged ({len(blobs[k])} bytes, "
                           f"not {4 * dim}); run `imgsearch index` on your photo folders to make it again")
    return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), -1).astype(np.float32, copy=False)


def _ids_and_matrix(rows: Iterable[tuple[int, bytes]], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [N], vectors float32 [N, dim]) from (image_id, blob) rows, streamed (no list of rows)."""
    ids, blobs = [], []
    for i, b in rows:
        ids.append(i)
        blobs.append(b)
    return np.asarray(ids, dtype=np.int64), _matrix(blobs, dim, ids)


def _chunks(seq: Sequence, n: int = 500) -> Iterator[Sequence]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


@functools.lru_cache(maxsize=256)
def _sql(statement: str):
    """The SQLAlchemy statement (SQLAlchemy is imported on first use: importing this module stays cheap)."""
    from sqlalchemy import text

    return text(statement)


def _in(statement: str, values: Sequence, params: dict) -> tuple[str, dict]:
    """``statement`` with its ``IN :ids`` over ``values``, one named placeholder each (never spliced into SQL)."""
    names = [f"ids_{i}" for i in range(len(values))]
    placeholders = "(" + ", ".join(f":{n}" for n in names) + ")"
    return statement.replace(":ids", placeholders), {**params, **dict(zip(names, values))}


@dataclass
class _Writer:
    """A SQLAlchemy connection in a transaction; ``execute`` takes statement text (a list: executemany)."""

    conn: object

    def execute(self, statement, params=None):
        return self.conn.execute(_sql(statement) if isinstance(statement, str) else statement, params)

    def execute_in(self, statement: str, ids: Iterable[int], **params) -> None:
        """``statement`` with its ``IN :ids`` over ``ids``, 500 at a time."""
        for part in _chunks([int(i) for i in ids]):
            self.execute(*_in(statement, part, params))


def _under(root: str) -> tuple[str, dict]:
    """A WHERE condition and its parameters for the paths at or below ``root`` (a file or a folder)."""
    root = root.rstrip(os.sep) or os.sep
    if root == os.sep:
        return "1", {}
    # A byte range, not LIKE (which ignores ASCII case: /p/cats took in /p/Cats, and `index /p/cats` then
    # removed /p/Cats's images): the paths below root start with root + sep and sort before the byte after sep.
    # Text and BLOB paths (_bind) compare only with their own kind, so each kind gets its range.
    low = os.fsencode(root + os.sep)
    high = low[:-1] + bytes([low[-1] + 1])
    params = {"p": _bind(root), "blo": low, "bhi": high}
    with contextlib.suppress(UnicodeDecodeError):  # a non-UTF-8 root holds no text paths
        params.update(lo=low.decode(), hi=high.decode())
    text = " OR (path >= :lo AND path < :hi)" if "lo" in params else ""
    return f"(path = :p OR (path >= :blo AND path < :bhi){text})", params


def _album_key(name: str) -> str:
    """What album names are compared by: case folded in every script, composed accents made one character."""
    return unicodedata.normalize("NFC", name.casefold())


def _bind(path: str) -> str | bytes:
    """A path as SQLite stores it: text, or raw bytes (a BLOB) for a name that is not valid UTF-8 (surrogate
    escapes, which SQLite text cannot hold). The bytes round-trip exactly through os.fsdecode, and a BLOB never
    equals a text value, so an escaped name cannot collide with a real one."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path)


def _unbind(value: str | bytes) -> str:
    return os.fsdecode(value) if isinstance(value, bytes) else value


def _image(r) -> ImageRow:
    return ImageRow(r[0], _unbind(r[1]), *r[2:])


def _model(r) -> ModelRow:
    return ModelRow(r[0], r[1], r[2] or None, *r[3:])  # pretrained is stored as '' when there is none


class Store:
    """One open library database. Cheap to open; safe to share between threads (the server and UI rely on it).

    Each method checks a connection out of a pool for its own duration, so no SQLite connection is used by two
    threads at once (``check_same_thread=False`` lets a pooled one move between them): reads use sqlite3
    connections (``_idle``), writes SQLAlchemy's engine, made by the first write. SQLite serialises writers
    (WAL, 30 s busy timeout); each write method is one transaction, and a read sees every committed one.
    """

    def __init__(self, db_path: str | os.PathLike, *, create: bool = True, read_only: bool | None = None):
        self.path = Path(db_path)
        if not self.path.exists():
            if not create:
                raise LibraryError(f"no library at {self.path.parent}; run `imgsearch index PATH` first "
                                   "(or pass --home to point at an existing library)")
            from .config import make_home

            try:
                make_home(self.path.parent)
                # Made here before SQLite would make it 0644; its -wal and -shm files copy this mode.
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            except OSError as e:
                raise LibraryError(f"cannot create library folder {self.path.parent}: {e.strerror or e}") from None
        # A library on read-only media or without write permission still answers queries. SQLite writes the
        # file, and its folder for the WAL and journal files.
        writable = os.access(self.path, os.W_OK) and os.access(self.path.parent, os.W_OK)
        self.read_only = not writable if read_only is None else read_only
        self._library_id: str | None = None
        self._engine = None
        self._engine_lock = threading.RLock()
        self._idle: queue.SimpleQueue = queue.SimpleQueue()  # read connections between calls
        from .migrations import SCHEMA_VERSION

        # Reads go straight to SQLite; SQLAlchemy (a fifth of a cold query's start) is loaded by the first write,
        # or now when the schema must be created or upgraded (or SQLite alone cannot read its version).
        schema = None
        with contextlib.suppress(sqlite3.Error, LibraryError):
            schema = self.schema_version
        if schema != SCHEMA_VERSION:
            self.engine
        if create:
            self._mark_home()

    @property
    def engine(self):
        """The SQLAlchemy engine for writes (and migrations), made on first use."""
        with self._engine_lock:
            if self._engine is None:
                from sqlalchemy import create_engine, event

                # hide_parameters: an error must never carry the statement's values (vector blobs) to the user.
                engine = create_engine(f"sqlite:///{self.path}", future=True, hide_parameters=True,
                                       **({"creator": self._connect_read_only} if self.read_only else {}))

                @event.listens_for(engine, "connect")
                def _pragmas(dbapi_conn, _record):
                    dbapi_conn.execute("PRAGMA busy_timeout = 30000")
                    if not self.read_only:
                        dbapi_conn.execute("PRAGMA journal_mode = WAL")
                        dbapi_conn.execute("PRAGMA synchronous = NORMAL")
                    dbapi_conn.execute("PRAGMA foreign_keys = ON")

                @event.listens_for(engine, "handle_error")
                def _translate(context):
                    if (better := _library_error(self, context.original_exception)) is not None:
                        raise better

                self._engine = engine
                try:
                    self._migrate()
                except BaseException:
                    self._engine = None
                    engine.dispose()
                    raise
            return self._engine

    @contextlib.contextmanager
    def _read(self):
        """A read connection (sqlite3, WAL: it sees every committed write) for one call, then back to ``_idle``."""
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            try:
                conn = self._connect_read_only() if self.read_only else \
                    sqlite3.connect(str(self.path), timeout=30, check_same_thread=False)
                conn.execute("PRAGMA busy_timeout = 30000")
            except sqlite3.Error as e:
                raise _open_error(self.path, e) from None
        try:
            yield conn
        except sqlite3.Error as e:
            if (better := _library_error(self, e)) is not None:
                raise better from None
            raise
        finally:
            self._idle.put(conn)

    def _mark_home(self) -> None:
        """Leave the marker by which `index` recognises (and skips) this folder as a library home."""
        from .config import HOME_MARKER

        marker = self.path.parent / HOME_MARKER
        if marker.exists():
            return
        with contextlib.suppress(OSError):  # read-only home: it is still recognised as the current home by identity
            marker.write_text("This folder is an imgsearch library home (library.db, index/, thumbs/).\n"
                              "`imgsearch index` never indexes a folder holding this file and a library.db.\n",
                              encoding="utf-8")

    def _connect_read_only(self):
        """A read-only connection; ``immutable`` when SQLite cannot create the WAL index file beside it."""
        from urllib.parse import quote

        uri = "file:" + quote(str(self.path.resolve()))
        try:
            conn = sqlite3.connect(uri + "?mode=ro", uri=True, check_same_thread=False)
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.OperationalError as e:
            if _code(e) != SQLITE_CANTOPEN:
                raise
        wal = Path(str(self.path) + "-wal")
        if wal.exists() and wal.stat().st_size > 0:
            # Committed data still sits in the WAL; immutable would silently ignore it.
            raise LibraryError(f"library {self.path.parent} is read-only and its last writes are still in "
                               f"{wal.name}; open it once where it is writable (or copy the folder somewhere "
                               "writable) to query it")
        return sqlite3.connect(uri + "?immutable=1", uri=True, check_same_thread=False)

    # --- schema and small helpers --------------------------------------------------------------
    def _migrate(self) -> None:
        import sqlalchemy as sa

        from .migrations import migrate

        try:
            migrate(self.engine, self.path, read_only=self.read_only)
        except sa.exc.DatabaseError as e:
            raise _open_error(self.path, e) from None

    @property
    def library_id(self) -> str:
        """This database's random identity (made when it was created): caches record which library built them."""
        if self._library_id is None:
            self._library_id = self.get_meta("library_id") or ""
        return self._library_id

    def get_meta(self, key: str) -> str | None:
        """A library_meta value (small per-library facts, e.g. a model's relevance floor)."""
        value = self.scalar("SELECT value FROM library_meta WHERE key = :k", k=key)
        return None if value is None else str(value)

    def set_meta(self, key: str, value: str) -> None:
        self._write("INSERT OR REPLACE INTO library_meta (key, value) VALUES (:k, :v)",
                    {"k": key, "v": value})

    @property
    def schema_version(self) -> int:
        return self.scalar("SELECT max(version) FROM schema_migrations") or 0

    @contextlib.contextmanager
    def begin(self):
        """One write transaction (SQLAlchemy); its ``execute`` takes the statement text as reads do."""
        with self.engine.begin() as c:
            yield _Writer(c)

    def _write(self, sql: str, params=None):
        """One statement as its own transaction (a list of parameter dicts: executemany)."""
        with self.begin() as c:
            return c.execute(sql, params)

    def scalar(self, sql: str, **params):
        with self._read() as c:
            row = c.execute(sql, params).fetchone()
            return None if row is None else row[0]

    def rows(self, sql: str, **params) -> list:
        with self._read() as c:
            return c.execute(sql, params).fetchall()

    def _rows_in(self, sql: str, values: Iterable, **params) -> Iterator:
        """The rows of ``sql`` with its ``IN :ids`` over ``values``, 500 at a time."""
        for part in _chunks(list(values)):
            with self._read() as c:
                rows = c.execute(*_in(sql, part, params)).fetchall()
            yield from rows

    def _stream(self, sql: str, **params) -> Iterator:
        """The rows of ``sql`` as SQLite hands them over, without a list of them all."""
        with self._read() as c:
            yield from c.execute(sql, params)

    def _pages(self, sql: str, batch: int, **params) -> Iterator[list]:
        """``sql`` (rows after image id ``:l``, ``LIMIT :n``, id first) a page at a time: a short read per
        page, so memory stays at one page and a writer is never held up for long."""
        rows = self.rows(sql, **params, l=-1, n=batch)
        while rows:
            yield rows
            rows = self.rows(sql, **params, l=rows[-1][0], n=batch)

    def _dim(self, model_id: int) -> int:
        return int(self.scalar("SELECT dim FROM models WHERE id = :i", i=model_id) or 0)

    def close(self) -> None:
        with self._engine_lock:
            if self._engine is not None:
                self._engine.dispose()
        with contextlib.suppress(queue.Empty):
            while True:
                self._idle.get_nowait().close()

    # --- models ------------------------------------------------------------------------------
    _MODEL_COLS = "id, name, pretrained, fingerprint, dim, version"

    def get_or_create_model(self, name: str, pretrained: str | None, fingerprint: str, dim: int) -> ModelRow:
        self._write("INSERT OR IGNORE INTO models (name, pretrained, fingerprint, dim, created_at) "
                    "VALUES (:n, :p, :f, :d, :t)",
                    {"n": name, "p": pretrained or "", "f": fingerprint, "d": dim, "t": time.time()})
        row = self.find_model(name, pretrained, fingerprint)
        if row.dim != dim:
            raise LibraryError(f"model {row.label} is recorded with dimension {row.dim} but loads with {dim}")
        return row

    def _model_where(self, where: str, **params) -> ModelRow | None:
        r = self.rows(f"SELECT {self._MODEL_COLS} FROM models WHERE {where}", **params)
        return _model(r[0]) if r else None

    def find_model(self, name: str, pretrained: str | None, fingerprint: str) -> ModelRow | None:
        return self._model_where("name = :n AND pretrained = :p AND fingerprint = :f",
                                 n=name, p=pretrained or "", f=fingerprint)

    def model_by_id(self, model_id: int) -> ModelRow | None:
        return self._model_where("id = :i", i=model_id)

    def models(self) -> list[ModelRow]:
        """Every model with its vector count."""
        rows = self.rows(f"SELECT {self._MODEL_COLS}, (SELECT count(*) FROM vectors v "
                         "WHERE v.model_id = m.id) FROM models m ORDER BY m.id")
        return [_model(r) for r in rows]

    def model_version(self, model_id: int) -> int:
        return int(self.scalar("SELECT version FROM models WHERE id = :i", i=model_id) or 0)

    def library_version(self) -> int:
        """The sum of every model's version: moves with any image or vector change (watchers, other runs)."""
        return int(self.scalar("SELECT coalesce(sum(version), 0) FROM models") or 0)

    # --- images ------------------------------------------------------------------------------
    _IMAGE_COLS = ("id, path, size, mtime_ns, hash, width, height, taken_at, added_at, "
                   + ", ".join(META_COLUMNS[1:]))

    def images_under(self, roots: Iterable[str]) -> dict[str, ImageRow]:
        """Every library image at or below each root (files or folders), keyed by path."""
        out: dict[str, ImageRow] = {}
        for root in roots:
            where, params = _under(root)
            out.update((row.path, row) for row in map(_image, self.rows(
                f"SELECT {self._IMAGE_COLS} FROM images WHERE {where}", **params)))
        return out

    def image_ids_with_vectors(self, model_id: int, ids: Iterable[int]) -> set[int]:
        """Those of ``ids`` with a sound vector of this model (a damaged one is made again by the next index)."""
        return {r[0] for r in self._rows_in("SELECT image_id FROM vectors WHERE model_id = :m AND length(vector) = "
                                            ":n AND image_id IN :ids", map(int, ids), m=model_id,
                                            n=4 * self._dim(model_id))}

    def images_by_hash(self, hashes: Iterable[str]) -> dict[str, list[ImageRow]]:
        out: dict[str, list[ImageRow]] = {}
        for r in self._rows_in(f"SELECT {self._IMAGE_COLS} FROM images WHERE hash IN :ids", set(hashes)):
            out.setdefault(r[4], []).append(_image(r))
        return out

    def get_images(self, ids: Iterable[int]) -> dict[int, ImageRow]:
        rows = self._rows_in(f"SELECT {self._IMAGE_COLS} FROM images WHERE id IN :ids", map(int, ids))
        return {r[0]: _image(r) for r in rows}

    def image_by_path(self, path: str) -> ImageRow | None:
        return self.images_at([path]).get(path)

    def images_at(self, paths: Iterable[str]) -> dict[str, ImageRow]:
        """The library rows at exactly these paths, keyed by path."""
        return {row.path: row for row in map(_image, self._rows_in(
            f"SELECT {self._IMAGE_COLS} FROM images WHERE path IN :ids", map(_bind, paths)))}

    def image_hashes(self) -> set[str]:
        """Every content hash in the library (new files matching one may be moves or copies)."""
        return {r[0] for r in self.rows("SELECT DISTINCT hash FROM images")}

    def ids_under(self, folder: str) -> np.ndarray:
        where, params = _under(folder)
        return np.fromiter((r[0] for r in self.rows(f"SELECT id FROM images WHERE {where}", **params)),
                           dtype=np.int64)

    def image_count(self) -> int:
        return int(self.scalar("SELECT count(*) FROM images") or 0)

    def ids_matching(self, f) -> np.ndarray:
        """Sorted ids of the images a geo.MetaFilter (dates, place, camera) lets through."""
        sql, params = meta_filter_sql(f)
        return np.array(sorted(r[0] for r in self.rows(sql, **params) if f.keeps(*r[1:])), dtype=np.int64)

    def when_where_summary(self) -> dict:
        """Date range and how the dates were found, GPS and camera counts (for `status`)."""
        r = self.rows("SELECT min(taken_at), max(taken_at), count(CASE WHEN taken_source = 'exif' THEN 1 END), "
                      "count(CASE WHEN taken_source = 'file' THEN 1 END), count(gps_lat), "
                      "count(CASE WHEN camera_make IS NOT NULL OR camera_model IS NOT NULL THEN 1 END), "
                      "count(CASE WHEN taken_source IS NULL THEN 1 END) FROM images")[0]
        return dict(zip(("taken_first", "taken_last", "taken_exif", "taken_file", "with_gps", "with_camera",
                         "without_meta"), r))

    # --- writes (each call is one transaction) -------------------------------------------------
    def write_batch(self, model_id: int, *, new: Sequence[dict] = (), updated: Sequence[dict] = (),
                    moved: Sequence[tuple[int, str, int, int]] = (), touched: Sequence[tuple[int, int, int]] = (),
                    vectors: Sequence[tuple[int | str, np.ndarray]] = (), cleared_failures: Sequence[str] = (),
                    failures: Sequence[tuple[str, str, int | None, int | None]] = (),
                    meta: Sequence[dict] = ()) -> dict[str, int]:
        """Apply one batch of indexing results atomically; returns {path: id} for new images.

        new: dicts with 'path' and the _CONTENT columns; updated: the same plus 'id' (content changed: other
        models' vectors are dropped as stale). moved: (id, new_path, size, mtime_ns). touched: (id, size,
        mtime_ns) for same-content files. vectors: (image id or path of a new image, vector) for this model.
        meta: dicts with 'id' and META_COLUMNS (when/where backfill; vectors and caches are unaffected).
        """
        now = time.time()
        ids: dict[str, int] = {}
        cols = ("path", "folder", "name", *_CONTENT)
        insert = (f"INSERT INTO images ({', '.join(cols)}, added_at, updated_at) "
                  f"VALUES ({', '.join(':' + k for k in cols)}, :now, :now)")
        with self.begin() as c:
            for img in new:
                res = c.execute(insert, {**_image_params(img), "now": now})
                ids[img["path"]] = res.lastrowid
            if updated:
                c.execute(f"UPDATE images SET {_set(_CONTENT)}, updated_at = :now WHERE id = :id",
                          [{**_image_params(img), "id": img["id"], "now": now} for img in updated])
                c.execute("DELETE FROM vectors WHERE model_id != :m AND image_id = :id",
                          [{"m": model_id, "id": img["id"]} for img in updated])
            if moved:
                c.execute("DELETE FROM images WHERE path = :path AND id != :id",
                          [{"id": i, "path": _bind(p)} for i, p, _, _ in moved])
                c.execute("UPDATE images SET path = :path, folder = :folder, name = :name, size = :size, "
                          "mtime_ns = :mtime_ns, updated_at = :now WHERE id = :id",
                          [{**_path_params(p), "id": i, "size": s, "mtime_ns": m, "now": now}
                           for i, p, s, m in moved])
            if touched:
                c.execute("UPDATE images SET size = :s, mtime_ns = :m WHERE id = :id",
                          [{"id": i, "s": s, "m": m} for i, s, m in touched])
            if vectors:
                c.execute("INSERT OR REPLACE INTO vectors (model_id, image_id, vector, seq) VALUES "
                          "(:m, :i, :v, (SELECT version FROM models WHERE id = :m) + 1)",
                          [{"m": model_id, "i": ids[k] if isinstance(k, str) else int(k), "v": vector_to_blob(v)}
                           for k, v in vectors])
            if meta:
                c.execute(f"UPDATE images SET width = coalesce(:width, width), height = coalesce(:height, "
                          f"height), {_set(META_COLUMNS)} WHERE id = :id",
                          [{"id": m["id"], **{k: m.get(k) for k in ("width", "height", *META_COLUMNS)}} for m in meta])
            if cleared_failures:
                c.execute("DELETE FROM failures WHERE path = :p", [{"p": _bind(p)} for p in cleared_failures])
            if failures:
                c.execute("INSERT OR REPLACE INTO failures (path, reason, size, mtime_ns, at) "
                          "VALUES (:p, :r, :s, :m, :t)",
                          [{"p": _bind(p), "r": r, "s": s, "m": m, "t": now} for p, r, s, m in failures])
            if new or updated or moved or vectors:
                c.execute("UPDATE models SET version = version + 1 WHERE id = :m", {"m": model_id})
            if updated:  # other models lost vectors for these images
                c.execute("UPDATE models SET version = version + 1 WHERE id != :m", {"m": model_id})
        return ids

    def delete_images(self, ids: Iterable[int]) -> int:
        """Remove images (and all their vectors, tags, captions) from the library."""
        ids = [int(i) for i in ids]
        if not ids:
            return 0
        with self.begin() as c:
            c.execute_in("DELETE FROM images WHERE id IN :ids", ids)
            c.execute("UPDATE models SET version = version + 1")
        return len(ids)

    def delete_failures_under(self, roots: Iterable[str], keep: set[str] | None = None) -> None:
        """Forget failure records under ``roots`` except paths in ``keep`` (the ones that still fail)."""
        keep = keep or set()
        with self.begin() as c:
            for root in roots:
                where, params = _under(root)
                rows = c.execute(f"SELECT path FROM failures WHERE {where}", params)
                gone = [r[0] for r in rows if _unbind(r[0]) not in keep]
                if gone:
                    c.execute("DELETE FROM failures WHERE path = :p", [{"p": p} for p in gone])

    def failures(self, limit: int | None = None) -> list[tuple[str, str]]:
        sql = "SELECT path, reason FROM failures ORDER BY path" + (f" LIMIT {int(limit)}" if limit else "")
        return [(_shown(_unbind(r[0])), r[1]) for r in self.rows(sql)]

    def failures_of(self, paths: Iterable[str]) -> dict[str, tuple[str, int | None, int | None]]:
        """{path: (reason, size, mtime_ns)} for those of ``paths`` that failed before."""
        return {_unbind(r[0]): tuple(r[1:]) for r in self._rows_in(
            "SELECT path, reason, size, mtime_ns FROM failures WHERE path IN :ids", map(_bind, paths))}

    def failure_count(self) -> int:
        return int(self.scalar("SELECT count(*) FROM failures") or 0)

    # --- vectors -----------------------------------------------------------------------------
    def vector_count(self, model_id: int) -> int:
        return int(self.scalar("SELECT count(*) FROM vectors WHERE model_id = :m", m=model_id) or 0)

    def load_vectors(self, model_id: int, ids: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [N], vectors float32 [N, dim]) for a model; all of them or the given ids."""
        if ids is None:
            rows = self._stream("SELECT image_id, vector FROM vectors WHERE model_id = :m ORDER BY image_id",
                                m=model_id)
        else:
            rows = self._rows_in("SELECT image_id, vector FROM vectors WHERE model_id = :m "
                                 "AND image_id IN :ids", map(int, ids), m=model_id)
        return _ids_and_matrix(rows, self._dim(model_id))

    def vector_ids(self, model_id: int) -> np.ndarray:
        """Every image id that has a vector for this model, ascending."""
        rows = self._stream("SELECT image_id FROM vectors WHERE model_id = :m ORDER BY image_id", m=model_id)
        return np.fromiter((r[0] for r in rows), dtype=np.int64)  # no list of 10M row tuples

    def iter_vectors(self, model_id: int, batch: int = 50_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All of a model's (ids, vectors), ``batch`` rows at a time in id order (bounded memory)."""
        dim = self._dim(model_id)
        for rows in self._pages("SELECT image_id, vector FROM vectors WHERE model_id = :m AND image_id > :l "
                                "ORDER BY image_id LIMIT :n", batch, m=model_id):
            yield _ids_and_matrix(rows, dim)

    def iter_image_vectors(self, model_id: int, batch: int = 10_000) -> Iterator[tuple[list[ImageRow], np.ndarray]]:
        """A model's images with their vectors, ``batch`` rows per query in id order: (rows, float32 [n, dim])
        (exports read through this)."""
        dim = self._dim(model_id)
        cols = ", ".join(f"i.{c.strip()}" for c in self._IMAGE_COLS.split(","))
        for rows in self._pages(f"SELECT {cols}, v.vector FROM vectors v JOIN images i ON i.id = v.image_id "
                                "WHERE v.model_id = :m AND v.image_id > :l ORDER BY v.image_id LIMIT :n",
                                batch, m=model_id):
            yield [_image(r[:-1]) for r in rows], _matrix([r[-1] for r in rows], dim, [r[0] for r in rows])

    def vector_changes(self, model_id: int, since_version: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(upserted ids, their vectors, deleted ids) for a model since ``since_version`` (cache deltas)."""
        since = {"m": model_id, "v": since_version}
        ids, vecs = _ids_and_matrix(self._stream("SELECT image_id, vector FROM vectors WHERE model_id = :m "
                                                 "AND seq > :v", **since), self._dim(model_id))
        deleted = [r[0] for r in self.rows("SELECT DISTINCT image_id FROM vector_deletions "
                                           "WHERE model_id = :m AND seq > :v", **since)]
        return ids, vecs, np.asarray(deleted, dtype=np.int64)

    def prune_deletions(self, model_id: int, through_version: int) -> None:
        """Forget tombstones a freshly rebuilt cache no longer needs."""
        self._write("DELETE FROM vector_deletions WHERE model_id = :m AND seq <= :v",
                    {"m": model_id, "v": through_version})

    # --- tags (zero-shot labels) ---------------------------------------------------------------
    def tag_set(self, model_id: int, labels: Sequence[str], templates: Sequence[str]) -> int:
        """Id of the (model, labels, templates) set, created on first use; the same labels and templates in
        another order are that set (listed in the order it was made with)."""
        lab, tpl = json.dumps(list(labels)), json.dumps(list(templates))
        same = (sorted(labels), sorted(templates))
        with self.begin() as c:
            for set_id, lab_in, tpl_in in c.execute("SELECT id, labels, templates FROM tag_sets WHERE model_id = :m "
                                                    "ORDER BY id", {"m": model_id}).fetchall():
                if (sorted(json.loads(lab_in)), sorted(json.loads(tpl_in))) == same:
                    return int(set_id)
            c.execute("INSERT OR IGNORE INTO tag_sets (model_id, labels, templates, created_at) "
                      "VALUES (:m, :l, :t, :now)", {"m": model_id, "l": lab, "t": tpl, "now": time.time()})
            return int(c.execute("SELECT id FROM tag_sets WHERE model_id = :m AND labels = :l AND templates = :t",
                                 {"m": model_id, "l": lab, "t": tpl}).scalar())

    def replace_tags(self, set_id: int, image_ids: Sequence[int], tags: Sequence[tuple[int, str, float]]) -> None:
        """Set the tags of ``image_ids`` in one set to ``tags`` [(image_id, label, prob)], in one transaction."""
        with self.begin() as c:
            c.execute_in("DELETE FROM tags WHERE set_id = :s AND image_id IN :ids", image_ids, s=set_id)
            if tags:
                c.execute("INSERT INTO tags (set_id, image_id, label, prob) VALUES (:s, :i, :l, :p)",
                          [{"s": set_id, "i": int(i), "l": lab, "p": float(p)} for i, lab, p in tags])

    def tag_sets(self) -> list[dict]:
        """Every label set with its model and how many images it tagged."""
        rows = self.rows("SELECT s.id, s.model_id, m.name, m.pretrained, s.labels, s.templates, s.created_at, "
                         "(SELECT count(DISTINCT image_id) FROM tags t WHERE t.set_id = s.id) "
                         "FROM tag_sets s JOIN models m ON m.id = s.model_id ORDER BY s.id")
        return [{"id": r[0], "model_id": r[1], "model": f"{r[2]} ({r[3]})" if r[3] else r[2],
                 "labels": json.loads(r[4]), "templates": json.loads(r[5]), "created_at": r[6], "images": r[7]}
                for r in rows]

    def delete_tag_set(self, set_id: int) -> int:
        """Drop a label set and its tags; returns how many sets were removed (0 or 1)."""
        return int(self._write("DELETE FROM tag_sets WHERE id = :s", {"s": set_id}).rowcount or 0)

    def tag_counts(self, set_id: int | None = None) -> list[tuple[str, int]]:
        """(label, images) over all sets (or one), most used first; labels compare case-insensitively."""
        where = "WHERE set_id = :s" if set_id is not None else ""
        rows = self.rows(f"SELECT min(label), count(DISTINCT image_id) FROM tags {where} "
                         "GROUP BY label COLLATE NOCASE ORDER BY 2 DESC, 1", s=set_id)
        return [(r[0], int(r[1])) for r in rows]

    def ids_with_tags(self, labels: Sequence[str]) -> np.ndarray:
        """Images carrying every one of ``labels`` (case-insensitive, from any set), sorted."""
        sql = "SELECT DISTINCT image_id FROM tags WHERE label = :l COLLATE NOCASE"
        found = [{r[0] for r in self.rows(sql, l=label)} for label in labels]
        return np.array(sorted(set.intersection(*found) if found else ()), dtype=np.int64)

    # --- captions and keyword search (FTS5 over name, folder, captions, tags) ------------------
    def add_captions(self, pairs: Sequence[tuple[int, str]], source: str | None = None,
                     replace: bool = False) -> int:
        """Store (image_id, text) captions (``replace``: drop those images' old ones first); how many were new
        (an identical caption already on the image is not added twice)."""
        now = time.time()
        with self.begin() as c:
            if replace:
                c.execute_in("DELETE FROM captions WHERE image_id IN :ids", sorted({i for i, _ in pairs}))
            if not pairs:
                return 0
            # One executemany; sqlite3 sums each row's direct changes into rowcount (the FTS rows the
            # trigger touches are not counted), so ignored duplicates add 0.
            return c.execute("INSERT OR IGNORE INTO captions (image_id, text, source, added_at) "
                             "VALUES (:i, :t, :s, :now)",
                             [{"i": int(image_id), "t": caption, "s": source, "now": now}
                              for image_id, caption in pairs]).rowcount or 0

    def captions_of(self, image_id: int) -> list[str]:
        return [r[0] for r in self.rows("SELECT text FROM captions WHERE image_id = :i ORDER BY id", i=image_id)]

    def keyword_matches(self, fts_query: str, weights: tuple[float, float, float, float] = (4.0, 2.0, 3.0, 3.0),
                        limit: int | None = None) -> list[tuple[int, float]]:
        """[(image_id, relevance > 0)] for an FTS5 MATCH expression, most relevant first; ``weights``: the bm25
        weights of the name, folder, captions and tags columns."""
        w = ", ".join(str(float(x)) for x in weights)
        sql = (f"SELECT rowid, -bm25(image_text, {w}) AS rel FROM image_text WHERE image_text MATCH :q "
               "ORDER BY rel DESC" + (f" LIMIT {int(limit)}" if limit else ""))
        try:
            return [(int(r[0]), float(r[1])) for r in self.rows(sql, q=fts_query)]
        except sqlite3.OperationalError as e:
            raise LibraryError(f"keyword search failed ({e}); check the library with `imgsearch status`") \
                from None

    # --- perceptual fingerprints (cache for `duplicates`) -------------------------------------
    def fingerprints(self, image_ids: Iterable[int]) -> dict[int, bytes]:
        """Cached fingerprints still valid for the images' current content (the file hash must match)."""
        return {r[0]: bytes(r[1]) for r in self._rows_in(
            "SELECT f.image_id, f.data FROM image_fingerprints f JOIN images i ON i.id = f.image_id "
            "AND i.hash = f.hash WHERE f.image_id IN :ids", map(int, image_ids))}

    def save_fingerprints(self, rows: Sequence[tuple[int, str, bytes]]) -> None:
        """Cache (image_id, content hash, fingerprint bytes)."""
        if rows:
            self._write("INSERT OR REPLACE INTO image_fingerprints (image_id, hash, data) "
                        "VALUES (:i, :h, :d)", [{"i": int(i), "h": h, "d": bytes(d)} for i, h, d in rows])

    # --- albums (albums.py: saved searches; members are evaluated, not stored) ------------------
    _ALBUM_COLS = "id, name, request, created_at, changed_at, members, digest"

    def albums(self) -> list:
        """Every album row (id, name, request JSON, created_at, changed_at, members, digest), by name."""
        return self.rows(f"SELECT {self._ALBUM_COLS} FROM albums ORDER BY name COLLATE NOCASE")

    def album(self, name: str):
        """The album row of this name regardless of case in any script (an exact match first), or None."""
        key = _album_key(name)
        named = [r for r in self.albums() if _album_key(r[1]) == key]
        return next((r for r in named if r[1] == name), named[0] if named else None)

    @staticmethod
    def _album_name_taken(c: _Writer, name: str, album_id: int = 0) -> bool:
        # In the writing transaction: SQLite's NOCASE folds ASCII only ('Été' and 'été' would both pass it).
        key = _album_key(name)
        return any(_album_key(n) == key for n, in c.execute("SELECT name FROM albums WHERE id != :a",
                                                            {"a": album_id}).fetchall())

    def add_album(self, name: str, request: str, members: int, digest: str, pins: dict[int, bool] | None = None,
                  vector: tuple[int, np.ndarray] | None = None, created_at: float | None = None) -> int | None:
        """A new album with its pins and (model id, query vector), in one transaction; None when the name is taken."""
        now = time.time()
        with self.begin() as c:
            if self._album_name_taken(c, name):
                return None
            res = c.execute("INSERT OR IGNORE INTO albums (name, request, created_at, changed_at, members, "
                            "digest) VALUES (:n, :r, :c, :t, :m, :d)",
                            {"n": name, "r": request, "c": created_at or now, "t": now, "m": members, "d": digest})
            if not res.rowcount:
                return None
            album_id = int(res.lastrowid)
            if pins:
                c.execute("INSERT INTO album_pins (album_id, image_id, keep) VALUES (:a, :i, :k)",
                          [{"a": album_id, "i": int(i), "k": int(keep)} for i, keep in pins.items()])
            if vector is not None:
                c.execute("INSERT INTO album_vectors (album_id, model_id, vector) VALUES (:a, :m, :v)",
                          {"a": album_id, "m": vector[0], "v": vector_to_blob(vector[1])})
        return album_id

    def rename_album(self, album_id: int, name: str) -> bool:
        """False when another album has the name."""
        with self.begin() as c:
            return not self._album_name_taken(c, name, album_id) and bool(c.execute(
                "UPDATE OR IGNORE albums SET name = :n WHERE id = :a", {"n": name, "a": album_id}).rowcount)

    def delete_album(self, album_id: int) -> None:
        """The album, its pins and vectors; never an image."""
        self._write("DELETE FROM albums WHERE id = :a", {"a": album_id})

    def album_pins(self, album_id: int) -> dict[int, bool]:
        """{image id: True pinned in, False dropped}."""
        return {r[0]: bool(r[1]) for r in self.rows("SELECT image_id, keep FROM album_pins WHERE album_id = :a",
                                                    a=album_id)}

    def set_album_pins(self, album_id: int, ids: Iterable[int], keep: bool) -> None:
        """Pins of an album and images that still exist: another thread or process may delete either meanwhile."""
        self._write("INSERT OR REPLACE INTO album_pins (album_id, image_id, keep) SELECT :a, :i, :k WHERE EXISTS "
                    "(SELECT 1 FROM albums WHERE id = :a) AND EXISTS (SELECT 1 FROM images WHERE id = :i)",
                    [{"a": album_id, "i": int(i), "k": int(keep)} for i in ids])

    def album_vector(self, album_id: int, model_id: int) -> np.ndarray | None:
        blob = self.scalar("SELECT vector FROM album_vectors WHERE album_id = :a AND model_id = :m",
                           a=album_id, m=model_id)
        return None if blob is None else _matrix([blob], 0)[0]

    def save_album_vector(self, album_id: int, model_id: int, vector: np.ndarray) -> None:
        """Kept only while the album exists: it may be deleted while it is evaluated (a request, a watch batch)."""
        self._write("INSERT OR REPLACE INTO album_vectors (album_id, model_id, vector) SELECT :a, :m, :v "
                    "WHERE EXISTS (SELECT 1 FROM albums WHERE id = :a)",
                    {"a": album_id, "m": model_id, "v": vector_to_blob(vector)})

    def album_evaluated(self, album_id: int, members: int, digest: str, changed: bool) -> None:
        """Record an evaluation (``digest``: the members each model found); the last-change time moves when
        ``changed`` (members joined or left, not a first look with another model)."""
        self._write("UPDATE albums SET members = :m, digest = :d, "
                    "changed_at = CASE WHEN :c THEN :t ELSE changed_at END WHERE id = :a AND digest != :d",
                    {"a": album_id, "m": members, "d": digest, "c": int(changed), "t": time.time()})

    # --- runs --------------------------------------------------------------------------------
    _RUN_COUNTS = ("new", "updated", "unchanged", "moved", "removed", "failed")
    _RUN_COLS = ("id", "model_id", "roots", "started_at", "finished_at", *_RUN_COUNTS, "interrupted", "pid")

    def start_run(self, model_id: int, roots: Sequence[str]) -> int:
        return int(self._write("INSERT INTO runs (model_id, roots, started_at, pid) VALUES (:m, :r, :t, :p)",
                               {"m": model_id, "r": "\n".join(_shown(r) for r in roots), "t": time.time(),
                                "p": os.getpid()}).lastrowid)

    def finish_run(self, run_id: int, counts: dict[str, int], interrupted: bool = False) -> None:
        self._write(f"UPDATE runs SET finished_at = :t, interrupted = :x, {_set(self._RUN_COUNTS)} "
                    "WHERE id = :id", {"t": time.time(), "x": int(interrupted), "id": run_id,
                                       **{k: counts.get(k, 0) for k in self._RUN_COUNTS}})

    def indexed_root(self, folders: Sequence[str]) -> str | None:
        """One of ``folders`` that an index run (or watch) was given as a root, if any."""
        lines = {f"\n{_shown(f)}\n": f for f in folders}
        where = " OR ".join(f"instr(char(10) || roots || char(10), :f{i}) > 0" for i in range(len(lines)))
        hit = self.rows(f"SELECT roots FROM runs WHERE {where} LIMIT 1", **{f"f{i}": k for i, k in enumerate(lines)})
        return next((f for k, f in lines.items() if k in f"\n{hit[0][0]}\n"), None) if hit else None

    def last_run(self) -> dict | None:
        r = self.rows(f"SELECT {', '.join(self._RUN_COLS)} FROM runs ORDER BY id DESC LIMIT 1")
        return dict(zip(self._RUN_COLS, r[0])) if r else None

    def disk_usage(self) -> int:
        paths = [Path(str(self.path) + suffix) for suffix in ("", "-wal", "-shm")]
        return sum(p.stat().st_size for p in paths if p.exists())


SQLITE_READONLY, SQLITE_CORRUPT, SQLITE_CANTOPEN, SQLITE_FULL, SQLITE_NOTADB = 8, 11, 14, 13, 26


def _code(exc: BaseException) -> int | None:
    """SQLite's primary result code of an sqlite3 error (extended codes carry it in the low byte)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def _library_error(store: "Store", exc: BaseException) -> LibraryError | None:
    """A one-line LibraryError for SQLite failures a user can act on (full disk, read-only files, damage)."""
    code = _code(exc)
    if code in (SQLITE_CORRUPT, SQLITE_NOTADB) or "malformed" in str(exc):  # a damaged page met by any query
        return _open_error(store.path, exc)
    if code == SQLITE_FULL or "database or disk is full" in str(exc):
        return LibraryError(disk_full_message(store.path.parent))
    if code == SQLITE_READONLY or "readonly database" in str(exc):
        return LibraryError(f"library {store.path.parent} is read-only: queries work, but indexing, forget, "
                            "captions and tags need write access to it")
    return None


def _open_error(path: Path, e) -> LibraryError:
    """Only a database SQLite calls damaged gets the advice to start a new one, and never to delete it."""
    orig = getattr(e, "orig", None) or e
    if isinstance(orig, LibraryError):
        return orig
    code = _code(orig)
    if code in (SQLITE_CORRUPT, SQLITE_NOTADB) or "not a database" in str(orig) or "malformed" in str(orig):
        return LibraryError(
            f"library database {path} is unreadable ({orig}): it is damaged. Copy it somewhere safe first (it "
            "holds your captions and tags), then rename it and re-run `imgsearch index PATH` to start a new one")
    return LibraryError(f"cannot open library database {path} ({orig}); check its permissions and free disk space")


def _path_params(path: str) -> dict:
    return {"path": _bind(path), "folder": _shown(os.path.dirname(path)),
            "name": _shown(os.path.basename(path))}


def _image_params(img: dict) -> dict:
    return {**_path_params(img["path"]), **{c: img.get(c) for c in _CONTENT}}
