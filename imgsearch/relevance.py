"""A per-model relevance floor: the score above which a hit is "probably relevant", not just "nearest".

A raw cosine means different things for different models, so the floor is measured per model on the user's own
library. Text queries: the upper quartile of the 99th-percentile scores of NULL_CAPTIONS (generic captions)
against the library's images; a quartile, not the maximum, keeps a caption that happens to describe the library
("a dog on the grass" in a dog library) from lifting the floor for everyone. Image queries: the 90th percentile
of the cosine between random pairs of distinct images. A query mixing text and image terms, or steered away
from something (negatives, unliked images), gets no verdict.
Stored in library_meta with the vector count and model version it was measured on; the first query that asks
measures it (encoding the captions once per model, never on `index`'s clock), then `index` and stale queries
measure it again from the kept caption vectors.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import time

import numpy as np

METHOD = 1
SAMPLE = 20_000  # image vectors scored; a random sample above this (the percentiles are stable by then)
CAPTION_PERCENTILE = 99.0
CAPTION_QUANTILE = 75.0
PAIR_PERCENTILE = 90.0
PAIRS = 50_000
RECALIBRATE_SMALL = 1_000
RECALIBRATE_SHARE = 0.2

# Generic and diverse on purpose: people, animals, places, things, documents, screens, art, weather.
NULL_CAPTIONS = (
    "a photo of a person smiling", "a group of friends at a party", "a baby sleeping in a crib",
    "an old man reading a newspaper", "a woman riding a bicycle in the city", "children playing football",
    "a wedding ceremony in a church", "a crowd at a concert", "a portrait of a young woman",
    "a man in a suit giving a talk", "a dog playing on the grass", "a cat sleeping on a sofa",
    "a horse in a field", "birds flying over the sea", "a fish in an aquarium", "a cow on a farm",
    "an elephant at the zoo", "a butterfly on a flower", "a mountain landscape with snow",
    "a sandy beach with palm trees", "a city skyline at night", "a forest path in autumn",
    "a waterfall in the jungle", "a desert with sand dunes", "a lake with a wooden boat",
    "a busy street with traffic", "a country road through fields", "a sunset over the ocean",
    "a plate of pasta", "a birthday cake with candles", "a cup of coffee on a table", "a bowl of fruit",
    "a pizza in a box", "a glass of wine", "a burger and fries", "vegetables at a market",
    "a car parked on the street", "a train at a station", "an airplane in the sky", "a bus in the rain",
    "a motorcycle on a highway", "a sailing boat in a harbour", "a bicycle leaning against a wall",
    "a kitchen with wooden cabinets", "a living room with a fireplace", "a bedroom with a large bed",
    "an office with computers", "a classroom with desks", "a bathroom with white tiles",
    "a library with many books", "a supermarket aisle", "a restaurant interior", "a screenshot of a website",
    "a page of handwritten notes", "a scanned document with text", "a spreadsheet on a screen",
    "a map of a city", "a diagram with arrows", "a receipt from a shop", "a passport photo",
    "a painting of flowers", "a pencil sketch of a face", "a cartoon character", "a statue in a museum",
    "graffiti on a brick wall", "a church with a tall tower", "a castle on a hill", "a modern glass building",
    "a bridge over a river", "a lighthouse on the coast", "a snowy street in winter", "a thunderstorm",
    "a rainbow after the rain", "fog over the hills", "fireworks in the night sky", "a football stadium",
    "a tennis match", "people skiing down a slope", "a swimmer in a pool", "a runner in a marathon",
    "a guitar on a stage", "a laptop on a desk", "a smartphone in a hand", "a pair of shoes",
    "a red dress in a shop window", "a watch on a wrist", "keys on a table", "a garden with roses",
    "a tree in a park", "a potted plant by a window", "a tent at a campsite", "a campfire at night",
)


def meta_key(model_id: int) -> str:
    return f"relevance:{int(model_id)}"


def parse(value: str | None) -> dict | None:
    """The stored floor, or None when absent, unreadable or from another method version."""
    try:
        floor = json.loads(value) if value else None
    except ValueError:
        return None
    return floor if isinstance(floor, dict) and floor.get("method") == METHOD else None


def is_stale(floor: dict | None, vectors: int, version: int) -> bool:
    """Under RECALIBRATE_SMALL images any change counts (``version``: the model's, moved by every image and
    vector write), even one that keeps the count (photos replaced); above, a count moved by RECALIBRATE_SHARE."""
    if floor is None:
        return True
    then = int(floor.get("vectors") or 0)
    if then < RECALIBRATE_SMALL:
        return floor.get("version") != version
    return abs(vectors - then) > RECALIBRATE_SHARE * then


def floor_for(floor: dict | None, kind: str | None) -> float | None:
    """The cut-off for a query kind ("text" or "image"), None when there is none."""
    value = None if floor is None or kind is None else floor.get(kind)
    return float(value) if isinstance(value, (int, float)) else None


def calibrate(image_vecs: np.ndarray, caption_vecs: np.ndarray, vectors: int | None = None,
              version: int | None = None) -> dict:
    """Both floors from (a sample of) the library's image vectors and the NULL_CAPTIONS' text vectors;
    ``vectors``: how many the library has (the sample's size when not given); ``version``: the model's then."""
    vecs = np.asarray(image_vecs, dtype=np.float32)
    out: dict = {"method": METHOD, "vectors": int(len(vecs) if vectors is None else vectors), "version": version,
                 "captions": len(caption_vecs), "at": round(time.time(), 3), "text": None, "image": None}
    if len(vecs) == 0:
        return out
    scores = np.asarray(caption_vecs, dtype=np.float32) @ vecs.T  # (captions, images)
    out["text"] = round(float(np.percentile(np.percentile(scores, CAPTION_PERCENTILE, axis=1), CAPTION_QUANTILE)), 6)
    if (m := len(vecs)) >= 2:
        rng = np.random.default_rng(0)  # seeded: the same library gives the same floor
        a = rng.integers(0, m, PAIRS)
        b = (a + rng.integers(1, m, PAIRS)) % m  # never an image with itself
        out["image"] = round(float(np.percentile(np.einsum("ij,ij->i", vecs[a], vecs[b]), PAIR_PERCENTILE)), 6)
    return out


def current(store, model_id: int, encode_texts, *, save: bool = True) -> dict | None:
    """The model's floor, measured again first when missing or stale (and saved when ``save``); None for a
    model without vectors. ``encode_texts`` (normalised text vectors for a list of strings) is called only
    the first time for a model: the captions' vectors are kept. `index` passes None (encoding them costs
    seconds): it keeps a floor up to date once a query asked for one, and gets the stored one, or None."""
    version, count = store.model_version(model_id), store.vector_count(model_id)  # version first: a write
    floor = parse(store.get_meta(meta_key(model_id)))  # in between makes this floor stale, never wrongly fresh
    if not is_stale(floor, count, version):
        return floor
    if count == 0:
        return None
    captions = _caption_vectors(store, model_id, encode_texts, save)
    if captions is None:
        return floor
    ids = store.vector_ids(model_id)
    if len(ids) > SAMPLE:
        ids = np.sort(np.random.default_rng(0).choice(ids, SAMPLE, replace=False))
    _, vecs = store.load_vectors(model_id, ids.tolist())
    floor = calibrate(vecs, captions, count, version)
    if save:
        _save(store, meta_key(model_id), json.dumps(floor, sort_keys=True))
    return floor


def _caption_vectors(store, model_id: int, encode_texts, save: bool) -> np.ndarray | None:
    key = f"relevance-captions:{int(model_id)}"
    digest = hashlib.sha1("\n".join(NULL_CAPTIONS).encode()).hexdigest()[:16]
    with contextlib.suppress(ValueError, KeyError, TypeError):  # unreadable: encode again
        kept = json.loads(store.get_meta(key) or "null")
        if isinstance(kept, dict) and kept.get("captions") == digest:
            return np.frombuffer(base64.b64decode(kept["vectors"]), dtype="<f4").reshape(len(NULL_CAPTIONS), -1)
    if encode_texts is None:
        return None
    vecs = np.asarray(encode_texts(list(NULL_CAPTIONS)), dtype="<f4")
    if save:
        _save(store, key, json.dumps({"captions": digest, "vectors": base64.b64encode(vecs.tobytes()).decode()}))
    return vecs


def _save(store, key: str, value: str) -> None:
    with contextlib.suppress(Exception):  # a read-only or busy library keeps the floor in memory for this process
        store.set_meta(key, value)


def query_kind(kinds) -> str | None:
    """Which floor a query is judged by (SearchRequest.term_kinds): "text" for text terms only, "image" for
    images and library ids only, None for a mix (its scores sit between the two scales and neither floor is
    calibrated for them) and for a query steered away from something ("not"): subtracting a direction lowers
    every score, so the floor judged most of the images the query ranks first irrelevant."""
    kinds = {{"text": "text", "image": "image", "id": "image"}.get(k) for k in kinds}
    return kinds.pop() if len(kinds) == 1 else None
