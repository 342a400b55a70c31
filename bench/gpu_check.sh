#!/usr/bin/env bash
# One short GPU check, for a machine with an NVIDIA GPU, from the repository root:
#   1. decode (nvJPEG batches), encode and end-to-end indexing images/s on generated 1 MP and 12 MP JPEGs
#      with a random-weight ViT-B-32 (same compute as the real one). Target on one H100: end-to-end
#      >= 5,000 images/s for 1 MP JPEGs.
#   2. a few fp16 fine-tuning steps on CUDA (grad scaler path) on data/samples, and the model it writes
#      loading back for a query.
# On the lent GPU machine, which cannot reach PyPI: first `bash bench/gpu_wheels.sh` here, then run
#   bash bench/gpu_check.sh      (device tool: carry [".whl"]; the log is also written to $OUT when set)
# N1MP / N12MP / BATCH override the image counts and the batch size. Takes about 4-6 minutes on an H100.
# DEVICE=cpu N1MP=20 N12MP=2 BATCH=8 runs the same steps on a CPU (to check the script itself).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
LOG=${OUT:-/tmp}/gpu_check.log
exec > >(tee "$LOG") 2>&1
PY=${PY:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/imgsearch-site \
    .whl/*.whl
  export PYTHONPATH=/tmp/imgsearch-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PY" -c "import imgsearch, open_clip, faiss, sqlalchemy" ; then
  echo "error: packages missing; run bash bench/gpu_wheels.sh where pip reaches PyPI and carry .whl" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
DEVICE=${DEVICE:-cuda}
PRECISION=fp32
if [ "$DEVICE" = cuda ]; then PRECISION=fp16; fi
"$PY" - "$DEVICE" <<'PY'
import sys, faiss, torch, torchvision
cuda = torch.cuda.is_available()
assert cuda or sys.argv[1] == "cpu", "no CUDA device visible to torch"
print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if cuda else "(no GPU)", "| faiss", faiss.__version__, "GPUs for faiss:",
      faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0)
PY
echo "== 1. indexing throughput ($DEVICE)"
"$PY" bench/index_throughput.py --device "$DEVICE" --batch "${BATCH:-256}" --n1mp "${N1MP:-6000}" --n12mp "${N12MP:-200}"
echo "== 2. $PRECISION fine-tuning on $DEVICE"
WORK=$(mktemp -d)
MODEL=$("$PY" -c "import sys; sys.path.insert(0, 'bench'); from common import random_vit_b32; print(random_vit_b32())")
"$PY" -m imgsearch --home "$WORK/home" --model "$MODEL" finetune data/samples/captions.csv -o "$WORK/ft" \
  --max-steps 12 --batch-size 16 --lr 1e-5 --device "$DEVICE" --precision "$PRECISION"
"$PY" - "$WORK/ft" <<'PY'
import json, sys
r = json.load(open(f"{sys.argv[1]}/training_report.json"))
h = r["hyperparameters"]
print(f"finetune on {h['device']} with {h['precision']}: {r['steps']} steps, {r['samples_per_second']} samples/s, "
      f"{r['summary']}")
PY
"$PY" -m imgsearch --home "$WORK/home" --model "local-dir:$WORK/ft" --device "$DEVICE" index data/samples -q
"$PY" -m imgsearch --home "$WORK/home" --model "local-dir:$WORK/ft" --device "$DEVICE" query "a red circle" -k 3
rm -rf "$WORK"
echo "== done (log: $LOG)"
