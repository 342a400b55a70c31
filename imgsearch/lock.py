"""One writer at a time per library: an advisory lock on <home>/write.lock, held for a whole write command.

SQLite alone serialises transactions, not runs (two `index` runs planning the same new files collide).
Readers never take it. The holder writes its pid in the file so a waiting run can name it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

from .config import HOME_DB, make_home
from .errors import LibraryError

LOCK_NAME = "write.lock"

_held: dict[str, tuple[int, int]] = {}  # lock path -> (thread id, depth): re-entrant within one thread
_held_guard = threading.Lock()


def holder_pid(home: str | os.PathLike) -> int | None:
    """The pid recorded by the current or last holder (None when unknown)."""
    try:
        text = (Path(home) / LOCK_NAME).read_text(encoding="ascii", errors="replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def is_held(home: str | os.PathLike) -> bool:
    """Whether some process holds the write lock now (a probe: takes and drops a shared lock, never waits)."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fd = os.open(Path(home) / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return False  # no lock file: no writer has run since locking existed
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


@contextmanager
def write_lock(home: str | os.PathLike, *, wait: bool = True) -> Iterator[None]:
    """Hold the library's write lock. Another holder: say so once and wait, or with ``wait=False`` fail at once
    with a LibraryError that names the holder."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): SQLite's own locking is all there is
        yield
        return
    home = Path(home)
    path = home / LOCK_NAME
    key = str(path.absolute())
    me = threading.get_ident()
    with _held_guard:
        owner = _held.get(key)
        reentered = bool(owner) and owner[0] == me
        if reentered:
            _held[key] = (me, owner[1] + 1)
    if reentered:
        try:
            yield
        finally:
            with _held_guard:
                _held[key] = (me, _held[key][1] - 1)
        return
    if os.path.islink(path):  # the pid is written into this file, never through a link to another (O_NOFOLLOW)
        raise LibraryError(f"{path} is a symbolic link; remove it (imgsearch writes its pid there)")
    made = not os.path.lexists(home)  # by this run: removed again if it leaves only the lock file there
    try:
        make_home(home)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except OSError as e:
        why = "a file, not a folder" if isinstance(e, FileExistsError) else e.strerror or e
        raise LibraryError(f"cannot write to the library at {home} ({why})" + (
            "; queries work, but indexing, forget, captions and tags need write access"
            if (home / HOME_DB).is_file() else "; give --home a folder you can write to")) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pid = holder_pid(home)
            who = f" (pid {pid})" if pid else ""
            if not wait:
                raise LibraryError(f"another imgsearch run{who} is writing to this library; try again when it has "
                                   "finished, or wait for it (leave out --no-wait; wait=True in Python)") from None
            # One write for the line and its newline, so it cannot run into another thread's line (serve --watch).
            sys.stderr.write(f"another imgsearch run{who} is writing to this library; waiting… (Ctrl-C to stop)\n")
            sys.stderr.flush()
            while True:  # polling, not a blocking flock, keeps Ctrl-C responsive
                time.sleep(0.1)
                with suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
        if not _same_file(fd, path):  # its holder removed the home it had made and left empty: lock it anew
            with write_lock(home, wait=wait):
                yield
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        with _held_guard:
            _held[key] = (me, 1)
        try:
            yield
        finally:
            with _held_guard:
                _held.pop(key, None)
            os.ftruncate(fd, 0)  # a pid left behind would be named by the next waiter
            with suppress(OSError):  # a first run that wrote nothing (a bad --model) leaves no folder behind
                if made and os.listdir(home) == [LOCK_NAME] and _same_file(fd, path):
                    os.unlink(path)
                    os.rmdir(home)  # never recursive: anything that appeared meanwhile keeps it
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.lstat(path))
    except OSError:
        return False


@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created when missing) for the block, waited for: a short
    read-modify-write of a file several processes share. Without flock (Windows), none."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
