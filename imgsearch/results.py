"""Result types of the Python API (imgsearch.Library): plain dataclasses, standard library only, so a cold
text query and `import imgsearch` never pay for numpy, SQLAlchemy or torch to name them."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field


class _AsDict:
    def as_dict(self) -> dict:
        return asdict(self)  # nested dataclasses too (LibraryStatus.models)


@dataclass
class Hit(_AsDict):
    """One search result: ``score`` is the cosine similarity (or keyword relevance for keyword-only search)."""

    rank: int
    id: int
    path: str
    score: float
    width: int | None
    height: int | None
    size: int
    taken_at: str | None
    taken_source: str | None = None  # "exif", or "file": taken_at is then the file's modification time
    # Above the model's calibrated relevance floor (relevance.py); None where no floor applies (keyword
    # ranking, text and images mixed in one query, negatives or unliked images).
    relevant: bool | None = None
    gps_lat: float | None = None  # where it was taken (EXIF GPS), for maps
    gps_lon: float | None = None


@dataclass
class IndexReport:
    new: int = 0
    updated: int = 0
    unchanged: int = 0
    moved: int = 0
    removed: int = 0
    encoded: int = 0
    reused: int = 0  # vectors copied from an identical file already in the library
    aliases: int = 0  # second paths (symlinks, hard links) to a file the library already has
    alias_paths: set[str] = field(default_factory=set, repr=False)  # those paths (watch moves a row to one)
    failed_before: int = 0  # failed in an earlier run and unchanged since: not retried
    failed: list[tuple[str, str]] = field(default_factory=list)
    # folder -> images kept although their files were not found: the folder holds no images at all now (an
    # unmounted drive's empty mount point); `imgsearch forget FOLDER` drops them
    kept: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    interrupted: bool = False
    model: str = ""
    image_tower: str = ""  # which backend/precision made the vectors, e.g. "onnxruntime int8"
    int8_parity: float | None = None  # min cosine int8 vs fp32 on a sample of this run's images
    parity_images: int = 0
    decode: str = ""  # how files were decoded: Pillow, or batched tensors (and why not, when refused)

    def counts(self) -> dict[str, int]:
        return {"new": self.new, "updated": self.updated, "unchanged": self.unchanged, "moved": self.moved,
                "removed": self.removed, "failed": len(self.failed)}

    @property
    def found_nothing(self) -> bool:
        """No image at all under the paths indexed: not even an unchanged, aliased, failed or kept one."""
        return not (any(self.counts().values()) or self.aliases or self.failed_before or self.kept)

    def as_dict(self) -> dict:
        return {**self.counts(), "encoded": self.encoded, "reused": self.reused, "aliases": self.aliases,
                "failed_before": self.failed_before, "seconds": round(self.seconds, 3),
                "interrupted": self.interrupted, "model": self.model, "image_tower": self.image_tower,
                "int8_parity": self.int8_parity, "parity_images": self.parity_images, "decode": self.decode,
                "failures": [{"path": p, "reason": r} for p, r in self.failed], "kept": self.kept}


@dataclass
class ModelStatus(_AsDict):
    """One model's vectors in the library and the state of its FAISS cache file."""

    id: int
    model: str  # label, e.g. "ViT-B-32 (laion2b_s34b_b79k)"
    name: str
    pretrained: str | None
    dim: int
    vectors: int
    index_file: str
    index_state: str
    index_type: str | None
    index_vectors: int | None
    recall_at_10: float | None
    nprobe: int | None
    index_bytes: int
    relevance_floor: dict | None = None  # {"text", "image", "vectors", "stale"} (relevance.py)


@dataclass
class LibraryStatus(_AsDict):
    """What the library holds (Library.status); ``as_dict()`` is `imgsearch status --json`."""

    home: str
    images: int
    failures: int
    failed_files: list[dict] = field(default_factory=list)  # the first 20: {"path", "reason"}
    models: list[ModelStatus] = field(default_factory=list)
    last_run: dict | None = None
    disk_bytes: int = 0
    read_only: bool = False
    schema_version: int | None = None
    # taken_first/taken_last (local ISO), taken_exif/taken_file (where dates came from), with_gps,
    # with_camera, without_meta (indexed before schema 5; the next `index` fills them)
    when_where: dict | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "LibraryStatus":
        return cls(**{**d, "models": [ModelStatus(**m) for m in d["models"]]})


def hits_for(store, scored, k: int, min_score: float | None = None) -> list[Hit]:
    """Hits for (id, score) pairs, best first, skipping files deleted since indexing; stops at ``k`` or at the
    first score under ``min_score`` (compared as shown, rounded: a score copied from the output keeps its hit)."""
    scored = list(scored)
    hits: list[Hit] = []
    step = max(4 * k, 64)
    for start in range(0, len(scored), step):
        chunk = scored[start:start + step]
        rows = store.get_images(i for i, _ in chunk)
        for i, score in chunk:
            score = round(float(score), 6)
            if min_score is not None and score < min_score:
                return hits
            row = rows.get(i)
            if row is None or not os.path.exists(row.path):
                continue
            hits.append(Hit(len(hits) + 1, i, row.path, score, row.width, row.height, row.size, row.taken_at,
                            row.taken_source, gps_lat=row.gps_lat, gps_lon=row.gps_lon))
            if len(hits) == k:
                return hits
    return hits
