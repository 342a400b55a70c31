"""The vector index: choose, build, update, search, save and load. Knows ids and vectors, nothing else.

Vectors are L2-normalised (inner product = cosine). Exact numpy search (``FlatIndex``) while the collection is
small, so a cold query never imports FAISS; FAISS IVF above that, IVF-PQ when the raw vectors exceed the memory
budget, the probe count tuned to a recall target measured against exact search. The saved file's header carries
the caller's metadata and a checksum: a stale or damaged file is detected, never trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np

from .config import atomic_file

MAGIC = b"IMGSFAIS"
FORMAT = 3  # 3: flat indexes are numpy arrays (ids, then vectors), not a FAISS blob
IVF_FORMATS = (2, FORMAT)  # IVF and IVF-PQ files are the same in both: an older one is read as it is
BuildProgress = Callable[[str, int, int], None]  # (stage, done, total)


class IndexFileError(Exception):
    """The cache file is missing, damaged or from another format; rebuild it."""


class OtherFormatError(IndexFileError):
    """The cache file is sound but in another imgsearch version's format (an upgrade): rebuild it."""


@dataclass(frozen=True)
class IndexPolicy:
    """How to pick the index type. Thresholds are settings so tests can exercise IVF on small sets."""

    flat_max: int = 50_000  # exact search up to here (about 10 ms at 50k x 512 on two cores)
    memory_budget: int = 4 << 30  # bytes the index may use before switching to PQ codes
    recall_target: float = 0.95  # recall@10 the probe count is tuned for
    sample_queries: int = 500


@dataclass(frozen=True)
class Plan:
    kind: str  # "flat" | "ivf" | "ivfpq"
    nlist: int = 0
    pq_m: int = 0

    @property
    def label(self) -> str:
        return {"flat": "Flat (exact)", "ivf": f"IVF{self.nlist},Flat"}.get(self.kind, f"IVF{self.nlist},PQ{self.pq_m}")


def plan_for(n: int, dim: int, policy: IndexPolicy = IndexPolicy()) -> Plan:
    """The index type for ``n`` vectors of ``dim`` floats under ``policy``."""
    if n <= policy.flat_max:
        return Plan("flat")
    # About 2*sqrt(n) lists keeps each list a few hundred vectors and quantizer training within minutes.
    nlist = int(2 ** round(math.log2(max(64.0, 2 * math.sqrt(n)))))
    nlist = min(nlist, max(64, n // 40))
    if n * dim * 4 <= policy.memory_budget:
        return Plan("ivf", nlist)
    m = next(m for m in (64, 48, 32, 16, 8, 4, 2, 1) if dim % m == 0 and m <= dim // 4 or m == 1)
    return Plan("ivfpq", nlist, m)


class FlatIndex:
    """Exact inner-product search in numpy for flat-sized libraries, with the calls of the FAISS indexes it
    stands in for (``ntotal``, ``add_with_ids``, ``remove_ids``, ``search``). Ties go to the lower id."""

    BLOCK = 1 << 24  # scores per query block (64 MB of float32): bounds memory for many queries at once

    def __init__(self, dim: int, ids: np.ndarray | None = None, vectors: np.ndarray | None = None):
        self.d = dim
        self.ids = np.zeros(0, dtype=np.int64) if ids is None else ids
        self.vectors = np.zeros((0, dim), dtype=np.float32) if vectors is None else vectors

    @property
    def ntotal(self) -> int:
        return len(self.ids)

    def add_with_ids(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self.ids = np.concatenate([self.ids, ids])
        self.vectors = np.concatenate([self.vectors, vectors])

    def remove_ids(self, ids: np.ndarray) -> int:
        keep = ~np.isin(self.ids, ids)
        removed = int(len(keep) - keep.sum())
        if removed:
            self.ids, self.vectors = self.ids[keep], self.vectors[keep]
        return removed

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None):
        ids, vectors = self.ids, self.vectors
        if allowed is not None:
            keep = np.isin(ids, allowed)
            ids, vectors = ids[keep], vectors[keep]
        n = len(ids)
        k = min(k, n)
        out_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_i = np.full((len(queries), k), -1, dtype=np.int64)
        if k == 0:
            return out_s, out_i
        step = max(1, self.BLOCK // max(n, 1))
        for start in range(0, len(queries), step):
            scores = queries[start:start + step] @ vectors.T
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (len(scores), 1))
            for row, cand in enumerate(top):
                order = np.lexsort((ids[cand], -scores[row, cand]))  # best score first, then the lower id
                out_s[start + row] = scores[row, cand[order]]
                out_i[start + row] = ids[cand[order]]
        return out_s, out_i

    def payload(self) -> bytes:
        return np.ascontiguousarray(self.ids, dtype="<i8").tobytes() + \
            np.ascontiguousarray(self.vectors, dtype="<f4").tobytes()

    @classmethod
    def from_payload(cls, payload, dim: int, count: int) -> "FlatIndex":
        if len(payload) != count * (8 + 4 * dim):
            raise ValueError("flat index payload has the wrong size")
        ids = np.frombuffer(payload, dtype="<i8", count=count)
        vectors = np.frombuffer(payload, dtype="<f4", offset=8 * count).reshape(count, dim)
        return cls(dim, ids, vectors)


@dataclass(eq=False)
class VectorIndex:
    """Nearest-neighbour index over (id, vector) pairs, inner product on normalised vectors."""

    dim: int
    index: object  # FlatIndex or a FAISS index
    plan: Plan = Plan("flat")
    nprobe: int = 0
    recall: float | None = None
    built_count: int = 0

    # --- building ----------------------------------------------------------------------------
    @classmethod
    def build(cls, ids: np.ndarray, vectors: np.ndarray, dim: int, policy: IndexPolicy = IndexPolicy(),
              seed: int = 0) -> "VectorIndex":
        """Index in-memory vectors (see ``build_from`` for collections that do not fit in memory)."""
        return cls.build_from(ArraySource(ids, vectors), dim, policy, seed)

    @classmethod
    def build_from(cls, source: "VectorSource", dim: int, policy: IndexPolicy = IndexPolicy(),
                   seed: int = 0, progress: BuildProgress | None = None) -> "VectorIndex":
        """Index every vector of ``source`` in one streaming pass: peak memory is the index, the training
        sample and one chunk, so IVF-PQ builds of collections far larger than memory work.

        The quantizer trains on a random sample of the whole collection (folders are ordered: the first rows
        are not representative); the pass that adds the vectors also gathers the exact neighbours the probe
        count is tuned against. ``progress(stage, done, total)`` hears about IVF builds (minutes at millions).
        """
        n = len(source)
        plan = plan_for(n, dim, policy)
        if plan.kind == "flat":
            ids = np.empty(n, dtype=np.int64)
            vectors = np.empty((n, dim), dtype=np.float32)  # filled in place: no list of chunks plus a copy
            done = 0
            for part_ids, part in source.chunks():
                ids[done:done + len(part_ids)] = part_ids
                vectors[done:done + len(part_ids)] = part
                done += len(part_ids)
            return cls(dim, FlatIndex(dim, ids[:done], vectors[:done]), plan, recall=1.0, built_count=done)
        import faiss

        quantizer = faiss.IndexFlatIP(dim)
        if plan.kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, dim, plan.nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, dim, plan.nlist, plan.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = 10
        gpus = False
        with contextlib.suppress(Exception):  # faiss-cpu has no GPUs (nor, in some builds, get_num_gpus)
            gpus = faiss.get_num_gpus() > 0
        if gpus:
            # k-means for the coarse quantizer is the slow part of building; faiss-gpu runs it on the GPU.
            index.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(dim))
        report = progress or (lambda stage, done, total: None)
        report(f"training {plan.label}", 0, n)
        rng = np.random.default_rng(seed)
        all_ids = np.asarray(source.ids(), dtype=np.int64)
        sample = min(n, max(40 * plan.nlist, 256 * 40 if plan.kind == "ivfpq" else 0))
        train_ids = rng.choice(all_ids, size=sample, replace=False) if sample < n else all_ids
        _, train = source.take(train_ids)
        index.train(np.ascontiguousarray(train, dtype=np.float32))
        del train
        if gpus:
            index.clustering_index = None
        probe = _TruthProbe(source, rng.choice(all_ids, size=min(policy.sample_queries, n), replace=False))
        added = 0
        for ids, vectors in source.chunks():
            vectors = np.ascontiguousarray(vectors, dtype=np.float32)
            index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
            probe.update(ids, vectors)
            added += len(ids)
            report(f"building {plan.label}", added, n)
        vi = cls(dim, index, plan, built_count=n)
        # The smallest probe count whose recall@10 against exact search meets the target, with a small
        # margin so that other queries than the sample still meet it. Successive probe counts re-rank mostly
        # the same candidates: read each one's vector (SQLite) once.
        exact_vectors = _Memo(source.take, max_rows=(256 << 20) // (4 * dim))
        vi.nprobe = 1
        while True:
            vi.recall = probe.recall(vi, vi.nprobe, exact_vectors)
            if vi.recall >= min(1.0, policy.recall_target + 0.01) or vi.nprobe * 2 > plan.nlist:
                return vi
            vi.nprobe *= 2

    # --- updating ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def kind(self) -> str:
        return self.plan.label

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape[1] != self.dim:
            raise ValueError(f"vectors have dimension {vectors.shape[1]}, index has {self.dim}")
        self.index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> int:
        if len(ids) == 0:
            return 0
        return int(self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64)))  # numpy or FAISS alike

    def outgrown(self, policy: IndexPolicy) -> bool:
        """True when the collection changed enough that another index type or list count suits it better."""
        n = len(self)
        return plan_for(n, self.dim, policy).kind != self.plan.kind or \
            (self.plan.kind != "flat" and (n > 4 * self.built_count or n < self.built_count // 4))

    # --- searching ---------------------------------------------------------------------------
    REFINE = 10  # PQ codes are coarse: fetch this many times k candidates and re-rank them exactly

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
               nprobe: int | None = None, exact_vectors=None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query row; ids of -1 pad when fewer exist. ``allowed`` restricts ids.
        ``exact_vectors(ids) -> (ids, vectors)`` reads the full vectors (SQLite): IVF-PQ candidates are
        re-ranked with them, which is what makes compressed codes usable."""
        if self.plan.kind == "ivfpq" and exact_vectors is not None:
            _, ids = self._search(queries, k * self.REFINE, allowed, nprobe)
            return rerank(np.atleast_2d(queries), ids, k, exact_vectors)
        return self._search(queries, k, allowed, nprobe)

    def _search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
                nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if allowed is not None:
            allowed = np.ascontiguousarray(allowed, dtype=np.int64)
            k = min(k, len(allowed))
        k = min(k, len(self))
        if k <= 0:
            return np.zeros((len(queries), 0), dtype=np.float32), np.zeros((len(queries), 0), dtype=np.int64)
        if isinstance(self.index, FlatIndex):
            return self.index.search(queries, k, allowed)
        import faiss

        if allowed is not None:  # a filter can leave most lists empty: look everywhere
            params = faiss.SearchParametersIVF(sel=faiss.IDSelectorBatch(allowed), nprobe=self.plan.nlist)
        else:
            params = faiss.SearchParametersIVF(nprobe=min(nprobe or self.nprobe or 1, self.plan.nlist))
        return self.index.search(queries, k, params=params)

    @property
    def nbytes(self) -> int:
        return len(self._payload())

    def _payload(self):
        if isinstance(self.index, FlatIndex):
            return self.index.payload()
        import faiss

        return faiss.serialize_index(self.index)

    # --- persistence -------------------------------------------------------------------------
    def meta(self) -> dict:
        return {"dim": self.dim, "count": len(self), "kind": self.kind, "plan": asdict(self.plan),
                "nprobe": self.nprobe, "recall_at_10": self.recall, "built_count": self.built_count}

    def save(self, path: str | os.PathLike, meta: dict) -> None:
        """Write atomically: temp file + fsync + rename. ``meta`` says what state it was built from."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = memoryview(self._payload())
        # The payload size lets `status` spot a truncated file without reading gigabytes of vectors.
        header = json.dumps({**meta, **self.meta(), "payload_bytes": int(payload.nbytes)}).encode()
        with atomic_file(path, durable=True, sweep=True) as f:
            f.write(MAGIC + struct.pack("<II", FORMAT, len(header)) + header + _digest(header, [payload]))
            f.write(payload)

    @staticmethod
    def read_meta(path: str | os.PathLike) -> dict:
        """The metadata header alone (cheap: does not read the vectors)."""
        with open(path, "rb") as f:
            return _read_header(f)[0]

    @classmethod
    def load(cls, path: str | os.PathLike) -> tuple["VectorIndex", dict]:
        try:
            with open(path, "rb") as f:
                meta, header, digest = _read_header(f)
                payload = f.read()
        except FileNotFoundError:
            raise IndexFileError("index file is missing") from None
        if _digest(header, [payload]) != digest:
            raise IndexFileError("index file checksum does not match (damaged or truncated)")
        try:
            plan = Plan(**meta["plan"])
            if plan.kind == "flat":
                index = FlatIndex.from_payload(payload, int(meta["dim"]), int(meta["count"]))
            else:
                import faiss

                index = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8))
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise IndexFileError(f"cannot read the index: {e}") from None
        if index.d != meta["dim"] or index.ntotal != meta["count"]:
            raise IndexFileError("index file contents disagree with its header")
        return cls(meta["dim"], index, plan, meta.get("nprobe", 0), meta.get("recall_at_10"),
                   meta.get("built_count", 0)), meta


def _read_header(f) -> tuple[dict, bytes, bytes]:
    """(metadata, header bytes, checksum) of an index file open at its start; leaves it at the payload."""
    head = f.read(16)
    if len(head) < 16 or head[:8] != MAGIC:
        raise IndexFileError("not an imgsearch index file")
    fmt, hlen = struct.unpack("<II", head[8:16])
    if fmt not in IVF_FORMATS:
        raise OtherFormatError(f"index file format {fmt} is not {FORMAT}")
    header, digest = f.read(hlen), f.read(16)
    with contextlib.suppress(ValueError, AttributeError):
        meta = json.loads(header)
        if isinstance(meta, dict) and len(digest) == 16:
            # an older IVF file is used as it is: a large library's first query after an upgrade retrains nothing
            if fmt != FORMAT and meta.get("plan", {}).get("kind") not in ("ivf", "ivfpq"):
                raise OtherFormatError(f"index file format {fmt} is not {FORMAT}")
            return meta, header, digest
    raise IndexFileError("index file header is damaged")


def _digest(header: bytes, blocks) -> bytes:
    h = hashlib.blake2b(header, digest_size=16)
    for block in blocks:
        h.update(block)
    return h.digest()


def rerank(queries: np.ndarray, ids: np.ndarray, k: int, exact_vectors) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products for candidate ids (per query row, -1 = none); the best k of each row."""
    flat = np.unique(ids[ids >= 0])
    out_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    out_i = np.full((len(queries), k), -1, dtype=np.int64)
    if len(flat) == 0:
        return out_s, out_i
    got_ids, vecs = exact_vectors(flat)
    where = {int(i): n for n, i in enumerate(np.asarray(got_ids).tolist())}
    for row, q in enumerate(queries):
        cand = [int(i) for i in ids[row] if i >= 0 and int(i) in where]
        exact = FlatIndex(len(q), np.asarray(cand, dtype=np.int64), vecs[[where[i] for i in cand]])
        scores, best = exact.search(q[None, :], k)
        out_s[row, :best.shape[1]], out_i[row, :best.shape[1]] = scores[0], best[0]
    return out_s, out_i


class VectorSource(Protocol):
    """Where a collection's vectors come from when an index is built (an array, SQLite, a file)."""

    def __len__(self) -> int: ...

    def ids(self) -> np.ndarray:
        """Every id, int64."""

    def take(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) for the given ids, in any order; missing ids are left out."""

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every (ids, vectors) once, a bounded chunk at a time."""


class ArraySource:
    """A VectorSource over arrays already in memory."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray, chunk: int = 200_000):
        self._ids = np.ascontiguousarray(ids, dtype=np.int64)
        self._vectors = vectors
        self._chunk = chunk
        self._order = None

    def __len__(self) -> int:
        return len(self._ids)

    def ids(self) -> np.ndarray:
        return self._ids

    def take(self, want: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        want = np.asarray(want, dtype=np.int64)
        if len(self._ids) == 0 or len(want) == 0:
            return want[:0], np.zeros((0, self._vectors.shape[1]), dtype=np.float32)
        if self._order is None:
            self._order = np.argsort(self._ids, kind="stable")
        pos = self._order[np.searchsorted(self._ids, want, sorter=self._order).clip(0, len(self._ids) - 1)]
        found = self._ids[pos] == want
        return want[found], np.asarray(self._vectors[pos[found]], dtype=np.float32)

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(self._ids), self._chunk):
            yield self._ids[start:start + self._chunk], self._vectors[start:start + self._chunk]


class _Memo:
    """An ``exact_vectors(ids) -> (ids, vectors)`` lookup that keeps up to ``max_rows`` vectors it has read."""

    def __init__(self, lookup, max_rows: int):
        self.lookup = lookup
        self.max_rows = max_rows
        self.kept: dict[int, np.ndarray] = {}

    def __call__(self, want: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        want = np.asarray(want, dtype=np.int64)
        missing = np.array([i for i in want.tolist() if i not in self.kept], dtype=np.int64)
        got_ids, got = self.lookup(missing) if len(missing) else (missing, None)
        fresh = dict(zip(np.asarray(got_ids).tolist(), got)) if len(got_ids) else {}
        if len(self.kept) + len(fresh) <= self.max_rows:
            self.kept.update(fresh)
        rows = [(i, v) for i in want.tolist() if (v := self.kept.get(i, fresh.get(i))) is not None]
        if not rows:
            return want[:0], np.zeros((0, 0), dtype=np.float32)
        return np.array([i for i, _ in rows], dtype=np.int64), np.stack([v for _, v in rows])


class _TruthProbe:
    """Exact top-k neighbours of sample queries drawn from the collection, gathered chunk by chunk. A query's
    own vector is left out of both the exact and the approximate lists: it acts as a held-out query."""

    def __init__(self, source: VectorSource, query_ids: np.ndarray, k: int = 10):
        self.own, self.queries = source.take(np.asarray(query_ids, dtype=np.int64))
        self.queries = np.ascontiguousarray(self.queries, dtype=np.float32)
        self.k = k
        self.scores = np.full((len(self.own), k + 1), -np.inf, dtype=np.float32)
        self.ids = np.full((len(self.own), k + 1), -1, dtype=np.int64)

    def update(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        import faiss

        if len(ids) == 0 or len(self.own) == 0:
            return
        kk = min(self.k + 1, len(ids))
        d, pos = faiss.knn(self.queries, np.ascontiguousarray(vectors, dtype=np.float32), kk,
                           metric=faiss.METRIC_INNER_PRODUCT)
        found = np.where(pos >= 0, np.asarray(ids, dtype=np.int64)[pos.clip(0)], -1)
        scores = np.concatenate([self.scores, d], axis=1)
        both = np.concatenate([self.ids, found], axis=1)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :self.k + 1]
        self.scores = np.take_along_axis(scores, top, axis=1)
        self.ids = np.take_along_axis(both, top, axis=1)

    def recall(self, index: "VectorIndex", nprobe: int, exact_vectors=None) -> float:
        if len(self.own) == 0:
            return 1.0
        _, approx = index.search(self.queries, self.k + 1, nprobe=nprobe, exact_vectors=exact_vectors)
        hits = total = 0
        for row, own in enumerate(self.own):
            truth = [int(i) for i in self.ids[row] if i >= 0 and i != own][:self.k]
            got = {int(i) for i in approx[row] if i >= 0 and i != own}
            hits += sum(1 for t in truth if t in got)
            total += len(truth)
        return hits / total if total else 1.0


def measure_recall(index: VectorIndex, source: VectorSource, query_ids: np.ndarray, nprobe: int,
                   k: int = 10) -> float:
    """Recall@k of ``index`` against exact search over ``source``, for the collection's vectors ``query_ids``
    as held-out queries (one streaming pass over the source)."""
    probe = _TruthProbe(source, query_ids, k)
    for ids, vectors in source.chunks():
        probe.update(ids, vectors)
    return probe.recall(index, nprobe, source.take)


def load_or_build(path: str | os.PathLike, state: dict, dim: int,
                  full: Callable[[], VectorSource],
                  fetch_changes: Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
                  policy: IndexPolicy = IndexPolicy(),
                  progress: BuildProgress | None = None, save: bool = True) -> tuple[VectorIndex, str]:
    """(index, "loaded" | "updated" | "rebuilt") for ``state`` (model_id, version, fingerprint, library_id).

    The cache file is trusted when every key but the version matches (a cache of another database is rebuilt);
    one from an older version is brought up to date with ``fetch_changes(version)`` (upserted ids, their
    vectors, deleted ids) unless the collection outgrew its index type. ``save=False`` (a read-only library)
    leaves the cache file alone.
    """
    index, action = None, "rebuilt"
    with contextlib.suppress(IndexFileError, OSError, ValueError, KeyError):
        cached, meta = VectorIndex.load(path)
        same_source = all(meta.get(k) == state[k] for k in state if k != "version") and cached.dim == dim
        if same_source and meta.get("version") == state["version"]:
            return cached, "loaded"
        if same_source and fetch_changes is not None and meta.get("version", 0) < state["version"]:
            ids, vecs, deleted = fetch_changes(int(meta["version"]))
            cached.remove(np.concatenate([deleted, ids]))
            cached.add(ids, vecs)
            if not cached.outgrown(policy):
                index, action = cached, "updated"
    if index is None:
        index = VectorIndex.build_from(full(), dim, policy, progress=progress)
    if save:
        with contextlib.suppress(OSError):  # a read-only library still answers queries: the cache is optional
            index.save(path, state)
    return index, action


def cache_state(path: str | os.PathLike, verify_max: int = 1 << 30) -> tuple[str, dict | None]:
    """('ok'|'missing'|'damaged'|'stale: ...', header) for status reports, without loading the vectors: the
    file's size must match its header, and files up to ``verify_max`` bytes have their checksum verified."""
    if not os.path.exists(path):
        return "missing", None
    try:
        with open(path, "rb") as f:
            meta, header, digest = _read_header(f)
            size = os.fstat(f.fileno()).st_size
            payload = size - 32 - len(header)
            if payload < 0 or ("payload_bytes" in meta and payload != meta["payload_bytes"]):
                return "damaged", None
            if size <= verify_max and _digest(header, iter(lambda: f.read(8 << 20), b"")) != digest:
                return "damaged", None
        return "ok", meta
    except OtherFormatError:  # an older imgsearch's cache is not damaged: saying so alarmed every upgraded library
        return "stale: written by another version of imgsearch (rebuilt on next query)", None
    except (IndexFileError, OSError, ValueError):
        return "damaged", None
