"""The cold `imgsearch query "text"` path: numpy, sqlite3 and the exported text tower, nothing heavier.

A fresh process answering a text query used to import torch, open_clip, SQLAlchemy and FAISS (9+ s on a
2-core CPU). For the common case, a text query over a library small enough for an exact (flat) index,
this module answers with what the query needs and no more: the model row and vectors read with the
standard sqlite3 module, an exact inner product in numpy (what FAISS's flat index computes), and the text
tower from textfast. Anything it does not handle (image terms, keyword filters, IVF-sized libraries, a
missing or unverified export, an older schema) returns None and the caller takes the full path, which
keeps every message and behaviour.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

# One BLAS thread: for a handful of tokens OpenBLAS's thread pool costs more than it saves, and on a busy
# 2-core machine its spinning threads made a 5-token forward 20x slower (4.5 s vs 0.2 s, measured).
# Only takes effect when numpy is not imported yet (a fresh CLI process); never overrides the user.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from .config import Settings  # noqa: E402

from .queryspec import parse_weighted as _weighted  # noqa: E402  (stdlib only, shared with the full path)


def _connect(db: Path) -> sqlite3.Connection | None:
    if not db.is_file():
        return None
    # Read-only: this path never migrates or writes; a concurrent indexer's WAL is still visible.
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=30)
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


def search_texts(settings: Settings, texts: list[str], not_texts: list[str], k: int, min_score: float | None,
                 under: str | None, tags: list[str] | None, where=None,
                 relevance: bool = False) -> list[dict] | None:
    """Hits as dicts (the keys of search.Hit) or None when the full path must answer.

    ``where``: a geo.MetaFilter (dates, place, camera), decided by the same SQL and test as the full path.
    ``relevance``: judge the hits against the stored relevance floor (None when it is missing or stale: the
    full path measures it).
    """
    try:
        return _search_texts(settings, texts, not_texts, k, min_score, under, tags, where, relevance)
    except Exception:  # noqa: BLE001 - a fast-path bug must never fail the query; the full path answers
        if os.environ.get("IMGSEARCH_DEBUG"):
            raise
        return None


def _search_texts(settings: Settings, texts: list[str], not_texts: list[str], k: int, min_score: float | None,
                  under: str | None, tags: list[str] | None, where=None,
                  relevance: bool = False) -> list[dict] | None:
    from . import textfast
    from .encoder import ModelSpec, known_fingerprint
    from .files import abspath
    from .migrations import SCHEMA_VERSION
    from .store import _like_prefix, _unbind, meta_filter_sql

    if not texts or k < 1:
        return None
    pos = [_weighted(t) for t in texts]
    neg = [_weighted(t) for t in not_texts]
    if any(not t for _, t in pos + neg):
        return None  # the full path reports the empty term
    spec = ModelSpec(settings.model, settings.pretrained).canonical()
    fingerprint = known_fingerprint(spec)
    if fingerprint is None:
        return None
    try:
        conn = _connect(settings.db_path)
    except sqlite3.Error:
        return None
    if conn is None:
        return None
    try:
        try:
            conn.execute("BEGIN")  # one snapshot: the vector count and the rows read agree under a live indexer
            if (conn.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] or 0) != SCHEMA_VERSION:
                return None  # the full path migrates or refuses with its message
            row = conn.execute("SELECT id, dim FROM models WHERE name = ? AND pretrained = ? AND fingerprint = ?",
                               (spec.name, spec.pretrained or "", fingerprint)).fetchone()
            if row is None:
                return None  # the full path explains the mismatch
            model_id, dim = row
            count = conn.execute("SELECT count(*) FROM vectors WHERE model_id = ?", (model_id,)).fetchone()[0]
            if count == 0 or count > settings.flat_max:
                return None  # empty (message) or an IVF-sized library (FAISS answers)
            try:
                tower = textfast.open_tower(settings.home, fingerprint)
            except textfast.ExportError:
                return None  # the full path says why once and uses torch
            if tower.dim != dim:
                return None
            cut = None
            if relevance:
                from . import relevance as floors

                meta = conn.execute("SELECT value FROM library_meta WHERE key = ?",
                                    (floors.meta_key(model_id),)).fetchone()
                floor = floors.parse(meta[0] if meta else None)
                if floors.is_stale(floor, count):
                    return None  # the full path measures it (and saves it for the next cold query)
                cut = floors.floor_for(floor, "text")
            sql_where, params = "", []
            if under:
                folder = abspath(under)  # the real path, as the library stores it
                if not os.path.isdir(folder):
                    return None  # a file or a missing folder: the full path decides and words the error
                folder = folder.rstrip(os.sep) or os.sep
                if folder != os.sep:
                    sql_where = " AND image_id IN (SELECT id FROM images WHERE path = ? OR path LIKE ? ESCAPE '\\')"
                    params = [folder, _like_prefix(folder)]
            for label in [t.strip() for t in tags or () if t]:
                sql_where += " AND image_id IN (SELECT image_id FROM tags WHERE label = ? COLLATE NOCASE)"
                params.append(label)
            allowed = None
            if where is not None:
                sql, args = meta_filter_sql(where)
                allowed = {r[0] for r in conn.execute(sql, args) if where.keeps(r[1], r[2], r[3], r[4])}
            row = conn.execute("SELECT value FROM library_meta WHERE key = 'lang'").fetchone()
            vecs = textfast_query_vector(tower, pos, neg, dim, settings.lang, row[0] if row else None)
            if vecs is None:
                return None  # terms cancel out: the full path says so
            # Rows stream into one preallocated matrix: a blob list plus a joined copy tripled peak memory.
            matrix = np.empty((count, dim), dtype=np.float32)
            ids = []
            for i, b in conn.execute(
                    f"SELECT image_id, vector FROM vectors WHERE model_id = ?{sql_where}", (model_id, *params)):
                if allowed is not None and i not in allowed:
                    continue
                matrix[len(ids)] = np.frombuffer(b, dtype="<f4")
                ids.append(i)
            if not ids:
                return []
            scores = matrix[:len(ids)] @ vecs
            order = np.argsort(-scores, kind="stable")
            id_arr = np.asarray(ids, dtype=np.int64)
            hits: list[dict] = []
            step = max(k + 8, 32)
            for start in range(0, len(order), step):
                part = order[start:start + step]
                want = [int(id_arr[j]) for j in part]
                rows = {r[0]: r for r in conn.execute(
                    "SELECT id, path, size, width, height, taken_at, taken_source FROM images WHERE id IN "
                    f"({','.join('?' * len(want))})", want)}
                for j in part:
                    score = float(scores[j])
                    # Compared as shown (rounded): a score the user copies from the output keeps that hit.
                    if min_score is not None and round(score, 6) < min_score:
                        return hits
                    r = rows.get(int(id_arr[j]))
                    path = _unbind(r[1]) if r is not None else None
                    if path is None or not os.path.exists(path):
                        continue  # deleted since it was indexed
                    hits.append({"rank": len(hits) + 1, "id": r[0], "path": path, "score": round(score, 6),
                                 "width": r[3], "height": r[4], "size": r[2], "taken_at": r[5],
                                 "taken_source": r[6],
                                 "relevant": None if cut is None else round(score, 6) >= cut})
                    if len(hits) == k:
                        return hits
            return hits
        except sqlite3.Error:
            return None
    finally:
        conn.close()


def textfast_query_vector(tower, pos: list[tuple[float, str]], neg: list[tuple[float, str]],
                          dim: int, lang: str | None = None, library_lang: str | None = None) -> np.ndarray | None:
    """Weighted sum of positives minus negatives, normalised, as search.Searcher.query_vector does."""
    texts = [t for _, t in pos + neg]
    vecs = tower.encode(texts, lang, library_lang)
    out = np.zeros(dim, dtype=np.float32)
    for (w, _), v in zip(pos, vecs[:len(pos)]):
        out += w * v
    for (w, _), v in zip(neg, vecs[len(pos):]):
        out -= w * v
    norm = float(np.linalg.norm(out))
    if norm < 1e-8:
        return None
    return out / norm
