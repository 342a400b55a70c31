"""Paths as text a person can read. Standard library only, so the store and the file walker share it
without importing each other."""

from __future__ import annotations

import os


def display(path: str) -> str:
    """``path`` printable anywhere: bytes that are not UTF-8 (surrogate escapes) shown as \\xNN."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
