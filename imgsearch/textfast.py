"""Text towers without torch: a verified export of the model's text tower, made once per weights fingerprint.

A cold `imgsearch query` spent seconds importing torch and open_clip to encode five words. The text tower is
exported to ``<home>/exports/<fingerprint>/text/`` with a JSON manifest recording its check against the torch
tower on hard prompts (identical token ids, cosine >= MIN_COSINE, in two languages where the tokenizer takes
one); an unverified or damaged export is never used. Two kinds:

- CLIP's BPE transformer (TextTower): one memory-mapped float32 file run in numpy (only the token table rows
  a query uses are touched), on the used positions only (causal attention pooled at end-of-text).
- A Hugging Face tower (OrtTextTower; XLM-R, NLLB, BERT-style): ONNX on onnxruntime, tokenized by the
  `tokenizers` package from tokenizer.json.

Importing this module costs numpy and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from .bpe import MERGES

FORMAT = 1
HF_KIND = "hf-onnx"  # the manifest's "kind" of a Hugging Face tower; CLIP's BPE tower has none
MANIFEST = "manifest.json"
WEIGHTS = "weights.f32"
ONNX_FILE = "text.onnx"
TOKENIZER_FILE = "tokenizer.json"
MIN_COSINE = 0.9999
OPSET = 17
BATCH = 32  # texts per forward chunk: bounds the [B*n, 4*width] MLP activations for long label lists
_LANG_SLOT = -1  # where the language token goes in a recorded special-token template

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


def _read_manifest(folder: Path) -> dict:
    """The manifest in ``folder``; ExportError saying why there is no readable one."""
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError("text encoder export missing; `imgsearch index` or this query makes it") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"no readable manifest ({e.__class__.__name__})") from None


def _padded(rows: list[list[int]], pad: int) -> np.ndarray:
    ids = np.full((len(rows), max(len(r) for r in rows)), pad, dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    return ids


def _normalised(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class _Tower:
    """A verified export of ``KIND`` in ``folder`` with Encoder's text contract (``encode_texts``,
    ``logit_scale``), so search and zeroshot take either."""

    KIND: str | None = None

    def __init__(self, folder: str | os.PathLike, fingerprint: str):
        self.folder = Path(folder)
        meta = _read_manifest(self.folder)
        want = (FORMAT, fingerprint, self.KIND)
        if (meta.get("format"), meta.get("fingerprint"), meta.get("kind")) != want:
            raise ExportError("manifest is for another format, kind of tower or other weights")
        if not meta.get("verified") or "logit_scale" not in meta:
            raise ExportError(meta.get("reason") or f"export failed verification against torch: {meta.get('parity')}")
        self.meta = meta
        self.dim = int(meta["dim"])

    @property
    def logit_scale(self) -> float:
        return float(self.meta["logit_scale"])  # exp(logit_scale), for classify's probabilities

    def encode(self, texts: list[str], lang: str | None = None, default_lang: str | None = None) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._encode(self.tokenize(texts, lang, default_lang))

    encode_texts = encode


# --- CLIP's BPE tower in numpy -----------------------------------------------------------------------
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


def reference_features(arrays, facts: dict, tower: str, inputs) -> np.ndarray:
    """A plain CLIP tower's unnormalised features straight from its state-dict tensors (open_clip's names and
    layouts, none of an export's): the independent check of an export made without torch. ``inputs``:
    normalised pixels [n, 3, S, S] for ``tower`` "visual", token id rows for "text"."""
    p = "visual." if tower == "visual" else ""
    eps, act, heads = float(facts["eps"]), facts["act"], int(facts["heads"])
    mask = np.float32(0)
    if tower == "visual":
        conv = arrays[p + "conv1.weight"]
        width, patch = conv.shape[0], conv.shape[2]
        n, c, size, _ = inputs.shape
        g = size // patch
        x = inputs.reshape(n, c, g, patch, g, patch).transpose(0, 2, 4, 1, 3, 5).reshape(n, g * g, -1)
        x = x @ np.asarray(conv, np.float32).reshape(width, -1).T
        x = np.concatenate([np.broadcast_to(arrays[p + "class_embedding"], (n, 1, width)), x], 1)
        x = _layer_norm(x + arrays[p + "positional_embedding"], arrays[p + "ln_pre.weight"], arrays[p + "ln_pre.bias"], eps)
    else:
        ids = _padded(inputs, 0)
        x = np.asarray(arrays["token_embedding.weight"])[ids] + arrays["positional_embedding"][:ids.shape[1]]
        mask = np.triu(np.full((ids.shape[1],) * 2, -np.inf, np.float32), 1)
    n, t, width = x.shape
    layers = sum(1 for k in arrays if k.startswith(p + "transformer.resblocks.") and k.endswith(".ln_1.weight"))
    for i in range(layers):
        w = lambda k: arrays[f"{p}transformer.resblocks.{i}.{k}"]  # noqa: E731
        gamma = lambda k: arrays.get(f"{p}transformer.resblocks.{i}.{k}", 1.0)  # noqa: E731 - layer scale
        q, k, v = (z.reshape(n, t, heads, -1).transpose(0, 2, 1, 3) for z in np.split(
            _layer_norm(x, w("ln_1.weight"), w("ln_1.bias"), eps) @ w("attn.in_proj_weight").T
            + w("attn.in_proj_bias"), 3, axis=-1))
        a = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1]) + mask
        a = np.exp(a - a.max(-1, keepdims=True))
        o = ((a / a.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(n, t, width)
        x = x + (o @ w("attn.out_proj.weight").T + w("attn.out_proj.bias")) * gamma("ls_1.gamma")
        h = _act(_layer_norm(x, w("ln_2.weight"), w("ln_2.bias"), eps) @ w("mlp.c_fc.weight").T + w("mlp.c_fc.bias"), act)
        x = x + (h @ w("mlp.c_proj.weight").T + w("mlp.c_proj.bias")) * gamma("ls_2.gamma")
    if tower == "visual":
        return _layer_norm(x[:, 0], arrays[p + "ln_post.weight"], arrays[p + "ln_post.bias"], eps) @ arrays[p + "proj"]
    x = _layer_norm(x, arrays["ln_final.weight"], arrays["ln_final.bias"], eps)[np.arange(n), ids.argmax(-1)]
    if "text_projection" in arrays:
        return x @ arrays["text_projection"]
    if "text_projection.weight" in arrays:
        return x @ arrays["text_projection.weight"].T + arrays.get("text_projection.bias", 0.0)
    return x


class TextTower(_Tower):
    """CLIP's BPE text tower in numpy on the memory-mapped weights file; reads no language token."""

    def __init__(self, folder: str | os.PathLike, fingerprint: str):
        super().__init__(folder, fingerprint)
        total = int(self.meta["floats"])
        path = self.folder / WEIGHTS
        try:
            size = path.stat().st_size
        except OSError:
            raise ExportError("weights file missing") from None
        if size != 4 * total:
            raise ExportError(f"weights file has {size} bytes, expected {4 * total} (damaged or truncated)")
        from .bpe import MERGES_TXT, VOCAB_TXT

        if not ((self.folder / MERGES_TXT).is_file() and (self.folder / VOCAB_TXT).is_file()):
            raise ExportError("tokenizer tables missing")
        flat = np.memmap(path, dtype="<f4", mode="r", shape=(total,))
        self._w = {name: flat[off:off + int(np.prod(shape))].reshape(shape)
                   for name, (off, shape) in self.meta["arrays"].items()}
        self._tok = None

    def tokenize(self, texts: list[str], lang: str | None = None, default_lang: str | None = None) -> list[list[int]]:
        if self._tok is None:
            from . import bpe

            self._tok = bpe.load(str(self.folder), int(self.meta["context_length"]))
        return self._tok(list(texts))

    def _encode(self, rows: list[list[int]]) -> np.ndarray:
        return np.concatenate([self._forward(rows[i:i + BATCH]) for i in range(0, len(rows), BATCH)])

    def _forward(self, rows: list[list[int]]) -> np.ndarray:
        m, w = self.meta, self._w
        ids = _padded(rows, 0)  # 0-padded like open_clip; causal attention ignores it
        n = ids.shape[1]
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
            x = x + (o * w[p + "ls_1"] if p + "ls_1" in w else o)  # layer scale
            h = _layer_norm(x, w[p + "ln_2.w"], w[p + "ln_2.b"], eps)
            h = _act(np.dot(h, w[p + "c_fc.w"]) + w[p + "c_fc.b"], act)
            h = np.dot(h, w[p + "c_proj.w"]) + w[p + "c_proj.b"]
            x = x + (h * w[p + "ls_2"] if p + "ls_2" in w else h)
        x = x.reshape(b, n, width)
        x = _layer_norm(x, w["ln_final.w"], w["ln_final.b"], eps)
        # "argmax": the highest id (end-of-text); "eos": the first end-of-text token
        x = x[np.arange(b), (ids if m["pool"] == "argmax" else ids == int(m["eos_id"])).argmax(-1)]
        if "proj.w" in w:
            x = x @ w["proj.w"] + w.get("proj.b", 0)
        return _normalised(x)


# --- a Hugging Face tower on onnxruntime -------------------------------------------------------------
class OrtTextTower(_Tower):
    """A Hugging Face text tower exported to ONNX, tokenized as open_clip's HFTokenizer does."""

    KIND = HF_KIND

    def __init__(self, folder: str | os.PathLike, fingerprint: str):
        super().__init__(folder, fingerprint)
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ExportError(f"{e.name} is not installed (pip install 'imgsearch[multilingual]')") from None
        for name in (ONNX_FILE, TOKENIZER_FILE):
            if not (self.folder / name).is_file():
                raise ExportError(f"{name} missing from the export")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1  # a handful of tokens: a thread pool costs more than it saves
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.folder / ONNX_FILE), opts, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(self.folder / TOKENIZER_FILE))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()

    def tokenize(self, texts: list[str], lang: str | None = None, default_lang: str | None = None) -> list[list[int]]:
        """Token ids as open_clip's HFTokenizer makes them (before padding)."""
        from .bpe import clean_whitespace
        from .lang import query_language

        m = self.meta
        prefix, suffix = m["prefix"], m["suffix"]
        room = int(m["context_length"]) - len(prefix) - len(suffix)
        langs = [query_language(t, lang, default_lang) if m.get("lang_ids") else None for t in texts]
        encoded = self.tokenizer.encode_batch([clean_whitespace(t) for t in texts], add_special_tokens=False)
        out = []
        for enc, code in zip(encoded, langs):
            slot = int(m["lang_ids"].get(code, m["lang_ids"].get("eng_Latn", 0))) if code else None
            out.append([slot if t == _LANG_SLOT else t for t in [*prefix, *enc.ids[:max(room, 0)], *suffix]])
        return out

    def _encode(self, rows: list[list[int]]) -> np.ndarray:
        # Padding is masked and positions are absolute: the used length suffices.
        return _normalised(self.session.run(None, {"input_ids": _padded(rows, int(self.meta["pad_id"]))})[0])


_towers: dict[tuple[str, str], _Tower] = {}


def load_tower(folder: str | os.PathLike, fingerprint: str) -> _Tower:
    """The verified export in ``folder``, of whichever kind its manifest names."""
    try:
        hf = _read_manifest(Path(folder)).get("kind") == HF_KIND
    except ExportError:
        hf = False  # TextTower words why
    return (OrtTextTower if hf else TextTower)(folder, fingerprint)


def open_tower(home: str | os.PathLike, fingerprint: str) -> _Tower:
    key = (str(home), fingerprint)
    if key not in _towers:
        _towers[key] = load_tower(export_dir(home, fingerprint), fingerprint)
    return _towers[key]


_warned: set[str] = set()


def warn_once(label: str, reason: str) -> None:
    """One line on stderr per model and process when the torch fallback is taken."""
    if label not in _warned:
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


def _write_clip(facts: dict, tensors: list[tuple[str, np.ndarray]], bpe_src: Path, tmp: Path) -> dict:
    """CLIP's BPE tower into ``tmp``: a float32 file and the tokenizer tables; returns the manifest's facts."""
    from .bpe import write_tables

    arrays, off = {}, 0
    with open(tmp / WEIGHTS, "wb") as f:
        for name, ten in tensors:
            a = np.ascontiguousarray(ten, "<f4")
            a.tofile(f)
            arrays[name] = [off, list(a.shape)]
            off += a.size
    shutil.copyfile(bpe_src, tmp / MERGES)
    write_tables(bpe_src, tmp)
    return {**facts, "floats": off, "arrays": arrays}


def _special_template(tok, lang: str | None) -> tuple[list[int], list[int]]:
    """(prefix, suffix) special ids the tokenizer puts around a text, the language token as _LANG_SLOT."""
    if lang is not None:
        tok.set_language(lang)
    inner = tok.tokenizer("a b", add_special_tokens=False)["input_ids"]
    full = tok.tokenizer("a b")["input_ids"]
    for start in range(len(full) - len(inner) + 1):
        if full[start:start + len(inner)] == inner:
            prefix, suffix = full[:start], full[start + len(inner):]
            break
    else:
        raise ValueError("special tokens are not around the text")
    if lang is None:
        return prefix, suffix
    lang_id = tok.tokenizer.convert_tokens_to_ids(lang)
    return [_LANG_SLOT if t == lang_id else t for t in prefix], [_LANG_SLOT if t == lang_id else t for t in suffix]


def _write_hf(encoder, tmp: Path) -> dict:
    """A Hugging Face tower into ``tmp``: ONNX (token ids -> projected features) and tokenizer.json."""
    import importlib.util

    import torch
    from open_clip.tokenizer import _clean_whitespace as oc_clean

    from .lang import NLLB_CODES

    text, tok = encoder.model.text, encoder.tokenizer
    if not hasattr(tok, "tokenizer") or not hasattr(tok.tokenizer, "backend_tokenizer"):
        raise ExportError("text tower is not a Hugging Face model with a fast tokenizer")
    if getattr(tok, "tokenizer_mode", "") or getattr(tok, "strip_sep_token", False):
        raise ExportError("tokenizer mode is not supported")
    if getattr(tok, "clean_fn", None) is not oc_clean:
        raise ExportError("tokenizer cleaning is not open_clip's default (whitespace)")
    for package in ("onnx", "onnxruntime", "tokenizers"):  # onnx: the exporter needs it
        if importlib.util.find_spec(package) is None:
            raise ExportError(f"{package} is not installed (pip install 'imgsearch[multilingual]')")
    prefix, suffix = _special_template(tok, "eng_Latn" if encoder.takes_language else None)
    vocab = tok.tokenizer.get_vocab() if encoder.takes_language else {}
    pad = int(text.config.pad_token_id)
    probe = torch.tensor([[prefix[0] if prefix and prefix[0] >= 0 else pad] + [pad] * 3] * 2, dtype=torch.long)
    probe[:, 1] = 5
    with torch.no_grad():
        torch.onnx.export(text.eval(), (probe,), str(tmp / ONNX_FILE), input_names=["input_ids"],
                          output_names=["features"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={"input_ids": {0: "n", 1: "len"}, "features": {0: "n"}})
    tok.tokenizer.backend_tokenizer.save(str(tmp / TOKENIZER_FILE))
    return {"kind": HF_KIND, "context_length": int(tok.context_length), "pad_id": pad, "prefix": prefix,
            "suffix": suffix, "lang_ids": {c: int(vocab[c]) for c in NLLB_CODES if c in vocab}}


def _torch_check(tower: _Tower, encoder) -> dict:
    """The export's verdict against the torch tower in fp32: identical token ids and cosine >= MIN_COSINE on
    PARITY_PROMPTS, in two languages when the tokenizer takes one."""
    same_ids, cos, pad = True, 1.0, int(tower.meta.get("pad_id", 0))
    for lang in (("eng_Latn", "kor_Hang") if encoder.takes_language else (None,)):
        ours, ref = tower.tokenize(PARITY_PROMPTS, lang), encoder.tokenize(PARITY_PROMPTS, lang)
        same_ids = same_ids and [r + [pad] * (ref.shape[1] - len(r)) for r in ours] == ref.tolist()
        got, want = tower.encode(PARITY_PROMPTS, lang), encoder.encode_texts(PARITY_PROMPTS, lang)
        cos = min(cos, float(np.min(np.sum(got * want, axis=1))))
    return {"verified": bool(same_ids and cos >= MIN_COSINE), "checked": "torch", "parity": {
        "prompts": len(PARITY_PROMPTS), "token_ids_identical": same_ids, "min_cosine": round(cos, 7)}}


def _publish(home, fingerprint: str, meta: dict, write, check) -> Path:
    """Write an export into a temporary folder (``write(tmp)`` -> its facts), record ``check(tower)``'s verdict
    in its manifest and rename it into place; a failed check is kept (verified: false), not retried each run."""
    from .config import held, sweep_temps

    final = export_dir(home, fingerprint)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_temps(final.parent, r"\.text\.[a-z0-9_]{8}")  # the folders of builds that were killed (mkdtemp's names)
    tmp = Path(tempfile.mkdtemp(prefix=".text.", dir=final.parent))
    try:
        with held(tmp):
            meta = {"format": FORMAT, "fingerprint": fingerprint, **meta, **write(tmp), "verified": True}
            (tmp / MANIFEST).write_text(json.dumps(meta), encoding="utf-8")
            meta.update(check(load_tower(tmp, fingerprint)))
            (tmp / MANIFEST).write_text(json.dumps(meta), encoding="utf-8")
            if final.exists():  # made by an earlier or concurrent run for the same weights: keep theirs
                shutil.rmtree(tmp)
            else:
                tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def build_export(home: str | os.PathLike, encoder) -> Path:
    """Write and verify the text export for ``encoder`` (a loaded fp32 torch Encoder); returns its folder."""
    if encoder.precision != "fp32":
        raise ExportError("the export is made from an fp32 model only")
    hf = getattr(getattr(encoder.model, "text", None), "config", None) is not None

    def write(tmp: Path) -> dict:
        if hf:
            return _write_hf(encoder, tmp)
        from open_clip import tokenizer as oc_tok

        return _write_clip(*_describe(encoder.model, encoder.tokenizer), Path(oc_tok.default_bpe()), tmp)

    try:
        return _publish(home, encoder.fingerprint, {"model": encoder.spec.label, "dim": int(encoder.dim),
                                                    "logit_scale": float(encoder.logit_scale)}, write,
                        lambda tower: _torch_check(tower, encoder))
    except Exception as e:
        if hf and not isinstance(e, ExportError):
            raise ExportError(f"exporting the text tower failed ({type(e).__name__}: {str(e)[:120]})") from None
        raise


def export_from_checkpoint(home, fingerprint: str, label: str, model_cfg: dict, arrays, bpe_src: Path) -> Path:
    """CLIP's text export without torch, from a checkpoint's tensors (clipgraph.Checkpoint), its open_clip
    ``model_cfg`` and the BPE tables in ``bpe_src``. Checked against reference_features ("checked": "numpy");
    the first index run that loads torch checks it against torch (ensure_export)."""
    from . import clipgraph

    text_cfg = model_cfg.get("text_cfg") or {}
    if any(text_cfg.get(k) for k in ("hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs")):
        raise ExportError("the tokenizer is not CLIP's plain BPE tokenizer")
    try:
        facts, tensors = clipgraph.text_weights(arrays, clipgraph.config_facts(model_cfg, "text"))
        logit_scale = math.exp(float(np.asarray(arrays["logit_scale"]).reshape(-1)[0]))
    except (clipgraph.Unsupported, KeyError) as e:
        raise ExportError(str(e)) from None
    if facts["pool"] != "argmax":
        raise ExportError(f"text pooling {facts['pool']!r} is left to torch")
    prompts = PARITY_PROMPTS[:8]  # short ones: the torch check later takes them all

    def write(tmp: Path) -> dict:
        from .bpe import BPETokenizer

        out = _write_clip(facts, tensors, bpe_src, tmp)
        tok = BPETokenizer(tmp, int(text_cfg.get("context_length", 77)))
        return {**out, "context_length": tok.context_length, "sot_id": tok.sot_id, "eos_id": tok.eot_id}

    def check(tower: _Tower) -> dict:
        want = _normalised(reference_features(arrays, facts, "text", tower.tokenize(prompts)))
        cos = float(np.min(np.sum(tower.encode(prompts) * want, axis=1)))
        return {"verified": cos >= MIN_COSINE, "checked": "numpy", "parity": {"prompts": len(prompts),
                                                                               "min_cosine": round(cos, 7)}}

    proj = dict(tensors).get("proj.w")
    dim = int(proj.shape[1]) if proj is not None else facts["width"]
    return _publish(home, fingerprint, {"model": label, "dim": dim, "logit_scale": logit_scale}, write, check)


def ensure_export(home: str | os.PathLike, encoder, quiet: bool = False) -> Path | None:
    """Make the text export for this model if it is missing or unusable; returns its folder when a verified
    export exists afterwards. Never raises: the fast path is an optimisation."""
    try:
        folder, checked = export_dir(home, encoder.fingerprint), None
        with contextlib.suppress(ExportError):
            checked = load_tower(folder, encoder.fingerprint)
            if checked.meta.get("checked") != "numpy":
                return folder
        if getattr(encoder, "torch_free", False):  # no torch to check or make it with (make_exports makes it)
            return folder if checked is not None else None
        if checked is None and (folder / MANIFEST).is_file():
            old = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            if old.get("fingerprint") == encoder.fingerprint:
                if old.get("format") == FORMAT and old.get("verified") is False:
                    return None  # verified once and failed: do not pay for it again on every run
                shutil.rmtree(folder)  # damaged, and ours (its manifest names these weights): replace it
        if encoder.precision != "fp32" or not str(encoder.device).startswith("cpu"):
            from . import encoder as encoder_mod

            encoder = encoder_mod.build(encoder.spec, "cpu", "fp32")
        if checked is not None:  # made without torch (export_from_checkpoint): checked against torch once
            meta = {**checked.meta, **_torch_check(checked, encoder)}
            from .config import atomic_file

            with atomic_file(folder / MANIFEST) as f:
                f.write(json.dumps(meta).encode("utf-8"))
            _towers.pop((str(home), encoder.fingerprint), None)
            if not meta["verified"]:
                raise ExportError(f"the export made without torch does not match torch: {meta['parity']}")
            return folder
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
