"""Watched folders: turn file-system events into small batches for the library's own index and forget.

Events (watchdog: inotify, or polling) only name paths; a path is looked at once its size and mtime stayed
the same across a quiet spell (``debounce``): a burst of events is one look, and a half-copied photo is not
indexed as a broken one. Writing is the library's crash-safe incremental index + forget, so a watcher killed
at any point loses nothing the next start does not find.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from . import files
from .config import HOME_DB, HOME_MARKER
from .errors import ImgSearchError, UsageError
from .output import shell_word, shown
from .results import IndexReport

# Names editors, browsers and copy tools write first and rename when done: only the final name is a photo.
TEMP_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".crdownload", ".download", ".swp", ".swx", "~")
MAX_DELAY = 3.0  # seconds: a steady stream of events still gets a batch out this often


class FoldersGone(ImgSearchError):
    """Every watched folder disappeared: there is nothing left to watch."""


@dataclass
class Batch:
    """What one batch did to the library."""

    report: IndexReport
    changed: list[str] = field(default_factory=list)  # paths that were indexed (files or folders)
    gone: list[str] = field(default_factory=list)  # paths that were forgotten
    seconds: float = 0.0
    error: str | None = None  # the one-line message of an ImgSearchError that stopped this batch

    def line(self) -> str:
        if self.error:
            return f"batch of {len(self.changed) + len(self.gone)} paths not applied: {self.error}"
        r = self.report
        parts = [f"added {r.new}", f"updated {r.updated}", f"moved {r.moved}", f"removed {r.removed}"]
        if r.failed:
            parts.append(f"failed {len(r.failed)} (imgsearch status --failures)")
        return ", ".join(parts) + f" ({self.seconds:.1f}s)"

    @property
    def empty(self) -> bool:
        r = self.report
        return not (self.error or r.new or r.updated or r.moved or r.removed or r.failed)


def check_folders(paths) -> list[str]:
    """The folders to watch, as the library names paths; a one-line UsageError for anything else."""
    roots: list[str] = []
    for p in paths:
        full = files.abspath(p)
        if not os.path.exists(full):
            raise UsageError(f"no such folder: {p}")
        if not os.path.isdir(full):
            raise UsageError(f"{p} is not a folder; watch takes folders (index single files with "
                             "`imgsearch index FILE`)")
        if full not in roots:
            roots.append(full)
    return roots


def _identity(path: str) -> tuple[int, int] | None:
    """Which folder is at ``path``: another one there (a drive unmounted from its mount point, a folder put in
    the place of one renamed away) is not the folder that was watched."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _signature(path: str) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino) if not os.path.isdir(path) else ("dir",)


def _linked_folders(roots: list[str]) -> list[str]:
    """The real folders outside ``roots`` that symlinked folders below them (or below those) lead to."""
    found: list[str] = []
    todo, seen = list(roots), set()
    while todo:
        folder = todo.pop()
        if (key := _identity(folder)) in seen:
            continue
        seen.add(key)
        with contextlib.suppress(OSError), os.scandir(folder) as it:
            for e in it:
                with contextlib.suppress(OSError):
                    if files.is_hidden(e.name) or not e.is_dir():
                        continue
                    real = os.path.realpath(e.path) if e.is_symlink() else e.path
                    if not any(files.under(real, r) for r in roots + found):
                        found.append(real)
                    todo.append(real)
    return found


class Watcher:
    """Keeps a library in step with folders: ``start()``, ``catch_up()``, then ``run()`` until stopped.
    ``apply(changed, gone)`` writes one batch and returns an IndexReport (``removed`` counting the
    forgotten images too); ``catch_up(roots, progress, build_progress)`` is the start's full incremental
    index. ``on_batch(Batch)`` and ``say(str)`` report; nothing here prints."""

    clock = staticmethod(time.monotonic)  # when events happened and quiet spells end (a test may stop it)

    def __init__(self, paths, apply: Callable[[list[str], list[str]], IndexReport],
                 catch_up: Callable[..., IndexReport], *, home=None, poll: bool = False, interval: float = 1.0,
                 debounce: float = 0.5, on_batch: Callable[[Batch], None] | None = None,
                 say: Callable[[str], None] | None = None):
        self.roots = check_folders(paths)
        self._identities = {root: _identity(root) for root in self.roots}
        self._apply, self._catch_up = apply, catch_up
        self.home = files.abspath(home) if home is not None else None
        self.poll, self.interval, self.debounce = poll, interval, debounce
        self.on_batch = on_batch or (lambda b: None)
        self.say = say or (lambda s: None)
        self.how = ""  # "inotify" / "polling every 1s": said in the status line
        self.batches = 0
        self.totals = IndexReport()
        self._observer = None
        self.links: list[str] = []  # folders outside the roots that symlinked folders in them lead to
        self._watches: dict[str, object] = {}
        self._lock = threading.Lock()
        self._pending: dict[str, float] = {}  # path -> monotonic time of its last event
        self._sigs: dict[str, tuple | None] = {}  # path -> (size, mtime, inode) seen at its last look
        self._last_event = 0.0

    # --- events (observer thread) ----------------------------------------------------------------
    def ignored(self, path: str) -> bool:
        """Paths no batch should see: the library's own home, hidden and temporary files, outside the roots."""
        root = next((r for r in self.roots + self.links if files.under(path, r)), None)
        if root is None or (self.home is not None and files.under(path, self.home)):
            return True
        rel = os.path.relpath(path, root)
        if rel == ".":
            return False
        parts = rel.split(os.sep)
        if any(files.is_hidden(part) for part in parts) or parts[-1].lower().endswith(TEMP_SUFFIXES):
            return True
        # Another library's home inside a watched folder: its thumbnails are no photos.
        folders = (os.path.join(root, *parts[:i]) for i in range(len(parts)))
        return any(os.path.exists(os.path.join(f, HOME_MARKER)) and os.path.exists(os.path.join(f, HOME_DB))
                   for f in folders)

    def notice(self, path: str) -> None:
        """Something happened at ``path``; it is looked at once things have been quiet for a moment."""
        path = os.fsdecode(path)
        if self.ignored(path):
            return
        now, sig = self.clock(), _signature(path)
        with self._lock:
            self._pending[path] = self._last_event = now
            self._sigs[path] = sig

    def _handler(self):
        from watchdog.events import FileSystemEventHandler

        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                kind = event.event_type
                if kind in ("opened", "closed_no_write") or (event.is_directory and kind == "modified"):
                    return  # a folder's "modified" only echoes its children's own events
                watcher.notice(event.src_path)
                if kind == "moved":
                    watcher.notice(event.dest_path)

        return Handler()

    # --- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start receiving events (before the catch-up, so nothing written meanwhile is missed)."""
        try:
            from watchdog.observers.polling import PollingObserver
        except ImportError:
            raise UsageError("watching folders needs watchdog: pip install 'imgsearch[watch]'") from None
        handler = self._handler()
        observer = None
        if not self.poll:
            try:
                from watchdog.observers import Observer

                observer = Observer()
                self._observe(observer, handler)
                self.how = "inotify" if "inotify" in type(observer).__name__.lower() else type(observer).__name__
                return
            except OSError as e:  # no inotify, or its watch limit reached (a big tree): polling still works
                self.say(f"native file events unavailable ({e.strerror or e}); polling every {self.interval:g}s "
                         "instead")
                self._watches.clear()
                if observer is not None:
                    with contextlib.suppress(Exception):
                        observer.stop()
        self._observe(PollingObserver(timeout=self.interval), handler)
        self.how = f"polling every {self.interval:g}s"

    def _observe(self, observer, handler) -> None:
        for root in self.roots:
            self._watches[root] = observer.schedule(handler, root, recursive=True)
        # The walk (catch-up) follows symlinked folders, inotify does not: each target outside gets its own watch.
        self.links = _linked_folders(self.roots)
        for folder in self.links:
            observer.schedule(handler, folder, recursive=True)
        observer.start()
        self._observer = observer

    def catch_up(self, progress=None, build_progress=None) -> IndexReport:
        """A normal incremental index of every root: whatever changed while nothing was watching."""
        return self._catch_up(list(self.roots), progress=progress, build_progress=build_progress)

    def close(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            with contextlib.suppress(RuntimeError):
                observer.join(5)

    def __enter__(self) -> "Watcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, stop: threading.Event | None = None, tick: float = 0.1) -> None:
        """Apply batches until ``stop`` is set (or Ctrl-C); FoldersGone when no watched folder is left."""
        if self._observer is None:
            self.start()
        stop = stop or threading.Event()
        try:
            while not stop.wait(tick):
                self._check_roots()
                changed, gone = self._ready()
                if changed or gone:
                    self._run_batch(changed, gone)
        finally:
            self.close()

    # --- batches ---------------------------------------------------------------------------------------
    def _check_roots(self) -> None:
        for root in list(self.roots):
            if os.path.isdir(root) and _identity(root) == self._identities[root]:
                continue
            # Deleted, renamed or unmounted: its images stay (an unplugged drive must not empty the library, and
            # the empty mount point left in its place must not read as every photo deleted).
            self.roots.remove(root)
            watch = self._watches.pop(root, None)
            if watch is not None and self._observer is not None:
                with contextlib.suppress(Exception):
                    self._observer.unschedule(watch)
            with self._lock:
                for p in [p for p in self._pending if files.under(p, root)]:
                    del self._pending[p]
                    self._sigs.pop(p, None)
            left, where = len(self.roots), shown(root)  # a name with a newline or non-UTF-8 bytes: one line
            self.say(f"watched folder {where} is gone (deleted, renamed or unmounted); its images stay in the "
                     f"library (`imgsearch forget {shell_word(root)}` removes them); "
                     + (f"still watching {left} folder{'s' if left != 1 else ''}" if left else "nothing left"))
            if not left:
                raise FoldersGone("every watched folder is gone; nothing left to watch (start `imgsearch watch` "
                                  "again with folders that exist)")

    def _ready(self) -> tuple[list[str], list[str]]:
        """Paths whose batch is due: quiet for ``debounce`` (or waiting ``MAX_DELAY``) and no longer changing."""
        now = self.clock()
        with self._lock:
            if not self._pending:
                return [], []
            quiet = now - self._last_event >= self.debounce
            overdue = now - min(self._pending.values()) >= MAX_DELAY
            if not (quiet or overdue):
                return [], []
            due = [p for p, t in self._pending.items() if now - t >= self.debounce]
            ready = []
            for p in due:
                sig = _signature(p)
                if sig != self._sigs.get(p):  # still being written: look again after another quiet spell
                    self._sigs[p] = sig
                    self._pending[p] = now
                    continue
                ready.append(p)
                del self._pending[p]
                self._sigs.pop(p, None)
        # A folder in the batch covers everything under it (indexing it also drops its vanished files).
        kept: list[str] = []
        for p in sorted(ready):
            if not (kept and files.under(p, kept[-1])):
                kept.append(p)
        # Only folders and image files (by extension or content, as the walk decides): `index` given a
        # notes.txt would record it as a failed image.
        changed = [p for p in kept if os.path.isdir(p) or (os.path.isfile(p) and files.is_image_file(p))]
        gone = [p for p in kept if not os.path.lexists(p)]
        return changed, gone

    def _run_batch(self, changed: list[str], gone: list[str]) -> None:
        t0 = time.perf_counter()
        try:
            batch = Batch(self._apply(changed, gone), changed, gone)
        except ImgSearchError as e:
            batch = Batch(IndexReport(), changed, gone, error=str(e))
            # A file that vanished (or came back) between the look and the write stopped the whole batch: look
            # at every path of it again (the rest were neither indexed nor forgotten).
            if any(not os.path.exists(p) for p in changed) or any(os.path.lexists(p) for p in gone):
                for p in changed + gone:
                    self.notice(p)
        batch.seconds = time.perf_counter() - t0
        for name in ("new", "updated", "moved", "removed"):
            setattr(self.totals, name, getattr(self.totals, name) + getattr(batch.report, name))
        self.totals.failed.extend(batch.report.failed)
        if not batch.empty:  # a touched or re-saved identical file changes nothing: not a batch to count
            self.batches += 1
            self.on_batch(batch)
