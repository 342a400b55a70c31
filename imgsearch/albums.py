"""Smart albums: a saved search that stays current.

An album keeps the search REQUEST (texts and weights, example images by absolute path, ids, filters, k,
threshold) as JSON in the ``albums`` table, never a frozen list. Its members are what the one engine answers
for it now, plus photos pinned in, minus photos dropped (pins are image ids: they follow moved files). The
query vector is kept per model (``album_vectors``), so example images are not re-embedded until the model
changes.

Evaluated, not materialised: every door sees the same members at once (no refresh to miss) and nothing
drifts from the request. Each evaluation records the member count and a digest of the ids, so ``list`` can
say when members last changed; ``Library.index`` (so ``watch``) evaluates every album after a batch that
changed the library, which dates a newcomer's arrival.

A threshold (``min_score`` or ``relevance``; a keyword-only album matches or not) makes an album grow: it
holds every photo that passes, up to k (default: the query limit). Without one, it is the top k now.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import unicodedata
from dataclasses import asdict, dataclass, field

from .config import MAX_K
from .errors import ImgSearchError, ParamError, UsageError
from .request import SearchRequest, Term, _string, _weight, check_k
from .results import Hit, hits_for

MAX_NAME = 100
_WHEN = ("after", "before", "near", "camera")


@dataclass
class Album:
    """One album as last evaluated: ``count`` members, ``changed_at`` when a photo last joined or left;
    ``problem`` says why its saved search no longer runs (then count is the last one known)."""

    name: str
    query: str  # the saved search as command-line words
    request: dict  # the saved search as stored: texts, weights, image paths, filters, k
    count: int
    grows: bool  # new photos that pass join (a threshold), else it is the top k now
    pinned: int
    dropped: int
    created_at: float
    changed_at: float
    problem: str | None = None
    hits: list[Hit] = field(default_factory=list)  # the members, ranked (Library.album fills it)

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "hits"}


def check_name(name) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ParamError("name", "give the album a name")
    name = unicodedata.normalize("NFC", name.strip())  # "é" typed as one character or as e + accent: one name
    if len(name) > MAX_NAME or "/" in name or not name.isprintable():
        raise ParamError("name", f"an album name is up to {MAX_NAME} printable characters, without '/'")
    return name


# --- the saved request ---------------------------------------------------------------------------------------
def grows(request: SearchRequest) -> bool:
    return request.min_score is not None or request.relevance or request.keyword_only


def with_k(request: SearchRequest, k) -> SearchRequest:
    """The album's k: as given, else every photo that passes a threshold, else the top 10 (the request's)."""
    if k is not None:
        return request.with_(k=check_k(k))
    return request.with_(k=MAX_K) if grows(request) else request


def record_of(request: SearchRequest) -> dict:
    """The stable JSON form of a request (the server's field names; example images as absolute paths)."""
    from .files import abspath

    images = [t for t in request.positives + request.negatives if t.kind == "image"]
    if any(not isinstance(t.value, str) for t in images):
        raise ParamError("images", "an album keeps its example images as files: give their paths (or library "
                                   "ids), not bytes")
    record = request.with_(positives=tuple(t for t in request.positives if t.kind != "image"),
                           negatives=tuple(t for t in request.negatives if t.kind != "image")).to_json()
    for key, terms in (("images", request.positives), ("not_images", request.negatives)):
        record[key] = [{"path": t.value, "weight": t.weight} for t in terms if t.kind == "image"]
    if request.under:
        record["under"] = abspath(request.under)
    return {k: v for k, v in record.items() if v not in (None, [], False)}


def request_of(record: dict) -> SearchRequest:
    """The request back from its record, checked as at any door (an export's record may be damaged). Example
    images are not opened here: their vector is kept."""

    def absolute(path, key: str) -> str:
        if not os.path.isabs(_string(path, key)):  # relative to what? Records are written with absolute ones
            raise ParamError(key, "an album keeps its files and folders by absolute path")
        return path

    def terms(key: str, kind: str):
        return [(t["weight"], t["text"]) if kind == "text" else
                Term("image", absolute(t["path"], key), _weight(t["weight"], key))
                for t in record.get(key, [])]

    try:
        if record.get("under") is not None:
            absolute(record["under"], "under")
        for key in ("like", "unlike"):
            for mark in record.get(key, []):
                if isinstance(mark, str):
                    absolute(mark, key)
        return SearchRequest.build(terms("texts", "text"), image=terms("images", "image"),
                                   not_text=terms("not", "text"), not_image=terms("not_images", "image"),
                                   ids=record.get("ids", ()), k=record.get("k", 10),
                                   relevance=record.get("relevance", False),
                                   **{f: record.get(f)
                                      for f in ("min_score", "under", "tag", "keyword", "blend", *_WHEN)},
                                   like=record.get("like", ()), unlike=record.get("unlike", ()))
    except (AttributeError, KeyError, TypeError, ValueError):
        raise ParamError("request", "the saved search is damaged (not as imgsearch writes one)") from None


def describe(record: dict) -> str:
    """The saved search as the words of `imgsearch album save` (ids as id:N)."""
    import shlex

    def weighted(t: dict, value: str) -> str:
        return value if t["weight"] == 1 else f"{t['weight']:g}:{value}"

    words = [weighted(t, t["text"]) for t in record.get("texts", [])] + [f"id:{i}" for i in record.get("ids", [])]
    words = [shlex.quote(w) for w in words]
    for key, flag, what in (("images", "--image", "path"), ("not", "--not", "text"),
                            ("not_images", "--not-image", "path")):
        words += [f"{flag} {shlex.quote(weighted(t, t[what]))}" for t in record.get(key, [])]
    for key in ("min_score", "under", "keyword", "blend", *_WHEN):
        if record.get(key) is not None:
            value = record[key]
            value = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            words.append(f"--{key.replace('_', '-')} {shlex.quote(value)}")
    words += [f"--tag {shlex.quote(t)}" for t in record.get("tag", [])]
    words += [f"--{key} {shlex.quote(str(m))}" for key in ("like", "unlike") for m in record.get(key, [])]
    words += ["--relevant"] * bool(record.get("relevance")) + [f"-k {record['k']}"] * (record.get("k", MAX_K) != MAX_K)
    return " ".join(words)


# --- evaluation ----------------------------------------------------------------------------------------------
def evaluate(store, warm, request: SearchRequest, album_id: int | None = None, pins: dict | None = None):
    """(members ranked, query vector, model id) of a request now; ``warm()`` gives the Searcher (not called
    for a keyword-only album). Pinned photos are in whatever the search says, dropped ones out."""
    pins = pins or {}
    req = request.with_(exclude_ids=tuple(i for i, keep in pins.items() if not keep), relevance=False)
    if request.tags:  # the engine finds no photo for a tag no set has; an album says why
        labels = {label.lower() for s in store.tag_sets() for label in s["labels"]}
        for tag in request.tags:
            if tag.lower() not in labels:
                raise ParamError("tag", f"no tag set has {tag!r} (dropped, or never made by `imgsearch "
                                        "classify`; `imgsearch tags` lists them)")
    vec = model_id = None
    if request.relevance:
        from . import relevance

        kind = relevance.query_kind(request.term_kinds)
        if kind is None:
            raise ParamError("relevance", "needs a text-only or an image-only search without --not terms or "
                                          "unliked photos (no floor is calibrated for those, nor for keywords "
                                          "alone); give --min-score instead")
    if request.keyword_only:
        from .search import keyword_search

        hits = keyword_search(store, req)
    else:
        searcher = warm()
        model_id = searcher.model.id
        vec = store.album_vector(album_id, model_id) if album_id is not None else None
        if vec is None:
            vec = searcher.query_vector(request)
            if album_id is not None and not store.read_only:
                store.save_album_vector(album_id, model_id, vec)
        if request.relevance:
            cut = relevance.floor_for(searcher.relevance_floor(), kind)
            if cut is None:
                raise ParamError("relevance", "this library has no relevance floor yet (too few photos); give "
                                              "--min-score instead")
            req = req.with_(min_score=cut if request.min_score is None else max(cut, request.min_score))
        hits = searcher.search(req, vec)
    extra = [i for i, keep in pins.items() if keep and i not in {h.id for h in hits}]
    if extra:
        scores = {}
        if vec is not None:
            ids, vecs = store.load_vectors(model_id, extra)
            scores = dict(zip(ids.tolist(), (vecs @ vec).tolist()))
        hits = sorted(hits + hits_for(store, [(i, scores.get(i, 0.0)) for i in extra], len(extra)),
                      key=lambda h: -h.score)
        for rank, h in enumerate(hits, 1):
            h.rank = rank
    return hits, vec, model_id


def _digest(hits: list[Hit]) -> str:
    return hashlib.blake2b(",".join(map(str, sorted(h.id for h in hits))).encode(), digest_size=8).hexdigest()


def _seen(digests: str) -> dict:
    """The members each model found when it last evaluated the album, as stored: {model id: _digest}."""
    try:
        seen = json.loads(digests)
    except ValueError:  # none yet (an imported album)
        return {}
    return seen if isinstance(seen, dict) else {}


def load(store, name):
    row = store.album(check_name(name))
    if row is None:
        raise UsageError(f"no album named {name!r}; `imgsearch album list` shows them")
    return row


def current(store, warm, row) -> Album:
    """The album evaluated now, its record updated; ``problem`` set when its saved search no longer runs."""
    record, pins = json.loads(row[2]), store.album_pins(row[0])
    request, hits, problem, changed_at, count = None, [], None, row[4], row[5]
    try:
        request = request_of(record)
        hits, _, model_id = evaluate(store, warm, request, row[0], pins)
    except ImgSearchError as e:
        detail = e.detail if isinstance(e, ParamError) else str(e)
        if isinstance(e, ParamError) and e.param == "under":
            detail = f"folder {record.get('under')} no longer exists"
        problem = (f"album {row[1]}: {detail}; the album is kept as saved (`imgsearch album list` shows its search; "
                   f"save a corrected one, or `imgsearch album delete {row[1]}`)")
    else:
        # Members are compared with what the same model found last: two models disagree, and switching between
        # them is no change; a first look with a model only records what it finds.
        count, seen, digest = len(hits), _seen(row[6]), _digest(hits)
        model = str(model_id or "")  # "": keyword-only, no model
        if seen.get(model) != digest and not store.read_only:
            seen_now = json.dumps({**seen, model: digest}, sort_keys=True)
            store.album_evaluated(row[0], count, seen_now, model in seen)
            changed_at = time.time() if model in seen else changed_at
    query = describe(record) if request is not None else ""  # a damaged record may not describe
    return Album(row[1], query, record, count, request is not None and grows(request),
                 sum(pins.values()), len(pins) - sum(pins.values()), row[3], changed_at, problem, hits)


def save(store, warm, name, request: SearchRequest) -> Album:
    name = check_name(name)
    if (row := store.album(name)) is not None:  # the name as it is, "Beach" when "beach" was asked
        raise UsageError(f"an album named {row[1]!r} already exists; pick another name (or `imgsearch album "
                         f"delete {row[1]}` first)")
    record = record_of(request)
    # The request's exclude_ids (search()'s): photos dropped from the album, as `unpin` drops them
    drops = dict.fromkeys(store.get_images(request.exclude_ids), False)
    hits, vec, model_id = evaluate(store, warm, request, pins=drops)
    album_id = store.add_album(name, json.dumps(_by_id(store, record), sort_keys=True), len(hits),
                               json.dumps({str(model_id or ""): _digest(hits)}), drops,
                               vector=None if vec is None else (model_id, vec))
    if album_id is None:
        raise UsageError(f"an album named {name!r} already exists; pick another name")
    return current(store, warm, store.album(name))


def pin(store, warm, name, paths, keep: bool) -> tuple[int, Album]:
    """Pin photos (files, or every photo in a folder) in (``keep``) or out of an album: (photos, album)."""
    from .files import abspath

    row = load(store, name)
    wanted = [abspath(p) for p in paths]
    found = store.images_at(wanted)
    for path in [p for p in wanted if p not in found]:
        under = store.images_under([path])
        if not under:
            raise UsageError(f"{path} is not in the library; `imgsearch index` it first")
        found.update(under)
    ids = sorted({r.id for r in found.values()})
    store.set_album_pins(row[0], ids, keep)
    return len(ids), current(store, warm, row)


def rename(store, name, new_name) -> None:
    row, new_name = load(store, name), check_name(new_name)
    if not store.rename_album(row[0], new_name):
        taken = store.album(new_name)
        new_name = taken[1] if taken else new_name
        raise UsageError(f"an album named {new_name!r} already exists; pick another name")


# --- marked photos: by id in the library, by path in an export ---------------------------------------------
_MARKS = ("ids", "like", "unlike")  # a record's library photos: examples ("more like this") and marks


def _by_id(store, record: dict) -> dict:
    """``record`` with the library photos it names by path (marks; an export's examples) named by id, so they
    follow a moved file as pins do. An export's example that is not in this library stays an example image, by
    its path."""
    rows = store.images_at([m for key in _MARKS for m in record.get(key, []) if isinstance(m, str)])
    out = {**record, **{key: [rows[m].id if isinstance(m, str) and m in rows else m for m in record[key]]
                        for key in _MARKS if key in record}}
    lost = [m for m in out.get("ids", []) if isinstance(m, str)]
    if lost:
        out["ids"] = [m for m in out["ids"] if not isinstance(m, str)]
        out["images"] = [*out.get("images", []), *({"path": p, "weight": 1.0} for p in lost)]
    return {k: v for k, v in out.items() if v != []}


def _by_path(store, record: dict) -> dict:
    """``record`` with the library ids it holds as the photos' paths: in another library an id is another
    photo, or none. A photo forgotten since is left out (the album answered from its kept query vector)."""
    rows = store.get_images([m for key in _MARKS for m in record.get(key, []) if not isinstance(m, str)])
    return {**record, **{key: [m if isinstance(m, str) else rows[m].path for m in record[key]
                               if isinstance(m, str) or m in rows] for key in _MARKS if key in record}}


# --- in a library export -------------------------------------------------------------------------------------
def dump(store) -> list[dict]:
    """Every album for an export's manifest: name, saved search (its photos by path) and pins by path."""
    out = []
    for r in store.albums():
        pins = store.album_pins(r[0])
        rows = store.get_images(pins)
        out.append({"name": r[1], "request": _by_path(store, json.loads(r[2])), "created_at": r[3],
                    "pins": [[rows[i].path, keep] for i, keep in pins.items() if i in rows]})
    return out


def restore(store, records) -> int:
    """An export's albums added to this library, those whose name is free here; pins and marked photos found
    by path. A damaged record is skipped. Returns how many were added."""
    added = 0
    for rec in records if isinstance(records, list) else []:
        try:
            name = check_name(rec["name"])
            # An id is another library's photo (exports before marks travelled by path held ids): left out
            foreign = {k: [m for m in rec["request"][k] if isinstance(m, str)] for k in _MARKS if k in rec["request"]}
            record = record_of(request_of(_by_id(store, {**rec["request"], **foreign})))  # as `album save` writes
            pins = {str(p): bool(keep) for p, keep in rec.get("pins") or []}
        except (ImgSearchError, AttributeError, KeyError, TypeError, ValueError):
            continue
        rows = store.images_at(pins)
        created = rec.get("created_at")
        if type(created) not in (int, float) or not math.isfinite(created):
            created = None
        album_id = store.add_album(name, json.dumps(record, sort_keys=True), 0, "",
                                   {rows[p].id: keep for p, keep in pins.items() if p in rows},
                                   created_at=created)
        added += album_id is not None
    return added
