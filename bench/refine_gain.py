"""Refine by example: how much do two good and two bad marks raise precision@10, and with which weights?

    python bench/refine_gain.py [--per-class 14] [--seed 3] [--model-dir DIR]

A library of generated shapes (imgsearch.synthetic: 6 colours x 3 shapes) searched with the tiny CLIP
trained on them. Each task asks for a colour only ("red"), meaning one shape of it (red circles): two
images of the intended shape are liked and two of another shape of that colour are unliked, the first
ones the unrefined query shows (as a user would mark them). Precision@10 counts images of the intended
colour and shape among the top 10, the four marked images left out of both rankings; "better"/"worse"
count the tasks it raised or lowered; "colour P@10" is the refined top 10's share of the asked colour. One row per
Rocchio weighting (a, b, c): q' = a*q + b*mean(liked) - c*mean(unliked), normalised; a = 1 throughout,
since only the ratios matter. Deterministic: fixed seeds for the model, the images and the marks.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's imgsearch

WEIGHTS = [(1.0, b, c) for b in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0) for c in (0.0, 0.5, 1.0, 2.0)]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def tiny_model(folder: Path) -> str:
    from imgsearch import synthetic

    if not (folder / "open_clip_model.safetensors").exists():
        synthetic.pretrain_tiny_clip(folder, steps=600, seed=0)  # what the tests train (tests/conftest.py)
    return f"local-dir:{folder}"


def tasks(searcher, colors, shapes, per_task: int = 2):
    """(colour, intended shape, liked ids, unliked ids) for each colour and each ordered pair of shapes."""
    from imgsearch.request import SearchRequest

    out = []
    for color in colors:
        shown = searcher.search(SearchRequest.build(color, k=60))
        for good, bad in itertools.permutations(shapes, 2):
            liked = [h.id for h in shown if Path(h.path).name.startswith(f"{color}_{good}_")][:per_task]
            unliked = [h.id for h in shown if Path(h.path).name.startswith(f"{color}_{bad}_")][:per_task]
            if len(liked) == per_task and len(unliked) == per_task:
                out.append((color, good, liked, unliked))
    return out


def precision(searcher, vec, color: str, shape: str, exclude) -> tuple[float, float]:
    """Precision@10 for the colour and shape meant, and for the colour alone (did the query stay?)."""
    names = [Path(h.path).name for h in searcher.search_vector(vec, 10, exclude_ids=exclude)]
    return (sum(n.startswith(f"{color}_{shape}_") for n in names) / 10,
            sum(n.startswith(f"{color}_") for n in names) / 10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=14, help="images per colour and shape (over 10 + 2 liked: "
                    "a perfect ranking has precision 1)")
    ap.add_argument("--seed", type=int, default=3, help="seed of the generated images")
    ap.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "imgsearch-bench-tiny-clip")
    args = ap.parse_args()

    from imgsearch import Library, synthetic
    from imgsearch.request import SearchRequest
    from imgsearch.search import ROCCHIO, rocchio

    model = tiny_model(args.model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "shapes"
        synthetic.generate(photos, per_class=args.per_class, size=64, seed=args.seed, captions_file=None)
        with Library(Path(tmp) / "home", model=model, device="cpu", precision="fp32") as lib:
            lib.index(photos)
            searcher = lib._warm()
            todo = tasks(searcher, list(synthetic.COLORS), synthetic.SHAPES)
            t0 = time.perf_counter()
            rows = []
            for weights in WEIGHTS:
                before, after, colour = [], [], []
                for color, shape, liked, unliked in todo:
                    q = searcher.query_vector(SearchRequest.build(color))
                    marks = liked + unliked
                    before.append(precision(searcher, q, color, shape, marks)[0])
                    vec = rocchio(q, searcher.marked_vectors(liked, "like"),
                                  searcher.marked_vectors(unliked, "unlike"), weights)
                    p, c = precision(searcher, vec, color, shape, marks)
                    after.append(p)
                    colour.append(c)
                rows.append((weights, sum(before) / len(before), sum(after) / len(after),
                             sum(x > y for x, y in zip(after, before)), sum(x < y for x, y in zip(after, before)),
                             sum(colour) / len(colour)))
            took = time.perf_counter() - t0
            # the engine's weights through the public API, so the table's row is what users get
            color, shape, liked, unliked = todo[0]
            api = lib.search(color, like=liked, unlike=unliked, exclude_ids=liked + unliked)
            api_p = sum(Path(h.path).name.startswith(f"{color}_{shape}_") for h in api) / 10

    print(f"CPU: {cpu_name()}; {len(todo)} tasks (colour query, 2 liked, 2 unliked),"
          f" {args.per_class} images per colour x shape; sweep {took:.1f}s")
    print(f"{'a':>4} {'b':>5} {'c':>5}  {'P@10 query':>10}  {'P@10 refined':>12}  {'gain':>6}  {'better':>6}  "
          f"{'worse':>5}  {'colour P@10':>11}")
    for (a, b, c), p0, p1, better, worse, colour in rows:
        mark = "  <- engine" if (a, b, c) == tuple(ROCCHIO) else ""
        print(f"{a:4.2f} {b:5.2f} {c:5.2f}  {p0:10.3f}  {p1:12.3f}  {p1 - p0:+6.3f}  {better:6d}  {worse:5d}  "
              f"{colour:11.3f}{mark}")
    print(f"public API (Library.search like/unlike, engine weights {ROCCHIO}), task {color}/{shape}: P@10 {api_p:.2f}")


if __name__ == "__main__":
    main()
