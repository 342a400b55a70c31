"""Zero-shot tags for the library (stored in SQLite with their model and label set) and for loose files."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from . import files, zeroshot
from .config import Settings
from .errors import UsageError
from .evaluation import encode_files
from .request import _number
from .search import folder_ids

CHUNK = 8192  # images classified per step: bounds memory at N x labels floats


@dataclass
class TagReport:
    set_id: int
    model: str
    labels: list[str]
    templates: list[str]
    images: int = 0  # images classified
    tagged: int = 0  # images that got at least one tag (--min-prob may leave some without)
    counts: list[tuple[str, int]] = field(default_factory=list)  # (label, images) best first
    results: list[dict] = field(default_factory=list)  # per image: path + [(label, prob)]

    def as_dict(self) -> dict:
        return {"set": self.set_id, "model": self.model, "labels": self.labels, "templates": self.templates,
                "images": self.images, "tagged": self.tagged,
                "counts": [{"label": lab, "images": n} for lab, n in self.counts], "results": self.results}


def resolve_labels(labels: str | Sequence[str] | None, labels_file: str | os.PathLike | None) -> list[str]:
    """Labels from --labels or --labels-file (exactly one of them)."""
    if labels and labels_file:
        raise UsageError("give --labels or --labels-file, not both")
    if labels_file:
        return zeroshot.read_labels(labels_file)
    if labels is None:
        raise UsageError("no labels: give --labels \"dog,cat,car\" or --labels-file FILE (one label per line)")
    return zeroshot.parse_labels(labels)


def resolve_templates(templates: Sequence[str] | None, templates_file: str | os.PathLike | None) -> list[str]:
    """--template (repeatable) or --templates-file replace the default ensemble."""
    if templates and templates_file:
        raise UsageError("give --template or --templates-file, not both")
    if templates_file:
        return zeroshot.read_templates(templates_file)
    if templates:
        return zeroshot.check_templates(templates)
    return list(zeroshot.DEFAULT_TEMPLATES)


def _checked(labels, templates, top: int, min_prob: float) -> tuple[list[str], list[str]]:
    """(labels, templates: one string is one template, the default ensemble when None) once they, ``top`` and
    ``min_prob`` are checked (the Python API's values reach here unchecked)."""
    _number(top, "top", "give a whole number, at least 1", 1, math.inf, whole=True)
    _number(min_prob, "min_prob", "give a probability between 0 and 1", 0.0, 1.0)
    templates = [templates] if isinstance(templates, str) else templates or zeroshot.DEFAULT_TEMPLATES
    return list(labels), zeroshot.check_templates(templates, "templates")


def classify_library(store, model, text_side, labels: Sequence[str], templates: Sequence[str] | None = None,
                     top: int = 1, min_prob: float = 0.0, under: str | os.PathLike | None = None,
                     keep_results: bool = False, langs: tuple = ()) -> TagReport:
    """Tag every indexed image (or those under a folder) with its top labels, from stored vectors.
    ``model`` is the library's model row, ``text_side`` anything with encode_texts and logit_scale (the
    exported text tower or the encoder). Re-running with the same model, labels and templates replaces that
    set's tags; other sets stay."""
    labels, templates = _checked(labels, templates, top, min_prob)
    if under:
        ids = np.array(sorted(store.image_ids_with_vectors(model.id, folder_ids(store, under).tolist())),
                       dtype=np.int64)
    else:
        ids = store.vector_ids(model.id)
    if len(ids) == 0:
        raise UsageError(f"no indexed images{f' under {under}' if under else ''} to classify; "
                         "run `imgsearch index PATH` first")
    label_vecs = zeroshot.label_embeddings(text_side, labels, templates, langs)  # no torch with a text export
    set_id = store.tag_set(model.id, labels, templates)
    report = TagReport(set_id, model.label, labels, templates)
    for start in range(0, len(ids), CHUNK):
        part_ids, vecs = store.load_vectors(model.id, ids[start:start + CHUNK].tolist())
        probs = zeroshot.classify(vecs, label_vecs, text_side.logit_scale)
        best = zeroshot.top_labels(probs, labels, top, min_prob)
        rows = [(int(i), lab, p) for i, tags in zip(part_ids, best) for lab, p in tags]
        store.replace_tags(set_id, part_ids.tolist(), rows)
        report.images += len(part_ids)
        report.tagged += sum(1 for tags in best if tags)
        if keep_results:
            paths = store.get_images(part_ids.tolist())
            report.results += [{"id": int(i), "path": paths[int(i)].path if int(i) in paths else None,
                                "labels": _labelled(tags)} for i, tags in zip(part_ids, best)]
    report.counts = store.tag_counts(set_id)
    return report


@dataclass
class FileLabels:
    path: str
    labels: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict:
        return {"path": self.path, "labels": _labelled(self.labels), **({"error": self.error} if self.error else {})}


def _labelled(tags: list[tuple[str, float]]) -> list[dict]:
    return [{"label": lab, "prob": round(p, 4)} for lab, p in tags]


def classify_files(settings: Settings, paths: Sequence[str | os.PathLike], labels: Sequence[str],
                   templates: Sequence[str] | None = None, top: int = 1, min_prob: float = 0.0,
                   *, encoder, langs: tuple = ()) -> list[FileLabels]:
    """Labels for image files (folders are walked) without touching the library; ``encoder`` is the encoder
    or a function returning it, called once the files are known to exist (imgsearch.Library passes one);
    ``langs`` as classify_library's."""
    labels, templates = _checked(labels, templates, top, min_prob)
    for p in paths:
        if not os.path.exists(p):
            raise UsageError(f"image not found: {p}")
    out = [FileLabels(e.path, error=getattr(e, "reason", None)) for e in files.walk([str(p) for p in paths])]
    if not out:
        raise UsageError("no image files in " + ", ".join(str(p) for p in paths))
    if not hasattr(encoder, "encode_images"):
        encoder = encoder()
    label_vecs = zeroshot.label_embeddings(encoder, labels, templates, langs)
    todo = [r for r in out if r.error is None]
    # Decoded and encoded as `index` does it: its decode stage, thread budget and batches.
    vecs, ok, failures = encode_files(encoder, [r.path for r in todo], settings)
    errors = dict(failures)
    for r in todo:
        r.error = errors.get(r.path)
    probs = zeroshot.classify(vecs, label_vecs, encoder.logit_scale)
    for k, tags in zip(ok, zeroshot.top_labels(probs, labels, top, min_prob)):
        todo[k].labels = tags
    return out
