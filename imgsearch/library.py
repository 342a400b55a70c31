"""imgsearch.Library: the Python API, and the one place that puts the pieces together (the CLI, the server
and the UI call it; none of them opens a Store, loads an Encoder or builds a Searcher itself).

Thread safety: one Library may be shared by many threads. ``_open_lock`` guards opening the Store and the
warm searcher; ``_encode_lock`` loading the encoders and every encode (neither the torch model nor the
exported tower promises concurrent calls); the searcher's own lock reloading the FAISS index. Searches and
reads run concurrently (each Store call has its own pooled connection). Writes take the write lock
(lock.write_lock) across threads and processes; a watcher's batch holds it, then ``_encode_lock``.
Nothing heavy is imported here (search.py says how the engine stays lean).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Iterable, Sequence

from .config import Settings
from .errors import ParamError, UsageError
from .lock import write_lock
from .modelspec import ModelSpec, english_only
from .request import MAX_ID, SearchRequest, _many, _number
from .results import Hit, IndexReport, LibraryStatus

__all__ = ["Library", "Hit", "IndexReport", "LibraryStatus", "labels_from", "templates_from"]


def _paths(paths, verb: str) -> list[str]:
    """One path or many (str, bytes or os.PathLike), as text, for the method ``verb``. An empty path is refused:
    `imgsearch forget "$DIR"` with DIR unset must not mean the current folder."""
    try:
        out = [os.fsdecode(p) for p in ([paths] if isinstance(paths, (str, bytes, os.PathLike)) else paths)]
    except TypeError:
        raise TypeError(f"{verb}: give a path or a list of paths, not {type(paths).__name__}") from None
    if "" in out:
        raise UsageError(f"an empty path was given to {verb} (an unset variable?); name the files or folders, "
                         "`.` for the current folder")
    if not out:
        raise UsageError(f"give at least one file or folder to {verb}")
    return out


def _request(request, where: str) -> SearchRequest:
    """``request`` when it is a SearchRequest; a TypeError saying how to make one otherwise (a JSON body)."""
    if not isinstance(request, SearchRequest):
        raise TypeError(f"{where} takes a SearchRequest (SearchRequest.build(...), .from_json(body) or "
                        f".from_params(params) makes one), not {type(request).__name__}")
    return request


def _albums():
    """albums.py, imported on first use: the cold query, which every CLI start may be, never loads it."""
    from . import albums

    return albums


def labels_from(labels=None, labels_file=None) -> list[str]:
    """Labels for classify from a comma-separated string (or list) or a file with one label per line."""
    from .tagging import resolve_labels

    return resolve_labels(labels, labels_file)


def templates_from(templates=None, templates_file=None) -> list[str]:
    """Prompt templates ('a photo of {}') given directly or in a file; the default ensemble otherwise."""
    from .tagging import resolve_templates

    return resolve_templates(templates, templates_file)


class Library:
    """One image library (a home folder) searched with one model. Arguments left as None (or "auto") come
    from IMGSEARCH_* environment variables, then the defaults; ``other_settings`` are any other Settings
    fields (batch_size, workers, ...), or give ``settings`` alone."""

    def __init__(self, home=None, model: str | None = None, pretrained: str | None = None, *,
                 device: str = "auto", precision: str = "auto", settings: Settings | None = None,
                 **other_settings):
        if settings is None:
            if home is not None:
                home = os.path.expanduser(os.fsdecode(home))
            settings = Settings.from_env(home=home, model=model, pretrained=pretrained,
                                         device=None if device == "auto" else device,
                                         precision=None if precision == "auto" else precision, **other_settings)
        elif not isinstance(settings, Settings):
            raise TypeError(f"settings= takes an imgsearch.config.Settings, not {type(settings).__name__}")
        elif (home, model, pretrained, device, precision, other_settings) != (None, None, None, "auto", "auto", {}):
            raise TypeError("give settings= or the individual settings, not both")
        if settings.lang is not None:
            from .lang import check

            settings = settings.with_(lang=check(settings.lang))  # an unknown code fails here, in one line
        self.settings = settings
        self._store = self._searcher = None
        self._encoder = None  # the image encoder (and torch text tower where no export can exist), loaded once
        self._query = None  # what encodes query images, scores and file tags (_images); False: the encoder
        self._open_lock = threading.RLock()
        self._encode_lock = threading.RLock()
        self._links: set[str] = set()  # hard links and symlinks watch batches saw to images kept at another path
        self._closed = False

    # --- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "Library":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the database; the Library can't be used afterwards."""
        with self._open_lock:
            self._closed = True
            if self._store is not None:
                self._store.close()
            self._store = self._searcher = None

    def _refuse_closed(self) -> None:
        if self._closed:
            raise UsageError("this Library was closed; open a new one")

    def __repr__(self) -> str:
        return f"Library(home={str(self.settings.home)!r}, model={self.settings.model!r})"

    # --- the pieces, opened lazily --------------------------------------------------------------
    @property
    def store(self):
        """The library database (read-only when the files are); opened on first use."""
        return self._open_store(create=False)

    def _open_store(self, create: bool = True):
        """The one Store of this Library; ``create`` makes the library (index and import do)."""
        with self._open_lock:
            self._refuse_closed()
            if self._store is None:
                from .store import Store

                self._store = Store(self.settings.db_path, create=create)
            return self._store

    def _warm(self):
        """The warm searcher: the model row for these weights, the text encoder and the vector index."""
        with self._open_lock:
            if self._searcher is None:
                from .search import Searcher

                self._searcher = Searcher(self.settings, self.store, lambda: self.encoder, self._encode_lock,
                                          self._images)
            return self._searcher

    @property
    def encoder(self):
        """The torch model (the watcher's batches, image queries where no export exists, texts where none can
        exist), loaded once and never changed (an index run chooses its own image encoder, onnx_image.select).
        Without torch installed, the fp32 image export and the text export (onnx_image.query_encoder)."""
        with self._encode_lock:
            self._refuse_closed()
            if self._encoder is None:
                from .encoder import load, torch_installed

                spec = ModelSpec(self.settings.model, self.settings.pretrained)
                self._encoder = (load(spec, self.settings.device, self.settings.precision) if torch_installed()
                                 else self._export_encoder(make=True))
            return self._encoder

    def _images(self):
        """What encodes query images, CLIP scores and file tags: on the CPU a verified fp32 image export with
        the text export (no torch import: a cold `query --image` starts in a fraction of a second), else the
        encoder."""
        from .encoder import torch_installed
        from .onnx_image import _no_gpu_without_torch

        with self._encode_lock:
            self._refuse_closed()
            if self._query is None:
                self._query = False
                if torch_installed() and self.settings.torch_free and _no_gpu_without_torch(self.settings.device):
                    from .errors import ModelLoadError

                    with contextlib.suppress(ModelLoadError):  # no torch-free export of this tower: torch encodes
                        self._query = self._export_encoder(make=False)
            return self._query or self.encoder

    def _export_encoder(self, make: bool):
        from .config import thread_budget
        from .onnx_image import query_encoder

        # `score` and `classify FILES` make no library for their exports
        return query_encoder(self.settings.without_library(), thread_budget(workers=self.settings.workers).encoder,
                             make=make)

    @property
    def model_label(self) -> str:
        """How status and reports name this Library's model, e.g. "ViT-B-32 (laion2b_s34b_b79k)"."""
        return ModelSpec(self.settings.model, self.settings.pretrained).canonical().label

    @property
    def model(self):
        """The library's model row for these weights (a ModelMismatchError says what to do when absent)."""
        return self._warm().model

    def vector_count(self) -> int:
        """Vectors in this model's search index (loads or refreshes the index)."""
        return len(self._warm().index())

    def load(self) -> "Library":
        """Load the model and the index now rather than on the first query (servers call this at start)."""
        s = self._warm()
        s.text_encoder()
        s.index()
        return self

    def _model_row_without_weights(self):
        """The model row for duplicates, which never encode: no weight resolution, no torch import."""
        if self._searcher is not None:
            return self._searcher.model
        from .encoder import known_fingerprint
        from .search import model_row_for

        store = self.store
        spec = ModelSpec(self.settings.model, self.settings.pretrained).canonical()
        fp = known_fingerprint(spec)
        if fp is None:
            # An hf-hub model: any vectors made under this name and tag will do for comparing stored vectors.
            rows = [m for m in store.models() if m.vectors and m.name == spec.name
                    and (m.pretrained or None) == (spec.pretrained or None)]
            if len(rows) == 1:
                return rows[0]
            fp = ""
        return model_row_for(store, spec, fp)

    # --- write side --------------------------------------------------------------------------------
    def index(self, paths, progress=None, build_progress=None, wait: bool = True,
              ray: str | None = None) -> IndexReport:
        """Add (or re-index incrementally) the images under ``paths``; returns what changed.
        ``ray``: decode and encode on Ray Data: "local" starts a Ray for this run, else a cluster address
        ("auto", "ray://host:10001"). The files must be readable by every worker at the same paths."""
        from .indexer import index_paths

        remote = None
        if ray is not None:
            from .distributed import RayStage

            remote = RayStage(self.settings, ray)  # a missing Ray or a malformed address fails before any work
            if remote.address is not None:
                remote.open()  # an unreachable cluster too
        try:
            report = index_paths(self.settings, _paths(paths, "index"), encoder=self._encoder,
                                 open_store=self._open_store, load_encoder=lambda: self.encoder, progress=progress,
                                 build_progress=build_progress, wait=wait, remote=remote)
        finally:
            if remote is not None:
                remote.close()
        if self.settings.lang and self.store.get_meta("lang") != self.settings.lang:
            # Recorded with the library: later queries in Latin script default to it (lang.query_language).
            self.store.set_meta("lang", self.settings.lang)
        if report.new or report.updated or report.moved or report.removed:
            self._albums_follow()
        return report

    def _albums_follow(self) -> None:
        """After the library changed: evaluate every album, so each records when a photo joined or left it."""
        if self.store.albums():
            self.albums()

    @property
    def lang(self) -> str | None:
        """The query language: --lang / IMGSEARCH_LANG, else the one recorded when the library was indexed."""
        return self.settings.lang or (self.store.get_meta("lang") if self.settings.db_path.is_file() else None)

    def language_hint(self, texts) -> str | None:
        """One line for a query an English-only model cannot read (non-Latin script), naming the
        multilingual preset; None when the query is fine for this model."""
        from .lang import english_only_hint, non_latin

        texts = [t[1] if isinstance(t, tuple) else t for t in texts]
        if not non_latin(texts):
            return None
        spec = ModelSpec(self.settings.model, self.settings.pretrained)
        return english_only_hint(spec.canonical().label) if english_only(spec) else None

    def forget(self, paths, wait: bool = True) -> int:
        """Remove files or folders from the library (the files stay on disk); returns how many images."""
        from .indexer import forget

        removed = forget(self.settings, self.store, _paths(paths, "forget"), wait=wait)
        if removed:
            self._albums_follow()
        return removed

    def watcher(self, paths, *, poll: bool = False, interval: float = 1.0, debounce: float = 0.5,
                on_batch=None, say=None):
        """A Watcher (imgsearch/watch.py) keeping the library in step with folders: ``start()``,
        ``catch_up()``, then ``run(stop_event)``. Batches go through ``index`` and ``forget`` like a command
        would, under the write lock only while each batch is written."""
        from .watch import Watcher

        return Watcher(_paths(paths, "watch"), self._watch_batch, self._watch_catch_up, home=self.settings.home,
                       poll=poll, interval=interval, debounce=debounce, on_batch=on_batch, say=say)

    def _watch_catch_up(self, roots, progress=None, build_progress=None) -> IndexReport:
        self.encoder  # loaded once here, kept for every batch after
        report = self.index(roots, progress=progress, build_progress=build_progress)
        self._links |= report.alias_paths
        return report

    def _watch_batch(self, changed: list[str], gone: list[str]) -> IndexReport:
        """One watch batch, as one writer: index what is there, then forget what is gone (the index claims a
        moved file's row first, so it keeps its id). Writer first, then the encoder: queries of a shared
        Library (serve --watch) wait for one batch at most, never for another process's long index run."""
        with write_lock(self.settings.home):
            if gone and self._links:  # rm a.jpg of hard links a.jpg, b.jpg: a's row moves to b, as index does
                changed = changed + self._surviving_links(gone, set(changed))
            with self._encode_lock:
                report = self.index(changed) if changed else IndexReport()
            self._links |= report.alias_paths
            if gone:
                report.removed += self.forget(gone)
        return report

    def _surviving_links(self, gone: list[str], changed: set[str]) -> list[str]:
        """Known other names of gone rows' files: the same size and time as a row, so the same unchanged inode
        (not a file being written); the index confirms by content and moves the row there."""
        marks = {(r.size, r.mtime_ns) for r in self.store.images_under(gone).values()}
        out = []
        for p in sorted(self._links - changed):
            try:
                st = os.stat(p)
            except OSError:
                self._links.discard(p)
                continue
            if (st.st_size, st.st_mtime_ns) in marks:
                out.append(p)
        return out

    def version(self) -> int:
        """A number that moves whenever images or vectors change, in any process (pages cache on it)."""
        return self.store.library_version()

    def status(self) -> LibraryStatus:
        from .indexer import library_status

        return LibraryStatus.from_dict(library_status(self.settings, self.store))

    def relevance_floor(self) -> dict | None:
        """This model's relevance floor: {"text", "image", "vectors", ...} (relevance.py), measured if needed."""
        return self._warm().relevance_floor()

    def failures(self) -> list[tuple[str, str]]:
        """Every file that failed to index, with its reason."""
        return self.store.failures()

    # --- images and thumbnails -------------------------------------------------------------------
    THUMB = 256  # grid tiles (px, longest side)
    PREVIEW = 1024  # detail view

    @staticmethod
    def parse_id(raw) -> int:
        """A library image id from user input ('12', 12); anything else is a UsageError."""
        from .thumbs import parse_id

        return parse_id(raw)

    def image(self, image_id):
        """The library's row for an image id (path, size, dimensions, date taken); UsageError if unknown."""
        from .thumbs import library_image

        return library_image(self.store, image_id)

    def thumbnail(self, image_id, size: int = THUMB):
        """Path of a cached JPEG thumbnail of the image (made on first use under <home>/thumbs, or where the home
        cannot be written in a private temporary folder removed at exit)."""
        from .thumbs import thumbnail

        return thumbnail(self.settings, image_id, size, store=self.store)

    def thumbnails(self, ids, size: int = THUMB) -> dict:
        """{id: thumbnail path, or the error that image gave} for many images at once (made in parallel)."""
        from .thumbs import thumbnails

        return thumbnails(self.settings, _many(ids), size, store=self.store)  # one id, or any iterable of them

    # --- search ------------------------------------------------------------------------------------
    def search(self, text=None, *, image=None, not_text=None, not_image=None, ids: Iterable[int] = (),
               k: int = 10, min_score: float | None = None, under: str | os.PathLike | None = None,
               tag: str | Sequence[str] | None = None, keyword: str | None = None, blend: float | None = None,
               exclude_ids: Iterable[int] = (), after=None, before=None, near=None,
               camera: str | None = None, relevance: bool = False, like=(), unlike=()) -> list[Hit]:
        """The ``k`` library images closest to the query, best first.

        ``text``: a string ("2:red car" weighs it), a (weight, text) pair, or a list of those.
        ``image``: a file path, the file's bytes, a binary file object, a PIL image, a (weight, image) pair,
        or a list of those; bytes, file objects and PIL images are decoded in memory, never written to disk.
        ``not_text`` / ``not_image`` steer away; ``ids``: library images to find more like; ``like`` /
        ``unlike``: library images (ids or paths) marked good or bad among earlier results (search.rocchio).
        Filters: ``under`` a folder, ``tag`` zero-shot tags (all must match), ``keyword`` words in names,
        folders, captions and tags; ``blend`` (0..1) mixes keyword relevance into the score instead.
        When and where (geo.py): ``after``/``before`` a capture date (YYYY, YYYY-MM, YYYY-MM-DD or ISO
        timestamp; ``before`` ends at the end of its period), ``near`` "LAT,LON[,KM]" or (lat, lon[, km]) (5 km
        by default), ``camera`` text in the camera's make and model.
        ``relevance``: mark each hit ``relevant`` against the model's calibrated relevance floor (relevance.py;
        measured on a model's first call, seconds on a CPU); None for keyword ranking and text-image mixes.
        A wrong value raises a ParamError naming the parameter (request.SearchRequest checks them all)."""
        request = SearchRequest.build(
            text, image=image, not_text=not_text, not_image=not_image, ids=ids, k=k, min_score=min_score,
            under=under, tag=tag, keyword=keyword, blend=blend, exclude_ids=exclude_ids, after=after, before=before,
            near=near, camera=camera, relevance=relevance, like=like, unlike=unlike)
        hint = self.language_hint(request.texts)
        if hint:
            print(hint, file=sys.stderr)
        return self.run(request)

    def run(self, request: SearchRequest) -> list[Hit]:
        """Answer a ready-made SearchRequest (the server, the UI and the CLI build one from their input; each
        says the language hint where its user reads it)."""
        if _request(request, "run()").keyword_only:
            from .search import keyword_search

            return keyword_search(self.store, request)
        return self._warm().search(request)

    # --- albums: saved searches that stay current (albums.py) --------------------------------------
    # Album writes are single small transactions: they do not wait for the write lock (an index run may
    # hold it for hours); SQLite serialises them.
    def albums(self) -> list:
        """Every album evaluated now (albums.Album); ``problem`` says why a saved search no longer runs (a
        folder gone, a tag set dropped), set instead of raising, so one broken album never hides the others."""
        return [_albums().current(self.store, self._warm, row) for row in self.store.albums()]

    def album(self, name: str):
        """One album evaluated now, its members ranked in ``hits`` (pinned photos in, dropped ones out,
        deleted files never). A UsageError names an unknown album, or says why its saved search no longer runs
        (the album is kept)."""
        album = _albums().current(self.store, self._warm, _albums().load(self.store, name))
        if album.problem:
            raise UsageError(album.problem)
        return album

    def save_album(self, name: str, text=None, *, k: int | None = None, request: SearchRequest | None = None,
                   **search):
        """Save a search as an album and return it evaluated (an ``Album``). The search is ``search()``'s
        arguments, or a ready ``request``; example images must be files (their absolute path is kept).
        ``k``: how many photos at most; when None, an album with a threshold (``min_score``, ``relevance``)
        or of keywords only holds every photo that passes (up to the query limit) and new photos join it,
        else it is the top 10 now. A name taken (regardless of case) is a UsageError; nothing is saved then."""
        if request is None:
            request = SearchRequest.build(text, k=10, **search)
        elif text is not None or search:
            raise TypeError("give request= or the search's arguments, not both")
        request = _request(request, "save_album(request=)")
        return _albums().save(self.store, self._warm, name, _albums().with_k(request, k))

    def rename_album(self, name: str, new_name: str) -> None:
        _albums().rename(self.store, name, new_name)

    def delete_album(self, name: str) -> None:
        """Delete the album (its saved search and pins); never a photo."""
        self.store.delete_album(_albums().load(self.store, name)[0])

    def pin(self, name: str, paths):
        """Keep photos (files, or every library photo in a folder) in the album whatever its search says;
        returns (photos pinned, the album evaluated now). A path not in the library is a UsageError."""
        return _albums().pin(self.store, self._warm, name, _paths(paths, "pin"), True)

    def unpin(self, name: str, paths):
        """Drop photos from the album whatever its search says (``pin`` brings them back); as ``pin``."""
        return _albums().pin(self.store, self._warm, name, _paths(paths, "unpin"), False)

    def export_album(self, name: str, folder, *, link: bool = False) -> list[str]:
        """Copy (or with ``link`` symlink) the album's photos, best first, into a new or empty folder; a name
        taken twice gets " (2)"; returns the files written. Never overwrites anything."""
        from .exchange import export_album

        return export_album(self.album(name), folder, link)

    def indexed_folder_of(self, path) -> str | None:
        """The folder at or above ``path`` that `index` or `watch` was given, if any: its next index reads
        ``path`` too (an album exported there is indexed again as copies)."""
        from .files import abspath

        chain = [abspath(path)]
        while chain[-1] != os.path.dirname(chain[-1]):
            chain.append(os.path.dirname(chain[-1]))
        return self.store.indexed_root(chain)

    # --- zero-shot tags, scores ------------------------------------------------------------------
    def classify(self, labels, templates=None, top: int = 1, min_prob: float = 0.0, under=None,
                 keep_results: bool = False):
        """Tag every library image (or those under a folder) with its top labels; returns a TagReport."""
        from . import tagging, zeroshot

        labels = zeroshot.parse_labels(labels)
        s = self._warm()
        with write_lock(self.settings.home):  # tags are library writes: one writer at a time
            return tagging.classify_library(self.store, s.model, s.text_encoder(), labels, templates, top, min_prob,
                                            under=under, keep_results=keep_results, langs=(s.lang, s.library_lang))

    def classify_files(self, paths, labels, templates=None, top: int = 1, min_prob: float = 0.0):
        """Labels for image files (folders are walked) without touching the library."""
        from . import tagging, zeroshot

        return tagging.classify_files(self.settings, _paths(paths, "classify"), zeroshot.parse_labels(labels),
                                      templates, top, min_prob, encoder=self._images,
                                      langs=(self.settings.lang, self.lang))

    def tags(self) -> list[tuple[str, int]]:
        """(tag, images) pairs, most common first."""
        return self.store.tag_counts()

    def tag_sets(self) -> list[dict]:
        return self.store.tag_sets()

    def drop_tag_set(self, set_id: int) -> bool:
        """Delete one label set and its tags; False when there is no such set."""
        _number(set_id, "set_id", "give a tag set id, a whole number from 1 (tag_sets() lists them)", 1, MAX_ID,
                whole=True)
        store = self.store  # a home without a library is refused before the lock's file is made there
        with write_lock(self.settings.home):
            return bool(store.delete_tag_set(set_id))

    def score(self, image, texts: Sequence[str]):
        """Cosine and CLIPScore of one image against each text: a path, the file's bytes, a binary file object or
        a PIL image, as search()'s ``image`` (it need not be in the library)."""
        from .zeroshot import score_image

        with self._encode_lock:
            return score_image(self._images, image, texts, self.settings.max_pixels, (self.settings.lang, self.lang))

    # --- duplicates, captions ----------------------------------------------------------------------
    def duplicates(self, under=None, threshold: float | None = None, similar: bool = False,
                   min_match: float | None = None, exact: bool | None = None):
        """Groups of copies of one picture (or CLIP-similar images with ``similar``); deletes nothing.
        Compares stored vectors and pixels only: the model is never loaded."""
        from . import dupes

        return dupes.find_duplicates(self.settings, self.store, self._model_row_without_weights(),
                                     under=under, threshold=threshold, similar=similar, exact=exact,
                                     min_match=dupes.DEFAULT_MIN_MATCH if min_match is None else min_match)

    def captions(self, path) -> list[str]:
        from .keywords import captions_of

        return captions_of(self.store, path)

    def add_caption(self, path, text: str, replace: bool = False) -> bool:
        """Attach a caption (searched by ``keyword``); False when the image already has it."""
        from .keywords import add_caption

        if not isinstance(text, str):
            raise ParamError("text", "a caption is text, e.g. \"our dog at the beach\"")
        store = self.store  # as drop_tag_set
        with write_lock(self.settings.home):
            return add_caption(store, path, text, replace)

    def import_captions(self, source, image_col: str = "path", caption_col: str = "caption",
                        replace: bool = False):
        from .keywords import import_captions

        store = self.store  # as drop_tag_set
        with write_lock(self.settings.home):
            return import_captions(store, source, image_col, caption_col, replace)

    # --- export and import ---------------------------------------------------------------------------
    def export(self, folder, format: str = "parquet", *, model: str | None = None, progress=None):
        """Write one model's vectors and image metadata into ``folder`` (new or empty); an ExportReport.
        ``format``: "parquet" (one dataset, vectors as fixed-size lists) or "clip-retrieval"
        (img_emb/img_emb_0.npy + metadata/metadata_0.parquet, for autofaiss and clip-retrieval).
        ``model``: whose vectors (name, label or id) when the library holds several; else the only one, or
        this Library's model. ``progress(done, total)`` per chunk of rows."""
        from .exchange import export_library

        if model is not None and (isinstance(model, bool) or not isinstance(model, (str, int))):
            raise ParamError("model", "give the name, label or id of a model the library holds")
        return export_library(self.settings, self.store, folder, format, model=None if model is None else str(model),
                              progress=progress)

    def import_(self, folder, *, trust: bool = False, assume_model: bool = False, progress=None,
                wait: bool = True):
        """Add the images of an export (parquet or clip-retrieval form) whose files are here; an ImportReport.
        The export's model must be this Library's (same weights, same dimension): models never mix. Each
        file's content hash is checked against the export unless ``trust``. ``assume_model``: the export does
        not name its model and this Library's model made it. Importing twice adds nothing."""
        from .exchange import import_library

        report = import_library(self.settings, folder, trust=trust, assume_model=assume_model,
                                open_store=self._open_store, encoder=lambda: self.encoder, progress=progress,
                                wait=wait)
        if report.added or report.vectors_added or report.albums:
            self._albums_follow()
        return report
