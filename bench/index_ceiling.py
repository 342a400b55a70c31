"""How fast can indexing be on this CPU at all? A roofline for the image tower against the rclip targets.

    nice python bench/index_ceiling.py [--n 300] [--rclip 7.5] [--model local-dir:...]

For the random ViT-B-32-256 of bench/index_vs_rclip.py (same export, same onnxruntime session settings as
`imgsearch index`), in one process:

1. the tower's multiply-accumulates per image, counted from its config (patch embedding, QKV/out
   projections, MLP, attention products, final projection);
2. the GEMM rate this CPU reaches on those exact matrix shapes (M = batch x tokens), in onnxruntime fp32
   MatMul and in the dynamic int8 kernel the int8 tower uses (DynamicQuantizeMatMul), next to numpy's BLAS;
3. the tower's measured model-only rate (batch 32, the encoder's threads), and the share of it that is
   GEMM time at the rate of (2);
4. the whole-process ceiling for `--n` photos: GEMM time alone + the measured decode cost per photo (draft
   decode + preprocess, spread over the cores) + the measured minimum start-up (interpreter, imports,
   session), i.e. what indexing would take if every non-GEMM operator of the tower cost nothing.

Compared with `--rclip` (rclip's whole-process img/s from bench/index_vs_rclip.py on the same photos), it
prints which ratio targets (fp32 >= 1.2x, int8 >= 2x) fit under the ceiling on this CPU.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import make_photos

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tower_macs(cfg: dict) -> tuple[float, float, int]:
    """(GEMM MACs per image with weight matrices, attention MACs per image, tokens) of an open_clip ViT."""
    v = cfg["vision_cfg"]
    size, patch, width, layers = v["image_size"], v["patch_size"], v["width"], v["layers"]
    mlp = int(width * v.get("mlp_ratio", 4.0))
    grid = (size // patch) ** 2
    tokens = grid + 1
    per_token = layers * (3 * width * width + width * width + 2 * width * mlp)
    weights = tokens * per_token + grid * 3 * patch * patch * width + width * cfg["embed_dim"]
    attention = layers * 2 * tokens * tokens * width
    return float(weights), float(attention), tokens


def _rate(fn, seconds: float = 2.0) -> float:
    fn()
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - t)


def gemm_rates(m: int, shapes: list[tuple[int, int]], threads: int) -> dict[str, float]:
    """GMAC/s over the tower's weight shapes (each weighted by its MACs) for numpy, ORT fp32, ORT int8."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(0)
    out: dict[str, float] = {"numpy": 0.0, "onnxruntime fp32": 0.0, "onnxruntime int8": 0.0}
    total = sum(k * n for k, n in shapes)
    tmp = Path(tempfile.mkdtemp(prefix="ceiling-"))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    for k, n in shapes:
        a = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((k, n), dtype=np.float32) * 0.05
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
                                  [numpy_helper.from_array(w, "w")])
        fp32 = tmp / f"mm-{k}-{n}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(fp32))
        int8 = tmp / f"mm-{k}-{n}-int8.onnx"
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True, reduce_range=False)
        share = k * n / total
        macs = m * k * n / 1e9
        out["numpy"] += share * macs * _rate(lambda: a @ w)
        for label, path in (("onnxruntime fp32", fp32), ("onnxruntime int8", int8)):
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            out[label] += share * macs * _rate(lambda: sess.run(None, {"x": a}))
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()
    return out


def startup_floor(model_path: Path, threads: int) -> float:
    """Seconds for a fresh interpreter to import what `imgsearch index` imports and create the session."""
    code = (f"import time; t=time.perf_counter(); import imgsearch.cli, imgsearch.indexer, imgsearch.store, "
            f"sqlalchemy, faiss, PIL.Image; from imgsearch.onnx_image import OrtImageTower; "
            f"from pathlib import Path; OrtImageTower(Path({str(model_path)!r}), 'x', {threads}); "
            f"print(time.perf_counter()-t)")
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True,
                       capture_output=True)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--rclip", type=float, default=None, help="rclip's whole-process img/s on the same photos")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "imgsearch-vs-rclip"))
    args = ap.parse_args()

    from index_vs_rclip import random_vit_b32_256

    from imgsearch import onnx_image
    from imgsearch.config import thread_budget
    from imgsearch.encoder import ModelSpec, load
    from imgsearch.images import open_image

    work = Path(args.work)
    model = random_vit_b32_256(work / "vit-b-32-256-random")
    cfg = json.loads((work / "vit-b-32-256-random" / "open_clip_config.json").read_text())["model_cfg"]
    threads = thread_budget(device="cpu").encoder
    enc = load(ModelSpec(model), "cpu", "fp32")
    home = work / "export-home"
    towers = {kind: onnx_image.ensure_export(enc, home, kind, threads)[0] for kind in ("fp32", "int8")}
    weights, attention, tokens = tower_macs(cfg)
    v = cfg["vision_cfg"]
    width, mlp = v["width"], int(v["width"] * v.get("mlp_ratio", 4.0))
    batch = 32
    shapes = [(width, 3 * width), (width, width), (width, mlp), (mlp, width)]
    print(f"cpu: {onnx_image.cpu_model()}, {os.cpu_count()} cores, encoder threads {threads}")
    print(f"tower: ViT-B-32-256, {tokens} tokens, {weights / 1e9:.2f} GMAC/image in weight GEMMs "
          f"+ {attention / 1e9:.3f} GMAC attention products")
    rates = gemm_rates(batch * tokens, shapes, threads)
    print("GEMM on the tower's shapes (M = 32 x tokens): "
          + ", ".join(f"{k} {r:.0f} GMAC/s" for k, r in rates.items()))

    photos = make_photos(work / f"photos-{args.n}", args.n, 1024, 768, seed=3)
    files = sorted(glob.glob(str(photos / "*.jpg")))[: args.n]
    sample = files[:64]
    t = time.perf_counter()
    pixels = [enc.preprocess(open_image(p, draft_size=enc.draft_size)[0]).numpy() for p in sample]
    decode_ms = (time.perf_counter() - t) / len(sample) * 1e3
    x = np.stack((pixels * (batch // len(pixels) + 1))[:batch])
    start = startup_floor(onnx_image.export_dir(home, enc.fingerprint) / onnx_image.INT8_FILE, threads)
    print(f"decode + preprocess {decode_ms:.1f} ms/photo on one core (draft decode); start-up floor "
          f"{start:.2f} s (interpreter, imports, int8 session)")
    for kind, gemm_key, target in (("fp32", "onnxruntime fp32", 1.2), ("int8", "onnxruntime int8", 2.0)):
        tower = towers[kind]
        model_rate = batch * _rate(lambda: tower.encode(x), 6.0)
        gemm_s = weights / (rates[gemm_key] * 1e9)
        ceiling_model = 1.0 / gemm_s
        whole = args.n / (args.n * gemm_s + args.n * decode_ms / 1e3 / threads + start)
        print(f"{kind}: model-only {model_rate:.2f} img/s; GEMMs alone at the measured rate {ceiling_model:.2f} img/s "
              f"({model_rate / ceiling_model:.0%} of it reached); whole-process ceiling for {args.n} photos "
              f"{whole:.2f} img/s", end="")
        if args.rclip:
            need = target * args.rclip
            verdict = "fits under the ceiling" if whole >= need else "is above the ceiling: not reachable here"
            print(f"; target {target}x rclip = {need:.2f} img/s {verdict} (ceiling {whole / args.rclip:.2f}x)")
        else:
            print()


if __name__ == "__main__":
    main()
