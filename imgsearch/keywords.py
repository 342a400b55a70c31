"""Keyword search (SQLite FTS5 over file names, folders, captions and tags) and its combination with CLIP,
chosen by a SearchRequest's ``keyword`` and ``blend``:
- filter (default): only images matching the keywords, ranked by CLIP; the filter runs inside the vector search
  (``allowed_ids``), so it never returns fewer hits than exist.
- blend: ``score = (1 - w) * clip + w * keyword``, both scaled to 0..1: the cosine between the lowest and highest
  of the library's BLEND_POOL best hits and the keyword matches (below that, under 0), keyword relevance by the
  best match; an image that matches no keyword scores 0 on that side.

Keyword syntax: words must all match, each as a word prefix ("2019" matches IMG_20190501.jpg); "double quotes"
match a phrase; -word excludes. Case and accents are ignored.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field

import numpy as np

from . import files
from .errors import ParamError, UsageError
from .store import Store

# A keyword-only match list longer than this is cut to the most relevant ones when blending; the
# CLIP side still sees every image.
BLEND_KEYWORD_LIMIT = 10_000
BLEND_POOL = 100  # CLIP's side of a blend is scaled over the library's this many best hits and the keyword matches
_WORD = re.compile(r"[^\W_]")  # a letter or digit: what FTS5 (unicode61) makes words of


def _quote(term: str) -> str:
    return '"' + term.replace('"', '""') + '"'


def to_fts(text: str) -> str:
    """User keywords -> a safe FTS5 MATCH expression (UsageError when nothing searchable is left)."""
    try:
        parts = shlex.split(text, posix=True)
    except ValueError:  # unbalanced quote: take the words as they are
        parts = text.replace('"', " ").split()
    phrases = {m.group(1) for m in re.finditer(r'"([^"]+)"', text)}
    positives, negatives = [], []
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
    # One NOT of all the exclusions: a NOT per word nested, and past ~100 of them FTS5's parser overflowed
    return f"({expr}) NOT ({' OR '.join(negatives)})" if negatives else expr


def match(store: Store, text: str, limit: int | None = None) -> dict[int, float]:
    """{image_id: relevance in (0, 1]} for images matching ``text``; the best match scores 1."""
    found = store.keyword_matches(to_fts(text), limit=limit)
    if not found:
        return {}
    top = max(rel for _, rel in found) or 1.0
    # bm25 can be ~0 for terms present in nearly every row; keep every match above zero.
    return {i: max(rel / top, 1e-6) for i, rel in found}


def blend_scores(clip: dict[int, float], keyword: dict[int, float], weight: float,
                 scale: tuple[float, float] | None = None) -> list[tuple[int, float]]:
    """(id, (1-w)*clip01 + w*keyword) best first; clip01 is the cosine min-max scaled over ``scale`` (lowest,
    highest), the candidates' own range when None."""
    if not clip:
        return []
    lo, hi = scale or (min(clip.values()), max(clip.values()))
    span = hi - lo
    out = [(i, (1.0 - weight) * ((c - lo) / span if span > 1e-12 else 1.0) + weight * keyword.get(i, 0.0))
           for i, c in clip.items()]
    return sorted(out, key=lambda p: (-p[1], p[0]))


def blended_search(searcher, vec: np.ndarray, request, allowed: np.ndarray | None) -> list:
    """CLIP and keyword scores blended (``request.blend``). An image's score depends on the query alone: the
    cosine is scaled over the library's BLEND_POOL best hits and every keyword match, before any filter, so k,
    the filters, ``exclude_ids`` and ``min_score`` (on the cosine) only remove hits, never rescore the rest."""
    from .results import hits_for

    store = searcher.store
    kw = match(store, request.keyword, limit=BLEND_KEYWORD_LIMIT)
    # Exact cosines whatever the index type: IVF-PQ candidates are re-ranked with the stored vectors, and the
    # keyword matches outside the pool are scored straight from SQLite (an IVF probe could miss them).
    scores, ids = searcher.index().search(vec[None, :], BLEND_POOL, exact_vectors=searcher.exact_vectors)
    cosine = {int(i): round(float(s), 6) for s, i in zip(scores[0], ids[0]) if i >= 0}
    missing = np.array(sorted(set(kw) - set(cosine)), dtype=np.int64)
    if len(missing):
        got, vecs = searcher.exact_vectors(missing)
        cosine.update((int(i), round(float(s), 6)) for i, s in zip(got, vecs @ np.asarray(vec, dtype=np.float32)))
    if not cosine:
        return []
    scale = min(cosine.values()), max(cosine.values())
    # The candidates: CLIP's best k that pass the filters (an image no keyword matches ranks by its cosine
    # alone) and every keyword match that passes them.
    clip = {h.id: h.score for h in searcher.search_vector(vec, request.k, request.min_score, allowed,
                                                          request.exclude_ids)}
    keep = None if allowed is None else set(allowed.tolist())
    clip.update((i, cosine[i]) for i in kw if i in cosine and (keep is None or i in keep)
                and i not in request.exclude_ids and (request.min_score is None or cosine[i] >= request.min_score))
    return hits_for(store, blend_scores(clip, kw, request.blend, scale), request.k)


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
    rows = store.images_at(p.path for p in result.pairs)  # one lookup per 500 paths, not one per caption
    report.not_in_library = list(dict.fromkeys(p.path for p in result.pairs if p.path not in rows))
    texts = ((rows[p.path].id, " ".join(p.caption.split())) for p in result.pairs if p.path in rows)
    pairs = [(image_id, text) for image_id, text in texts if text]
    if pairs:
        report.added = store.add_captions(pairs, source=str(source), replace=replace)
    report.already = len(pairs) - report.added
    return report
