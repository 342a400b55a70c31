"""Which number format is fastest for the image tower on this CPU? Model-only img/s, one process, same batch.

    nice python bench/cpu_formats.py [--batch 32] [--runs 3] [--no-compile]

The random ViT-B-32-256 of bench/first_run.py (torch.manual_seed(0), a safetensors checkpoint), on the
encoder's thread count (one per core), batch of probe images in the model's input space:
- torch fp32 and torch bf16 (weights and inputs cast to bf16, as `imgsearch index --precision bf16` runs
  it), eager;
- torch bf16 compiled (torch.compile, inductor; the compile time is printed on its own, it is paid once per
  process and would fall on every `index` run);
- onnxruntime fp32 and int8, the exports `index` makes (imgsearch.onnx_image.make_exports, from the tensors).
bf16 on onnxruntime is not in the table: its CPU provider has no bf16 matrix kernels on x86.
Prints img/s per format, the ratio to torch fp32, and the CPU's flags that matter (AVX2, AVX-512 BF16/VNNI,
AMX). Best of --runs after a warm-up (the timer `--precision auto` uses).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "imgsearch-first-run"))
    args = ap.parse_args()

    import numpy as np
    import open_clip
    import torch
    from safetensors.torch import load_file

    from first_run import model_folder, random_checkpoint
    from imgsearch import onnx_image
    from imgsearch.config import Settings, cpuinfo, thread_budget

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folder = model_folder(random_checkpoint(work / "vit-b-32-256-random.safetensors"))
    threads = thread_budget(workers=0).encoder
    torch.set_num_threads(threads)
    flags = set((cpuinfo("flags") or "").split())
    have = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    print(f"CPU: {onnx_image.cpu_model()}, {os.cpu_count()} cores ({', '.join(have)}); {threads} threads; "
          f"batch {args.batch}; torch {torch.__version__}")

    model = open_clip.create_model("ViT-B-32-256", pretrained=None)
    model.load_state_dict(load_file(folder / "open_clip_model.safetensors"))
    visual = model.visual.eval()
    batch = onnx_image.probe_batch(256, args.batch)
    x = torch.from_numpy(batch)
    rates: dict[str, float] = {}

    @torch.inference_mode()
    def fp32(b):
        return visual(b)

    import copy

    visual16 = copy.deepcopy(visual).to(torch.bfloat16)

    @torch.inference_mode()
    def bf16(b, tower=visual16):
        return tower(b.to(torch.bfloat16)).float()

    rates["torch fp32"] = onnx_image._timed(fp32, x, args.runs)
    rates["torch bf16"] = onnx_image._timed(bf16, x, args.runs)
    if not args.no_compile:
        compiled = torch.compile(visual16)
        t = time.perf_counter()
        bf16(x, compiled)
        print(f"torch.compile (inductor) bf16: first call {time.perf_counter() - t:.1f} s (compile + one batch)")
        rates["torch bf16 compiled"] = onnx_image._timed(lambda b: bf16(b, compiled), x, args.runs)

    home = Path(tempfile.mkdtemp(prefix="formats-", dir=work))
    settings = Settings(home=home, model=f"local-dir:{folder}", pretrained=None, device="cpu", precision="int8",
                        workers=0)
    assert onnx_image.make_exports(settings, threads, text=False) == "ok"
    exports = next((home / "exports").iterdir()) / "image"
    for kind in ("fp32", "int8"):
        tower = onnx_image.OrtImageTower(exports / f"image-{kind}.onnx", kind, threads)
        rates[f"onnxruntime {kind}"] = onnx_image._timed(tower.encode, np.ascontiguousarray(batch), args.runs)
        tower.session = None

    base = rates["torch fp32"]
    for name, rate in sorted(rates.items(), key=lambda kv: -kv[1]):
        print(f"  {name:22s} {rate:7.2f} img/s  {rate / base:5.2f}x torch fp32")


if __name__ == "__main__":
    main()
