"""Near-duplicate groups: CLIP neighbours from FAISS propose pairs, a perceptual fingerprint confirms them.

1. Candidates: each image's k nearest CLIP neighbours above a cosine threshold (flat search, IVF beyond
   ``EXACT_MAX`` images: N^1.5 work rather than N^2, bench/duplicates_scale.py).
2. Confirmation: a perceptual fingerprint per image (cached in SQLite per content hash); resized,
   re-encoded, converted and lightly cropped copies score above 0.96, two photos of one subject fall
   below although CLIP finds them alike. ``similar=True`` groups by CLIP alone.
3. Groups: union-find over confirmed pairs, the suggested keeper first (largest, then oldest). Nothing is
   ever deleted here.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime

import numpy as np

from . import images
from .config import Settings
from .errors import DecodeError
from .request import _number
from .search import folder_ids

DEFAULT_THRESHOLD = 0.90  # CLIP cosine for a candidate pair
DEFAULT_MIN_MATCH = 0.96  # thumbnail correlation that confirms a pair
NEIGHBOURS = 24  # per image; groups larger than this still join through union-find
EXACT_MAX = 20_000  # flat search below this many images, IVF above
NPROBE = 8


# --- perceptual fingerprint -----------------------------------------------------------------------
THUMB = 16
CROPS = (1.0, 0.9)  # whole frame and central 90%: a copy cropped evenly by ~5% per side matches the latter


def fingerprint(im) -> bytes:
    """Small colour thumbnails of ``im`` (one per CROPS entry), as uint8 bytes."""
    from PIL import Image

    im = im.convert("RGB")
    w, h = im.size
    parts = []
    for f in CROPS:
        dx, dy = w * (1 - f) / 2, h * (1 - f) / 2
        # BOX averages every source pixel: stable under resizing and JPEG noise.
        parts.append(np.asarray(im.resize((THUMB, THUMB), Image.Resampling.BOX, box=(dx, dy, w - dx, h - dy)),
                                dtype=np.uint8))
    return np.stack(parts).tobytes()


def unpack(fp: bytes) -> np.ndarray:
    v = np.frombuffer(fp, dtype=np.uint8).astype(np.float32).reshape(len(CROPS), -1)
    v -= v.mean(axis=1, keepdims=True)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-6)


def match_score(a: bytes | np.ndarray, b: bytes | np.ndarray) -> float:
    """Pixel likeness of two fingerprints (bytes, or ``unpack``ed: faster when one image is in many pairs)
    in [-1, 1]: the best correlation over the crop combinations."""
    a = unpack(a) if isinstance(a, bytes) else a
    b = unpack(b) if isinstance(b, bytes) else b
    return float((a @ b.T).max())


# --- candidates -------------------------------------------------------------------------------------
def candidate_pairs(vectors: np.ndarray, threshold: float, k: int = NEIGHBOURS,
                    exact: bool | None = None) -> list[tuple[int, int, float]]:
    """(row_a, row_b, cosine) with row_a < row_b for neighbours at or above ``threshold``; k-NN search keeps
    the output at most N*k pairs. ``exact`` forces flat (True) or IVF (False) search, else flat up to EXACT_MAX."""
    from .vectors import IndexPolicy, VectorIndex

    n = len(vectors)
    if n < 2:
        return []
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    kk = min(k + 1, n)  # +1: an image is its own nearest neighbour
    if exact is None:
        exact = n <= EXACT_MAX
    # The library's own index builder: flat when exact, else IVF (~2*sqrt(N) lists, quantizer trained on a
    # sample); a query then scans a few thousand vectors, far below the N^2 of comparing all pairs.
    policy = IndexPolicy(flat_max=n if exact else 0, recall_target=0.97)
    index = VectorIndex.build(np.arange(n, dtype=np.int64), x, x.shape[1], policy)
    nprobe = None if exact else min(max(index.nprobe, NPROBE), index.plan.nlist)
    scores, nbrs = index.search(x, kk, nprobe=nprobe)
    rows, cols, sims = np.repeat(np.arange(n, dtype=np.int64), kk), nbrs.ravel(), scores.ravel()
    keep = (cols >= 0) & (cols != rows) & (sims >= threshold)
    rows, cols, sims = rows[keep], cols[keep], sims[keep]
    a, b = np.minimum(rows, cols), np.maximum(rows, cols)
    # Each pair is usually found from both ends; keep one copy (with the higher score, should they differ).
    order = np.lexsort((-sims, b, a))
    a, b, sims = a[order], b[order], sims[order]
    first = np.ones(len(a), dtype=bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return list(zip(a[first].tolist(), b[first].tolist(), sims[first].astype(float).tolist()))


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]  # path halving
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> list[list[int]]:
        by_root: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            by_root.setdefault(self.find(i), []).append(i)
        return [g for g in by_root.values() if len(g) > 1]


# --- report -----------------------------------------------------------------------------------------
@dataclass
class Member:
    id: int
    path: str
    width: int | None
    height: int | None
    size: int
    taken_at: str | None
    keeper: bool = False
    similarity: float | None = None  # CLIP cosine to the keeper
    match: float | None = None  # pixel likeness to the keeper (fingerprint correlation)


@dataclass
class Group:
    members: list[Member]

    @property
    def keeper(self) -> Member:
        return self.members[0]

    def as_dict(self) -> dict:
        return {"keeper": self.keeper.path, "images": [asdict(m) for m in self.members]}


@dataclass
class DupeReport:
    mode: str  # "duplicates" | "similar"
    threshold: float
    images: int = 0
    candidates: int = 0  # pairs proposed by CLIP
    confirmed: int = 0  # pairs that passed the perceptual check (all candidates with --similar)
    groups: list[Group] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"mode": self.mode, "threshold": self.threshold, "images": self.images,
                "candidates": self.candidates, "confirmed": self.confirmed, "seconds": round(self.seconds, 3),
                "groups": [g.as_dict() for g in self.groups],
                "unreadable": [{"path": p, "reason": r} for p, r in self.unreadable]}


def _age_key(row) -> tuple:
    return (row.taken_at or datetime.fromtimestamp(row.mtime_ns / 1e9).isoformat(), row.mtime_ns)


def keeper_order(rows: list) -> list:
    """Largest resolution first, then oldest, then path (stable and predictable)."""
    return sorted(rows, key=lambda r: (-((r.width or 0) * (r.height or 0)), _age_key(r), r.path))


def _fingerprints(store, rows: dict, ids: set[int], workers: int, max_pixels: int) -> tuple[dict[int, bytes], list]:
    """Fingerprints for ``ids``: cached ones from SQLite, the rest decoded in threads and cached."""
    known = store.fingerprints(ids)
    todo = [rows[i] for i in sorted(ids - set(known))]
    failed: list[tuple[str, str]] = []
    fresh = []  # (id, content hash, fingerprint) to cache

    def compute(row):
        return fingerprint(images.open_image(row.path, draft_size=128, max_pixels=max_pixels)[0])

    for row, fp in zip(todo, images.decode_many(todo, compute, workers)):
        if isinstance(fp, DecodeError):
            failed.append((row.path, str(fp)))
        else:
            known[row.id] = fp
            fresh.append((row.id, row.hash, fp))
    if not store.read_only:  # a cache: a read-only library still answers, computing them again next time
        store.save_fingerprints(fresh)
    return known, failed


def _identities(rows: dict) -> dict[int, tuple[int, int]]:
    """(device, inode) of each row's file; rows whose file is gone are left out."""
    out: dict[int, tuple[int, int]] = {}
    for i, r in rows.items():
        with contextlib.suppress(OSError):
            st = os.stat(r.path)
            out[i] = (st.st_dev, st.st_ino)
    return out


def find_duplicates(settings: Settings, store, model, under: str | os.PathLike | None = None,
                    threshold: float | None = None, similar: bool = False, min_match: float = DEFAULT_MIN_MATCH,
                    exact: bool | None = None) -> DupeReport:
    """Group the library's near-duplicates (or CLIP-similar images with ``similar``); deletes nothing.
    ``model`` is the model row whose stored vectors are compared: nothing is encoded, no model loaded."""
    threshold = _number(DEFAULT_THRESHOLD if threshold is None else threshold, "threshold",
                        "give a cosine similarity between -1 and 1, e.g. 0.9", -1.0, 1.0)
    min_match = _number(min_match, "min_match", "give a pixel likeness between 0 and 1, e.g. 0.96", 0.0, 1.0)
    started = time.perf_counter()
    ids = folder_ids(store, under).tolist() if under else None
    ids_arr, vecs = store.load_vectors(model.id, ids)
    report = DupeReport("similar" if similar else "duplicates", threshold, images=len(ids_arr))
    pairs = candidate_pairs(vecs, threshold, exact=exact)
    report.candidates = len(pairs)
    involved = {int(ids_arr[a]) for a, _, _ in pairs} | {int(ids_arr[b]) for _, b, _ in pairs}
    rows = store.get_images(involved)
    identity = _identities(rows)  # files deleted since indexing can be neither compared nor kept
    prints: dict[int, np.ndarray] = {}  # unpacked once: an image may sit in many pairs
    if not similar:  # no encoder running: decoding gets every core
        raw, report.unreadable = _fingerprints(store, rows, set(identity), settings.decode_workers(),
                                               settings.max_pixels)
        prints = {i: unpack(fp) for i, fp in raw.items()}
    uf = UnionFind(len(ids_arr))
    for a, b, _ in pairs:
        ia, ib = int(ids_arr[a]), int(ids_arr[b])
        if ia not in identity or ib not in identity or identity[ia] == identity[ib]:
            continue  # gone, or one physical file under two names (symlink, hard link): deleting "the copy" loses it
        if not similar and (ia not in prints or ib not in prints or match_score(prints[ia], prints[ib]) < min_match):
            continue
        report.confirmed += 1
        uf.union(a, b)
    for members in uf.groups():
        ordered = keeper_order([rows[int(ids_arr[m])] for m in members])
        row_of = {int(ids_arr[m]): m for m in members}
        keep = ordered[0]
        keep_vec = vecs[row_of[keep.id]]
        report.groups.append(Group([
            Member(r.id, r.path, r.width, r.height, r.size, r.taken_at, keeper=r is keep,
                   similarity=round(float(vecs[row_of[r.id]] @ keep_vec), 4),
                   match=round(match_score(prints[r.id], prints[keep.id]), 4)
                   if r.id in prints and keep.id in prints else None)
            for r in ordered]))
    report.groups.sort(key=lambda g: (-len(g.members), g.keeper.path))
    report.seconds = time.perf_counter() - started
    return report
