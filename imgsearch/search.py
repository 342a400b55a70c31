"""Query layer: text, image and stored-image queries, weighted combinations and negatives, filters."""

from __future__ import annotations

import os
import threading
from typing import Iterable, Sequence

import numpy as np

from . import files, images
from .config import Settings
from .encoder import Encoder, ModelSpec, known_fingerprint, resolve_weights
from .errors import DecodeError, ModelMismatchError, ParamError, UsageError
from .queryspec import check_k
from .store import ModelRow, Store
from .indexcache import model_index
from .query import Query, Term, image_data_term, image_term, text_term
from .results import Hit
from .vectors import VectorIndex

__all__ = ["Searcher", "Query", "Term", "Hit", "text_term", "image_term", "image_data_term", "check_k",
           "model_row_for"]

def model_row_for(store: Store, spec: ModelSpec, fingerprint: str) -> ModelRow:
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


class Searcher:
    """A warm searcher over one library and one model: encoder and FAISS index stay loaded.

    The engine behind imgsearch.Library, which owns it and documents the thread-safety contract: encodes
    and the encoder load run under ``encode_lock``, index (re)loads under the searcher's own lock.
    """

    def __init__(self, settings: Settings, encoder: Encoder | None = None, store: Store | None = None,
                 encode_lock=None):
        self.settings = settings
        self.store = store or Store(settings.db_path, create=False)
        spec = ModelSpec(settings.model, settings.pretrained).canonical()
        # Check the library before paying for model load: a mismatch is reported in milliseconds.
        fingerprint = encoder.fingerprint if encoder else self._fingerprint(spec)
        self.model = model_row_for(self.store, spec, fingerprint)
        self._encoder = encoder
        self._spec = spec
        self._tower = None
        self._tower_failed = False
        self._index: VectorIndex | None = None
        self._index_version: int | None = None
        self._lock = threading.Lock()
        self._encode_lock = encode_lock or threading.RLock()
        self._floor: dict | None = None
        self._floor_version: int | None = None
        self._floor_lock = threading.Lock()
        # Query language: --lang, else each query's script, else the language recorded at index time.
        self.lang, self.library_lang = settings.lang, self.store.get_meta("lang")

    def _fingerprint(self, spec: ModelSpec) -> str:
        """Weights fingerprint without importing open_clip when the library already knows these weights."""
        fp = known_fingerprint(spec)
        if fp is None or (fp.startswith("tag:") and self.store.find_model(spec.name, spec.pretrained, fp) is None):
            fp = resolve_weights(spec)[0]  # validates the tag / hub model and words the error
        return fp

    def text_side(self):
        """What encodes texts here: the exported tower (encode_texts, logit_scale) or the torch encoder."""
        if self._encoder is None and not self._tower_failed and self._tower is None:
            self.encode_texts([])
        return self._tower if self._encoder is None and self._tower is not None else self.encoder

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Text vectors: from the exported numpy text tower while no torch model is loaded (a cold process
        never imports torch for text), else torch. After a torch fallback the export is made for next time."""
        with self._encode_lock:
            return self._encode_texts(texts)

    @property
    def loaded_encoder(self) -> Encoder | None:
        """The encoder if one is loaded already (never loads it)."""
        return self._encoder

    def _encode_texts(self, texts: list[str]) -> np.ndarray:
        from . import textfast

        if self._encoder is None and not self._tower_failed:
            if self._tower is None:
                try:
                    self._tower = textfast.open_tower(self.settings.home, self.model.fingerprint)
                except textfast.ExportError as e:
                    self._tower_failed = True
                    textfast.warn_once(self.model.label, str(e))
            if self._tower is not None:
                return self._tower.encode(list(texts), self.lang, self.library_lang)
        vecs = self.encoder.encode_texts(list(texts), self.lang, self.library_lang)
        if self._tower_failed:
            self._tower_failed = False  # one attempt per searcher
            textfast.ensure_export(self.settings.home, self.encoder, quiet=True)
        return vecs

    @property
    def encoder(self) -> Encoder:
        with self._encode_lock:
            if self._encoder is None:
                from . import encoder as encoder_mod

                self._encoder = encoder_mod.load(self._spec, self.settings.device, self.settings.precision)
            return self._encoder

    def index(self) -> VectorIndex:
        """The FAISS index, reloaded when the library changed since it was loaded."""
        with self._lock:
            version = self.store.model_version(self.model.id)
            if self._index is None or version != self._index_version:
                self._index, self._index_version, _ = model_index(self.settings, self.store, self.model.id)
            return self._index

    # --- embedding -----------------------------------------------------------------------------
    def embed_terms(self, terms: Iterable[Term]) -> list[tuple[float, np.ndarray]]:
        terms = list(terms)
        out: list[tuple[float, np.ndarray]] = []
        texts = [t for t in terms if t.kind == "text"]
        if texts:
            vecs = self.encode_texts([str(t.value) for t in texts])
            out += [(t.weight, v) for t, v in zip(texts, vecs)]
        imgs = [t for t in terms if t.kind == "image"]
        if imgs:
            pil = [self._query_image(t) for t in imgs]
            with self._encode_lock:
                vecs = self.encoder.encode_images(pil)
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

    def _query_image(self, t: Term):
        """An image term decoded to RGB: from a path, from bytes in memory, or a PIL image as given."""
        value = t.value
        label = t.name or (str(value) if isinstance(value, (str, os.PathLike)) else "uploaded image")
        if not isinstance(value, (str, os.PathLike, bytes)):
            if not hasattr(value, "convert") or not hasattr(value, "size"):
                raise UsageError(f"{t.noun} {label}: give a file path, its bytes, a file object or a PIL image")
            try:
                images.check_size(*value.size, self.settings.max_pixels)
            except DecodeError as e:
                raise UsageError(f"cannot use {t.noun} {label}: {e}") from None
            return value if value.mode == "RGB" else value.convert("RGB")
        try:
            im, _ = images.open_image(value if isinstance(value, bytes) else str(value),
                                      draft_size=self.encoder.draft_size, max_pixels=self.settings.max_pixels)
        except DecodeError as e:
            raise UsageError(f"cannot use {t.noun} {label}: {e}") from None
        return im

    def query_vector(self, query: Query) -> np.ndarray:
        """Weighted sum of positives minus weighted negatives, normalised (a direction in CLIP space)."""
        vec = np.zeros(self.model.dim, dtype=np.float32)
        for w, v in self.embed_terms(query.positives):
            vec += w * v
        for w, v in self.embed_terms(query.negatives):
            vec -= w * v
        norm = float(np.linalg.norm(vec))
        if norm < 1e-8:
            raise UsageError("the query terms cancel out; change the weights or drop a negative term")
        return vec / norm

    # --- search --------------------------------------------------------------------------------
    def search(self, query: Query, k: int = 10, min_score: float | None = None, under: str | None = None,
               allowed_ids: np.ndarray | None = None, exclude_ids: Iterable[int] = (),
               tag: str | Sequence[str] | None = None, keyword: str | None = None,
               blend: float | None = None, after=None, before=None, near=None, camera=None,
               relevance: bool = False) -> list[Hit]:
        """Top ``k`` images for ``query``; files deleted since indexing never appear.

        ``relevance``: set each hit's ``relevant`` against the model's relevance floor (measured on first
        use). ``tag``: only images with these zero-shot tags. ``keyword``: only images whose name, folder,
        captions or tags match (see keywords.py); with ``blend`` (0..1) keyword relevance is blended
        into the score instead of filtering. ``after``/``before``/``near``/``camera``: capture date, place
        and camera (see geo.py); like the others they restrict the ids the vector search may return.
        """
        check_k(k)
        if blend is not None and not keyword:
            raise ParamError("blend", "weighs keyword relevance; give a keyword too")
        allowed_ids = self.restrict_when_where(allowed_ids, after, before, near, camera)
        vec = self.query_vector(query)
        if tag or keyword:
            from . import keywords

            keywords.check_blend(blend)
            allowed_ids = keywords.restrict(self.store, allowed_ids, tag, keyword if blend is None else None)
            if blend is not None:
                return keywords.blended_search(self, vec, keyword, blend, k, min_score, under, allowed_ids,
                                               exclude_ids)
        hits = self.search_vector(vec, k, min_score, under, allowed_ids, exclude_ids)
        if relevance and hits:
            from . import relevance as floors

            cut = floors.floor_for(self.relevance_floor(), floors.query_kind(t.kind for t in query.positives))
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

    def restrict_when_where(self, allowed_ids: np.ndarray | None, after=None, before=None, near=None,
                            camera=None) -> np.ndarray | None:
        """``allowed_ids`` narrowed to images taken in the date range, near the place, with the camera."""
        from . import geo

        f = geo.build(after, before, near, camera)
        if f is None:
            return allowed_ids
        ids = self.store.ids_matching(f)
        return ids if allowed_ids is None else np.intersect1d(allowed_ids, ids)

    def search_vector(self, vec: np.ndarray, k: int = 10, min_score: float | None = None, under: str | None = None,
                      allowed_ids: np.ndarray | None = None, exclude_ids: Iterable[int] = ()) -> list[Hit]:
        index = self.index()
        allowed = allowed_ids
        if under:
            folder = files.abspath(under)
            if not os.path.isdir(folder) and self.store.image_by_path(folder) is None:
                raise ParamError("under", "no such folder")
            in_folder = self.store.ids_under(folder)
            allowed = in_folder if allowed is None else np.intersect1d(allowed, in_folder)
        exclude = set(int(i) for i in exclude_ids)
        limit = len(index) if allowed is None else len(allowed)
        fetch = min(limit, k + len(exclude) + 8)
        nprobe = None
        while True:
            scores, ids = index.search(vec[None, :], fetch, allowed=allowed, nprobe=nprobe,
                                       exact_vectors=lambda want: self.store.load_vectors(self.model.id, want))
            if (ids[0] < 0).any() and index.plan.kind != "flat":
                # The probed IVF lists held fewer vectors than asked for: widen the probe, never return short.
                if nprobe != index.plan.nlist:
                    nprobe = index.plan.nlist
                    continue
            pairs = [(float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i >= 0 and int(i) not in exclude]
            rows = self.store.get_images(i for _, i in pairs)
            hits: list[Hit] = []
            for score, i in pairs:
                # Compared as shown (rounded): a score the user copies from the output keeps that hit.
                if min_score is not None and round(score, 6) < min_score:
                    break
                row = rows.get(i)
                if row is None or not os.path.exists(row.path):
                    continue  # deleted since it was indexed
                hits.append(Hit(len(hits) + 1, i, row.path, round(score, 6), row.width, row.height, row.size,
                                row.taken_at, row.taken_source))
                if len(hits) == k:
                    return hits
            exhausted = fetch >= limit or (min_score is not None and pairs and pairs[-1][0] < min_score)
            if exhausted:
                return hits
            fetch = min(limit, fetch * 4)

