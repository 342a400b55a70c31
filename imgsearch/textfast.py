"""Text tower without torch: an exported, verified copy of a CLIP text tower run in numpy on mmap'd weights.

A cold `imgsearch query` spent seconds importing torch and open_clip to encode five words. Instead, once per
model (keyed by its weights fingerprint) the text tower is written to
``<home>/exports/<fingerprint>/text/`` as one raw float32 file plus a JSON manifest and the BPE merges file.
The forward pass maps the file read-only: the 49408-row token table is only touched at the rows a query
uses, and the transformer runs on the used positions only (causal attention pooled at end-of-text, so
padding never matters). Before an export is used it is checked against the torch tower on hard prompts
(identical token ids, cosine >= MIN_COSINE); the manifest records the result and an unverified or damaged
export is never used. Importing this module costs numpy and nothing else.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

FORMAT = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.f32"
MERGES = "bpe_simple_vocab_16e6.txt.gz"
MIN_COSINE = 0.9999
BATCH = 32  # texts per forward chunk: bounds the [B*n, 4*width] MLP activations for long label lists

# Prompts the export must reproduce exactly: long (truncated at the context length), unicode, emoji,
# accents, CJK, empty-ish, HTML entities, control characters, contractions, digits, special-token text.
PARITY_PROMPTS = [
    "a red car", "a photo of a dog", "", " ", "   \t\n ", "A Red CAR!!!", "it's a dog's life, isn't it? we'll see",
    "café crème brûlée naïve façade", "東京の夜景", "猫と犬 and a 🐶🐱 on the sofa 🛋️", "emoji only 😀😃😄",
    "Tom &amp; Jerry &lt;3 &quot;quoted&quot; &#39;x&#39;", "ctrl\x00chars\x07and\x1b[31mcolour\r\nline",
    "fi ligature ﬁne and ｆｕｌｌｗｉｄｔｈ", "â€œmojibakeâ€\x9d text", "1234567890 3.14 2024-01-01",
    "<start_of_text> literal <end_of_text>", "Ελληνικά και русский текст", "x" * 300,
    " ".join(["a photo of a very long sentence that keeps going"] * 12),
    "a" + " b" * 200, "tab\tseparated\twords", "UPPER lower MiXeD", "#hashtag @mention http://example.com/a?b=c",
]


class ExportError(Exception):
    """The export is missing, damaged, unverified or does not fit this model."""


def export_dir(home: str | os.PathLike, fingerprint: str) -> Path:
    from .config import model_exports_dir

    return model_exports_dir(home, fingerprint) / "text"


# --- numpy forward ---------------------------------------------------------------------------------
def _erf(x: np.ndarray) -> np.ndarray:
    """erf with |error| < 1.2e-7 (Numerical Recipes' erfc Chebyshev fit); numpy has none, scipy costs an import."""
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277))))))))
    erfc = t * np.exp(poly)
    return np.where(x >= 0, 1.0 - erfc, erfc - 1.0).astype(x.dtype, copy=False)


def _act(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "quick_gelu":  # OpenAI's CLIP weights were trained with it
        return x / (1.0 + np.exp(-1.702 * x))
    if kind == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1.0 + _erf(x * (1.0 / math.sqrt(2.0))))


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    xc = x - mu
    var = (xc * xc).mean(-1, keepdims=True)
    return xc / np.sqrt(var + eps) * w + b


class TextTower:
    """A verified export, memory-mapped; ``encode(texts)`` returns L2-normalised float32 [N, dim]."""

    def __init__(self, folder: str | os.PathLike, fingerprint: str):
        folder = Path(folder)
        try:
            meta = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ExportError("text encoder export missing; `imgsearch index` or this query makes it") from None
        except (OSError, ValueError) as e:
            raise ExportError(f"no readable manifest ({e.__class__.__name__})") from None
        if meta.get("format") != FORMAT or meta.get("fingerprint") != fingerprint:
            raise ExportError("manifest is for another format or other weights")
        if not meta.get("verified") or "logit_scale" not in meta:
            raise ExportError(meta.get("reason") or f"export failed verification against torch: {meta.get('parity')}")
        total = int(meta["floats"])
        path = folder / WEIGHTS
        try:
            size = path.stat().st_size
        except OSError:
            raise ExportError("weights file missing") from None
        if size != 4 * total:
            raise ExportError(f"weights file has {size} bytes, expected {4 * total} (damaged or truncated)")
        from .bpe import MERGES_TXT, VOCAB_TXT

        if not ((folder / MERGES_TXT).is_file() and (folder / VOCAB_TXT).is_file()):
            raise ExportError("tokenizer tables missing")
        self.meta = meta
        self.folder = folder
        flat = np.memmap(path, dtype="<f4", mode="r", shape=(total,))
        self._w = {name: flat[off:off + int(np.prod(shape))].reshape(shape)
                   for name, (off, shape) in meta["arrays"].items()}
        self.dim = int(meta["dim"])
        self._tok = None

    @property
    def tokenizer(self):
        if self._tok is None:
            from . import bpe

            self._tok = bpe.load(str(self.folder), int(self.meta["context_length"]))
        return self._tok

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale) of the model, for zero-shot probabilities (classify) without torch."""
        return float(self.meta["logit_scale"])

    def encode_texts(self, texts: list[str], lang: str | None = None, default_lang: str | None = None) -> np.ndarray:
        """Same contract as Encoder.encode_texts, so zeroshot.label_embeddings takes either."""
        return self.encode(list(texts), lang, default_lang)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(list(texts))

    def encode(self, texts: list[str], lang: str | None = None, default_lang: str | None = None) -> np.ndarray:
        """CLIP's BPE tower reads no language token: ``lang`` is accepted for the common contract."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        rows = self.tokenize(texts)
        out = [self._forward(rows[i:i + BATCH]) for i in range(0, len(rows), BATCH)]
        return np.concatenate(out)

    def _forward(self, rows: list[list[int]]) -> np.ndarray:
        m, w = self.meta, self._w
        n = max(len(r) for r in rows)
        ids = np.zeros((len(rows), n), dtype=np.int64)  # 0-padded like open_clip; causal attention ignores it
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
        used, inverse = np.unique(ids, return_inverse=True)
        table = np.asarray(w["token_embedding"][used], dtype=np.float32)  # copies only the used rows
        x = table[inverse.reshape(ids.shape)] + w["positional_embedding"][:n]
        heads, eps, act = int(m["heads"]), float(m["eps"]), m["act"]
        b, width = x.shape[0], x.shape[2]
        hd = width // heads
        # Linear layers run as one 2-D [B*n, width] GEMM: numpy's stacked 3-D matmul was 10x slower here.
        x = np.ascontiguousarray(x.reshape(b * n, width), dtype=np.float32)
        mask = np.triu(np.full((n, n), -np.inf, dtype=np.float32), 1)
        scale = np.float32(1.0 / math.sqrt(hd))
        for li in range(int(m["layers"])):
            p = f"l{li}."
            h = _layer_norm(x, w[p + "ln_1.w"], w[p + "ln_1.b"], eps)
            qkv = np.dot(h, w[p + "in_proj.w"]) + w[p + "in_proj.b"]
            qkv = qkv.reshape(b, n, 3, heads, hd).transpose(2, 0, 3, 1, 4)  # 3, B, H, n, hd
            q, k, v = qkv[0] * scale, qkv[1], qkv[2]
            att = np.einsum("bhqd,bhkd->bhqk", q, k) + mask
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            o = np.einsum("bhqk,bhkd->bqhd", att, v).reshape(b * n, width)
            o = np.dot(o, w[p + "out_proj.w"]) + w[p + "out_proj.b"]
            if p + "ls_1" in w:
                o = o * w[p + "ls_1"]
            x = x + o
            h = _layer_norm(x, w[p + "ln_2.w"], w[p + "ln_2.b"], eps)
            h = _act(np.dot(h, w[p + "c_fc.w"]) + w[p + "c_fc.b"], act)
            h = np.dot(h, w[p + "c_proj.w"]) + w[p + "c_proj.b"]
            if p + "ls_2" in w:
                h = h * w[p + "ls_2"]
            x = x + h
        x = x.reshape(b, n, width)
        x = _layer_norm(x, w["ln_final.w"], w["ln_final.b"], eps)
        if m["pool"] == "argmax":
            pos = ids.argmax(-1)
        else:  # "eos": first end-of-text token
            pos = (ids == int(m["eos_id"])).argmax(-1)
        x = x[np.arange(b), pos]
        if "proj.w" in w:
            x = x @ w["proj.w"]
            if "proj.b" in w:
                x = x + w["proj.b"]
        x = x.astype(np.float32, copy=False)
        norm = np.linalg.norm(x, axis=-1, keepdims=True)
        return x / np.maximum(norm, 1e-12)


_towers: dict[tuple[str, str], TextTower] = {}


def load_tower(folder: str | os.PathLike, fingerprint: str):
    """The verified export in ``folder``: CLIP's BPE tower in numpy, or a Hugging Face tower (textort)."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = {}
    if isinstance(meta, dict) and meta.get("kind") is not None:
        from . import textort

        if meta.get("kind") != textort.KIND or meta.get("fingerprint") != fingerprint:
            raise ExportError("manifest is for another kind of tower or other weights")
        try:
            return textort.open_export(folder, meta)
        except textort.TowerError as e:
            raise ExportError(str(e)) from None
    return TextTower(folder, fingerprint)


def open_tower(home: str | os.PathLike, fingerprint: str) -> TextTower:
    key = (str(home), fingerprint)
    tower = _towers.get(key)
    if tower is None:
        tower = _towers[key] = load_tower(export_dir(home, fingerprint), fingerprint)
    return tower


_warned: set[str] = set()


def warn_once(label: str, reason: str) -> None:
    """One line on stderr per model and process when the torch fallback is taken."""
    if label in _warned:
        return
    _warned.add(label)
    print(f"note: fast text encoder for {label} not usable ({reason}); using torch (slower start)", file=sys.stderr)


# --- export (needs torch; runs at the end of an index run or after a torch-encoded query) --------------------
def _describe(model, tokenizer) -> tuple[dict, list[tuple[str, np.ndarray]]]:
    """Architecture facts and the arrays to write (clipgraph.text_weights over the model's state dict), or
    ExportError when this text tower or its tokenizer is not plain CLIP."""
    from open_clip import tokenizer as oc_tok

    from . import clipgraph

    if not isinstance(tokenizer, oc_tok.SimpleTokenizer) or tokenizer.reduction_fn is not None:
        raise ExportError(f"tokenizer {type(tokenizer).__name__} is not CLIP's BPE tokenizer")
    if tokenizer.clean_fn is not oc_tok._clean_lower or len(tokenizer.all_special_ids) != 2:
        raise ExportError("tokenizer uses non-default cleaning or extra special tokens")
    try:
        facts, arrays = clipgraph.text_weights(clipgraph.state_arrays(model), clipgraph.model_facts(model, "text"))
    except clipgraph.Unsupported as e:
        raise ExportError(str(e)) from None
    facts.update(context_length=int(tokenizer.context_length), eos_id=int(tokenizer.eot_token_id),
                 sot_id=int(tokenizer.sot_token_id))
    return facts, arrays


def build_export(home: str | os.PathLike, encoder) -> Path:
    """Write and verify the text export for ``encoder`` (a loaded torch Encoder); returns its folder.

    A failed verification is recorded (verified: false) so it is not retried on every run; any other
    problem raises ExportError and leaves nothing behind.
    """
    import torch
    from open_clip import tokenizer as oc_tok

    if encoder.precision != "fp32":
        raise ExportError("the export is made from an fp32 model only")
    from . import textort

    if textort.is_hf_tower(encoder):
        try:
            return textort.build_export(export_dir(home, encoder.fingerprint), encoder, PARITY_PROMPTS)
        except textort.TowerError as e:
            raise ExportError(str(e)) from None
    final = export_dir(home, encoder.fingerprint)
    model = encoder.model
    try:
        facts, tensors = _describe(model, encoder.tokenizer)
    except ExportError as e:
        # Record "not supported" so later runs do not retry (and do not repeat the note) for these weights.
        final.mkdir(parents=True, exist_ok=True)
        (final / MANIFEST).write_text(json.dumps({"format": FORMAT, "fingerprint": encoder.fingerprint,
                                                  "verified": False, "reason": str(e)}), encoding="utf-8")
        raise
    bpe_src = Path(oc_tok.default_bpe())
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".text.", dir=final.parent))
    try:
        arrays, off = {}, 0
        with open(tmp / WEIGHTS, "wb") as f:
            for name, ten in tensors:
                a = np.ascontiguousarray(ten, "<f4")
                a.tofile(f)
                arrays[name] = [off, list(a.shape)]
                off += a.size
        shutil.copyfile(bpe_src, tmp / MERGES)
        from .bpe import write_tables

        write_tables(bpe_src, tmp)
        dim = int(tensors[-1][1].shape[-1]) if tensors[-1][0].startswith("proj") else facts["width"]
        meta = {"format": FORMAT, "fingerprint": encoder.fingerprint, "model": encoder.spec.label, **facts,
                "dim": dim, "floats": off, "arrays": arrays, "verified": True,
                "logit_scale": float(encoder.logit_scale)}
        (tmp / MANIFEST).write_text(json.dumps(meta), encoding="utf-8")
        # Verify against the torch tower in fp32 (a bf16 encoder's own output is not the reference).
        tower = TextTower(tmp, encoder.fingerprint)
        ours = tower.tokenize(PARITY_PROMPTS)
        ref = encoder.tokenizer(PARITY_PROMPTS)
        ours_padded = [r + [0] * (ref.shape[1] - len(r)) for r in ours]
        same_ids = ours_padded == ref.tolist()
        with torch.inference_mode():
            ids = torch.tensor(ours_padded, dtype=torch.long)
            want = torch.nn.functional.normalize(encoder._text_forward(ids.to(encoder.device)).float(), dim=-1)
            want = want.cpu().numpy()
        got = tower.encode(PARITY_PROMPTS)
        cos = float(np.min(np.sum(got * want, axis=1)))
        meta.update(verified=bool(same_ids and cos >= MIN_COSINE), parity={
            "prompts": len(PARITY_PROMPTS), "token_ids_identical": same_ids, "min_cosine": round(cos, 7)})
        (tmp / MANIFEST).write_text(json.dumps(meta), encoding="utf-8")
        if final.exists():  # made by an earlier or concurrent run; ours is the same weights, keep theirs
            shutil.rmtree(tmp)
            return final
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def ensure_export(home: str | os.PathLike, encoder, quiet: bool = False) -> Path | None:
    """Make the text export for this model if it is missing or unusable; never raises (the fast path is
    an optimisation). Returns the folder when a verified export exists afterwards."""
    try:
        folder = export_dir(home, encoder.fingerprint)
        try:
            load_tower(folder, encoder.fingerprint)
            return folder
        except ExportError:
            pass
        manifest = folder / MANIFEST
        if manifest.is_file():
            old = json.loads(manifest.read_text(encoding="utf-8"))
            if old.get("fingerprint") == encoder.fingerprint and old.get("format") == FORMAT \
                    and old.get("verified") is False:
                return None  # verified once and failed: do not pay for it again on every run
            # Damaged export of ours (manifest names these weights): replace it.
            if old.get("fingerprint") == encoder.fingerprint:
                shutil.rmtree(folder)
        if encoder.precision != "fp32" or not str(encoder.device).startswith("cpu"):
            from . import encoder as encoder_mod

            encoder = encoder_mod.build(encoder.spec, "cpu", "fp32")
        try:
            build_export(home, encoder)
        except ExportError as e:
            if not folder.exists():  # record "not supported" so later runs neither retry nor repeat the note
                folder.mkdir(parents=True, exist_ok=True)
                (folder / MANIFEST).write_text(json.dumps({"format": FORMAT, "fingerprint": encoder.fingerprint,
                                                           "verified": False, "reason": str(e)}), encoding="utf-8")
            raise
        load_tower(folder, encoder.fingerprint)
        return folder
    except Exception as e:  # noqa: BLE001 - any failure only means "no fast path"
        if not quiet:
            label = getattr(getattr(encoder, "spec", None), "label", "this model")
            print(f"note: no fast text encoder for {label}: {e}; text queries will load torch", file=sys.stderr)
        return None
