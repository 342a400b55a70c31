#!/usr/bin/env bash
# Wheels for the Python packages the lent GPU machine lacks (it has torch, torchvision, numpy, pillow,
# typer, tqdm, safetensors, timm, regex, huggingface-hub; it cannot reach PyPI). Run here, where pip can,
# from the repository root; the wheels land in .whl/ (git-ignored, about 27 MB) for the device call to carry:
#   bash bench/gpu_wheels.sh
# faiss-gpu is not among them: its wheel alone (135 MB) is over what one device call may carry (64 MB),
# so the GPU machine searches with faiss-cpu and the faiss-gpu paths stay unexercised there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
mkdir -p .whl
for pkg in open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 sqlalchemy==2.1.9 greenlet==3.5.6 faiss-cpu==1.15.1; do
  # shellcheck disable=SC2086
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
    -d .whl "$pkg"
done
ls -la .whl
