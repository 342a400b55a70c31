"""Hugging Face text towers (XLM-R, NLLB, BERT-style) without torch: ONNX export run by onnxruntime,
tokenized by the `tokenizers` package.

textfast covers CLIP's own BPE transformer in numpy. A multilingual model's text tower is a transformers
model with its own tokenizer; once per model (keyed by the weights fingerprint) it is exported next to
textfast's files, ``<home>/exports/<fingerprint>/text/``: the tower (token ids -> projected features) as
ONNX, the fast tokenizer's tokenizer.json, and a manifest. Before it is used the export is checked against
the torch tower on hard prompts, in two languages when the tokenizer takes one: identical token ids and
cosine >= MIN_COSINE. An unverified export is recorded as such and never used. Importing this module costs
numpy; onnxruntime and tokenizers are imported when a tower is opened.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

KIND = "hf-onnx"
FORMAT = 1
MANIFEST = "manifest.json"
ONNX_FILE = "text.onnx"
TOKENIZER_FILE = "tokenizer.json"
MIN_COSINE = 0.9999
OPSET = 17
_LANG_SLOT = -1  # where the language token goes in a recorded special-token template
_PLAIN = re.compile(r"[ -%'-~]*")  # printable ASCII without '&': ftfy and html.unescape change nothing


class TowerError(Exception):
    """The export is missing, damaged, unverified or not possible for this tower (textfast words it)."""


def _clean_whitespace(text: str) -> str:
    """open_clip's HFTokenizer cleaning ("whitespace": ftfy, HTML entities, runs of spaces), ftfy only when needed."""
    if not _PLAIN.fullmatch(text):
        import html

        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split())


class OrtTextTower:
    """A verified export; ``encode(texts, lang, default_lang)`` returns L2-normalised float32 [N, dim]."""

    def __init__(self, folder: Path, meta: dict):
        try:
            import onnxruntime as ort
            from tokenizers import Tokenizer
        except ImportError as e:
            raise TowerError(f"{e.name} is not installed (pip install 'imgsearch[multilingual,fast]')") from None
        for name in (ONNX_FILE, TOKENIZER_FILE):
            if not (folder / name).is_file():
                raise TowerError(f"{name} missing from the export")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1  # a handful of tokens: a thread pool costs more than it saves
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(folder / ONNX_FILE), opts, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.meta = meta
        self.folder = folder
        self.dim = int(meta["dim"])

    @property
    def logit_scale(self) -> float:
        return float(self.meta["logit_scale"])

    def encode_texts(self, texts: list[str], lang: str | None = None, default_lang: str | None = None) -> np.ndarray:
        return self.encode(list(texts), lang, default_lang)

    def tokenize(self, texts: list[str], lang: str | None = None, default_lang: str | None = None) -> list[list[int]]:
        """Token ids as open_clip's HFTokenizer makes them (before padding)."""
        m = self.meta
        prefix, suffix = m["prefix"], m["suffix"]
        room = int(m["context_length"]) - len(prefix) - len(suffix)
        langs = [None] * len(texts)
        if m.get("lang_ids"):
            from .lang import query_language

            langs = [query_language(t, lang, default_lang) for t in texts]
        out = []
        cleaned = [_clean_whitespace(t) for t in texts]
        for enc, code in zip(self.tokenizer.encode_batch(cleaned, add_special_tokens=False), langs):
            slot = int(m["lang_ids"].get(code, m["lang_ids"].get("eng_Latn", 0))) if code else None
            pre = [slot if t == _LANG_SLOT else t for t in prefix]
            post = [slot if t == _LANG_SLOT else t for t in suffix]
            out.append(pre + list(enc.ids[:max(room, 0)]) + post)
        return out

    def encode(self, texts: list[str], lang: str | None = None, default_lang: str | None = None) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        rows = self.tokenize(texts, lang, default_lang)
        n = max(len(r) for r in rows)  # padding is masked and positions are absolute: the used length suffices
        ids = np.full((len(rows), n), int(self.meta["pad_id"]), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = r
        x = self.session.run(None, {"input_ids": ids})[0].astype(np.float32, copy=False)
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def open_export(folder: Path, meta: dict) -> OrtTextTower:
    if meta.get("format") != FORMAT:
        raise TowerError("manifest is for another format")
    if not meta.get("verified"):
        raise TowerError(meta.get("reason") or f"export failed verification against torch: {meta.get('parity')}")
    return OrtTextTower(folder, meta)


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
    if lang is not None:
        lang_id = tok.tokenizer.convert_tokens_to_ids(lang)
        prefix = [_LANG_SLOT if t == lang_id else t for t in prefix]
        suffix = [_LANG_SLOT if t == lang_id else t for t in suffix]
    return prefix, suffix


def build_export(final: Path, encoder, prompts: list[str]) -> Path:
    """Export ``encoder``'s Hugging Face text tower (fp32, CPU) to ``final`` and verify it on ``prompts``.

    Raises TowerError when this tower or tokenizer is not one this path reproduces.
    """
    import torch

    from .lang import NLLB_CODES

    text = getattr(encoder.model, "text", None)
    tok = encoder.tokenizer
    config = getattr(text, "config", None)
    if config is None or not hasattr(tok, "tokenizer") or not hasattr(tok.tokenizer, "backend_tokenizer"):
        raise TowerError("text tower is not a Hugging Face model with a fast tokenizer")
    if getattr(tok, "tokenizer_mode", "") or getattr(tok, "strip_sep_token", False):
        raise TowerError("tokenizer mode is not supported")
    from open_clip.tokenizer import _clean_whitespace as oc_clean

    if getattr(tok, "clean_fn", None) is not oc_clean:
        raise TowerError("tokenizer cleaning is not open_clip's default (whitespace)")
    takes_language = encoder.takes_language
    import importlib.util

    for package in ("onnx", "onnxruntime", "tokenizers"):  # onnx: the exporter needs it
        if importlib.util.find_spec(package) is None:
            raise TowerError(f"{package} is not installed (pip install 'imgsearch[multilingual,fast]')")
    prefix, suffix = _special_template(tok, "eng_Latn" if takes_language else None)
    lang_ids = {}
    if takes_language:
        vocab = tok.tokenizer.get_vocab()
        lang_ids = {c: int(vocab[c]) for c in NLLB_CODES if c in vocab}
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".text.", dir=final.parent))
    try:
        class Tower(torch.nn.Module):
            def __init__(self, text):
                super().__init__()
                self.text = text

            def forward(self, input_ids):
                return self.text(input_ids)

        pad = int(config.pad_token_id)
        probe = torch.tensor([[prefix[0] if prefix and prefix[0] >= 0 else pad] + [pad] * 3] * 2, dtype=torch.long)
        probe[:, 1] = 5
        with torch.no_grad():
            torch.onnx.export(Tower(text).eval(), (probe,), str(tmp / ONNX_FILE), input_names=["input_ids"],
                              output_names=["features"], opset_version=OPSET, dynamo=False,
                              dynamic_axes={"input_ids": {0: "n", 1: "len"}, "features": {0: "n"}})
        tok.tokenizer.backend_tokenizer.save(str(tmp / TOKENIZER_FILE))
        meta = {"format": FORMAT, "kind": KIND, "fingerprint": encoder.fingerprint, "model": encoder.spec.label,
                "dim": int(encoder.dim), "context_length": int(tok.context_length), "pad_id": pad,
                "prefix": prefix, "suffix": suffix, "lang_ids": lang_ids, "verified": True,
                "logit_scale": float(encoder.logit_scale)}
        tower = OrtTextTower(tmp, meta)
        same_ids, cos = True, 1.0
        for lang in (("eng_Latn", "kor_Hang") if takes_language else (None,)):
            ours = tower.tokenize(prompts, lang)
            ref = encoder.tokenize(prompts, lang)
            ours_padded = [r + [pad] * (ref.shape[1] - len(r)) for r in ours]
            same_ids = same_ids and ours_padded == ref.tolist()
            want = encoder.encode_texts(prompts, lang)
            got = tower.encode(prompts, lang)
            cos = min(cos, float(np.min(np.sum(got * want, axis=1))))
        meta.update(verified=bool(same_ids and cos >= MIN_COSINE), parity={
            "prompts": len(prompts), "token_ids_identical": same_ids, "min_cosine": round(cos, 7)})
        (tmp / MANIFEST).write_text(json.dumps(meta), encoding="utf-8")
        if final.exists():  # made by an earlier or concurrent run for the same weights: keep theirs
            shutil.rmtree(tmp)
            return final
        tmp.rename(final)
    except TowerError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TowerError(f"exporting the text tower failed ({type(e).__name__}: {str(e)[:120]})") from None
    return final


def is_hf_tower(encoder) -> bool:
    """Whether the encoder's text tower is a transformers model (this module's kind, not textfast's)."""
    return getattr(getattr(encoder.model, "text", None), "config", None) is not None
