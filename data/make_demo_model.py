"""Train the tiny demo model `make run` uses offline (a few seconds on a CPU)."""

import sys

from imgsearch.synthetic import pretrain_tiny_clip

if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "data/.demo-model"
    print(f"training the tiny demo model into {out} (offline stand-in for ViT-B-32) ...", flush=True)
    pretrain_tiny_clip(out, steps=600)
