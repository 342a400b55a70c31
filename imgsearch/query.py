"""Query terms: texts, images (path, bytes, file object or PIL image) and library ids, with weights.

Standard library only (plus files and queryspec), so the HTTP server and the Python API build queries
without importing the search engine; search.Searcher turns them into one vector.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

from . import files
from .errors import UsageError
from .queryspec import parse_weighted, split_image_spec


@dataclass(frozen=True)
class Term:
    """One part of a query: a text, an image, or an image already in the library (by id).

    An image is a file path, the file's bytes, or a PIL image; bytes and PIL images are decoded in memory,
    so a query image never has to be written to disk. ``name`` labels it in error messages.
    """

    kind: str  # "text" | "image" | "id"
    value: object  # str for text and image paths; bytes or PIL.Image.Image for images; int for ids
    weight: float = 1.0
    name: str | None = None
    noun: str = "query image"  # how messages refer to it: "cannot use query image NAME: ..."


def text_term(raw: str) -> Term:
    weight, text = parse_weighted(raw)
    if not text:
        raise UsageError("empty query text; give some words, e.g. imgsearch query \"a red car\"")
    return Term("text", text, weight)


def image_term(raw: str) -> Term:
    """An image file; 'W:path' weights it unless 'W:path' is itself an existing file."""
    weight, path = split_image_spec(raw)
    if not os.path.exists(path):
        raise UsageError(f"query image not found: {path}")
    return Term("image", files.abspath(path), weight)


def image_data_term(data, weight: float = 1.0, name: str = "uploaded image", noun: str = "query image") -> Term:
    """An image given as file bytes or a PIL image (decoded in memory, never written to disk)."""
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    return Term("image", data, float(weight), name, noun)


@dataclass
class Query:
    positives: list[Term] = field(default_factory=list)
    negatives: list[Term] = field(default_factory=list)

    @classmethod
    def build(cls, texts: Sequence[str] = (), images_: Sequence = (), not_texts: Sequence[str] = (),
              not_images: Sequence = (), ids: Sequence[int] = ()) -> "Query":
        """Texts and image specs ('W:path') as the CLI takes them; ready-made Terms (e.g. from
        image_data_term) pass through unchanged."""

        def image(p):
            return p if isinstance(p, Term) else image_term(p)

        def text(t):
            return t if isinstance(t, Term) else text_term(t)

        q = cls([text(t) for t in texts] + [image(p) for p in images_] + [Term("id", int(i)) for i in ids],
                [text(t) for t in not_texts] + [image(p) for p in not_images])
        if not q.positives:
            raise UsageError("nothing to search for: give query text, an image, or both")
        return q


