"""Which image encoder an index run uses (select), and the image tower on ONNX Runtime it may pick: fp32 where
it beats torch on this CPU, opt-in dynamic int8, or the whole run without torch (torch_free_encoder).

Exports live in ``<home>/exports/<weights fingerprint>/image/`` with a manifest repeating the fingerprint and
format (a replaced model never runs a stale export); one is used only after it matched the torch tower on a
probe batch (fp32: every cosine >= 0.9999). The chosen tower is a new OrtEncoder: a torch encoder other threads
may use never changes backend. onnxruntime and onnx are imported only when needed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .config import atomic_file, cpuinfo, draft_size_for, model_exports_dir, read_json
from .textfast import _normalised  # the one row normaliser (numpy only)

FORMAT = 2  # 2: the lean graph (clipgraph); a format-1 export is rebuilt once
OPSET = 17
FP32_MIN_COSINE = 0.9999
PROBE_IMAGES = 4
FP32_FILE = "image-fp32.onnx"
INT8_FILE = "image-int8.onnx"
MANIFEST = "manifest.json"
# How the int8 tower is made; part of every int8 parity verdict's key, so a changed recipe is re-checked.
INT8_RECIPE = {"ops": ["MatMul", "Gemm"], "per_channel": True, "reduce_range": False}
PREPROCESS_MAX_DIFF = 1e-4  # numpy vs torch preprocess, in normalised units (measured: 2.4e-7)

_said: set[str] = set()


def say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        print(message, file=sys.stderr)


class OnnxUnavailable(Exception):
    """onnxruntime/onnx missing, export failed or failed its check: run the image tower on torch."""


def export_dir(home: str | os.PathLike, fingerprint: str) -> Path:
    return model_exports_dir(home, fingerprint) / "image"


def cpu_model() -> str:
    import platform

    return cpuinfo("model name") or platform.processor() or platform.machine() or "unknown cpu"


def probe_batch(size: int, n: int = PROBE_IMAGES) -> np.ndarray:
    """A fixed batch in the model's normalised input space: smooth gradients plus texture, like photos."""
    rng = np.random.default_rng(1234)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    out = np.empty((n, 3, size, size), dtype=np.float32)
    for i in range(n):
        for c in range(3):
            a, b, f = rng.uniform(-1.5, 1.5, 3)
            out[i, c] = a * xx + b * yy + 0.5 * np.sin(6.28 * (f + 1) * (xx + yy)) + rng.normal(0, 0.3, (size, size))
    return out


def _read_manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _manifest_lock(folder: Path):
    """Held while a manifest is read, changed and written back: several processes may make or time one export."""
    from .lock import file_lock

    return file_lock(folder / ".manifest.lock")


def _write_manifest(folder: Path, manifest: dict) -> None:
    with atomic_file(folder / MANIFEST) as f:
        f.write(json.dumps(manifest, indent=2).encode("utf-8"))


def _import_ort():
    try:
        import onnxruntime
    except ImportError as e:
        if isinstance(e.__cause__, KeyboardInterrupt):  # Ctrl-C while its extension loaded: pybind11 wraps it
            raise e.__cause__ from None
        if not isinstance(e, ModuleNotFoundError):
            raise OnnxUnavailable(f"onnxruntime does not load ({e}); reinstall it: pip install --force-reinstall "
                                  "onnxruntime") from None
        raise OnnxUnavailable("onnxruntime is not installed (imgsearch installs it: pip install onnxruntime)") from None
    return onnxruntime


def _new_session(path: Path, threads: int, once: bool = False):
    ort = _import_ort()
    opts = ort.SessionOptions()
    if once:  # a check's few images: weights left unpacked (ViT-B-32 fp32: 374 MB loaded, not 535), as fast here
        opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.intra_op_num_threads = max(1, threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


_started: dict[tuple, object] = {}  # _session_key -> Future of a session begun by prestart()


def _session_key(path: Path, threads: int) -> tuple | None:
    """What a prestarted session is for: this file as it is now (size, mtime) and the thread count."""
    try:
        return str(path), tuple(_file_id(path)), threads
    except OSError:
        return None


def prestart(path: Path, threads: int) -> None:
    """Begin creating the session for ``path`` on a background thread, for OrtImageTower to pick up.

    onnxruntime releases the GIL while it loads a model (ViT-B-32: 0.6-0.8 s on 2 Zen 3 cores), so the caller's
    imports run meanwhile. An executor's thread, which the interpreter joins at shutdown: exiting while
    onnxruntime loaded on a daemon thread could crash the process (an error exit, a Ctrl-C)."""
    from concurrent.futures import ThreadPoolExecutor

    key = _session_key(path, threads)
    if key is not None and key not in _started:
        pool = ThreadPoolExecutor(1, thread_name_prefix="onnx-session")
        _started[key] = pool.submit(_new_session, path, threads)
        pool.shutdown(wait=False)


def drop_prestarted() -> None:
    """Forget head starts nobody picked up (the run went to torch): their sessions are freed once loaded."""
    _started.clear()


class OrtImageTower:
    """An onnxruntime session over an exported image tower; encode() returns L2-normalised float32 rows."""

    def __init__(self, path: Path, kind: str, threads: int, once: bool = False, lazy: bool = False):
        """``lazy``: no session until the first encode (a parity pass would release it first), unless prestarted."""
        fut = None if once else _started.pop(_session_key(path, threads), None)
        self.session = fut.result() if fut is not None else None if lazy else _new_session(path, threads, once)
        self.path, self.kind, self.threads = path, kind, threads

    def encode(self, batch: np.ndarray) -> np.ndarray:
        session = self.session
        if session is None:  # not loaded yet (lazy), or released while another tower ran (int8_parity)
            session = self.session = _new_session(self.path, self.threads)
        x = session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        return _normalised(x)

    def describe(self) -> str:
        return f"onnxruntime {self.kind}"


def _torch_features(encoder, batch: np.ndarray) -> np.ndarray:
    import torch

    return encoder.encode_image_tensors(torch.from_numpy(batch))


def _export(encoder, path: Path, int8: bool = False) -> None:
    """The fp32 (or int8) image graph: built from the tensors for open_clip's plain ViT (clipgraph), else traced
    by torch.onnx.export (int8: quantised from the fp32 file beside it)."""
    from . import clipgraph

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        try:
            clipgraph.write_image_graph(clipgraph.state_arrays(encoder.model),
                                        clipgraph.model_facts(encoder.model, "visual"), path, OPSET, int8)
            return
        except clipgraph.Unsupported:
            if importlib.util.find_spec("onnx") is None:  # torch's exporter and onnxruntime's quantiser need it
                raise OnnxUnavailable("the onnx package is not installed (pip install onnx)") from None
            if int8:
                return _quantise_int8(path.with_name(FP32_FILE), path)
        import torch

        class Tower(torch.nn.Module):
            def __init__(self, model):
                super().__init__()
                self.model = model

            def forward(self, pixels):
                return self.model.encode_image(pixels)

        # With autograd on (thread-local), nn.MultiheadAttention skips its fused kernel, which TorchScript can't trace.
        with torch.enable_grad():
            pixels = torch.from_numpy(probe_batch(encoder.image_size, 2)).requires_grad_()
            torch.onnx.export(Tower(encoder.model).eval(), (pixels,), str(tmp), input_names=["pixels"],
                              output_names=["features"], dynamic_axes={"pixels": {0: "n"}, "features": {0: "n"}},
                              opset_version=OPSET, dynamo=False)
        os.replace(tmp, path)
    except OnnxUnavailable:  # the quantiser's, which says what failed
        raise
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise OnnxUnavailable(f"exporting the image tower failed ({type(e).__name__}: {str(e)[:120]})") from None


def _quantise_int8(fp32: Path, out: Path) -> None:
    """The int8 model of a traced tower's ``fp32`` file, quantised in a child process: onnxruntime's quantiser
    logs through the root logger, which would make a host program's later logging.basicConfig a no-op."""
    import subprocess

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    # Only weight MatMul/Gemm (~all FLOPs): conv and activation x activation stay fp32 (better cosine, little cost).
    code = ("import json, sys\n"
            "from onnxruntime.quantization import QuantType, quantize_dynamic\n"
            "r = json.loads(sys.argv[3])\n"
            "quantize_dynamic(sys.argv[1], sys.argv[2], op_types_to_quantize=r['ops'], weight_type=QuantType.QInt8,\n"
            "                 per_channel=r['per_channel'], reduce_range=r['reduce_range'],\n"
            "                 extra_options={'MatMulConstBOnly': True})\n")
    try:
        done = subprocess.run([sys.executable, "-c", code, str(fp32), str(tmp), json.dumps(INT8_RECIPE)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
            raise RuntimeError(lines[-1])
        os.replace(tmp, out)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise OnnxUnavailable(f"int8 quantisation failed ({type(e).__name__}: {str(e)[:120]})") from None


def ensure_export(encoder, home, kind: str = "fp32", threads: int = 1) -> tuple[OrtImageTower, dict]:
    """A verified session for ``kind`` (fp32 | int8), exported first where needed; a numpy-checked export is
    checked against torch now. A bf16 encoder can neither write nor check an fp32 graph: it uses only an
    export made from the checkpoint's tensors (make_exports)."""
    folder = export_dir(home, encoder.fingerprint)
    if encoder.device != "cpu":
        raise OnnxUnavailable(f"the ONNX image tower runs fp32/int8 on the CPU, not {encoder.device}")
    if encoder.precision == "bf16":
        path, manifest, why = _verified(folder, encoder.fingerprint, kind)
        if path is None:
            raise OnnxUnavailable(why)
    else:
        path, manifest = _ensure_files(folder, encoder.fingerprint, encoder.spec.label, encoder.image_size, kind,
                                       threads, lambda p, int8: _export(encoder, p, int8),
                                       lambda probe: _torch_features(encoder, probe), "torch",
                                       lambda: {"dim": int(encoder.dim), "preprocess": _checked_preprocess(encoder)})
    return OrtImageTower(path, kind, threads), manifest


def _verified(folder: Path, fingerprint: str, kind: str) -> tuple[Path | None, dict, str]:
    """(the ``kind`` export file, its manifest, "ok") when there and verified, else (None, manifest, why not)."""
    manifest = _read_manifest(folder)
    if manifest.get("fingerprint") != fingerprint or manifest.get("format") != FORMAT:
        return None, manifest, "no image export for these weights"
    if not (manifest.get("fp32") or {}).get("passed") or not manifest.get("preprocess") or "dim" not in manifest:
        return None, manifest, "image export not verified"
    if kind == "int8" and _recipe_of(manifest.get("int8") or {}) != INT8_RECIPE:
        return None, manifest, "no int8 export"
    path = folder / (INT8_FILE if kind == "int8" else FP32_FILE)
    return (path, manifest, "ok") if path.is_file() else (None, manifest, "export file missing")


def _ensure_files(folder: Path, fingerprint: str, label: str, size: int, kind: str, threads: int, write, reference,
                  checked: str, describe) -> tuple[Path, dict]:
    """The export file for ``kind`` in ``folder`` and its manifest, made where missing: ``write(path, int8)``
    writes a graph; the fp32 one must match ``reference(probe)`` (``checked``: "torch" or "numpy"; a
    "numpy"-checked one is checked again by torch) on a session loaded for that alone (once=True, its memory
    given back: trim_heap); ``describe()`` gives the manifest's dim and preprocess. The int8 graph is not
    probed: the int8 parity gate checks it against fp32 on the user's own photos before any run uses it."""
    ort = _import_ort()
    folder.mkdir(parents=True, exist_ok=True)
    with _manifest_lock(folder):  # one process at a time: a concurrent one's manifest would drop entries
        manifest = _read_manifest(folder)
        if manifest.get("fingerprint") != fingerprint or manifest.get("format") != FORMAT:
            manifest = {"format": FORMAT, "fingerprint": fingerprint, "model": label, "opset": OPSET,
                        "input_size": size, "onnxruntime": ort.__version__}
        recheck = lambda e: checked == "torch" and (e or {}).get("checked") == "numpy"  # noqa: E731
        entry = manifest.get("fp32")
        if "preprocess" not in manifest or recheck(entry):
            manifest.update(describe())
            _write_manifest(folder, manifest)
        path, entry = folder / FP32_FILE, manifest.get("fp32")
        missing = entry is None or not path.is_file()
        if missing or recheck(entry):
            if missing:
                write(path, False)
            want = reference(probe := probe_batch(size))  # first: the numpy forward and a session never overlap
            cos = float((OrtImageTower(path, "fp32", threads, once=True).encode(probe) * want).sum(1).min())
            trim_heap()
            entry = manifest["fp32"] = {"file": FP32_FILE, "min_cosine": cos, "passed": cos >= FP32_MIN_COSINE,
                                        "threshold": FP32_MIN_COSINE, "checked": checked}
            _write_manifest(folder, manifest)
        if not entry.get("passed"):
            raise OnnxUnavailable(f"the exported image tower does not match {entry.get('checked', 'torch')} "
                                  f"(cosine {entry['min_cosine']:.6f})")
        if kind == "fp32":
            return path, manifest
        path, entry = folder / INT8_FILE, manifest.get("int8")
        if entry is None or not path.is_file() or _recipe_of(entry) != INT8_RECIPE:
            write(path, True)  # no probe check: the parity gate measures it on the user's own photos before use
            manifest["int8"] = {"file": INT8_FILE, **INT8_RECIPE}
            _write_manifest(folder, manifest)
        return path, manifest


def _timed(fn, batch, runs: int = 2) -> float:
    fn(batch)  # warm-up: first runs allocate and pack weights
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        fn(batch)
        best = min(best, time.perf_counter() - t)
    return len(batch) / best


def _contenders(precision: str, auto: bool) -> list[str]:
    """The image towers a run at ``precision`` chooses between by speed, torch first (auto: also int8)."""
    return [f"torch {precision}"] + [f"onnxruntime {k}" for k in ("fp32", "int8")
                                     if k == precision or (auto and k == "int8")]


def recorded_best(manifest: dict, names: list[str], threads: int) -> str | None:
    """The fastest of ``names`` as timed here before (decision_key); None when one of them was not."""
    speeds = (manifest.get("img_s") or {}).get(decision_key(threads)) or {}
    if manifest.get("format") != FORMAT or any(n not in speeds for n in names):
        return None
    return max(names, key=speeds.get)


def measure(encoder, home, towers: list[OrtImageTower]) -> str:
    """Times torch and each of ``towers`` on one probe batch, records the figures (record_speeds) and says the
    choice; returns the fastest one's name."""
    batch = probe_batch(encoder.image_size, 8)
    fns = {encoder.image_tower: lambda b: _torch_features(encoder, b), **{t.describe(): t.encode for t in towers}}
    speeds = {name: round(_timed(fn, batch), 2) for name, fn in fns.items()}
    best = record_speeds(home, encoder.fingerprint, speeds, towers[0].threads)
    say_choice(speeds, best)
    return best


ORT_MIN_RUN = 200  # files a run must have before onnxruntime is exported and timed (auto backend)


def select(encoder, settings, threads: int, files: int | None = None):
    """The image encoder a run uses; ``encoder`` may be shared (a server's queries) and is never changed.

    A torch encoder stays, except on the CPU: int8 runs on onnxruntime (behind the caller's parity gate), fp32
    does with image_backend onnx, or auto where onnxruntime was measured faster; --precision auto also times
    onnxruntime int8. A run of fewer than ORT_MIN_RUN ``files`` does not pay for the first export and timing.
    Without onnxruntime, or when an export fails, torch runs, with one note."""
    mode, precision = settings.image_backend, encoder.precision
    auto = settings.precision == "auto" and mode == "auto"
    if encoder.torch_free or not _ort_may_run(encoder.device, precision, mode, files, auto):
        return encoder
    names, timing = _contenders(precision, auto), False
    if precision == "int8" or mode == "onnx":
        names = names[-1:]
    else:
        best = recorded_best(_read_manifest(export_dir(settings.home, encoder.fingerprint)), names, threads)
        if best == names[0]:
            return encoder
        names, timing = ([best], False) if best else (names[1:], True)
    try:
        if precision == "bf16" and _verified(export_dir(settings.home, encoder.fingerprint), encoder.fingerprint,
                                              "int8")[0] is None:
            # from the checkpoint's tensors where it can (the text export: from the loaded model, index_paths)
            make_exports(settings.with_(precision="int8"), threads, text=False)
        towers = [ensure_export(encoder, settings.home, name.split()[1], threads) for name in names]
    except OnnxUnavailable as e:
        if precision == "int8":
            say_once(f"note: {e}; --precision int8 falls back to torch fp32")
        elif mode == "onnx":
            say_once(f"note: {e}; the image tower runs on torch")
        return encoder
    best = measure(encoder, settings.home, [t for t, _ in towers]) if timing else names[0]
    tower = next((t for t, _ in towers if t.describe() == best), None)  # None: torch measured fastest
    return encoder if tower is None else OrtEncoder(tower, encoder.spec, encoder.fingerprint, tower.kind, encoder.dim,
                                                    encoder.image_size, encoder.preprocess, encoder)


def _ort_may_run(device: str, precision: str, mode: str, files: int | None = None, auto: bool = False) -> bool:
    """Whether onnxruntime is in question at all, before any export or measurement is looked at."""
    small = files is not None and files < ORT_MIN_RUN
    return device == "cpu" and (precision == "int8" or ((precision == "fp32" or auto) and mode != "torch"
                                                        and not (mode == "auto" and small)))


def int8_parity(encoder, tensors) -> tuple[float, np.ndarray, dict]:
    """(min cosine, the int8 features, img/s) of an int8 OrtEncoder against fp32 on the user's decoded images.

    The reference is its fp32 torch encoder, else the fp32 export, run while the int8 session is released (one
    session in memory at a time; ViT-B-32: 0.2 s to load it again), which also times both towers for a
    torch-free auto run. The int8 features are the run's own vectors for those images where int8 passes."""
    batch = np.stack([np.asarray(t, np.float32) for t in tensors])
    speeds, clock = {}, time.perf_counter
    if encoder.torch_encoder is None or encoder.torch_encoder.precision != "fp32":  # bf16 is no fp32 reference
        tower = encoder.image_backend
        tower.session = None
        trim_heap()
        fp32 = OrtImageTower(tower.path.with_name(FP32_FILE), "fp32", tower.threads, once=True)
        t = clock()
        ref = fp32.encode(batch)
        speeds["onnxruntime fp32"] = len(batch) / (clock() - t)
        del fp32
        trim_heap()
        encoder.image_backend.encode(batch[:1])  # the int8 session loaded again before it is timed
    else:
        ref = _torch_features(encoder.torch_encoder, batch)
    t = clock()
    feats = encoder.encode_image_tensors(batch)
    if speeds:
        speeds["onnxruntime int8"] = len(batch) / (clock() - t)
    return float((feats * ref).sum(1).min()), feats, {k: round(v, 2) for k, v in speeds.items()}


def record_speeds(home, fingerprint: str, speeds: dict, threads: int) -> str:
    """Remember towers' img/s measured here (recorded_best reads them); returns the fastest."""
    folder = export_dir(home, fingerprint)
    with contextlib.suppress(OSError), _manifest_lock(folder):  # a cache: the next run measures again
        manifest = _read_manifest(folder)
        if manifest.get("fingerprint") == fingerprint:
            manifest.setdefault("img_s", {}).setdefault(decision_key(threads), {}).update(speeds)
            _write_manifest(folder, manifest)
    return max(speeds, key=speeds.get)


def say_choice(speeds: dict, best: str) -> None:
    timed = ", ".join(f"{n} {v:.1f} img/s" for n, v in speeds.items())
    say_once(f"note: image tower timed on this CPU: {timed}; {best} is used from now on (recorded with the export)")


def trim_heap() -> None:
    """Hand the heap pages a freed onnxruntime session leaves back to the system (glibc keeps them otherwise;
    ViT-B-32 fp32: 550 MB, not all reused). No setting changes; elsewhere than glibc it does nothing."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def _checked_preprocess(encoder) -> dict | None:
    """The model's preprocess_cfg when the numpy preprocess reproduces its torch one on two odd-sized probe
    pictures (so a torch-free run can trust it), else None."""
    from PIL import Image

    from .images import UnsupportedPreprocess, numpy_preprocess, preprocess_cfg_of, tensor_preprocess

    cfg = preprocess_cfg_of(encoder.model)
    try:
        tensor_preprocess(cfg, encoder.preprocess)  # also: its Normalize agrees with the cfg
        pre = numpy_preprocess(cfg)
    except UnsupportedPreprocess:
        return None
    rng = np.random.default_rng(7)
    for w, h in ((517, 333), (301, 613)):
        im = Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))
        ref = encoder.preprocess(im).numpy()
        got = pre(im)
        if got.shape != ref.shape or float(np.abs(got - ref).max()) > PREPROCESS_MAX_DIFF:
            return None
    return {k: v for k, v in cfg.items() if isinstance(v, (int, float, str, list, tuple))}


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"


def decision_key(threads: int) -> str:
    """What a measured speed verdict holds for; from package metadata, not imports (a torch-free run reads it)."""
    return f"{cpu_model()} | {threads} threads | torch {_version('torch')} | ort {_version('onnxruntime')}"


def _recipe_of(entry: dict) -> dict:
    return {k: entry.get(k) for k in INT8_RECIPE}


def _file_id(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _parity_key(home, fingerprint: str, library_id: str | None) -> tuple[Path, dict, str, dict] | None:
    """(export folder, its manifest, library key, what a verdict must match) of the weights' export, or None."""
    if not library_id:
        return None
    folder = export_dir(home, fingerprint)
    try:
        ident = {"recipe": INT8_RECIPE, "int8_file": _file_id(folder / INT8_FILE)}
    except OSError:
        return None
    manifest = _read_manifest(folder)
    return (folder, manifest, str(library_id), ident) if manifest.get("fingerprint") == fingerprint else None


def cached_parity(home, fingerprint: str, library_id: str | None, threshold: float,
                  failed: bool = False) -> dict | None:
    """The int8 parity check recorded for this library, weights and int8 export, when it still clears
    ``threshold`` (``failed``: when it does not); None means measure (again)."""
    found = _parity_key(home, fingerprint, library_id)
    if found is None or found[1].get("format") != FORMAT:
        return None
    _, manifest, key, ident = found
    verdict = (manifest.get("int8_parity") or {}).get(key)
    if not verdict or any(verdict.get(k) != v for k, v in ident.items()):
        return None
    return verdict if (float(verdict.get("min_cosine", -1)) >= threshold) != failed else None


def record_parity(home, fingerprint: str, library_id: str | None, cos: float, images: int) -> None:
    """Remember an int8 parity check: a pass, or a failure where auto fell back to fp32 without torch (auto's
    torch runs and --precision int8 refusals are not cached: the next run measures again)."""
    with contextlib.suppress(OSError), _manifest_lock(export_dir(home, fingerprint)):  # a cache: measured again
        found = _parity_key(home, fingerprint, library_id)
        if found is not None:
            folder, manifest, key, ident = found
            manifest.setdefault("int8_parity", {})[key] = {"min_cosine": cos, "images": images, **ident,
                                                           "measured": time.strftime("%Y-%m-%d")}
            _write_manifest(folder, manifest)


class OrtEncoder:
    """An image encoder whose tower is a verified ONNX export on onnxruntime. Over a loaded ``torch_encoder``
    (select) everything else is that encoder's; without one (torch_free_encoder), no torch import."""

    text_tower = None  # torch-free: the library's text export (torch_free_encoder)

    def __init__(self, tower: OrtImageTower, spec, fingerprint: str, precision: str, dim: int, image_size: int,
                 preprocess, torch_encoder=None):
        self.image_backend, self.image_tower = tower, tower.describe()
        self.spec, self.fingerprint, self.precision, self.device = spec, fingerprint, precision, "cpu"
        self.dim, self.image_size, self.preprocess = int(dim), int(image_size), preprocess
        self.torch_encoder, self.torch_free = torch_encoder, torch_encoder is None
        self.model = getattr(torch_encoder, "model", None)
        self.draft_size = draft_size_for(self.image_size)  # Encoder's: the same decode, the same vectors

    def __getattr__(self, name):  # only for names not set above: the text side, logit_scale, ...
        base = self.__dict__.get("torch_encoder") or self.__dict__.get("text_tower")  # torch-free: the text export
        if base is None or name.startswith("_"):
            raise AttributeError(name)
        return getattr(base, name)

    def encode_image_tensors(self, batch) -> np.ndarray:
        """Preprocessed images (a list, numpy or a CPU torch batch) -> L2-normalised float32 [N, dim]."""
        return self.image_backend.encode(np.stack(batch) if isinstance(batch, (list, tuple)) else batch)

    def encode_images(self, images) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.encode_image_tensors([np.asarray(self.preprocess(im)) for im in images])


def fp32_twin(encoder: OrtEncoder) -> OrtEncoder:
    """A torch-free int8 encoder's fp32 export on onnxruntime, for libraries where int8 fails its parity."""
    tower = OrtImageTower(encoder.image_backend.path.with_name(FP32_FILE), "fp32", encoder.image_backend.threads)
    return OrtEncoder(tower, encoder.spec, encoder.fingerprint, "fp32", encoder.dim, encoder.image_size,
                      encoder.preprocess)


def _no_gpu_without_torch(device: str) -> bool:
    """True when ``device`` certainly resolves to the CPU, decided without importing torch (auto without torch
    is the CPU; with it, auto may pick a GPU only where _gpu_possible)."""
    from .encoder import torch_installed

    return device == "cpu" or (device == "auto" and (not torch_installed() or not _gpu_possible()))


def say_gpu_unused(settings) -> None:
    """Without torch on a machine with a GPU, an index run says once that it encodes on the CPU, and how not to."""
    from .encoder import TORCH_EXTRA, torch_installed

    if settings.device == "auto" and not torch_installed() and _gpu_possible():
        extra = TORCH_EXTRA if sys.platform == "darwin" else TORCH_EXTRA.replace("[torch]", "[gpu]")
        say_once(f"note: this machine has a GPU, but this install has no torch, so images are encoded on the CPU; "
                 f"{extra} encodes on the GPU")


def _gpu_possible() -> bool:
    """A GPU driver is loaded (NVIDIA's /proc and /dev entries, ROCm's /dev/kfd), or this is Apple Silicon."""
    import platform

    return (sys.platform == "darwin" and platform.machine() == "arm64") or \
        any(os.path.exists(p) for p in ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd"))


def _lite_candidate(settings, threads: int) -> tuple[dict | None, str]:
    """What a torch-free run would use, from what is on disk for any library: else (None, why not)."""
    from .encoder import known_fingerprint, pick_precision, resolve_weights, torch_installed
    from .errors import UsageError
    from .modelspec import ModelSpec

    if not _no_gpu_without_torch(settings.device):
        return None, "a GPU may be present" if settings.device == "auto" else f"--device {settings.device}"
    try:
        precision = pick_precision(settings.precision, "cpu")
    except UsageError as e:
        return None, str(e)
    auto = settings.precision == "auto" and settings.image_backend == "auto"
    if not _ort_may_run("cpu", precision, settings.image_backend, auto=auto):
        return None, f"precision {precision} runs on torch"
    spec = ModelSpec(settings.model, settings.pretrained).canonical()
    fingerprint = None
    with contextlib.suppress(OSError):
        fingerprint = known_fingerprint(spec)
    if not torch_installed() and (not fingerprint or fingerprint.startswith("tag:")):
        resolve_weights(spec)  # says what is wrong: no such folder, no weights, a name or tag only open_clip knows
    if not fingerprint:
        return None, "weights fingerprint needs open_clip"
    folder, kind = export_dir(settings.home, fingerprint), precision
    if settings.image_backend != "onnx" and precision != "int8" and torch_installed():
        best = recorded_best(_read_manifest(folder), _contenders(precision, auto), threads)
        if not best or best.startswith("torch"):
            return None, f"onnxruntime not measured faster than torch {precision} here"
        kind = best.split()[1]
    path, manifest, why = _verified(folder, fingerprint, kind)
    if path is None:
        return None, why
    return {"spec": spec, "fingerprint": fingerprint, "precision": kind, "manifest": manifest, "path": path,
            "auto": auto}, "ok"


def prestart_lite(settings, threads: int) -> None:
    """Start loading the session a torch-free run would use (see prestart) before the library is opened."""
    try:
        cand, _ = _lite_candidate(settings, threads)
    except Exception:  # only a head start: torch_free_encoder decides, and says why
        return
    if cand is not None and importlib.util.find_spec("onnxruntime") is not None:
        prestart(cand["path"], threads)


# open_clip's PreprocessCfg() defaults: what it uses where a config names none (tests compare them)
PREPROCESS_DEFAULTS = {"size": 224, "mode": "RGB", "mean": [0.48145466, 0.4578275, 0.40821073],
                       "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic",
                       "resize_mode": "shortest", "fill_color": 0}


def checkpoint_source(spec) -> tuple[dict, dict, Path, Path] | None:
    """(open_clip model config, preprocess config, safetensors file, CLIP BPE table) of ``spec``, read as files
    without importing open_clip: a local-dir folder's; a model name's packaged config and --pretrained file; or
    a Hugging Face repo's (hf-hub: or a modelspec.HUB_TAGS tag), fetched as open_clip would. The BPE table is
    open_clip's own where installed, else the repo's or folder's merges. None when the weights are no
    safetensors file; clipgraph.Unsupported for an unreadable config or table; ModelLoadError for a hub file."""
    from .clipgraph import Unsupported
    from .encoder import CONFIG_FILE, LOCAL_DIR, _local_weights
    from .modelspec import hub_repo, looks_like_file
    from .textfast import MERGES

    where = importlib.util.find_spec("open_clip")  # the package folder, found without importing it
    package = Path(list(where.submodule_search_locations)[0]) if where else None
    local, repo = spec.name.startswith(LOCAL_DIR), hub_repo(spec)
    if repo:
        weights, config_file, merges = _hub_files(repo, spec.label)
    elif not local and spec.pretrained and not looks_like_file(spec.pretrained):
        raise Unsupported(f"open_clip resolves the tag {spec.pretrained!r}")  # without torch: resolve_weights refused
    else:
        try:
            weights = _local_weights(Path(spec.name[len(LOCAL_DIR):])) if local else Path(spec.pretrained or "")
        except OSError:
            return None
        config_file = weights and (weights.parent / CONFIG_FILE if local else
                                   package and package / "model_configs" / f"{spec.name}.json")
        merges = weights and weights.parent / "merges.txt"
    if weights is None or weights.suffix != ".safetensors" or not weights.is_file():
        return None
    if config_file is None:
        raise Unsupported(f"the config of {spec.name} comes with open_clip")
    try:
        config = read_json(Path(config_file).read_text(encoding="utf-8"))
        config = config if local or repo else {"model_cfg": config}
        model_cfg, pre = config["model_cfg"], config.get("preprocess_cfg") or {}
        if not isinstance(model_cfg, dict) or not isinstance(pre, dict):
            raise TypeError("not a JSON object")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise Unsupported(f"no readable open_clip config ({type(e).__name__})") from None
    bpe = package / MERGES if package else merges
    if bpe is None or not bpe.is_file():
        raise Unsupported("no merges.txt, CLIP's BPE table, beside the weights: open_clip would provide it")
    return model_cfg, pre, weights, bpe


def _hub_files(repo: str, label: str) -> tuple[Path, Path, Path | None]:
    """(weights, config, CLIP's BPE merges or None) of an open_clip model's Hugging Face repo, from
    huggingface_hub's cache, fetched there first when the hub can be reached."""
    from huggingface_hub import hf_hub_download

    from .encoder import CONFIG_FILE, _hub_offline, _hub_weights, _short
    from .errors import ModelLoadError

    offline = _hub_offline()
    try:
        weights, config = Path(_hub_weights(repo)), Path(hf_hub_download(repo, CONFIG_FILE, local_files_only=offline))
    except Exception as e:  # offline without a cached copy, an unknown repo, a failed download
        where = "no cached copy and the hub is unreachable" if offline else _short(e)
        raise ModelLoadError(f"cannot get the weights of {label} from Hugging Face ({repo}: {where}); connect to "
                             "the internet once so they are cached, or use --model local-dir:/path") from None
    for name in ("merges.txt", "tokenizer.json"):  # CLIP's BPE merges, in either of the hub's layouts
        with contextlib.suppress(Exception):
            return weights, config, Path(hf_hub_download(repo, name, local_files_only=offline))
    return weights, config, None


def make_exports(settings, threads: int, text: bool = True) -> str:
    """The image export (fp32, and int8 for an int8 run) and (``text``) the text export of a safetensors
    checkpoint, made without torch or open_clip where missing; "ok", else why not (the caller loads torch,
    which makes them; a reason is noted once on stderr).

    Graphs come from the tensors (clipgraph) and the open_clip config (refused where it does not fit them);
    each export is checked against the tower computed in numpy (textfast.reference_features): "checked": "numpy".
    """
    from . import clipgraph, textfast
    from .encoder import known_fingerprint, pick_precision, torch_installed
    from .errors import UsageError
    from .images import UnsupportedPreprocess, numpy_preprocess
    from .modelspec import ModelSpec

    spec = ModelSpec(settings.model, settings.pretrained).canonical()
    try:
        precision = pick_precision(settings.precision, "cpu")
    except UsageError as e:
        return str(e)
    if precision not in ("int8", "fp32") or (precision == "fp32" and settings.image_backend != "onnx"
                                             and torch_installed()):
        return f"{precision} {settings.image_backend} runs are not made without torch"
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed"  # the torch run says so
    try:
        source = checkpoint_source(spec)
        if source is None:
            return "the weights are not a safetensors file"
        model_cfg, pre, weights, bpe = source
        # Each step maps the file anew, so its pages leave the process before the checks' sessions load.
        fingerprint, tensors = known_fingerprint(spec), lambda: clipgraph.Checkpoint(weights)
        facts = clipgraph.config_facts(model_cfg, "visual")
        clipgraph.check_config(model_cfg, tensors())
        given = {k: v for k, v in pre.items() if k in PREPROCESS_DEFAULTS and v is not None}
        preprocess = {**PREPROCESS_DEFAULTS, **given, "size": [facts["image_size"]] * 2}
        numpy_preprocess(preprocess)
        print(f"note: making the ONNX and text exports of {spec.label} from its tensors (once, without torch)",
              file=sys.stderr)
        reference = lambda probe: _normalised(textfast.reference_features(tensors(), facts, "visual", probe))  # noqa
        _ensure_files(export_dir(settings.home, fingerprint), fingerprint, spec.label, facts["image_size"],
                      precision, threads, lambda p, int8: clipgraph.write_image_graph(tensors(), facts, p, OPSET, int8),
                      reference, "numpy", lambda: {"dim": int(tensors().shape_of("visual.proj")[1]),
                                                   "preprocess": preprocess})
        if text and not (textfast.export_dir(settings.home, fingerprint) / textfast.MANIFEST).is_file():
            textfast.export_from_checkpoint(settings.home, fingerprint, spec.label, model_cfg, tensors(), bpe)
            trim_heap()
        return "ok"
    except (clipgraph.Unsupported, UnsupportedPreprocess, textfast.ExportError, OnnxUnavailable) as e:
        why = str(e)
    except (OSError, ValueError, KeyError, TypeError) as e:  # damaged checkpoint, config or export: torch says more
        why = f"{type(e).__name__}: {str(e)[:120]}"
    if torch_installed():
        say_once(f"note: cannot make the exports of {spec.label} without torch ({why}); this run loads torch")
    return why


def torch_free_encoder(settings, library_id: str | None, threads: int, make: bool = True,
                       once: bool = False) -> tuple[OrtEncoder | None, str]:
    """An OrtEncoder without torch when this run can index without torch, else (None, why not).

    Needs the CPU, fp32 or int8, the weights fingerprint known without the model, a verified export (made first
    for a safetensors checkpoint: make_exports), onnxruntime chosen for fp32, and the text export. An int8 run
    without a parity verdict for this library measures it (the indexer)."""
    from . import textfast
    from .encoder import torch_installed

    cand, why = _lite_candidate(settings, threads)
    text_dir = textfast.export_dir(settings.home, cand["fingerprint"]) if cand else None
    if make and why in ("no image export for these weights", "image export not verified", "no int8 export",
                        "export file missing") or (make and cand and not (text_dir / textfast.MANIFEST).is_file()):
        made = make_exports(settings, threads)
        if made != "ok":
            return None, why if cand is None and torch_installed() else made
        cand, why = _lite_candidate(settings, threads)
    if cand is None:
        return None, why
    fingerprint, threshold = cand["fingerprint"], settings.int8_min_cosine
    passed = cached_parity(settings.home, fingerprint, library_id, threshold) if cand["precision"] == "int8" else None
    if cand["auto"] and cand["precision"] == "int8":
        if not torch_installed():  # the run's parity gate checks int8 against the fp32 export, else fp32 runs
            towers = ["onnxruntime fp32", "onnxruntime int8"]  # timed on a parity pass (indexer)
            if (passed is None and cached_parity(settings.home, fingerprint, library_id, threshold, failed=True)) \
                    or recorded_best(cand["manifest"], towers, threads) == towers[0]:
                cand["precision"], cand["path"] = "fp32", cand["path"].with_name(FP32_FILE)
        elif passed is None:
            return None, "int8 not yet checked against fp32 on this library's images"  # the torch run checks it
    try:
        text = textfast.TextTower(textfast.export_dir(settings.home, fingerprint), fingerprint)
    except (textfast.ExportError, OSError, ValueError, KeyError):
        return None, "no verified text export yet"
    # an int8 tower whose parity this run measures first loads its session after that pass, once
    lazy = cand["precision"] == "int8" and passed is None
    try:
        tower = OrtImageTower(cand["path"], cand["precision"], threads, once, lazy)
    except OnnxUnavailable as e:
        return None, str(e)
    except Exception as e:  # a damaged file: torch rebuilds it
        return None, f"export unreadable ({type(e).__name__})"
    from .images import numpy_preprocess

    manifest = cand["manifest"]
    enc = OrtEncoder(tower, cand["spec"], fingerprint, cand["precision"], manifest["dim"], manifest["input_size"],
                     numpy_preprocess(manifest["preprocess"]))
    enc.text_tower = text  # encode_texts, logit_scale: the one text encoder the library's queries use
    return enc, "ok"


def query_encoder(settings, threads: int, make: bool = True) -> OrtEncoder:
    """The torch-free encoder of image queries, CLIP scores, file tags and eval (fp32, or int8 where asked for;
    exports made where missing, with ``make``); ModelLoadError says why there is none."""
    from .encoder import needs_torch
    from .errors import ModelLoadError
    from .modelspec import ModelSpec

    precision = "int8" if settings.precision == "int8" else "fp32"
    # weights left unpacked (once): a query's few images run as fast, in 30% less memory (ViT-B-32: 374 MB)
    enc, why = torch_free_encoder(settings.with_(precision=precision, image_backend="onnx"), None, threads, make,
                                  once=True)
    if enc is None:
        spec = ModelSpec(settings.model, settings.pretrained)
        raise ModelLoadError(needs_torch(f"encoding images here ({why})", spec))
    return enc
