"""FAISS wrapper: build, add, remove, search, save and load. Knows ids and vectors, nothing else.

Vectors are L2-normalised, so inner product is cosine similarity. The saved file carries a header
with the caller's metadata and a checksum, so a stale or damaged file is detected, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"IMGSFAIS"
FORMAT = 1


class IndexFileError(Exception):
    """The cache file is missing, damaged or from another format; rebuild it."""


class VectorIndex:
    """Nearest-neighbour index over (id, vector) pairs with exact inner-product search."""

    def __init__(self, dim: int, index=None):
        import faiss

        self.dim = dim
        self.index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    @classmethod
    def build(cls, ids: np.ndarray, vectors: np.ndarray, dim: int) -> "VectorIndex":
        vi = cls(dim)
        vi.add(ids, vectors)
        return vi

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def kind(self) -> str:
        return "flat"

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape[1] != self.dim:
            raise ValueError(f"vectors have dimension {vectors.shape[1]}, index has {self.dim}")
        self.index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> int:
        import faiss

        if len(ids) == 0:
            return 0
        return int(self.index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))))

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query row; ids of -1 pad when fewer exist. ``allowed`` restricts ids."""
        import faiss

        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        n = len(self)
        if n == 0 or k <= 0:
            return (np.zeros((len(queries), 0), dtype=np.float32), np.zeros((len(queries), 0), dtype=np.int64))
        params = None
        if allowed is not None:
            allowed = np.ascontiguousarray(allowed, dtype=np.int64)
            if len(allowed) == 0:
                return (np.zeros((len(queries), 0), dtype=np.float32), np.zeros((len(queries), 0), dtype=np.int64))
            k = min(k, len(allowed))
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed))
        k = min(k, n)
        scores, ids = self.index.search(queries, k, params=params)
        return scores, ids

    # --- persistence -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, meta: dict) -> None:
        """Write atomically: temp file + fsync + rename. ``meta`` says what state it was built from."""
        import faiss

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = faiss.serialize_index(self.index).tobytes()
        header = json.dumps({**meta, "dim": self.dim, "count": len(self), "kind": self.kind}).encode()
        digest = hashlib.blake2b(header + payload, digest_size=16).digest()
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<II", FORMAT, len(header)) + header + digest)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @staticmethod
    def read_meta(path: str | os.PathLike) -> dict:
        """The metadata header alone (cheap: does not read the vectors)."""
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) < 16 or head[:8] != MAGIC:
                raise IndexFileError("not an imgsearch index file")
            fmt, hlen = struct.unpack("<II", head[8:16])
            if fmt != FORMAT:
                raise IndexFileError(f"index file format {fmt} is not {FORMAT}")
            header = f.read(hlen)
            try:
                return json.loads(header)
            except ValueError:
                raise IndexFileError("index file header is damaged") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> tuple["VectorIndex", dict]:
        import faiss

        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise IndexFileError("index file is missing") from None
        if len(data) < 16 or data[:8] != MAGIC:
            raise IndexFileError("not an imgsearch index file")
        fmt, hlen = struct.unpack("<II", data[8:16])
        if fmt != FORMAT:
            raise IndexFileError(f"index file format {fmt} is not {FORMAT}")
        header = data[16:16 + hlen]
        digest = data[16 + hlen:32 + hlen]
        payload = data[32 + hlen:]
        if hashlib.blake2b(header + payload, digest_size=16).digest() != digest:
            raise IndexFileError("index file checksum does not match (damaged or truncated)")
        meta = json.loads(header)
        try:
            index = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8))
        except RuntimeError as e:
            raise IndexFileError(f"faiss cannot read the index: {e}") from None
        if index.d != meta["dim"] or index.ntotal != meta["count"]:
            raise IndexFileError("index file contents disagree with its header")
        return cls(meta["dim"], index), meta


def load_or_build(path: str | os.PathLike, state: dict, dim: int, fetch) -> tuple[VectorIndex, bool]:
    """Load the cached index at ``path`` if it was built from ``state``; else rebuild and save it.

    ``fetch()`` returns (ids, vectors) from the source of truth. Returns (index, rebuilt?).
    """
    try:
        index, meta = VectorIndex.load(path)
        if all(meta.get(k) == v for k, v in state.items()) and index.dim == dim:
            return index, False
    except (IndexFileError, OSError, ValueError, KeyError):
        pass
    ids, vecs = fetch()
    index = VectorIndex.build(ids, vecs, dim)
    try:
        index.save(path, state)
    except OSError:
        pass  # a read-only library still answers queries; the cache is only an optimisation
    return index, True


def cache_state(path: str | os.PathLike) -> tuple[str, dict | None]:
    """('ok'|'missing'|'damaged', header) for status reports, without loading vectors."""
    if not os.path.exists(path):
        return "missing", None
    try:
        return "ok", VectorIndex.read_meta(path)
    except (IndexFileError, OSError, ValueError):
        return "damaged", None
