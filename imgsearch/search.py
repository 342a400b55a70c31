"""The search engine: one Searcher answers every SearchRequest, from every door.

Its parts are chosen once per library and model: the text encoder (the verified text-tower export wherever one
exists or can be made, so every door embeds a query identically; torch only to make it or where none can) and
the vector backend (vectors.py via indexcache.py). Each filter is written once, in ``allowed_ids``. Nothing here
imports torch, open_clip or FAISS until a request needs them.
"""

from __future__ import annotations

import os
import threading

import numpy as np

from .config import Settings
from .errors import DecodeError, ModelMismatchError, ParamError, UsageError
from .modelspec import ModelSpec
from .request import SearchRequest, Term
from .results import Hit, hits_for

__all__ = ["Searcher", "SearchRequest", "Term", "Hit", "model_row_for", "allowed_ids", "keyword_search", "rocchio"]

# Refinement by example (like/unlike marks): q' = a*q + b*mean(liked) - c*mean(unliked). Measured by
# bench/refine_gain.py on the shapes library: see docs/performance.md.
ROCCHIO = (1.0, 2.0, 1.0)


def rocchio(query: np.ndarray, liked: np.ndarray, unliked: np.ndarray, weights=ROCCHIO) -> np.ndarray:
    """The query moved toward the mean of the liked vectors and away from the unliked ones, normalised.
    ``query`` may be zero (marks alone: "more like these")."""
    a, b, c = weights
    vec = a * np.asarray(query, dtype=np.float32)
    for sign, weight, marked in ((1, b, liked), (-1, c, unliked)):
        if len(marked):
            vec = vec + sign * weight * np.asarray(marked, dtype=np.float32).mean(axis=0)
    norm = float(np.linalg.norm(vec))
    if norm < 1e-8:
        raise UsageError("the marked images cancel out the query; unmark some, or like at least one image")
    return (vec / norm).astype(np.float32)


def model_row_for(store, spec: ModelSpec, fingerprint: str):
    """The library's model row for these weights, or a ModelMismatchError saying what to do."""
    row = store.find_model(spec.name, spec.pretrained, fingerprint)
    if row is not None and store.vector_count(row.id) > 0:
        return row
    present = [m for m in store.models() if m.vectors]
    same_name = [m for m in present if m.name == spec.name and (m.pretrained or None) == (spec.pretrained or None)]
    if same_name:
        raise ModelMismatchError(
            f"the library's vectors for {spec.label} were made with different weights (the model files changed); "
            f"re-run `imgsearch --model {spec.name} index PATH` to re-encode")
    if present:
        names = ", ".join(m.label for m in present)
        raise ModelMismatchError(
            f"the library has no vectors for {spec.label} (it has: {names}); use --model with one of those, "
            f"or run `imgsearch --model {spec.name} index PATH` first")
    raise ModelMismatchError("the library is empty; run `imgsearch index PATH` first")


def folder_ids(store, under: str | os.PathLike) -> np.ndarray:
    """The ids of the library images in folder ``under`` (or that one image); a ParamError when neither."""
    from .files import abspath

    folder = abspath(under)
    if not os.path.isdir(folder) and store.image_by_path(folder) is None:
        raise ParamError("under", "no such folder")
    return store.ids_under(folder)


def allowed_ids(store, request: SearchRequest, keyword_filter: bool = True) -> np.ndarray | None:
    """The ids a request's filters let through (None: all): folder, zero-shot tags, keywords (unless they are
    blended into the score instead), capture date, place and camera."""
    allowed = None

    def narrow(ids) -> None:
        nonlocal allowed
        ids = np.asarray(ids, dtype=np.int64)
        allowed = ids if allowed is None else np.intersect1d(allowed, ids)

    if request.under:
        narrow(folder_ids(store, request.under))
    if request.when:
        from .geo import build

        narrow(store.ids_matching(build(**request.when)))
    if request.tags:
        narrow(store.ids_with_tags(list(request.tags)))
    if request.keyword and keyword_filter and request.blend is None:
        from .keywords import match

        narrow(sorted(match(store, request.keyword)))
    return allowed


def keyword_search(store, request: SearchRequest) -> list[Hit]:
    """A keyword-only request (no CLIP): hits scored by keyword relevance, best match 1.0, after the request's
    other filters; ``min_score`` cuts on that score. Needs no model."""
    from .keywords import match

    allowed = allowed_ids(store, request, keyword_filter=False)
    keep = None if allowed is None else set(allowed.tolist())
    scored = sorted(match(store, request.keyword).items(), key=lambda p: (-p[1], p[0]))
    return hits_for(store, ((i, s) for i, s in scored if (keep is None or i in keep) and i not in
                            request.exclude_ids), request.k, request.min_score)


def query_image(t: Term, draft_size: int, max_pixels: int):
    """An image term decoded to RGB (a search's, a score's): from a path, from bytes in memory, or a PIL image as
    given."""
    from . import images

    value = t.value
    try:
        if isinstance(value, (str, bytes)):
            return images.open_image(value, draft_size=draft_size, max_pixels=max_pixels)[0]
        images.check_size(*value.size, max_pixels)  # a PIL image
    except DecodeError as e:
        raise UsageError(f"cannot use {t.noun} {t.name or value}: {e}") from None
    return value if value.mode == "RGB" else value.convert("RGB")


class Searcher:
    """One library and one model, warm: the text encoder, the image encoder (loaded by the Library that owns
    this searcher, on first image term) and the vector index stay loaded. imgsearch.Library creates it and
    documents the thread-safety contract: encodes run under ``encode_lock``, index (re)loads under its own lock.
    """

    def __init__(self, settings: Settings, store, load_encoder, encode_lock, load_images=None):
        from .encoder import known_fingerprint, resolve_weights

        self.settings = settings
        self.store = store
        self._load_encoder = load_encoder  # the model (torch): a text tower without an export, and making one
        self._load_images = load_images or load_encoder  # what encodes query images
        spec = ModelSpec(settings.model, settings.pretrained).canonical()
        # Check the library before paying for a model load: a mismatch is reported in milliseconds.
        fp = known_fingerprint(spec)
        if fp is None or (fp.startswith("tag:") and store.find_model(spec.name, spec.pretrained, fp) is None):
            fp = resolve_weights(spec)[0]  # validates the tag / hub model and words the error
        self.model = model_row_for(store, spec, fp)
        self._text = self._index = self._index_version = self._floor = self._floor_version = None
        self._lock, self._floor_lock, self._encode_lock = threading.Lock(), threading.Lock(), encode_lock
        # Query language: --lang, else each query's script, else the language recorded at index time.
        self.lang, self.library_lang = settings.lang, store.get_meta("lang")

    # --- the parts --------------------------------------------------------------------------------
    def text_encoder(self):
        """What embeds texts, chosen once: the verified export (made now from the torch model if missing),
        else the torch encoder for a model whose text tower cannot be exported. Both have
        ``encode_texts(texts, lang, default_lang)`` and ``logit_scale``."""
        with self._encode_lock:
            if self._text is None:
                from . import textfast

                for attempt in (1, 2):
                    try:
                        self._text = textfast.open_tower(self.settings.home, self.model.fingerprint)
                        break
                    except textfast.ExportError as e:
                        if attempt == 1 and not self.store.read_only:
                            textfast.ensure_export(self.settings.home, self.encoder, quiet=True)  # records why not
                            continue
                        textfast.warn_once(self.model.label, str(e))
                        self._text = self.encoder
            return self._text

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        tower = self.text_encoder()
        with self._encode_lock:
            return tower.encode_texts(list(texts), self.lang, self.library_lang)

    @property
    def encoder(self):
        """The image encoder (torch, or onnxruntime), loaded through the Library on first use."""
        return self._load_encoder()

    def index(self):
        """The vector index (numpy or FAISS), reloaded when the library changed since it was loaded."""
        from .indexcache import model_index

        with self._lock:
            version = self.store.model_version(self.model.id)
            if self._index is None or version != self._index_version:
                self._index, self._index_version, _ = model_index(self.settings, self.store, self.model.id)
            return self._index

    # --- embedding ---------------------------------------------------------------------------------
    def embed_terms(self, terms) -> list[tuple[float, np.ndarray]]:
        terms = list(terms)
        out: list[tuple[float, np.ndarray]] = []
        texts = [t for t in terms if t.kind == "text"]
        if texts:
            out += [(t.weight, v) for t, v in zip(texts, self.encode_texts([str(t.value) for t in texts]))]
        imgs = [t for t in terms if t.kind == "image"]
        if imgs:
            encoder = self._load_images()
            pil = [query_image(t, encoder.draft_size, self.settings.max_pixels) for t in imgs]
            with self._encode_lock:
                vecs = encoder.encode_images(pil)
            out += [(t.weight, v) for t, v in zip(imgs, vecs)]
        ids = [t for t in terms if t.kind == "id"]
        if ids:
            found_ids, vecs = self.store.load_vectors(self.model.id, [int(t.value) for t in ids])
            by_id = dict(zip(found_ids.tolist(), vecs))
            for t in ids:
                if int(t.value) not in by_id:
                    raise UsageError(f"image id {t.value} is not in the library")
                out.append((t.weight, by_id[int(t.value)]))
        return out

    def query_vector(self, request: SearchRequest) -> np.ndarray:
        """Weighted sum of positives minus weighted negatives, normalised (a direction in CLIP space), then
        refined by the marked images (``rocchio``)."""
        vec = np.zeros(self.model.dim, dtype=np.float32)
        for sign, terms in ((1, request.positives), (-1, request.negatives)):
            for w, v in self.embed_terms(terms):
                vec += sign * w * v
        if request.positives or request.negatives:
            norm = float(np.linalg.norm(vec))
            if norm < 1e-8:
                raise UsageError("the query terms cancel out; change the weights or drop a negative term")
            vec /= norm
        if request.like or request.unlike:
            liked, unliked = self.marked_ids(request.like, "like"), self.marked_ids(request.unlike, "unlike")
            good = set(liked)
            both = next((m for m, i in zip(request.unlike, unliked) if i in good), None)
            if both is not None:  # the two marks pull opposite ways: which one was meant?
                both = f"image id {both}" if isinstance(both, int) else both
                raise ParamError("unlike", f"{both} is marked both liked and unliked; keep one of the marks")
            vec = rocchio(vec, self.marked_vectors(liked, "like"), self.marked_vectors(unliked, "unlike"))
        return vec

    def marked_ids(self, marks, field: str) -> list[int]:
        """The ids of marked images (ids, or paths of library files); a ParamError names the first path that
        is not in the library."""
        paths = [m for m in marks if isinstance(m, str)]
        rows = self.store.images_at(paths) if paths else {}
        for p in paths:
            if p not in rows:
                raise ParamError(field, f"{p} is not in the library; mark an indexed image (or index it first)")
        return [rows[m].id if isinstance(m, str) else int(m) for m in marks]

    def marked_vectors(self, marks, field: str) -> np.ndarray:
        """The stored vectors of marked images (as ``marked_ids`` takes them); a ParamError names the first
        mark that is not in the library."""
        ids = self.marked_ids(marks, field)
        found, vecs = self.store.load_vectors(self.model.id, ids)
        missing = sorted(set(ids) - set(found.tolist()))
        if missing:
            raise ParamError(field, f"image id {missing[0]} is not in the library (or has no vector for this model)")
        return vecs

    # --- search -------------------------------------------------------------------------------------
    def search(self, request: SearchRequest, vector: np.ndarray | None = None) -> list[Hit]:
        """The request's top hits; files deleted since indexing never appear. ``vector``: the request's
        query vector when already known (an album keeps its own)."""
        allowed = allowed_ids(self.store, request)
        vec = self.query_vector(request) if vector is None else vector
        if request.blend is not None:
            from .keywords import blended_search

            return blended_search(self, vec, request, allowed)
        hits = self.search_vector(vec, request.k, request.min_score, allowed, request.exclude_ids)
        if request.relevance and hits:
            from . import relevance as floors

            cut = floors.floor_for(self.relevance_floor(), floors.query_kind(request.term_kinds))
            for h in hits:
                h.relevant = None if cut is None else h.score >= cut
        return hits

    def relevance_floor(self) -> dict | None:
        """This model's calibrated relevance floor (relevance.py), measured first if missing or stale."""
        from . import relevance

        with self._floor_lock:
            version = self.store.model_version(self.model.id)  # one row: no vector count per query
            if self._floor_version != version:
                self._floor = relevance.current(self.store, self.model.id, self.encode_texts,
                                                save=not self.store.read_only)
                self._floor_version = version
            return self._floor

    def exact_vectors(self, want):
        return self.store.load_vectors(self.model.id, want)

    def search_vector(self, vec: np.ndarray, k: int = 10, min_score: float | None = None,
                      allowed: np.ndarray | None = None, exclude_ids=()) -> list[Hit]:
        index = self.index()
        exclude = set(int(i) for i in exclude_ids)
        limit = len(index) if allowed is None else len(allowed)
        fetch = min(limit, k + len(exclude) + 8)
        nprobe = None
        while True:
            scores, ids = index.search(vec[None, :], fetch, allowed=allowed, nprobe=nprobe,
                                       exact_vectors=self.exact_vectors)
            if (ids[0] < 0).any() and index.plan.kind != "flat" and nprobe != index.plan.nlist:
                # The probed IVF lists held fewer vectors than asked for: widen the probe, never return short.
                nprobe = index.plan.nlist
                continue
            pairs = [(int(i), float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0 and int(i) not in exclude]
            hits = hits_for(self.store, pairs, k, min_score)
            exhausted = fetch >= limit or (min_score is not None and pairs and round(pairs[-1][1], 6) < min_score)
            if len(hits) == k or exhausted:
                return hits
            fetch = min(limit, fetch * 4)
