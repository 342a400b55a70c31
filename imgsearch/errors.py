"""Errors the library raises. Each message says what went wrong and what to do about it."""


class ImgSearchError(Exception):
    """Base class; the CLI prints the message on one line and exits with ``exit_code``."""

    exit_code = 1


class UsageError(ImgSearchError):
    """The user asked for something malformed (bad option value, missing file argument)."""

    exit_code = 2


class ModelLoadError(ImgSearchError):
    """Model weights or config could not be loaded."""


class ModelMismatchError(ImgSearchError):
    """The library holds no vectors for the requested model, or they do not fit it."""


class LibraryError(ImgSearchError):
    """The library database is unreadable, locked or from a newer version."""


class DecodeError(ImgSearchError):
    """One image could not be read; indexing records the reason and moves on."""


class DataError(ImgSearchError):
    """An input file (captions, labels, templates) is malformed."""


class ParamError(UsageError):
    """A bad value for one named search parameter, worded for the Python and HTTP APIs ("under: no such
    folder"); the CLI rewords it with its flag and the value typed ("--under ~/x: no such folder")."""

    def __init__(self, param: str, detail: str):
        super().__init__(f"{param}: {detail}")
        self.param = param
        self.detail = detail


def disk_full_message(where) -> str:
    """One line for a full disk, naming the free space left (shared by the store and the CLI)."""
    import shutil
    from contextlib import suppress
    from pathlib import Path

    folder = Path(where)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    room = "free space unknown"
    with suppress(OSError):
        room = f"{shutil.disk_usage(folder).free / 1e6:.0f} MB free"
    return (f"disk full while writing the library at {where} ({room}); free some space (a few hundred MB "
            "for a large run) and re-run: finished batches are kept")
