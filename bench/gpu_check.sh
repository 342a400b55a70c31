#!/usr/bin/env bash
# One short GPU check: index generated 1 MP and 12 MP JPEGs with a random-weight ViT-B-32 on CUDA and print
# decode, encode and end-to-end images/s. Run on a machine with an NVIDIA GPU from the repository root:
#   bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if ! "$PY" -c "import imgsearch, open_clip, faiss" 2>/dev/null; then
  "$PY" -m pip install -q -e . || { echo "cannot install imgsearch here"; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
PY
# Prints end-to-end, encode-only and decode-only (nvJPEG) images/s for 1 MP and 12 MP JPEGs.
# Target on one H100: end-to-end >= 5,000 images/s for 1 MP JPEGs with ViT-B-32.
"$PY" bench/index_throughput.py --device cuda --batch 256 --n1mp "${N1MP:-3000}" --n12mp "${N12MP:-100}"
