"""Keyword search (SQLite FTS5 over file names, folders, captions and tags) and its combination with CLIP,
chosen by a SearchRequest's ``keyword`` and ``blend``:
- filter (default): only images matching the keywords, ranked by CLIP; the filter runs inside the vector search
  (``allowed_ids``), so it never returns fewer hits than exist.
- blend: ``score = (1 - w) * clip + w * keyword``, both scaled to 0..1 over the candidates (CLIP's top hits plus
  the keyword matches); an image that matches no keyword scores 0 on that side.

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


def blend_scores(clip: dict[int, float], keyword: dict[int, float], weight: float) -> list[tuple[int, float]]:
    """(id, (1-w)*clip01 + w*keyword) best first; clip01 is min-max scaled over the candidates."""
    if not clip:
        return []
    values = np.fromiter(clip.values(), dtype=np.float64)
    lo, span = float(values.min()), float(values.max()) - float(values.min())
    out = [(i, (1.0 - weight) * ((c - lo) / span if span > 1e-12 else 1.0) + weight * keyword.get(i, 0.0))
           for i, c in clip.items()]
    return sorted(out, key=lambda p: (-p[1], p[0]))


def blended_search(searcher, vec: np.ndarray, request, allowed: np.ndarray | None) -> list:
    """CLIP and keyword scores blended (``request.blend``); ``min_score`` still applies to the CLIP cosine."""
    from .results import hits_for

    store = searcher.store
    exclude = set(request.exclude_ids)
    kw = match(store, request.keyword, limit=BLEND_KEYWORD_LIMIT)
    if allowed is not None:
        keep = set(allowed.tolist())
        kw = {i: s for i, s in kw.items() if i in keep}
    pool = max(100, 5 * request.k + len(exclude))
    # Scores are exact cosines whatever the index type: IVF-PQ candidates are re-ranked with the stored
    # vectors (as the plain search does), so --min-score and the blend never see a PQ estimate.
    scores, ids = searcher.index().search(vec[None, :], pool, allowed=allowed, exact_vectors=searcher.exact_vectors)
    clip = {int(i): float(s) for s, i in zip(scores[0], ids[0]) if i >= 0}
    missing = np.array(sorted(set(kw) - set(clip)), dtype=np.int64)
    if len(missing):
        # Keyword matches outside the CLIP pool: score them straight from SQLite (an IVF probe could miss them).
        got, vecs = searcher.exact_vectors(missing)
        clip.update((int(i), float(s)) for i, s in zip(got, vecs @ np.asarray(vec, dtype=np.float32)))
    min_score = request.min_score
    clip = {i: s for i, s in clip.items() if i not in exclude and (min_score is None or s >= min_score)}
    return hits_for(store, blend_scores(clip, kw, request.blend), request.k)


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
