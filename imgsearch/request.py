"""One search request: every door (CLI, HTTP server, web UI, Python API) builds a SearchRequest, validated here
once, and search.Searcher answers it. A wrong value is a ParamError naming the field, the same text at every
door. Standard library only: the server client and the CLI parse requests without numpy or a model.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
from dataclasses import dataclass, field, replace
from datetime import date

from . import formats
from .config import MAX_K
from .errors import ParamError, UsageError

MAX_WEIGHT = 1000.0
MAX_TERMS = 64  # texts, images and ids together: each one is an encode, so this bounds a request's work
MAX_IMAGES = 16
MAX_TEXT = 1000  # characters per query text (CLIP reads 77 tokens; the rest only costs tokenizer time)
MAX_STRING = 4096  # any other string field (folders, keywords, camera, places)
MAX_ID = (1 << 63) - 1  # SQLite's largest integer
MAX_MARKS = 1000  # liked or unliked images per search: stored vectors, averaged (no encode)
WEIGHTED = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*:(.+)$", re.S)  # W:TEXT
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}
# What to give instead of a bad value, the same words at every door.
HINTS = {"k": f"give a whole number from 1 to {MAX_K}",
         "min_score": "give a cosine score between -1 and 1, such as 0.25",
         "blend": "give a keyword weight between 0 and 1 (0 = CLIP only, 1 = keywords only)"}


def parse_weighted(raw: str, ratios: bool = False) -> tuple[float, str]:
    """'2:red car' -> (2.0, 'red car'); 'red car' -> (1.0, 'red car'). ``ratios``: a digit right after the colon
    makes it words, not a weight ('16:9 wallpaper', '12:30'; '2: 3 dogs' weighs '3 dogs')."""
    m = WEIGHTED.match(raw)
    if m and not (ratios and m[2][:1].isdigit()):
        weight = float(m.group(1))
        # Beyond this, float32 query vectors overflow (inf/nan scores): reject rather than return nothing.
        if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
            digits = m.group(1) if len(m.group(1)) <= 12 else m.group(1)[:8] + "…"
            raise UsageError(f"weight {digits} in {raw[:40]!r} is out of range; use a number between "
                             f"-{MAX_WEIGHT:g} and {MAX_WEIGHT:g}, e.g. 2:\"red car\"")
        return weight, m.group(2).strip()
    return 1.0, raw.strip()


def check_k(k) -> int:
    """The one limit on results per search."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ParamError("k", HINTS["k"])
    return k


@dataclass(frozen=True)
class Term:
    """One part of a query: a text, an image, or an image already in the library (by id). An image is a file
    path, the file's bytes or a PIL image: bytes are decoded in memory, never written to disk."""

    kind: str  # "text" | "image" | "id"
    value: object  # str for text and image paths; bytes or PIL.Image.Image for images; int for ids
    weight: float = 1.0
    name: str | None = None  # labels it in error messages
    noun: str = "query image"  # how messages refer to it: "cannot use query image NAME: ..."


def _number(value, name: str, what: str, low: float, high: float, outside: str | None = None,
            whole: bool = False) -> float:
    """A finite number (``whole``: an int) from ``low`` to ``high``; ``outside`` says what is wrong with one out of
    range."""
    # compared, not math.isfinite: a JSON integer may be too large for a float (10**400 overflows)
    if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) \
            or not -math.inf < value < math.inf:
        raise ParamError(name, what)
    if not low <= value <= high:
        raise ParamError(name, outside or what)
    return value if whole else float(value)


def _string(value, name: str, limit: int = MAX_STRING) -> str:
    if not isinstance(value, str):
        raise ParamError(name, "must be text")
    if "\x00" in value:
        raise ParamError(name, "contains a NUL character; remove it")
    if len(value) > limit:
        raise ParamError(name, f"is longer than {limit} characters; shorten it")
    try:  # a lone surrogate (JSON "\ud800") is no text; a file name's undecodable bytes (\udc80-\udcff) are
        value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise ParamError(name, "is not valid Unicode text (a lone surrogate); send it as UTF-8") from None
    return value


def _weight(w, name: str) -> float:
    return _number(w, name, "a weight must be a finite number", -MAX_WEIGHT, MAX_WEIGHT,
                   f"a weight must be between -{MAX_WEIGHT:g} and {MAX_WEIGHT:g}")


def _is_weighted(x) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], (int, float)) and not isinstance(x[0], bool)


def _listed(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) and not _is_weighted(x) else [x]


def text_term(raw, name: str = "text") -> Term:
    """A query text: '2:red car', or a (weight, text) pair."""
    if isinstance(raw, Term):
        return raw
    if _is_weighted(raw):
        weight, text = _weight(raw[0], name), _string(raw[1], name, MAX_TEXT).strip()
    elif not isinstance(raw, str):
        raise ParamError(name, f"query text must be a string or a (weight, text) pair, not {type(raw).__name__}")
    else:
        weight, text = parse_weighted(_string(raw, name, MAX_TEXT), ratios=True)
    if not text:
        raise UsageError("empty query text; give some words, e.g. imgsearch query \"a red car\"")
    return Term("text", text, weight)


def image_term(raw, name: str = "image") -> Term:
    """A query image: a path ('W:path' weights it unless that is itself a file), bytes, a binary file object
    or a PIL image, alone or as a (weight, image) pair."""
    if isinstance(raw, Term):
        return raw
    weight = 1.0
    if _is_weighted(raw):
        weight, raw = _weight(raw[0], name), raw[1]
    if isinstance(raw, (str, os.PathLike)):
        raw = _string(os.fspath(raw), name)
        if weight == 1.0 and not os.path.exists(raw):  # 'W:path' weighs it, unless that is itself a file
            weight, raw = parse_weighted(raw)
        if not os.path.exists(raw):
            raise UsageError(f"query image not found: {raw}")
        from .files import abspath

        return Term("image", abspath(raw), weight)
    if isinstance(raw, (bytes, bytearray, memoryview)):
        return Term("image", bytes(raw), weight, "uploaded image")
    if hasattr(raw, "read") and not hasattr(raw, "convert"):  # a file object, e.g. an upload kept in memory
        label = os.path.basename(str(getattr(raw, "name", "") or "")) or "(file object)"
        return Term("image", raw.read(), weight, label, "the uploaded file" if label != "(file object)" else
                    "query image")
    if hasattr(raw, "convert") and hasattr(raw, "size"):  # a PIL image
        return Term("image", raw, weight, str(getattr(raw, "filename", "") or "") or "(in memory)")
    raise ParamError(name, "give a file path, its bytes, a file object or a PIL image")


def _many(values) -> list:
    """One id or mark, or any iterable of them (a set of the ids already shown, a numpy array); None: none."""
    if values is None or isinstance(values, (str, bytes, os.PathLike)) or not hasattr(values, "__iter__"):
        return _listed(values)
    return list(values)


def _ids(values, name: str) -> tuple[int, ...]:
    out = []
    for v in _many(values):
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v.strip())
        elif not isinstance(v, int) and hasattr(type(v), "__index__"):
            v = v.__index__()  # a numpy integer
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_ID:
            raise ParamError(name, f"{str(v)[:24]!r} is not an image id (a whole number from 1)")
        out.append(v)
    return tuple(out)


def _marks(values, name: str) -> tuple[int | str, ...]:
    """Library images marked good (like) or bad (unlike): ids, or paths of indexed files (made absolute
    here; the engine finds their ids and names any that is not in the library)."""
    out: list[int | str] = []
    for v in _many(values):
        if isinstance(v, os.PathLike):
            v = os.fspath(v)
        if isinstance(v, str) and not v.strip().isdigit():
            if not v.strip():
                raise ParamError(name, "give an image id or the path of a library image, not an empty value")
            from .files import abspath

            out.append(abspath(_string(v, name)))
        else:
            out += _ids([v], name)
    if len(out) > MAX_MARKS:
        raise ParamError(name, f"at most {MAX_MARKS} marked images")
    return tuple(out)


@dataclass(frozen=True)
class SearchRequest:
    """A validated search. Build it with ``SearchRequest.build(...)`` (Python values), ``from_json`` (the
    server's JSON body) or ``from_params`` (URL parameters); never construct it field by field."""

    positives: tuple[Term, ...] = ()
    negatives: tuple[Term, ...] = ()
    k: int = 10
    min_score: float | None = None
    under: str | None = None
    tags: tuple[str, ...] = ()
    keyword: str | None = None
    blend: float | None = None
    exclude_ids: tuple[int, ...] = ()
    when: dict = field(default_factory=dict)  # after/before/near/camera as given (validated by geo.build)
    relevance: bool = False
    like: tuple[int | str, ...] = ()  # results marked good: image ids or library paths (search.rocchio)
    unlike: tuple[int | str, ...] = ()  # and bad

    @classmethod
    def build(cls, text=None, *, image=None, not_text=None, not_image=None, ids=(), k: int = 10, min_score=None,
              under=None, tag=None, keyword=None, blend=None, exclude_ids=(), after=None, before=None, near=None,
              camera=None, relevance: bool = False, like=(), unlike=()) -> "SearchRequest":
        """Every door's values, checked once. ``text``/``not_text``: a string ("2:red car" weighs it), a
        (weight, text) pair, or a list of those; ``image``/``not_image``: a path, bytes, a binary file object, a
        PIL image, a (weight, image) pair or a list of those; ``ids``: library images to find more like;
        ``like``/``unlike``: library images (ids or paths) marked good or bad, to refine the query by."""
        texts, not_texts = _listed(text), _listed(not_text)
        images, not_images = _listed(image), _listed(not_image)
        id_list = _ids(ids, "ids")
        if len(texts) + len(not_texts) + len(images) + len(not_images) + len(id_list) > MAX_TERMS:
            raise ParamError("texts", f"at most {MAX_TERMS} query terms (texts, images and ids) per search")
        if len(images) + len(not_images) > MAX_IMAGES:
            raise ParamError("images", f"at most {MAX_IMAGES} images per search")
        positives = tuple([text_term(t, "texts") for t in texts] + [image_term(x, "images") for x in images]
                          + [Term("id", i) for i in id_list])
        negatives = tuple([text_term(t, "not") for t in not_texts] + [image_term(x, "not_images") for x in not_images])
        like, unlike = _marks(like, "like"), _marks(unlike, "unlike")
        check_k(k)
        if min_score is not None:
            min_score = _number(min_score, "min_score", HINTS["min_score"], -1.0, 1.0)
        if under is not None:
            under = _string(os.fspath(under) if isinstance(under, os.PathLike) else under, "under")
            if not under.strip():
                under = None
        tags = tuple(_string(t, "tag").strip() for t in _listed(tag))
        if len(tags) > MAX_TERMS:
            raise ParamError("tag", f"at most {MAX_TERMS} tags")
        tags = tuple(t for t in tags if t)
        if keyword is not None:
            keyword = _string(keyword, "keyword").strip() or None
        if blend is not None:
            blend = _number(blend, "blend", HINTS["blend"], 0.0, 1.0)
            if not keyword:
                raise ParamError("blend", "weighs keyword relevance; give a keyword too")
            if not (positives or like):
                raise ParamError("blend", "mixes keyword and CLIP scores; give query text or an image too")
        if not (positives or keyword or like):
            raise UsageError("nothing to search for: give query text, an image or a keyword")
        when = {}
        for name, value in (("after", after), ("before", before), ("near", near), ("camera", camera)):
            if value is None or (isinstance(value, str) and not value.strip()):  # as geo.build reads it: not given
                continue
            if isinstance(value, date):  # a date or datetime (Python API) as its ISO text: what JSON can carry
                value = value.isoformat()
            if isinstance(value, str):
                value = _string(value, name)
            when[name] = list(value) if isinstance(value, tuple) else value
        if when:
            from .geo import build as when_where

            when_where(**when)  # a bad date, place or camera fails here, whichever door it came through
        if not isinstance(relevance, bool):
            raise ParamError("relevance", "must be true or false")
        return cls(positives, negatives, k, min_score, under, tags, keyword, blend, _ids(exclude_ids, "exclude_ids"),
                   when, relevance, like, unlike)

    @classmethod
    def from_json(cls, body) -> "SearchRequest":
        """The server's POST body: {"texts": ["2:red car", {"text": "night", "weight": 0.5}], "not": [...],
        "ids": [...], "images": [base64 or {"data": base64, "weight": 2}], "not_images": [...], "k": 10, ...}."""
        if not isinstance(body, dict):
            raise ParamError("body", "the request must be a JSON object of search fields")
        unknown = sorted(set(body) - set(JSON_FIELDS))
        if unknown:
            raise ParamError(str(unknown[0])[:40], f"unknown field; the fields are {', '.join(JSON_FIELDS)}")

        def items(key: str) -> list:
            value = body.get(key)
            items = [] if value is None else value if isinstance(value, list) else [value]
            if len(items) > MAX_TERMS:
                raise ParamError(key, f"at most {MAX_TERMS} query terms (texts, images and ids) per search")
            return items

        def texts(key: str) -> list:
            out = []
            for n, item in enumerate(items(key)):
                if isinstance(item, dict):
                    name = f"{key}[{n}]"
                    _only_keys(item, name, {"text", "weight"})
                    text = item.get("text")
                    if not isinstance(text, str) or not text.strip():
                        raise ParamError(name, "'text' must be some words")
                    out.append((_weight(item.get("weight", 1.0), name), text))
                elif isinstance(item, str):
                    out.append(item)
                else:
                    raise ParamError(key, "must be a string or a list of strings")
            return out

        def pictures(key: str) -> list:
            out = []
            for n, item in enumerate(items(key)):
                name, weight = f"{key}[{n}]", 1.0
                if isinstance(item, dict):
                    _only_keys(item, name, {"data", "weight"})
                    weight, item = _weight(item.get("weight", 1.0), name), item.get("data")
                if not isinstance(item, str):
                    raise ParamError(key, 'must be a list of base64 strings or {"data": base64, "weight": number} '
                                          "objects")
                try:
                    data = base64.b64decode(item, validate=True)
                except (binascii.Error, ValueError):
                    raise ParamError(name, "images must be base64-encoded file contents") from None
                out.append(Term("image", data, weight, name))
            return out

        ids = body.get("ids") or []
        if not isinstance(ids, list) or any(isinstance(i, str) for i in ids):
            raise ParamError("ids", "must be a list of image ids")
        for key in ("like", "unlike"):
            if not isinstance(body.get(key) or [], list):
                raise ParamError(key, "must be a list of image ids or library paths")
        relevance = body.get("relevance", False)
        return cls.build(texts("texts"), image=pictures("images"), not_text=texts("not"),
                         not_image=pictures("not_images"), ids=ids, k=body.get("k", 10),
                         relevance=False if relevance is None else relevance, like=body.get("like") or (),
                         unlike=body.get("unlike") or (), **{key: body.get(key) for key in _PLAIN_FIELDS})

    @classmethod
    def from_params(cls, params, names: dict | None = None, image=None) -> "SearchRequest":
        """URL parameters ({name: [values]} as urllib.parse.parse_qs gives them, or {name: value}), named as
        in PARAMS; q, not, id, tag, like and unlike repeat (like=1,2 is two ids). ``names`` maps another
        door's names onto these (the web UI's min=); ``image``: an image term sent beside them."""
        got: dict[str, list[str]] = {}
        for key, value in params.items():
            key = (names or {}).get(key, key)
            if key not in PARAMS:
                raise ParamError(str(key)[:40], f"unknown parameter; use {', '.join(sorted(PARAMS))}")
            got.setdefault(key, []).extend(value if isinstance(value, list) else [value])

        def one(key: str):
            values = got.get(key) or []
            if len(values) > 1:
                raise ParamError(key, "give it once")
            return values[0] if values else None

        def typed(key: str, kind):  # build checks the value (nan, inf, range) with the same words
            raw = one(key)
            raw = "" if raw is None else str(raw).strip()
            try:
                return kind(raw) if raw else None
            except ValueError:
                raise ParamError(key, HINTS[key]) from None

        def marks(key: str) -> list[str]:
            # like=1,2 is two ids; any other value is one path (a path may hold a comma)
            out = []
            for v in got.get(key, []):
                parts = str(v).split(",")
                out += parts if all(p.strip().isdigit() for p in parts) else [v]
            return [v for v in out if str(v).strip()]

        k = typed("k", int)
        rel = str(one("relevance") or "").strip().lower()
        if rel not in _TRUE | _FALSE:
            raise ParamError("relevance", "give 1 or 0")
        return cls.build([q for q in got.get("q", []) if q.strip()], image=image,
                         not_text=[q for q in got.get("not", []) if q.strip()], ids=got.get("id", []),
                         k=10 if k is None else k,
                         min_score=typed("min_score", float), under=one("under"), tag=got.get("tag") or None,
                         keyword=one("keyword"), blend=typed("blend", float),
                         after=one("after"), before=one("before"), near=one("near"), camera=one("camera"),
                         relevance=rel in _TRUE, like=marks("like"), unlike=marks("unlike"))

    def to_json(self) -> dict:
        """The server's JSON body for this request (image files are sent as their bytes: the server reads no
        client paths). from_json(to_json()) gives the same request."""

        def terms(kind: str, seq) -> list:
            return [{"text": t.value, "weight": t.weight} if kind == "text" else
                    {"data": base64.b64encode(_image_bytes(t)).decode(), "weight": t.weight}
                    for t in seq if t.kind == kind]

        body = {"texts": terms("text", self.positives), "not": terms("text", self.negatives),
                "images": terms("image", self.positives), "not_images": terms("image", self.negatives),
                "ids": list(self.ids), "k": self.k, "min_score": self.min_score,
                "under": os.path.abspath(self.under) if self.under else None, "tag": list(self.tags) or None,
                "keyword": self.keyword, "blend": self.blend, "relevance": self.relevance, "like": list(self.like),
                "unlike": list(self.unlike), **self.when}
        return {k: v for k, v in body.items() if v not in (None, [], False)}

    # --- what the engine asks -------------------------------------------------------------------
    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(int(t.value) for t in self.positives if t.kind == "id")

    @property
    def texts(self) -> list[str]:
        return [str(t.value) for t in self.positives + self.negatives if t.kind == "text"]

    @property
    def term_kinds(self) -> list[str]:
        """Which relevance floor applies (relevance.query_kind): the positive terms' kinds, images marked good
        counting as ids, and "not" for negatives (--not terms, negative weights) or images marked bad."""
        return [t.kind for t in self.positives] + (["id"] if self.like else []) + \
            (["not"] if self.negatives or self.unlike or any(t.weight < 0 for t in self.positives) else [])

    @property
    def keyword_only(self) -> bool:
        return not (self.positives or self.negatives or self.like)

    def with_(self, **changes) -> "SearchRequest":
        return replace(self, **changes)


JSON_FIELDS = ("texts", "not", "images", "not_images", "ids", "k", "min_score", "under", "tag", "keyword", "blend",
               "after", "before", "near", "camera", "relevance", "like", "unlike")
PARAMS = frozenset({"q", "not", "id", "k", "min_score", "under", "tag", "keyword", "blend", "relevance", "after",
                    "before", "near", "camera", "like", "unlike"})
_PLAIN_FIELDS = ("min_score", "under", "tag", "keyword", "blend", "after", "before", "near", "camera")  # JSON as is


def _only_keys(item: dict, name: str, keys: set[str]) -> None:
    extra = sorted(str(k) for k in set(item) - keys)
    if extra:
        raise ParamError(name, f"unknown key {extra[0][:40]!r}; use {', '.join(sorted(keys))}")


def _image_bytes(t: Term) -> bytes:
    if isinstance(t.value, bytes):
        return t.value
    if isinstance(t.value, str):
        try:
            with formats.open_regular(t.value) as f:  # /dev/zero or a FIFO: no end to read
                return f.read()
        except OSError as e:
            raise UsageError(f"cannot use query image {t.value}: {e.strerror or e}") from None
    import io

    buf = io.BytesIO()
    t.value.save(buf, format="PNG")  # a PIL image: sent losslessly
    return buf.getvalue()
