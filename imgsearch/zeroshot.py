"""Zero-shot classification with prompt ensembles, and CLIP score of an image against texts (used by
`classify`, `score` and `eval zeroshot`). Vectors in and out are L2-normalised float32, as
``Encoder.encode_images`` / ``encode_texts`` return them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .config import MAX_PIXELS
from .errors import DataError, ParamError, UsageError
from .request import MAX_TEXT, _many, _string, image_term
from .textfast import _normalised

# Photo-style prompts: CLIP was trained on alt-text, where a bare label word is rare, and averaging
# several phrasings cancels some of each one's quirks (CLIP paper: +3.5% ImageNet over one prompt).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a blurry photo of a {}.", "a close-up photo of a {}.", "a bright photo of a {}.",
    "a dark photo of a {}.", "a cropped photo of a {}.", "a good photo of a {}.", "a photo of the small {}.",
    "a photo of the large {}.", "a picture of a {}.",
)
SINGLE_TEMPLATE: tuple[str, ...] = ("a photo of a {}.",)  # the one-prompt baseline to compare ensembles with
PLACEHOLDER = "{}"
CLIPSCORE_WEIGHT = 100.0  # CLIPScore = 100 * max(cos, 0) (Hessel et al. 2021, as torchmetrics reports it)


def parse_labels(text: str | Sequence[str]) -> list[str]:
    """Comma-separated labels (or a list of them) -> clean, unique labels in the given order."""
    items = _many(text)
    if not all(isinstance(item, str) for item in items):
        raise ParamError("labels", "give a comma-separated string or a list of labels")
    parts = [p for item in items for p in item.split(",")]
    return _unique_labels([p.strip() for p in parts], "--labels")


def _unique_labels(labels: list[str], where: str, error=UsageError) -> list[str]:
    labels = [lab for lab in labels if lab]
    if not labels:
        raise error(f"{where}: no labels given; give at least two, e.g. --labels \"dog,cat,car\"")
    if len(labels) < 2:
        raise error(f"{where}: only one label ({labels[0]!r}); give at least two, since probabilities compare "
                    "labels with each other")
    seen: set[str] = set()
    for lab in labels:
        _short(lab, where, "label", error)
        if lab.casefold() in seen:
            raise error(f"{where}: label {lab!r} is given twice; each label must be unique")
        seen.add(lab.casefold())
    return labels


def _short(text: str, where: str, what: str, error) -> None:
    if len(text) > MAX_TEXT:  # CLIP reads 77 tokens: a longer line is a wrong file, not a label
        raise error(f"{where}: a {what} of {len(text):,} characters ({text[:40]!r}...); a {what} is a few words, "
                    f"at most {MAX_TEXT} characters")


def _read_lines(path: str | os.PathLike, what: str) -> list[str]:
    from .captions import read_text

    lines = [line.strip() for line in read_text(path, what).split("\n")]
    return [line for line in lines if line and not line.startswith("#")]


def read_labels(path: str | os.PathLike) -> list[str]:
    """Labels from a text file, one per line."""
    return _unique_labels(_read_lines(path, "labels"), f"labels file {path}", DataError)


def check_templates(templates: Sequence[str], where: str = "--template", error=UsageError) -> list[str]:
    """Every template must hold exactly one ``{}`` for the label."""
    templates = _many(templates)
    if not all(isinstance(t, str) for t in templates):
        raise error(f"{where}: give templates as text, e.g. \"a satellite photo of {{}}\"")
    out = [t.strip() for t in templates if t.strip()]
    if not out:
        raise error(f"{where}: no templates given; a template looks like \"a satellite photo of {{}}\"")
    for t in out:
        _short(t, where, "template", error)
        if t.count(PLACEHOLDER) != 1:
            raise error(f"{where}: template {t!r} must contain {{}} exactly once where the label goes, "
                        "e.g. \"a satellite photo of {}\"")
    return out


def read_templates(path: str | os.PathLike) -> list[str]:
    """Prompt templates from a text file, one per line, each with ``{}`` for the label."""
    return check_templates(_read_lines(path, "templates"), f"templates file {path}", DataError)


def prompts(label: str, templates: Sequence[str] = DEFAULT_TEMPLATES) -> list[str]:
    # replace(), not format(): a template may contain other braces, a label may contain "{}".
    return [t.replace(PLACEHOLDER, label, 1) for t in templates]


def label_embeddings(encoder, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                     langs: tuple = ()) -> np.ndarray:
    """[len(labels), dim] float32: each label's mean normalised prompt embedding, renormalised (CLIP paper 3.1.4).
    ``langs``: (lang, default_lang) as a query's texts get them (encode_texts), for towers that take one."""
    labels = list(labels)
    templates = list(templates) or list(DEFAULT_TEMPLATES)
    texts = [p for lab in labels for p in prompts(lab, templates)]
    vecs = _normalised(encoder.encode_texts(texts, *langs).reshape(len(labels), len(templates), -1))
    return _normalised(vecs.mean(axis=1))


def classify(image_vectors: np.ndarray, label_vectors: np.ndarray, logit_scale: float = 100.0) -> np.ndarray:
    """[N, L] label probabilities: softmax of ``logit_scale * cosine`` over the labels."""
    image_vectors = np.atleast_2d(np.asarray(image_vectors, dtype=np.float32))
    logits = float(logit_scale) * (image_vectors @ np.asarray(label_vectors, dtype=np.float32).T)
    logits -= logits.max(axis=1, keepdims=True)  # stable softmax
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def top_labels(probs: np.ndarray, labels: Sequence[str], top: int = 1,
               min_prob: float = 0.0) -> list[list[tuple[str, float]]]:
    """Per row of ``probs``: up to ``top`` (label, probability) pairs at or above ``min_prob``, best first."""
    order = np.argsort(-probs, axis=1, kind="stable")[:, :max(1, min(int(top), len(labels)))]
    return [[(labels[j], float(row[j])) for j in idx if row[j] >= min_prob] for row, idx in zip(probs, order)]


@dataclass(frozen=True)
class TextScore:
    text: str
    cosine: float

    @property
    def clipscore(self) -> float:
        return CLIPSCORE_WEIGHT * max(self.cosine, 0.0)

    def as_dict(self) -> dict:
        return {"text": self.text, "cosine": round(self.cosine, 6), "clipscore": round(self.clipscore, 4)}


def score_image(load_encoder, image, texts: Sequence[str], max_pixels: int = MAX_PIXELS,
                langs: tuple = ()) -> list[TextScore]:
    """CLIP score of an image against each text, in order. ``image`` as a search's (request.image_term: a path, the
    file's bytes, a binary file object or a PIL image); both are checked before ``load_encoder()`` loads the model.
    ``langs`` as label_embeddings. A missing or unreadable image, or a text that is none, is a UsageError."""
    from .search import query_image

    texts = [_string(t, "texts", MAX_TEXT).strip() for t in _many(texts)]
    if not texts or not all(texts):
        raise UsageError("give at least one non-empty text to score the image against")
    term = image_term(image)
    encoder = load_encoder()
    pixels = query_image(term, encoder.draft_size, max_pixels)
    cos = encoder.encode_texts(texts, *langs) @ encoder.encode_images([pixels])[0]  # both L2-normalised
    return [TextScore(t, float(c)) for t, c in zip(texts, cos)]
