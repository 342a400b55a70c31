"""Index folders: walk -> read + hash -> decode + preprocess (worker threads) -> encode -> SQLite.

Worker threads decode upcoming files while the model encodes the current batch. Every batch is written in one
transaction, so an interrupted run loses at most the batch in flight and the next run picks up there.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from . import files, formats, images
from .config import HEIC_NEEDS_EXTRA, RAW_NEEDS_EXTRA, Settings, thread_budget, torch_threads
from .encoder import Encoder, ModelSpec
from .errors import DecodeError, ModelLoadError, UsageError
from .store import ImageRow, ModelRow, Store
from .vectors import BuildProgress
# The read side (FAISS cache loader) and the result type live apart so search never imports the write side.
from .indexcache import model_index
from .output import human_bytes
from .results import IndexReport


@dataclass
class _Work:
    entry: files.FileEntry
    old: ImageRow | None  # existing row at this path (content may have changed)
    needs_vector: bool  # False: only the fingerprint must be checked
    meta_only: bool = False  # unchanged, indexed before schema 5: read when/where from the header only


@dataclass
class _Done:
    work: _Work
    hash: str | None = None
    tensor: object = None
    info: images.ImageInfo | None = None
    error: str | None = None
    skipped_decode: bool = False  # content already known; no pixels decoded
    raw: bytes | None = None  # JPEG bytes left for the batched (GPU) decoder
    orientation: int = 1
    meta: dict | None = None  # when/where columns to backfill on an unchanged row
    vector: object = None  # already encoded elsewhere (a Ray worker): the batch encoder keeps it


ProgressFn = Callable[[int, int], None]  # (done, total)


def with_file_time(meta: dict, mtime_ns: int) -> dict:
    """``meta`` with the file's mtime as the capture time (taken_source 'file') when EXIF gave none."""
    if meta.get("taken_source") == "exif" and meta.get("taken_at"):
        return meta
    from datetime import datetime, timezone

    when = datetime.fromtimestamp(mtime_ns / 1e9, timezone.utc)
    local = when.astimezone()  # this machine's zone: what the user saw the file dated
    minutes = int(local.utcoffset().total_seconds() // 60)
    sign = "-" if minutes < 0 else "+"
    return {**meta, "taken_at": local.replace(tzinfo=None).isoformat(timespec="seconds"),
            "taken_utc": when.replace(tzinfo=None).isoformat(timespec="seconds"),
            "taken_offset": f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}", "taken_source": "file"}


def header_meta(path: str, mtime_ns: int) -> dict:
    """Size and when/where of a file from its header (no pixels decoded), for rows indexed before schema 5."""
    try:
        w, h, meta = images.read_meta(path)
        meta = {**meta, "width": w, "height": h}
    except DecodeError:
        meta = {}  # unreadable header: the file time still dates it, and it is not retried every run
    return with_file_time(meta, mtime_ns)


def tensor_decode_wanted(mode: str, device: str) -> bool:
    """IMGSEARCH_GPU_DECODE: nvJPEG decodes whole batches on the GPU; on a CPU, Pillow's draft decode is faster."""
    return mode == "on" or (mode == "auto" and device.startswith("cuda"))


class DecodeStage:
    """How indexing turns a file into the model's input tensor; fixed for a run, never flipped.

    Pillow: JPEG draft decode + the model's own preprocess. Tensor (``tensor=True``): JPEG bytes decoded in
    batches by torchvision on the encoder's device (nvJPEG on CUDA) and preprocessed from the model's
    ``preprocess_cfg``; a model whose preprocess that cannot reproduce, and every file it rejects, gets Pillow.
    """

    def __init__(self, encoder: Encoder, max_pixels: int, tensor: bool, device: str | None = None):
        self.encoder, self.max_pixels = encoder, max_pixels
        self.device = device or encoder.device  # where the batch decoder runs (cuda: nvJPEG)
        self.tensor_pre: images.TensorPreprocess | None = None
        self.refused: str | None = None
        if tensor:
            try:
                self.tensor_pre = images.tensor_preprocess(images.preprocess_cfg_of(encoder.model), encoder.preprocess)
            except images.UnsupportedPreprocess as e:
                self.refused = str(e)

    @property
    def tensor(self) -> bool:
        return self.tensor_pre is not None

    def describe(self) -> str:
        if self.tensor:
            how = "nvJPEG" if self.device.startswith("cuda") else "torchvision"
            return f"batched {how} on {self.device}, JPEG only (Pillow for the rest)"
        if self.refused:
            return f"Pillow (batched tensor decode refused for this model: {self.refused})"
        return "Pillow"

    def pillow(self, source):
        """(model input tensor, ImageInfo) of a path or bytes; raises DecodeError."""
        im, info = images.open_image(source, draft_size=self.encoder.draft_size, max_pixels=self.max_pixels)
        return self.encoder.preprocess(im), info

    def read_jpeg(self, f) -> tuple[bytes, images.ImageInfo, int] | None:
        """(bytes, ImageInfo, EXIF orientation) of the open file ``f`` when the batch decoder takes it, None
        to leave it to Pillow (not a JPEG, CMYK, odd markers, or over the full-decode cap: Pillow decodes
        it reduced, or refuses it)."""
        f.seek(0)
        if f.read(2) != b"\xff\xd8":
            return None
        f.seek(0)
        data = f.read()  # within the file-size cap
        try:
            return data, *images.jpeg_header(data, self.max_pixels)
        except DecodeError:
            return None

    def batch(self, datas: list[bytes], orientations: list[int]) -> list:
        """Tensor decode of JPEG bytes on the encoder's device: one tensor or None (give it to Pillow) each."""
        return images.decode_jpegs(datas, orientations, self.tensor_pre, self.device)

    def decode_files(self, paths: list[str], workers: int, batch_size: int, overlap: bool = True):
        """The whole stage on ``paths``, in order: a model input tensor or a DecodeError per path."""
        ahead = 2 * batch_size if overlap else batch_size
        if not self.tensor:
            yield from images.decode_many(paths, lambda p: self.pillow(p)[0], workers, ahead, overlap)
            return

        def read(path):
            with formats.open_regular(path) as f:
                return path, self.read_jpeg(f)

        from itertools import islice

        stream = images.decode_many(paths, read, workers, ahead, overlap)
        while part := list(islice(stream, batch_size)):
            jpegs = [k for k, r in enumerate(part) if not isinstance(r, DecodeError) and r[1] is not None]
            tensors = self.batch([part[k][1][0] for k in jpegs], [part[k][1][2] for k in jpegs])
            done = dict(zip(jpegs, tensors))
            for k, r in enumerate(part):
                if isinstance(r, DecodeError):
                    yield r
                elif done.get(k) is not None:
                    yield done[k]
                else:
                    try:
                        yield self.pillow(r[0])[0]
                    except DecodeError as e:
                        yield e


class Indexer:
    """One indexing run over some roots with one encoder. Use :func:`index_paths`.

    ``remote`` (e.g. ``distributed.RayStage``) reads, decodes and encodes instead of this process's threads:
    ``remote.results(indexer, work, known)`` yields one ``_Done`` per work item, in order, with ``vector`` set
    for the encoded ones; the walk, the incremental rules and the writes stay here.
    """

    def __init__(self, settings: Settings, encoder: Encoder, store: Store, remote=None):
        self.settings, self.remote, self.encoder, self.store = settings, remote, encoder, store
        self.model: ModelRow = store.get_or_create_model(encoder.spec.name, encoder.spec.pretrained,
                                                         encoder.fingerprint, encoder.dim)
        self.stage = DecodeStage(encoder, settings.max_pixels,
                                 tensor_decode_wanted(settings.gpu_decode, encoder.device))
        self.budget = thread_budget(device=encoder.device, workers=settings.workers)

    # --- worker side (threads, or Ray workers: there only self.settings and self.stage exist) ---------
    def _process(self, work: _Work, known_hashes: frozenset[str], tensor_decode: bool | None = None) -> _Done:
        path = work.entry.path
        if work.meta_only:
            return _Done(work, skipped_decode=True, meta=header_meta(path, work.entry.mtime_ns))
        cap = self.settings.max_file_mb << 20
        jpeg = None
        try:
            with formats.open_regular(path) as f:  # a FIFO swapped in since the walk never blocks the run
                size = os.fstat(f.fileno()).st_size
                if size > cap:  # never read: peak memory stays near workers x cap
                    return _Done(work, error=f"file is {human_bytes(size)}, over the {self.settings.max_file_mb} MB "
                                             "cap; raise IMGSEARCH_MAX_FILE_MB if it is a genuine image")
                digest = files.hash_file(f)
                if work.old is not None and work.old.hash == digest and not work.needs_vector:
                    meta = header_meta(path, work.entry.mtime_ns) if work.old.taken_source is None else None
                    return _Done(work, hash=digest, skipped_decode=True, meta=meta)  # touched, same content
                if digest in known_hashes and (work.old is None or work.old.hash != digest):
                    return _Done(work, hash=digest, skipped_decode=True)  # a move, copy or swap of a known image
                if self.stage.tensor if tensor_decode is None else tensor_decode:
                    jpeg = self.stage.read_jpeg(f)
        except OSError as e:
            return _Done(work, error=f"cannot read file: {e.strerror or e}")
        except DecodeError as e:
            return _Done(work, hash=digest, error=str(e))
        if jpeg is not None:
            return _Done(work, hash=digest, raw=jpeg[0], info=jpeg[1], orientation=jpeg[2])
        try:
            # From the file, not a bytes copy: Pillow reads what it decodes (a draft JPEG decode reads less).
            tensor, info = self.stage.pillow(path)
        except DecodeError as e:
            return _Done(work, hash=digest, error=str(e))
        except Exception as e:  # a decoder bug on one file must not stop the run
            return _Done(work, hash=digest, error=f"cannot decode: {type(e).__name__}: {e}")
        return _Done(work, hash=digest, tensor=tensor, info=info)

    # --- main side -------------------------------------------------------------------------------
    def run(self, roots: list[str], progress: ProgressFn | None = None,
            build_progress: BuildProgress | None = None) -> IndexReport:
        """Index ``roots``; ``progress(done, total)`` per file, ``build_progress`` for a FAISS rebuild after."""
        t0 = time.perf_counter()
        report = IndexReport(model=self.encoder.spec.label, decode=self.stage.describe())
        store = self.store
        model_id = self.model.id

        seen: dict[str, files.FileEntry] = {}
        problems: dict[str, str] = {}
        aliases: set[str] = set()
        for item in files.walk(roots, skip_homes=[self.settings.home], aliases=True):
            if isinstance(item, files.Skipped):
                problems[item.path] = item.reason
            elif isinstance(item, files.Alias):
                report.aliases += 1  # one physical file, one row: the path walked first
                aliases.add(item.path)
                report.alias_paths.add(item.path)
            else:
                seen[item.path] = item
        existing = store.images_under(roots)
        # Symlinks may lead outside the roots; those files' rows are found by path.
        inside = set(roots)  # a path's folders looked up, not each root tried: a watch batch has thousands of roots
        outside = [p for p in seen if p not in existing and inside.isdisjoint(_folders(p))]
        if outside:
            existing.update(store.images_at(outside))
        # The run's state, shared by the methods below (main thread only).
        self._with_vec = with_vec = store.image_ids_with_vectors(model_id, (r.id for r in existing.values()))
        self._claimed: set[int] = set()  # rows moved to a new path in this run
        self._report, self._pending, self._batch, self._sampled = report, _Pending(), [], {}

        # Files that failed before and have not changed since fail again: not re-read every run.
        prior = store.failures_of(p for p, e in seen.items()
                                  if (old := existing.get(p)) is None or old.size != e.size
                                  or old.mtime_ns != e.mtime_ns or old.id not in with_vec)
        still_failing = {path for path, (reason, size, mtime_ns) in prior.items()
                         if (size, mtime_ns) == (seen[path].size, seen[path].mtime_ns)
                         and not self._may_pass_now(reason, size)}
        report.failed_before = len(still_failing)

        work: list[_Work] = []
        for path, entry in seen.items():
            if path in still_failing:
                continue
            old = existing.get(path)
            vec = old is not None and old.id in with_vec
            if vec and old.size == entry.size and old.mtime_ns == entry.mtime_ns:
                if old.taken_source is None:  # from before schema 5: a header read fills when/where
                    work.append(_Work(entry, old, needs_vector=False, meta_only=True))
                else:
                    report.unchanged += 1
            else:
                work.append(_Work(entry, old, needs_vector=not vec))

        # Rows whose file is gone are move sources first; whatever is not claimed is removed at the end.
        self._missing = {p: r for p, r in existing.items()
                         if p not in seen and p not in problems and p not in aliases and _gone(p, problems)}
        self._missing_by_hash: dict[str, list[ImageRow]] = {}
        for r in self._missing.values():
            self._missing_by_hash.setdefault(r.hash, []).append(r)
        hashed = any(not w.meta_only for w in work)
        # A new or changed file whose content the library knows is a move (its old row's file is gone), a copy
        # or a swap of names (mv a t; mv b a; mv t b): its vector is reused, not encoded again.
        known = frozenset(self._missing_by_hash) | frozenset(store.image_hashes() if hashed else ())

        to_decode = [w for w in work if not w.meta_only]
        if self.remote is not None:
            report.decode, report.image_tower = self.remote.describe()
        elif to_decode:  # before the run is recorded: a refused int8 run leaves the library as it was
            self._choose_image_encoder(to_decode, report)
        run_id = store.start_run(model_id, roots)
        pending = self._pending
        total = len(work)
        results = None
        saved = report.counts()  # what the library holds: an interrupted run records this, not the batch in flight
        try:
            if progress:
                progress(0, total)
            budget = self.budget
            ahead = max(2 * self.settings.batch_size, 4 * budget.decode) if budget.overlap else \
                self.settings.batch_size
            if self.remote is not None:
                results = self.remote.results(self, work, known)
            else:
                results = images.decode_many(work, lambda w: self._process(w, known), budget.decode, ahead,
                                             overlap=budget.overlap)
            for done, (w, result) in enumerate(zip(work, results), 1):
                if isinstance(result, DecodeError):  # _process reports its own errors; this is a last resort
                    result = _Done(w, error=str(result))
                self._route(result)
                if len(pending.copies) >= self.settings.write_batch:
                    self._resolve_known()
                if len(self._batch) >= self.settings.batch_size:
                    self._encode()
                if pending.size() >= self.settings.write_batch or (pending.vectors and not self._batch):
                    self._resolve_known()
                    pending.flush(store, model_id)
                    saved = report.counts()
                if progress:
                    progress(done, total)
            self._resolve_known()
            self._encode()
            pending.flush(store, model_id)
            report.removed += store.delete_images(self._gone_ids(seen, aliases, problems))
            report.failed.extend(problems.items())
            if problems:
                pending.failures.extend((p, r, None, None) for p, r in problems.items())
                pending.flush(store, model_id)
            store.delete_failures_under(roots, keep={p for p, _ in report.failed} | still_failing)
        except BaseException:
            if results is not None:
                results.close()  # stop the decode threads before the run is recorded as interrupted
            report.interrupted = True
            report.seconds = time.perf_counter() - t0
            with contextlib.suppress(Exception):
                store.finish_run(run_id, saved, interrupted=True)
            raise
        report.failed.sort()
        store.finish_run(run_id, report.counts())
        from . import relevance

        # Kept fresh here once a query measured it (no text encoding here), so the cold path finds it ready.
        relevance.current(store, model_id, None)
        model_index(self.settings, store, model_id, build_progress)  # the next query starts fast
        report.seconds = time.perf_counter() - t0
        return report

    def _gone_ids(self, *walked) -> list[int]:
        """Ids of the rows whose file is gone, from a folder that still holds images. A folder that holds none at
        all now (the empty mount point of a drive not mounted, a root that is empty) keeps its rows, counted in
        ``report.kept`` by that folder: nothing in it says its photos were deleted."""
        yielding: set[str] = set()
        for path in itertools.chain(*walked):
            folder = os.path.dirname(path)
            while folder not in yielding:
                yielding.add(folder)
                folder = os.path.dirname(folder)
        ids, kept = [], self._report.kept
        for path, row in self._missing.items():
            folder = os.path.dirname(path)
            while not os.path.isdir(folder):
                folder = os.path.dirname(folder)
            if folder in yielding:
                ids.append(row.id)
            else:
                kept[folder] = kept.get(folder, 0) + 1
        return ids

    def _may_pass_now(self, reason: str, size: int) -> bool:
        """A recorded failure that a raised cap, a newly installed extra or a fixed machine may now let through
        (retried): a read error or a lack of memory says nothing about the file (chmod changes no mtime)."""
        if reason.startswith(("cannot read file", "not enough memory")):
            return True
        if reason == RAW_NEEDS_EXTRA:
            return files.raw_supported()
        if reason == HEIC_NEEDS_EXTRA:
            return files.heic_supported()
        if "IMGSEARCH_MAX_FILE_MB" in reason:
            return size <= self.settings.max_file_mb << 20
        if "IMGSEARCH_MAX_PIXELS" in reason:
            m = re.search(r"(\d+)x(\d+) = ", reason)
            return m is None or int(m[1]) * int(m[2]) <= self.settings.max_pixels
        return False

    def _choose_image_encoder(self, work: list[_Work], report: IndexReport) -> None:
        """This run's image encoder (onnx_image.select); int8 must first match fp32 on this run's images, or on this
        library's in an earlier run: else --precision int8 is refused, and auto falls back (torch, or fp32)."""
        from . import onnx_image

        enc = self.encoder = onnx_image.select(self.encoder, self.settings, self.budget.encoder, len(work))
        report.image_tower = enc.image_tower
        if enc.image_tower != "onnxruntime int8":
            return
        home, library_id, threshold = self.settings.home, self.store.library_id, self.settings.int8_min_cosine
        verdict = onnx_image.cached_parity(home, enc.fingerprint, library_id, threshold)
        if verdict is not None:
            report.int8_parity, report.parity_images = verdict.get("min_cosine"), 0  # 0: not measured now
            return
        sample = work if len(work) <= PARITY_SAMPLE else [work[int(i * len(work) / PARITY_SAMPLE)]
                                                           for i in range(PARITY_SAMPLE)]
        done = [res for res in images.decode_many(
            sample, lambda w: self._process(_Work(w.entry, None, True), frozenset(), False), self.budget.decode)
            if isinstance(res, _Done) and res.tensor is not None]
        tensors = [res.tensor for res in done]
        if not tensors:
            return
        cos, feats, speeds = onnx_image.int8_parity(enc, tensors)
        report.int8_parity, report.parity_images = cos, len(tensors)
        if cos < threshold and self.settings.precision == "auto":
            # auto chose int8 for speed: the torch tower instead (asked again next run), or the fp32 export (kept)
            if enc.torch_encoder is None:
                self.encoder = onnx_image.fp32_twin(enc)
                onnx_image.record_parity(home, enc.fingerprint, library_id, cos, len(tensors))
            else:
                base = enc.torch_encoder
                self.encoder = onnx_image.select(base, self.settings.with_(precision=base.precision),
                                                 self.budget.encoder, len(work))
            report.image_tower, report.int8_parity, report.parity_images = self.encoder.image_tower, None, 0
            onnx_image.say_once(f"note: int8 is too far from fp32 on your images (min cosine {cos:.4f} < {threshold} "
                                f"on {len(tensors)} images); this run encodes on {report.image_tower}")
            return
        if cos < threshold:
            raise UsageError(f"--precision int8 is too far from fp32 on your images (min cosine {cos:.4f} < "
                             f"{threshold} on {len(tensors)} images); index with --precision fp32")
        onnx_image.record_parity(home, enc.fingerprint, library_id, cos, len(tensors))
        if speeds and self.settings.precision == "auto" and enc.torch_encoder is None:
            # without torch, auto runs the faster of int8 and the fp32 export, as timed on this sample
            if onnx_image.record_speeds(home, enc.fingerprint, speeds, self.budget.encoder) == "onnxruntime fp32":
                self.encoder = onnx_image.fp32_twin(enc)
                report.image_tower = self.encoder.image_tower
                onnx_image.say_choice(speeds, report.image_tower)
                return
        # the sample's int8 vectors are this run's: those files are decoded again (hash, metadata), not encoded
        self._sampled = {(r.work.entry.path, r.work.entry.size, r.work.entry.mtime_ns): v for r, v in zip(done, feats)}

    def _fail(self, e: files.FileEntry, error: str) -> None:
        self._report.failed.append((e.path, error))
        self._pending.failures.append((e.path, error, e.size, e.mtime_ns))

    def _route(self, res: _Done) -> None:
        """Decide what one processed file means for the library."""
        w, e, pending, report = res.work, res.work.entry, self._pending, self._report
        if res.error is not None:
            self._fail(e, res.error)
            return
        if res.skipped_decode:
            if res.meta is not None:
                pending.meta.append({**res.meta, "id": w.old.id})
            if w.meta_only:
                report.unchanged += 1
                return
            if w.old is not None and w.old.hash == res.hash:  # same bytes, new timestamp
                pending.touched.append((w.old.id, e.size, e.mtime_ns))
                report.unchanged += 1
                pending.cleared.append(e.path)
                return
        if (w.old is None or w.old.hash != res.hash) and (candidates := self._missing_by_hash.get(res.hash)):
            # A gone file's content now at this path (mv b.jpg a.jpg): b's row moves here, a's row goes (its
            # captions, tags and pins stay with the picture they were given to).
            self._move(candidates.pop(), e)
            report.removed += w.old is not None
            return
        if res.skipped_decode:  # elsewhere in the library: decided in batches by _resolve_known
            pending.copies.append((e, res.hash, w.old))
            return
        self._batch.append(res)

    def _move(self, row: ImageRow, e: files.FileEntry) -> None:
        """The row's file now lives at ``e.path``: keep the row (id, vectors, captions, tags), change its path."""
        self._missing.pop(row.path, None)
        self._claimed.add(row.id)
        self._pending.moved.append((row.id, e.path, e.size, e.mtime_ns))
        self._pending.cleared.append(e.path)
        self._report.moved += 1
        if row.id not in self._with_vec:  # moved, but never encoded with this model
            redo = self._process(_Work(e, row, True), frozenset())
            if redo.error is None and not redo.skipped_decode:
                self._batch.append(redo)

    def _resolve_known(self) -> None:
        """New or changed files whose content the library already has, anywhere: a move across runs, an alias, a
        copy, or names swapped (a changed file keeps its own row, captions and tags; its vector is reused)."""
        pending, report, store = self._pending, self._report, self.store
        if not pending.copies:
            return
        todo, pending.copies = pending.copies, []
        by_hash = store.images_by_hash(h for _, h, _ in todo)
        row_ids = [r.id for rows in by_hash.values() for r in rows]
        self._with_vec |= store.image_ids_with_vectors(self.model.id, row_ids)
        copies: list[tuple[files.FileEntry, ImageRow, ImageRow | None]] = []
        for e, digest, old in todo:
            same = sorted((r for r in by_hash.get(digest, []) if r.path != e.path), key=lambda r: r.id)
            kind, row = _known_match(e.path, [r for r in same if r.id not in self._claimed])
            if kind == "moved":
                self._move(row, e)
                report.removed += old is not None  # the row at this path goes, as in mv b.jpg a.jpg
            elif kind == "alias" and old is None:  # a hard link to a file the library has under another name
                report.aliases += 1
                report.alias_paths.add(e.path)
            else:
                source = next((r for r in same if r.id in self._with_vec), None)  # a moved row's vector too
                if source is not None:
                    copies.append((e, source, old))
                    continue
                # Known content but no vector to copy for this model: decode after all.
                self._route(self._process(_Work(e, old, True), frozenset()))
        if copies:
            ids, vecs = store.load_vectors(self.model.id, sorted({src.id for _, src, _ in copies}))
            vec_by_id = dict(zip(ids.tolist(), vecs))
            for e, src, old in copies:
                record = {"path": e.path, "size": e.size, "mtime_ns": e.mtime_ns, "hash": src.hash,
                          "width": src.width, "height": src.height, **with_file_time(src.meta(), e.mtime_ns)}
                if old is None:
                    pending.new.append(record)
                    report.new += 1
                else:  # new content at a known path: the row, its captions and tags stay with the path
                    pending.updated.append({**record, "id": old.id})
                    report.updated += 1
                pending.vectors.append((e.path if old is None else old.id, vec_by_id[src.id]))
                pending.cleared.append(e.path)
                report.reused += 1

    def _decode_raw(self, batch: list[_Done]) -> list[_Done]:
        """Decode the batch's JPEG bytes together on the encoder's device; Pillow for the ones that fail."""
        raw = [r for r in batch if r.raw is not None]
        if not raw:
            return batch
        tensors = self.stage.batch([r.raw for r in raw], [r.orientation for r in raw])
        for r, t in zip(raw, tensors):
            r.raw, r.tensor = None, t
        kept = []
        for r in batch:
            if r.tensor is None:
                r = self._process(_Work(r.work.entry, r.work.old, True), frozenset(), tensor_decode=False)
                if r.error is not None:
                    self._fail(r.work.entry, r.error)
                    continue
            kept.append(r)
        return kept

    def _encode(self) -> None:
        """Encode the batch waiting and queue its rows and vectors for the next transaction."""
        batch, self._batch = self._decode_raw(self._batch), []
        pending, report = self._pending, self._report
        for r in batch:
            if r.vector is None and self._sampled:
                e = r.work.entry
                r.vector = self._sampled.pop((e.path, e.size, e.mtime_ns), None)
        todo = [r for r in batch if r.vector is None]
        if todo:
            if self.encoder.torch_free:
                vecs = self.encoder.encode_image_tensors([r.tensor for r in todo])
            else:
                import torch

                vecs = self.encoder.encode_image_tensors(torch.stack([r.tensor.to(self.encoder.device) for r in todo]))
            for r, vec in zip(todo, vecs):
                r.vector = vec
        for res in batch:
            w, e, info = res.work, res.work.entry, res.info
            record = {"path": e.path, "size": e.size, "mtime_ns": e.mtime_ns, "hash": res.hash,
                      "width": info.width, "height": info.height, **with_file_time(info.meta(), e.mtime_ns)}
            pending.vectors.append((e.path if w.old is None else w.old.id, res.vector))
            pending.cleared.append(e.path)
            if w.old is None:
                pending.new.append(record)
                report.new += 1
            elif w.old.hash != res.hash:
                pending.updated.append({**record, "id": w.old.id})
                report.updated += 1
            else:  # unchanged content, first vector for this model
                pending.touched.append((w.old.id, e.size, e.mtime_ns))
                if w.old.taken_source is None:
                    pending.meta.append({**record, "id": w.old.id})
                report.unchanged += 1
        report.encoded += len(batch)


class _Pending:
    """Results waiting for the next transaction."""

    def __init__(self):
        self.new: list[dict] = []
        self.updated: list[dict] = []
        self.moved: list[tuple] = []
        self.touched: list[tuple] = []
        self.vectors: list[tuple] = []
        self.copies: list[tuple[files.FileEntry, str, ImageRow | None]] = []  # (file, hash, its row)
        self.failures: list[tuple] = []
        self.cleared: list[str] = []
        self.meta: list[dict] = []

    def size(self) -> int:
        return (len(self.new) + len(self.updated) + len(self.moved) + len(self.touched) + len(self.copies)
                + len(self.failures) + len(self.meta))

    def flush(self, store: Store, model_id: int) -> None:
        if not (self.size() or self.vectors or self.cleared):
            return
        store.write_batch(model_id, new=self.new, updated=self.updated, moved=self.moved, touched=self.touched,
                          vectors=self.vectors, failures=self.failures, cleared_failures=self.cleared,
                          meta=self.meta)
        copies = self.copies
        self.__init__()
        self.copies = copies


def _known_match(path: str, rows: list[ImageRow]) -> tuple[str, ImageRow | None]:
    """How a new file at ``path`` relates to library rows with the same content.

    "moved": a row whose file is gone, or whose path is an old symlinked name of this very file, moves here.
    "alias": a row is this physical file under another real name (a hard link): no second row.
    "copy": the rows are other files with the same bytes.
    """
    for r in rows:
        if not os.path.lexists(r.path):
            return "moved", r
    for r in rows:
        try:
            if os.path.samefile(r.path, path):
                return ("moved" if os.path.realpath(r.path) == path else "alias"), r
        except OSError:
            continue
    return "copy", None


PARITY_SAMPLE = 32  # images decoded to check int8 against fp32 before an int8 run


def normalize_roots(paths: Iterable[str | os.PathLike]) -> list[str]:
    roots = []
    for p in paths:
        full = files.abspath(p)
        if not os.path.lexists(full):
            raise UsageError(f"no such file or folder: {p}")
        roots.append(full)
    if not roots:
        raise UsageError("give at least one folder or image file to index")
    return roots


def index_paths(settings: Settings, paths: Iterable[str | os.PathLike], *, encoder: Encoder | None = None,
                progress: ProgressFn | None = None, store: Store | None = None, open_store=None, load_encoder=None,
                build_progress: BuildProgress | None = None, wait: bool = True, remote=None) -> IndexReport:
    """Index (or re-index incrementally) image files under ``paths`` with the settings' model, holding the
    write lock (``wait=False``: fail at once when another run has it); ``remote``: see :class:`Indexer`."""
    from . import encoder as encoder_mod
    from . import onnx_image
    from .lock import write_lock

    roots = normalize_roots(paths)
    with write_lock(settings.home, wait=wait):
        own_store = store is None
        # An existing library is opened first (its id keys the int8 parity verdict); a new one only after the
        # model loaded, so a bad --model leaves no empty library. A Ray run (remote) is never torch-free.
        torch_free = encoder is None and remote is None and settings.torch_free
        threads = thread_budget(device="cpu", workers=settings.workers).encoder
        if torch_free:  # its ONNX session loads on the idle core while the library opens (SQLAlchemy, the store)
            onnx_image.prestart_lite(settings, threads)
        if store is None and settings.db_path.exists():
            store = open_store() if open_store else Store(settings.db_path)
        try:
            enc = encoder
            if torch_free:
                onnx_image.say_gpu_unused(settings)
                enc, why = onnx_image.torch_free_encoder(settings, store and store.library_id, threads)
                if enc is None and not encoder_mod.torch_installed():
                    raise ModelLoadError(encoder_mod.needs_torch(f"indexing here ({why})",
                                                                 ModelSpec(settings.model, settings.pretrained)))
            if enc is None:
                onnx_image.drop_prestarted()
                enc = load_encoder() if load_encoder else encoder_mod.load(
                    ModelSpec(settings.model, settings.pretrained), settings.device, settings.precision)
            store = store or (open_store() if open_store else Store(settings.db_path))
            indexer = Indexer(settings, enc, store, remote)
            torch_cpu = remote is None and enc.device == "cpu" and not enc.torch_free
            with torch_threads(settings, indexer.budget.encoder) if torch_cpu else contextlib.nullcontext():
                report = indexer.run(roots, progress, build_progress)
        finally:
            if own_store and open_store is None and store is not None:
                store.close()
        if not enc.torch_free:
            # The text export a cold `query` uses; made once per weights fingerprint, never fails the run.
            from .textfast import ensure_export

            ensure_export(settings.home, enc)
        return report


def _folders(path: str) -> Iterator[str]:
    """``path`` and every folder above it."""
    yield path
    while (parent := os.path.dirname(path)) != path:
        yield (path := parent)


def _gone(path: str, problems: dict[str, str]) -> bool:
    """Whether an indexed file the walk did not yield is gone. One it skipped without looking (inside a library
    home or a hidden folder) is still a file there, and one in a folder it could not list (permissions, an I/O
    error) may be: their rows stay, with their captions, tags and album pins."""
    if os.path.isfile(path):
        return False
    folder = os.path.dirname(path)
    while folder not in problems:
        parent = os.path.dirname(folder)
        if parent == folder:
            return True
        folder = parent
    return False


def forget(settings: Settings, store: Store, paths: Iterable[str | os.PathLike], wait: bool = True) -> int:
    """Remove files or folders (by path prefix) from the library; the files themselves are untouched."""
    from .lock import write_lock

    targets = [files.abspath(p) for p in paths]  # Library.forget refused an empty path or none
    with write_lock(settings.home, wait=wait):
        rows = store.images_under(targets)
        removed = store.delete_images(r.id for r in rows.values())
        store.delete_failures_under(targets)
        return removed


def library_status(settings: Settings, store: Store) -> dict:
    """What is in the library: images, failures, models with vector counts, cache files, disk use."""
    from .vectors import cache_state

    models = []
    for m in store.models():
        path = settings.index_path(m.id)
        state, meta = cache_state(path)
        if state == "ok" and meta.get("library_id") != store.library_id:
            state = "stale: built for another library database (rebuilt on next query)"
        elif state == "ok" and meta.get("fingerprint") != m.fingerprint:
            state = "stale (rebuilt on next query)"
        elif state == "ok" and meta.get("version") != m.version:
            state = "stale (updated on next query)"
        meta = meta or {}
        models.append({"id": m.id, "model": m.label, "name": m.name, "pretrained": m.pretrained, "dim": m.dim,
                       "vectors": m.vectors, "index_file": str(path), "index_state": state,
                       "index_type": meta.get("kind"), "index_vectors": meta.get("count"),
                       "recall_at_10": meta.get("recall_at_10"), "nprobe": meta.get("nprobe"),
                       "index_bytes": path.stat().st_size if path.exists() else 0,
                       "relevance_floor": _floor_status(store, m)})
    disk = store.disk_usage()
    for folder in (settings.index_dir, settings.thumbs_dir):
        if folder.exists():
            disk += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return {"home": str(settings.home), "images": store.image_count(), "failures": store.failure_count(),
            "failed_files": [{"path": p, "reason": r} for p, r in store.failures(limit=20)],
            "models": models, "last_run": _run_state(settings, store.last_run()), "disk_bytes": disk,
            "read_only": store.read_only, "schema_version": store.schema_version,
            "when_where": store.when_where_summary()}


def _floor_status(store: Store, model: ModelRow) -> dict | None:
    """The stored relevance floor as status shows it (never measured here: status stays read-only)."""
    from . import relevance

    floor = relevance.parse(store.get_meta(relevance.meta_key(model.id)))
    if floor is None:
        return None
    return {"text": floor.get("text"), "image": floor.get("image"), "vectors": floor.get("vectors"),
            "stale": relevance.is_stale(floor, model.vectors, model.version)}


def _run_state(settings: Settings, run: dict | None) -> dict | None:
    """The last run with its ``state``: finished, running, or interrupted (its process ended unfinished, e.g.
    kill -9, power loss: nothing could record it, so the missing finish time and a free write lock tell)."""
    from .lock import is_held

    if run is None:
        return None
    if run["finished_at"] is not None:
        state = "interrupted" if run["interrupted"] else "finished"
    elif is_held(settings.home) and _alive(run.get("pid")):
        state = "running"
    else:
        state = "interrupted (process ended)"
    return {**run, "state": state}


def _alive(pid: int | None) -> bool:
    if not pid:
        return True  # run recorded before pids were: trust the lock
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True
