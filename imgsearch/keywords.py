"""Keyword search (SQLite FTS5 over file names, folders, captions and tags) and its combination with CLIP.

Two ways to combine, both used by ``Searcher.search(..., keyword=..., blend=...)``:
- filter (default): only images matching the keywords, ranked by CLIP; the filter runs inside the
  vector search (``allowed_ids``), so it never returns fewer hits than exist.
- blend: ``score = (1 - w) * clip + w * keyword`` where both are scaled to 0..1 over the candidates
  (CLIP's top hits plus the keyword matches); images that match no keyword score 0 on that side.

Keyword syntax: words must all match, each as a word prefix ("2019" matches IMG_20190501.jpg);
"double quotes" match a phrase; -word excludes. Case and accents are ignored.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from . import files
from .errors import ParamError, UsageError
from .queryspec import check_k
from .results import Hit
from .store import Store

# A keyword-only match list longer than this is cut to the most relevant ones when blending; the
# CLIP side still sees every image.
BLEND_KEYWORD_LIMIT = 10_000
_WORD = re.compile(r"\w", re.UNICODE)


def _quote(term: str) -> str:
    return '"' + term.replace('"', '""') + '"'


def to_fts(text: str) -> str:
    """User keywords -> a safe FTS5 MATCH expression (UsageError when nothing searchable is left)."""
    try:
        parts = shlex.split(text, posix=True)
    except ValueError:  # unbalanced quote: take the words as they are
        parts = text.replace('"', " ").split()
    phrases = {m.group(1) for m in re.finditer(r'"([^"]+)"', text)}
    positives: list[str] = []
    negatives: list[str] = []
    for part in parts:
        negate = part.startswith("-") and len(part) > 1
        term = part[1:] if negate else part
        if not _WORD.search(term):
            continue  # punctuation alone tokenises to nothing and would match nothing
        # A quoted phrase matches as written; a bare word also matches longer words that start with it.
        expr = _quote(term) if term in phrases else _quote(term) + "*"
        (negatives if negate else positives).append(expr)
    if not positives:
        raise ParamError("keyword", "has no words to look for; give e.g. 2019 or '\"red car\" -draft'")
    expr = " AND ".join(positives)
    for neg in negatives:
        expr = f"({expr}) NOT {neg}"
    return expr


def match(store: Store, text: str, limit: int | None = None) -> dict[int, float]:
    """{image_id: relevance in (0, 1]} for images matching ``text``; the best match scores 1."""
    found = store.keyword_matches(to_fts(text), limit=limit)
    if not found:
        return {}
    top = max(rel for _, rel in found) or 1.0
    # bm25 can be ~0 for terms present in nearly every row; keep every match above zero.
    return {i: max(rel / top, 1e-6) for i, rel in found}


def restrict(store: Store, allowed_ids: np.ndarray | None, tags: str | Sequence[str] | None = None,
             keyword: str | None = None) -> np.ndarray | None:
    """Intersect ``allowed_ids`` with images carrying all ``tags`` and matching ``keyword``."""
    allowed = allowed_ids
    if tags:
        labels = [tags] if isinstance(tags, str) else [t for t in tags if t]
        if labels:
            with_tags = store.ids_with_tags([t.strip() for t in labels])
            allowed = with_tags if allowed is None else np.intersect1d(allowed, with_tags)
    if keyword:
        matched = np.array(sorted(match(store, keyword)), dtype=np.int64)
        allowed = matched if allowed is None else np.intersect1d(allowed, matched)
    return allowed


def check_blend(weight: float | None) -> None:
    if weight is not None and not 0.0 <= weight <= 1.0:
        raise ParamError("blend", "give a keyword weight between 0 and 1 (0 = CLIP only, 1 = keywords only)")


def _folder_ids(store: Store, under: str | None) -> np.ndarray | None:
    if not under:
        return None
    folder = files.abspath(under)
    if not os.path.isdir(folder) and store.image_by_path(folder) is None:
        raise ParamError("under", "no such folder")
    return store.ids_under(folder)


def _hits(store: Store, scored: Iterable[tuple[int, float]], k: int, min_score: float | None = None) -> list:
    """Hits for (id, score) pairs in order, skipping files deleted since indexing."""

    scored = list(scored)
    hits: list = []
    for start in range(0, len(scored), max(4 * k, 64)):
        chunk = scored[start:start + max(4 * k, 64)]
        rows = store.get_images(i for i, _ in chunk)
        for i, score in chunk:
            if min_score is not None and score < min_score:
                return hits
            row = rows.get(i)
            if row is None or not os.path.exists(row.path):
                continue
            hits.append(Hit(len(hits) + 1, i, row.path, round(float(score), 6), row.width, row.height, row.size,
                            row.taken_at, row.taken_source))
            if len(hits) == k:
                return hits
    return hits


def keyword_search(store: Store, text: str, k: int = 10, under: str | None = None,
                   tags: str | Sequence[str] | None = None, allowed_ids: np.ndarray | None = None) -> list:
    """Keyword-only ranking (no CLIP): Hits scored by relevance, best match 1.0."""
    check_k(k)
    allowed = restrict(store, allowed_ids, tags)
    in_folder = _folder_ids(store, under)
    if in_folder is not None:
        allowed = in_folder if allowed is None else np.intersect1d(allowed, in_folder)
    keep = None if allowed is None else set(allowed.tolist())
    scored = sorted(match(store, text).items(), key=lambda p: (-p[1], p[0]))
    return _hits(store, ((i, s) for i, s in scored if keep is None or i in keep), k)


def blend_scores(clip: dict[int, float], keyword: dict[int, float], weight: float) -> list[tuple[int, float]]:
    """(id, (1-w)*clip01 + w*keyword) best first; clip01 is min-max scaled over the candidates."""
    if not clip:
        return []
    values = np.fromiter(clip.values(), dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    span = hi - lo
    out = []
    for i, c in clip.items():
        c01 = (c - lo) / span if span > 1e-12 else 1.0
        out.append((i, (1.0 - weight) * c01 + weight * keyword.get(i, 0.0)))
    out.sort(key=lambda p: (-p[1], p[0]))
    return out


def blended_search(searcher, vec: np.ndarray, text: str, weight: float, k: int = 10, min_score: float | None = None,
                   under: str | None = None, allowed_ids: np.ndarray | None = None,
                   exclude_ids: Iterable[int] = ()) -> list:
    """CLIP and keyword scores blended; ``min_score`` still applies to the CLIP cosine."""
    check_blend(weight)
    store = searcher.store
    allowed = allowed_ids
    in_folder = _folder_ids(store, under)
    if in_folder is not None:
        allowed = in_folder if allowed is None else np.intersect1d(allowed, in_folder)
    exclude = {int(i) for i in exclude_ids}
    kw = match(store, text, limit=BLEND_KEYWORD_LIMIT)
    if allowed is not None:
        keep = set(allowed.tolist())
        kw = {i: s for i, s in kw.items() if i in keep}
    index = searcher.index()
    model_id = searcher.model.id
    clip: dict[int, float] = {}
    pool = max(100, 5 * k + len(exclude))
    # Scores are exact cosines whatever the index type: IVF-PQ candidates are re-ranked with the stored
    # vectors (as the plain search does), so --min-score and the blend never see a PQ estimate.
    scores, ids = index.search(vec[None, :], pool, allowed=allowed,
                               exact_vectors=lambda want: store.load_vectors(model_id, want))
    clip.update((int(i), float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0)
    missing = np.array(sorted(set(kw) - set(clip)), dtype=np.int64)
    if len(missing):
        # Keyword matches outside the CLIP pool: score them straight from SQLite (an IVF probe could miss them).
        got, vecs = store.load_vectors(model_id, missing)
        clip.update((int(i), float(s)) for i, s in zip(got, vecs @ np.asarray(vec, dtype=np.float32)))
    clip = {i: s for i, s in clip.items() if i not in exclude and (min_score is None or s >= min_score)}
    return _hits(store, blend_scores(clip, kw, weight), k)


# --- captions (searchable text the user attaches to images) ----------------------------------------
def _library_image(store: Store, path: str | os.PathLike):
    full = files.abspath(path)
    row = store.image_by_path(full)
    if row is None:
        if not os.path.exists(full):
            raise UsageError(f"image not found: {path}")
        raise UsageError(f"{path} is not in the library; run `imgsearch index` on its folder first")
    return row


def add_caption(store: Store, path: str | os.PathLike, text: str, replace: bool = False) -> bool:
    """Attach a caption to a library image; False when it already had exactly this caption."""
    text = " ".join(text.split())
    if not text:
        raise UsageError("empty caption; give some words, e.g. imgsearch caption photo.jpg \"our dog at the beach\"")
    row = _library_image(store, path)
    return store.add_captions([(row.id, text)], source="cli", replace=replace) > 0


def captions_of(store: Store, path: str | os.PathLike) -> list[str]:
    return store.captions_of(_library_image(store, path).id)


@dataclass
class CaptionImport:
    source: str
    added: int = 0
    already: int = 0  # identical caption already stored
    not_in_library: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (where, reason) from the reader

    def as_dict(self) -> dict:
        return {"source": self.source, "added": self.added, "already": self.already,
                "not_in_library": self.not_in_library,
                "problems": [{"where": w, "reason": r} for w, r in self.problems]}


def import_captions(store: Store, source: str | os.PathLike, image_col: str = "path", caption_col: str = "caption",
                    replace: bool = False) -> CaptionImport:
    """Store captions from a CSV/TSV/JSONL file or sidecar folder (the formats `finetune` reads)."""
    from .captions import read_captions

    result = read_captions(source, image_col=image_col, caption_col=caption_col)
    report = CaptionImport(str(source), problems=list(result.problems))
    pairs: list[tuple[int, str]] = []
    ids: dict[str, int | None] = {}
    for pair in result.pairs:
        if pair.path not in ids:
            row = store.image_by_path(pair.path)
            ids[pair.path] = row.id if row else None
            if row is None:
                report.not_in_library.append(pair.path)
        image_id = ids[pair.path]
        text = " ".join(pair.caption.split())
        if image_id is not None and text:
            pairs.append((image_id, text))
    if pairs:
        report.added = store.add_captions(pairs, source=str(source), replace=replace)
    report.already = len(pairs) - report.added
    return report
