"""Regenerate data/samples: coloured-shape photos with captions (committed; about 100 KB)."""

from pathlib import Path

from imgsearch.synthetic import generate

if __name__ == "__main__":
    out = Path(__file__).parent / "samples"
    generate(out, per_class=2, size=160, fmt="jpg", seed=7)
    print(f"wrote {len(list(out.glob('*.jpg')))} images and captions.csv to {out}")
