"""The read side of a model's FAISS index: load the cache file when it matches the library, else update or
rebuild it from SQLite. Used by queries (library.Library, search.Searcher) and by the indexer after a run;
it never writes image rows, so the query side does not import the indexer."""

from __future__ import annotations

import contextlib

import numpy as np

from .config import Settings
from .store import Store
from .vectors import BuildProgress, IndexPolicy, VectorIndex, load_or_build


def index_policy(settings: Settings) -> IndexPolicy:
    return IndexPolicy(flat_max=settings.flat_max, memory_budget=settings.index_budget_mb << 20,
                       recall_target=settings.recall_target)


class StoreVectors:
    """One model's vectors in SQLite as a vectors.VectorSource: index builds stream them in bounded chunks."""

    def __init__(self, store: Store, model_id: int):
        self.store = store
        self.model_id = model_id
        self._ids = store.vector_ids(model_id)

    def __len__(self) -> int:
        return len(self._ids)

    def ids(self) -> np.ndarray:
        return self._ids

    def take(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.store.load_vectors(self.model_id, ids)

    def chunks(self):
        return self.store.iter_vectors(self.model_id)


def model_index(settings: Settings, store: Store, model_id: int,
                progress: BuildProgress | None = None) -> tuple[VectorIndex, int, str]:
    """One model's FAISS index, from its cache file when trustworthy, else updated or rebuilt from SQLite:
    (index, library version it reflects, "loaded" | "updated" | "rebuilt")."""
    model = store.model_by_id(model_id)
    # What the cache file must have been built from to be trusted (the library_id: not another library.db).
    state = {"model_id": model.id, "version": model.version, "fingerprint": model.fingerprint,
             "library_id": store.library_id}
    index, action = load_or_build(settings.index_path(model.id), state, model.dim,
                                  lambda: StoreVectors(store, model.id),
                                  lambda since: store.vector_changes(model.id, since), index_policy(settings),
                                  progress, save=not store.read_only)
    if action != "loaded" and not store.read_only:  # the cache now reflects model.version: older tombstones are spent
        with contextlib.suppress(Exception):  # a library that cannot be written keeps them, harmlessly
            store.prune_deletions(model.id, model.version)
    return index, model.version, action
