"""Peak memory of `imgsearch index` on a small folder, clean and with each decompression-bomb file added;
and of `imgsearch import` and `index` fed hostile exports and weights.

    python bench/bomb_memory.py [--model local-dir:/path]

Each run is a fresh `python -m imgsearch index` child in a fresh home; its peak RSS is read from a small
wrapper's rusage of its children (bench/common.peak_child). The bombs are tiny files that decode (or resize)
to gigabytes: a 1x120000 PNG (the model's resize of its short side makes a 64-px-tall strip millions wide), a
16x65000 JPEG, an ICO and an ICNS whose directories say 256x256 but whose PNG payload is 40000x40000
(real, all-black, 1-bit pixel data), and two 1.8 kB JPEGs claiming 13000x13000 (169 MP, within the doubled
cap of a JPEG decoded reduced), one of them with its components in separate scans.
Target: every bomb run within 300 MB of the clean run.
Then (tiny default model only): `import` of the clean library's parquet export, and of that export with one
path made 1.5 GB of one letter (zstd: ~50 kB on disk), once with honest metadata and once with a footer that
says the column unpacks to 1000 bytes; and `index --precision int8` with the model's weights replaced by a
549-byte safetensors file whose header claims 4 EiB. Target: the same, and each refused in one line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import peak_child  # noqa: E402


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def black_png(width: int, height: int) -> bytes:
    """A real 1-bit greyscale PNG of ``width`` x ``height`` black pixels (compresses ~1000:1)."""
    row, z = b"\0" * (1 + (width + 7) // 8), zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def ico_holding(payload: bytes) -> bytes:
    """An ICO whose one directory entry says 256x256 (0, 0) and points at ``payload``."""
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(payload), 22) + payload


def icns_holding(payload: bytes) -> bytes:
    """An ICNS with one 256x256 ('ic08') entry whose data is ``payload``."""
    block = b"ic08" + struct.pack(">I", 8 + len(payload)) + payload
    return b"icns" + struct.pack(">I", 8 + len(block)) + block


def bombs(folder: Path) -> dict[str, Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = {"wide.png": folder / "wide.png", "tall.jpg": folder / "tall.jpg",
           "hidden.ico": folder / "hidden.ico", "hidden.icns": folder / "hidden.icns"}
    Image.linear_gradient("L").resize((1, 120000)).save(out["wide.png"])
    Image.linear_gradient("L").resize((16, 65000)).convert("RGB").save(out["tall.jpg"], quality=80)
    sys.path.insert(0, str(ROOT / "tests"))
    from test_hostile_bombs import claimed_jpeg  # 169 MP claimed: within twice the cap a reduced decode gets

    for name, scans in (("claimed.jpg", False), ("claimed-scans.jpg", True)):
        out[name] = folder / name
        out[name].write_bytes(claimed_jpeg(13000, 13000, one_component_scan=scans))
    huge = black_png(40000, 40000)
    out["hidden.ico"].write_bytes(ico_holding(huge))
    out["hidden.icns"].write_bytes(icns_holding(huge))
    return out


def tiny_model(folder: Path) -> str:
    if not (folder / "open_clip_model.safetensors").exists():
        from imgsearch.synthetic import pretrain_tiny_clip

        pretrain_tiny_clip(folder, steps=20, seed=0)
    return f"local-dir:{folder}"


def run_index(folder: Path, model: str, work: Path) -> dict:
    home = Path(tempfile.mkdtemp(prefix="home-", dir=work))
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSEARCH_")}
    env.update(IMGSEARCH_HOME=str(home), IMGSEARCH_MODEL=model, IMGSEARCH_DEVICE="cpu", IMGSEARCH_PRECISION="fp32",
               PYTHONPATH=str(ROOT))
    rc, peak, _, out, err = peak_child([sys.executable, "-m", "imgsearch", "index", str(folder), "--json"], env)
    try:
        rep = json.loads(out)
    except ValueError:
        rep = {"error": (err.decode(errors="replace").strip().splitlines() or ["?"])[-1]}
    return {"peak_mb": round(peak, 1), "rc": rc, "new": rep.get("new"),
            "failures": {Path(f["path"]).name: f["reason"] for f in rep.get("failures", [])},
            "error": rep.get("error")}


def _child(args: list[str], env: dict) -> dict:
    rc, peak, _, out, err = peak_child([sys.executable, "-m", "imgsearch", *args], env)
    lines = err.decode(errors="replace").strip().splitlines()
    return {"peak_mb": round(peak, 1), "rc": rc,
            "said": lines[-1][:160] if lines else out.decode(errors="replace").strip()[:160]}


def parquet_bomb(export: str, folder: str, lie: str) -> None:
    """A copy of ``export`` whose first path is 1.5 GB of one letter (zstd); ``lie`` "1": its footer says 1000 B.
    Run in a child process (below): the bench's own peak memory would otherwise count in its children's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sys.path.insert(0, str(ROOT / "tests"))
    from test_hostile_import import understate  # the footer rewrite the import test uses

    shutil.copytree(export, folder)
    part = Path(folder) / "part-00000.parquet"
    table = pq.read_table(part)
    paths = table.column("path").to_pylist()
    paths[0] = "/" + "a" * (1500 << 20)
    table = table.set_column(table.schema.get_field_index("path"), "path", pa.array(paths, pa.string()))
    pq.write_table(table, part, compression="zstd", use_dictionary=False)
    if lie == "1":
        understate(part, "path", 1000)


def hostile_inputs(model_dir: Path, model: str, clean: Path, work: Path) -> None:
    """import and index fed a parquet bomb (honest and lying metadata) and a safetensors header bomb."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGSEARCH_")}
    env.update(IMGSEARCH_DEVICE="cpu", IMGSEARCH_PRECISION="fp32", PYTHONPATH=str(ROOT))
    home = work / "source-home"
    _child(["--home", str(home), "--model", model, "index", str(clean)], env)
    _child(["--home", str(home), "--model", model, "export", str(work / "export"), "--format", "parquet"], env)
    runs = {"clean export": work / "export"}
    for name, lie in (("1.5 GB path", "0"), ("1.5 GB path, understated", "1")):
        runs[name] = folder = work / name.replace(" ", "-").replace(",", "")
        subprocess.run([sys.executable, "-c", "import sys, bomb_memory as b; b.parquet_bomb(*sys.argv[1:])",
                        str(work / "export"), str(folder), lie], check=True, cwd=Path(__file__).parent)
    base = None
    for name, folder in runs.items():
        target = work / f"import-{len(name)}"
        shutil.copytree(home, target)
        res = _child(["--home", str(target), "--model", model, "import", str(folder)], env)
        base = base or res["peak_mb"]
        size = sum(f.stat().st_size for f in folder.glob("*.parquet"))
        print(json.dumps({"run": f"import: {name}", "bytes": size, **res,
                          "over_clean_mb": round(res["peak_mb"] - base, 1)}))
    bad = work / "bad-weights"
    shutil.copytree(model_dir, bad)
    (bad / "open_clip_model.safetensors").write_bytes(struct.pack("<Q", 2 ** 62) + b"{}" + b"\0" * 539)
    res = _child(["--home", str(work / "bad-home"), "--model", f"local-dir:{bad}", "--precision", "int8", "index",
                  str(clean)], env)
    print(json.dumps({"run": "index: 549-byte weights claiming a 4 EiB header", **res}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model id (default: a tiny CLIP trained for a few steps in a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imgsearch-bombs-"))
    try:
        from imgsearch import synthetic

        model = args.model or tiny_model(work / "model")
        clean = work / "clean"
        synthetic.generate(clean, per_class=1, size=96, fmt="jpg", seed=1, captions_file=None)
        made = bombs(work / "bombs")
        base = run_index(clean, model, work)
        print(json.dumps({"run": "clean", **base}))
        for name, path in made.items():
            folder = work / f"with-{name}"
            shutil.copytree(clean, folder)
            shutil.copy(path, folder / name)
            res = run_index(folder, model, work)
            res["over_clean_mb"] = round(res["peak_mb"] - base["peak_mb"], 1)
            res["within_300mb"] = res["over_clean_mb"] <= 300
            print(json.dumps({"run": name, "bytes": path.stat().st_size, **res}))
        if not args.model:
            hostile_inputs(work / "model", model, clean, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
