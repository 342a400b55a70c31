"""Retrieval metrics (R@k, mean rank) for image–caption sets; the one implementation `finetune` and `eval` share.
Identical caption strings are one text query (every image they caption a right answer); an image with several
captions is one image query with several right answers."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

KS = (1, 5, 10)


@dataclass
class Gallery:
    """Unique images and unique caption texts of a pair list, with which (image, text) match."""

    images: list[str]
    texts: list[str]
    matches: list[tuple[int, int]]  # (image index, text index), unique
    pair_index: list[tuple[int, int]]  # per input pair: (image index, text index)


def build_gallery(pairs) -> Gallery:
    """Group (path, caption) pairs (any objects with .path and .caption) into unique images and texts."""
    img_ids: dict[str, int] = {}
    txt_ids: dict[str, int] = {}
    pair_index = []
    for p in pairs:
        pair_index.append((img_ids.setdefault(p.path, len(img_ids)), txt_ids.setdefault(p.caption, len(txt_ids))))
    return Gallery(list(img_ids), list(txt_ids), sorted(set(pair_index)), pair_index)


def _chance_recall(n_items: int, n_relevant: np.ndarray, k: int) -> float:
    """Expected R@k of a random ranking: 1 - C(N-m, k) / C(N, k), averaged over queries."""
    vals = [1.0 - math.prod(max(0.0, (n_items - m - j) / (n_items - j)) for j in range(min(k, n_items)))
            for m in n_relevant]
    return float(np.mean(vals)) if vals else 0.0


def _direction(sim: np.ndarray, relevant: list[np.ndarray], n_items: int) -> dict:
    # 1-based rank of the best-placed relevant column of each row (ties count in our favour).
    ranks = np.array([1 + int((row > row[rel].max()).sum()) for row, rel in zip(sim, relevant)], dtype=np.int64)
    n_rel = np.array([len(r) for r in relevant])
    return {**{f"R@{k}": float((ranks <= k).mean()) for k in KS}, "mean_rank": float(ranks.mean()),
            "median_rank": float(np.median(ranks)), "queries": int(len(ranks)),
            # A random ranking puts the first of m relevant items among N at (N + 1) / (m + 1) on average.
            "chance": {**{f"R@{k}": _chance_recall(n_items, n_rel, k) for k in KS},
                       "mean_rank": float(np.mean((n_items + 1) / (n_rel + 1)))}}


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, matches) -> dict:
    """Image→text and text→image recall@1/5/10 and mean rank from L2-normalised embeddings.
    ``matches`` lists the (image row, text row) pairs that belong together; every image and text must be in
    one. Recalls are fractions, ranks 1-based, and "chance" is what a random ranking would score."""
    image_emb = np.asarray(image_emb, dtype=np.float32)
    text_emb = np.asarray(text_emb, dtype=np.float32)
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    texts_of: list[list[int]] = [[] for _ in range(n_img)]
    images_of: list[list[int]] = [[] for _ in range(n_txt)]
    for i, t in matches:
        texts_of[i].append(t)
        images_of[t].append(i)
    if any(not x for x in texts_of) or any(not x for x in images_of):
        raise ValueError("every image and every text needs at least one match")
    sim = image_emb @ text_emb.T
    return {
        "image_to_text": _direction(sim, [np.array(x) for x in texts_of], n_txt),
        "text_to_image": _direction(np.ascontiguousarray(sim.T), [np.array(x) for x in images_of], n_img),
        "images": n_img,
        "texts": n_txt,
    }


def headline(metrics: dict) -> float:
    """One number to pick the best checkpoint by: the mean of the six recalls."""
    return float(np.mean([metrics[d][f"R@{k}"] for d in ("image_to_text", "text_to_image") for k in KS]))


def table_rows(named: list[tuple[str, dict]], with_loss: bool = True) -> list[str]:
    """A small fixed-width table: one row per (label, metrics), plus what chance would score."""
    width = max([22] + [len(label) + 2 for label, _ in named])
    loss_head = f"{'val loss':>9}  " if with_loss else ""
    head = (f"{'':<{width}}{loss_head}{'i2t R@1':>7} {'R@5':>6} {'R@10':>6} {'mean rank':>9}  "
            f"{'t2i R@1':>7} {'R@5':>6} {'R@10':>6} {'mean rank':>9}")
    rows = [head.rstrip()]

    def fmt(label: str, m: dict, loss) -> str:
        cells = [f"{label:<{width}}"]
        if with_loss:
            cells.append((f"{loss:>9.4f}" if isinstance(loss, (int, float)) else f"{'':>9}") + "  ")
        for d in ("image_to_text", "text_to_image"):
            x = m[d]
            cells.append(f"{100 * x['R@1']:>6.1f}% {100 * x['R@5']:>5.1f}% {100 * x['R@10']:>5.1f}% "
                         f"{x['mean_rank']:>9.1f}  ")
        return "".join(cells).rstrip()

    rows += [fmt(label, m, m.get("val_loss")) for label, m in named]
    if named:
        chance = {d: named[0][1][d]["chance"] for d in ("image_to_text", "text_to_image")}
        rows.append(fmt("chance", chance, None))
    return rows


def classification_metrics(scores: np.ndarray, truth, classes: list[str], top_confusions: int = 10) -> dict:
    """Zero-shot top-1 / top-k (k = min(5, C)) accuracy from [N, C] scores (higher = more likely) and true
    class indices; per-class accuracy worst first, and the most frequent (true -> predicted) mistakes."""
    scores = np.asarray(scores, dtype=np.float32)
    truth = np.asarray(truth, dtype=np.int64)
    order = np.argsort(-scores, axis=1, kind="stable")
    k5 = min(5, len(classes))
    top1 = order[:, 0] == truth
    top5 = (order[:, :k5] == truth[:, None]).any(axis=1)
    per_class = []
    for c, name in enumerate(classes):
        mask = truth == c
        if mask.any():
            per_class.append({"class": name, "accuracy": float(top1[mask].mean()), "images": int(mask.sum())})
    per_class.sort(key=lambda x: (x["accuracy"], x["class"]))
    confusion = Counter((int(t), int(p)) for t, p in zip(truth, order[:, 0]) if t != p)
    confused = sorted(confusion.items(), key=lambda kv: (-kv[1], kv[0]))[:top_confusions]
    return {
        "images": int(len(truth)), "classes": len(classes),
        "top1": float(top1.mean()) if len(truth) else 0.0,
        "top5": float(top5.mean()) if len(truth) else 0.0, "top5_k": k5,
        "per_class": per_class,
        "confused": [{"true": classes[t], "predicted": classes[p], "count": n} for (t, p), n in confused],
    }
