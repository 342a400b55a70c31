"""open_clip model, preprocess and tokenizer loaded together; batch encoding of images and texts."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
from pathlib import Path

import numpy as np

from .errors import ModelLoadError, UsageError
from .modelspec import HF_HUB, LOCAL_DIR, ModelSpec  # noqa: F401  (re-exported: the encoder's public names)
from .modelspec import HUB_TAGS, WEIGHT_SUFFIXES, english_only, hub_repo, looks_like_file

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


def file_fingerprint(path: str | os.PathLike, sample: int = 4 << 20) -> str:
    """Cheap identity of a weights file: its size plus hashes of its first and last few MB."""
    size = os.path.getsize(path)
    h = hashlib.blake2b(digest_size=12)
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(sample))
        if size > 2 * sample:
            f.seek(-sample, os.SEEK_END)
            h.update(f.read(sample))
    return h.hexdigest()


def _local_weights(folder: Path) -> Path | None:
    for name in (WEIGHTS_FILE, "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                 "model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    return min((p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES), default=None)


TORCH_EXTRA = "pip install 'imgsearch[torch]'"


def torch_installed() -> bool:
    """Whether torch and open_clip can be imported (found without importing them). The default install leaves
    them out: indexing and queries run on onnxruntime and numpy; GPUs, bf16, fine-tuning need them."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("torch", "open_clip"))


def needs_torch(what: str, spec: ModelSpec | None = None) -> str:
    if spec is not None and not english_only(spec, unreadable=True):  # the torch extra alone would not load it
        return (f"{spec.canonical().label} has a Hugging Face text tower, which needs torch, open_clip and "
                "transformers; add them with: pip install 'imgsearch[multilingual]'")
    return f"{what} needs torch and open_clip, which this install leaves out; add them with: {TORCH_EXTRA}"


def import_open_clip():
    """open_clip, its first import leaving the program's environment and warnings filters as they were (it sets
    TOKENIZERS_PARALLELISM and TORCHINDUCTOR_CACHE_DIR, which child processes inherit, and adds filters). Only
    what the import added is taken out, in place, so other threads' changes meanwhile stay."""
    import sys
    import warnings

    if sys.modules.get("open_clip") is not None:
        return sys.modules["open_clip"]
    if not torch_installed():
        raise ModelLoadError(needs_torch("this model"))
    env = {key: os.environ.get(key) for key in ("TOKENIZERS_PARALLELISM", "TORCHINDUCTOR_CACHE_DIR")}
    before = {id(f) for f in warnings.filters}
    import open_clip

    if any(id(f) not in before for f in warnings.filters):
        warnings.filters[:] = [f for f in warnings.filters if id(f) in before]
        warnings._filters_mutated()  # as filterwarnings() does: the C module re-reads the list
    for key, value in env.items():  # only these: whatever else the program sets meanwhile stays
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    return open_clip


_hub_reachable: bool | None = None


def _hub_offline() -> bool:
    """True when Hugging Face files come from the cache alone: HF_HUB_OFFLINE is set, or the hub cannot be
    reached (asked once, in 3 s: offline, huggingface_hub retries for a minute). Passed as local_files_only."""
    global _hub_reachable
    from huggingface_hub import constants

    if _hub_reachable is None and not constants.HF_HUB_OFFLINE:
        import socket
        from urllib.parse import urlparse

        try:
            socket.create_connection((urlparse(constants.ENDPOINT).hostname, 443), timeout=3).close()
            _hub_reachable = True
        except OSError:
            _hub_reachable = False
    return constants.HF_HUB_OFFLINE or not _hub_reachable


def _hub_weights(repo: str, name: str = "") -> str:
    """A model's weights file from hub ``repo``, its safetensors form first (as open_clip does)."""
    from huggingface_hub import hf_hub_download

    name = name or "open_clip_pytorch_model.bin"
    safe = WEIGHTS_FILE if name == "open_clip_pytorch_model.bin" else \
        name.rsplit(".", 1)[0] + ".safetensors" if name.endswith((".bin", ".pth")) else None
    if safe:
        with contextlib.suppress(Exception):
            return hf_hub_download(repo, safe, local_files_only=_hub_offline())
    return hf_hub_download(repo, name, local_files_only=_hub_offline())


def resolve_weights(spec: ModelSpec) -> tuple[str, str | None]:
    """(fingerprint, weights path or None), checked before anything is built: open_clip happily builds a
    randomly initialised network when weights are missing; we never do."""
    name, pretrained = spec.name, spec.pretrained
    if name.startswith(LOCAL_DIR):
        folder = Path(name[len(LOCAL_DIR):])
        if not folder.is_dir():
            raise ModelLoadError(f"model folder {folder} does not exist; check the path after local-dir:")
        if not (folder / CONFIG_FILE).is_file():
            raise ModelLoadError(
                f"{folder} has no {CONFIG_FILE}; a local-dir model is a folder written by `imgsearch finetune` "
                "or open_clip's push_to_hf_hub (config + weights)")
        weights = _local_weights(folder)
        if weights is None:
            raise ModelLoadError(f"{folder} has a config but no weights file ({WEIGHTS_FILE}); "
                                 "refusing to run a randomly initialised model")
        return file_fingerprint(weights), str(weights)
    if name.startswith(HF_HUB):
        try:
            path = _hub_weights(name[len(HF_HUB):])
        except Exception as e:  # offline, unknown repo, no cached copy
            where = "no cached copy and the hub is unreachable" if _hub_offline() else _short(e)
            raise ModelLoadError(
                f"cannot get weights for {name} ({where}); connect to the internet once so they are "
                "cached, or use --model local-dir:/path") from None
        return file_fingerprint(path), str(path)
    if not torch_installed() and hub_repo(spec):  # a tag whose files are fetched without open_clip
        return f"tag:{name}:{pretrained}", None
    tag = None if torch_installed() else _example_tag(name)  # without torch: a tag this install fetches
    if not torch_installed() and (pretrained or not tag):  # other names and tags: open_clip's
        raise ModelLoadError(needs_torch(f"model {spec.label}", spec)
                             + (f"; or use --pretrained {tag}, which it loads" if tag else ""))
    if not pretrained:
        raise ModelLoadError(
            f"model {name} needs weights: give --pretrained TAG (e.g. {_example_tag(name)}) or a checkpoint "
            "file, or use --model local-dir:/path; imgsearch never runs a randomly initialised model")
    open_clip = import_open_clip()
    if name not in open_clip.list_models():
        raise ModelLoadError(f"unknown model {name!r}; `python -c \"import open_clip; print(open_clip.list_models())\"` "
                             "lists the built-in names")
    if looks_like_file(pretrained):
        if not os.path.isfile(pretrained):
            raise ModelLoadError(f"checkpoint file {pretrained} does not exist; check --pretrained")
        return file_fingerprint(pretrained), pretrained
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise ModelLoadError(f"unknown pretrained tag {pretrained!r} for {name}; known tags: {', '.join(tags) or 'none'}")
    # Published tags are immutable, so the tag itself identifies the weights.
    return f"tag:{name}:{pretrained}", None


_hub_fingerprints: dict[ModelSpec, str] = {}  # hf-hub models looked up on the hub this process (no torch)


def known_fingerprint(spec: ModelSpec) -> str | None:
    """The fingerprint resolve_weights would return, when it needs no open_clip import and no network.
    A tag is trusted only when the library already holds vectors under it (open_clip validated it then).
    hf-hub models: None, but without torch the hub's cache lookup is made once (ModelLoadError if it fails)."""
    name, pretrained = spec.name, spec.pretrained
    if name.startswith(HF_HUB):
        if torch_installed():
            return None
        if spec not in _hub_fingerprints:
            _hub_fingerprints[spec] = resolve_weights(spec)[0]
        return _hub_fingerprints[spec]
    if name.startswith(LOCAL_DIR):
        folder = Path(name[len(LOCAL_DIR):])
        weights = _local_weights(folder) if (folder / CONFIG_FILE).is_file() else None
        return file_fingerprint(weights) if weights is not None else None
    if not pretrained:
        return None
    if looks_like_file(pretrained):
        return file_fingerprint(pretrained) if os.path.isfile(pretrained) else None
    return f"tag:{name}:{pretrained}"


def _example_tag(name: str) -> str | None:
    """A tag of model ``name`` this install can load (without torch, a HUB_TAGS one, else None)."""
    if not torch_installed():
        return next((tag for n, tag in HUB_TAGS if n == name), None)
    with contextlib.suppress(Exception):
        return import_open_clip().list_pretrained_tags_by_model(name)[0]
    return "laion2b_s34b_b79k"


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls are much faster than fp32 on such CPUs."""
    from .config import cpuinfo

    return bool({"amx_bf16", "avx512_bf16"} & set((cpuinfo("flags") or "").split()))


def _mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def pick_device(device: str) -> str:
    """auto: a CUDA GPU, else Apple Silicon's GPU (MPS), else the CPU."""
    from .config import check_device

    check_device(device)
    if not torch_installed():
        if device in ("auto", "cpu"):
            return "cpu"
        raise UsageError(needs_torch(f"--device {device}"))
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was given but no CUDA GPU is available; use --device cpu or auto")
    if device == "mps" and not _mps_available():
        raise UsageError("--device mps was given but this torch has no usable Apple GPU (MPS needs macOS 12.3+ "
                         "on Apple Silicon); use --device cpu or auto")
    return device


def pick_precision(precision: str, device: str) -> str:
    """auto: fp16 on CUDA, fp32 on MPS (its fp16 autocast coverage varies between releases; fp16 opts in), bf16
    on CPUs with AMX/AVX512-BF16, else fp32. int8 (onnxruntime, the image tower) is CPU only."""
    from .config import check_precision

    check_precision(precision)
    if precision == "auto":
        if not torch_installed():
            return "int8"  # onnxruntime, behind the parity gate (fp32 where int8 is too far on a library's images)
        if device.startswith("cuda"):
            return "fp16"
        if device.startswith("mps"):
            return "fp32"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if precision == "fp16" and not device.startswith(("cuda", "mps")):
        raise UsageError("fp16 needs a GPU (CUDA or Apple MPS); on CPU use --precision fp32, bf16 or int8")
    if precision == "int8" and device != "cpu":
        raise UsageError(f"int8 runs on the CPU only (onnxruntime); use --device cpu or --precision fp32 on {device}")
    if precision == "bf16" and device.startswith("mps"):
        raise UsageError("bf16 is not supported on MPS; use --precision fp32 or fp16")
    return precision


def autocast_for(precision: str, device: str):
    import torch

    if precision == "fp16":  # CUDA or Apple MPS
        return torch.autocast("mps" if device.startswith("mps") else "cuda", dtype=torch.float16)
    if precision == "bf16":
        return torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Encoder:
    """A loaded CLIP model with the preprocess and tokenizer that belong to it; its image tower is always torch
    (onnx_image.select returns another object for an ONNX Runtime one: this one, often shared, never changes)."""

    torch_free = False

    def __init__(self, spec: ModelSpec, model, preprocess, tokenizer, device: str, precision: str,
                 fingerprint: str, weights_path: str | None):
        import torch

        self.spec = spec
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.precision = precision
        self.fingerprint = fingerprint
        self.weights_path = weights_path
        self._lock = threading.Lock()  # one forward pass at a time (UI/server share one encoder)
        size = getattr(model.visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        with torch.inference_mode():
            probe = tokenizer(["a"]).to(device)
            self.dim = int(self._text_forward(probe).shape[-1])

    def _autocast(self):  # bf16: the model itself is cast
        return autocast_for(self.precision, self.device) if self.precision == "fp16" else contextlib.nullcontext()

    def _text_forward(self, tokens):
        with self._autocast():
            out = self._short_text(tokens) if self._text_can_shorten() else self.model.encode_text(tokens)
        return out.float()

    def _text_can_shorten(self) -> bool:
        """True for open_clip's CLIP text tower (causal attention pooled at end-of-text): no pooled output sees
        the padding, so the transformer runs on the used length only (a short query: a tenth of 77 tokens)."""
        m = self.model
        return (hasattr(m, "token_embedding") and hasattr(m, "positional_embedding") and hasattr(m, "transformer")
                and getattr(m, "attn_mask", None) is not None and getattr(m, "text_pool_type", "") in ("argmax", "eos")
                and hasattr(m, "ln_final"))

    def _short_text(self, tokens):
        import torch
        from open_clip.transformer import text_global_pool

        m = self.model
        used = int((tokens != 0).sum(dim=1).max())  # 0 is padding in open_clip's tokenizer
        tokens = tokens[:, :max(used, 1)]
        n = tokens.shape[1]
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast) + m.positional_embedding[:n].to(cast)
        x = m.transformer(x, attn_mask=m.attn_mask[:n, :n])
        x = m.ln_final(x)
        x = text_global_pool(x, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if m.text_projection is not None:
            x = m.text_projection(x) if isinstance(m.text_projection, torch.nn.Linear) else x @ m.text_projection
        return x

    def encode_image_tensors(self, batch) -> np.ndarray:
        """Encode a preprocessed [N,3,H,W] batch; returns L2-normalised float32 [N, dim]."""
        import torch

        with self._lock, torch.inference_mode():
            if self.device.startswith("cuda") and batch.device.type == "cpu":
                batch = batch.pin_memory().to(self.device, non_blocking=True)
            batch = batch.to(torch.bfloat16 if self.precision == "bf16" else torch.float32)
            with self._autocast():
                feats = self.model.encode_image(batch)
            return torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy()

    def encode_images(self, images) -> np.ndarray:
        """Encode PIL images (already RGB)."""
        import torch

        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.encode_image_tensors(torch.stack([self.preprocess(im) for im in images]))

    def encode_texts(self, texts: list[str], lang: str | None = None, default_lang: str | None = None) -> np.ndarray:
        """Encode texts; returns L2-normalised float32 [N, dim]. ``lang``/``default_lang``: see tokenize."""
        import torch

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock, torch.inference_mode():
            tokens = self.tokenize(list(texts), lang, default_lang).to(self.device)
            feats = self._text_forward(self._trim_padding(tokens))
            return torch.nn.functional.normalize(feats, dim=-1).cpu().numpy()

    @property
    def takes_language(self) -> bool:
        """Whether the tokenizer needs the text's language (NLLB's language token)."""
        return callable(getattr(self.tokenizer, "set_lang_fn", None))

    def tokenize(self, texts: list[str], lang: str | None = None, default_lang: str | None = None):
        """Token ids [N, context] as the model's tokenizer makes them. Only tokenizers that take a language (NLLB)
        use ``lang`` (every text's); without it each text's script, then ``default_lang``, then English."""
        import torch

        if not self.takes_language:
            return self.tokenizer(texts)
        from .lang import query_language

        langs = [query_language(t, lang, default_lang) for t in texts]
        rows: list = [None] * len(texts)
        # The language is tokenizer state: one call per language, rows put back in the caller's order.
        for code in dict.fromkeys(langs):
            idx = [i for i, c in enumerate(langs) if c == code]
            self.tokenizer.set_language(code)
            for i, row in zip(idx, self.tokenizer([texts[i] for i in idx])):
                rows[i] = row
        return torch.stack(rows)

    def _trim_padding(self, tokens):
        """Drop the padding columns all rows end with, for Hugging Face text towers: their attention mask hides
        padding and positions are absolute, so the used prefix gives the same output, cheaper."""
        pad = getattr(getattr(getattr(self.model, "text", None), "config", None), "pad_token_id", None)
        if pad is None or getattr(self.tokenizer, "tokenizer_mode", "") == "clips":
            return tokens
        used = (tokens != pad).any(dim=0).nonzero()
        return tokens[:, :int(used.max()) + 1] if len(used) else tokens

    @property
    def draft_size(self) -> int:
        """Short side JPEGs are decoded at (libjpeg's reduced-scale decode) before the model's resize."""
        from .config import draft_size_for

        return draft_size_for(self.image_size)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())

    @property
    def image_tower(self) -> str:
        """What runs the image tower, as the index report names it (int8 here is the fallback to fp32)."""
        return "torch fp32" if self.precision == "int8" else f"torch {self.precision}"

    def describe(self) -> str:
        return f"{self.spec.label} on {self.device} ({self.precision}, dim {self.dim})"


def build(spec: ModelSpec, device: str = "auto", precision: str = "auto") -> Encoder:
    """Load model + preprocess + tokenizer; raise ModelLoadError with what to do when it fails."""
    spec = spec.canonical()
    if not torch_installed():
        raise ModelLoadError(needs_torch(f"{spec.label} on torch"))
    fingerprint, weights_path = resolve_weights(spec)
    device = pick_device(device)
    precision = pick_precision(precision, device)
    import torch

    try:
        model, preprocess, tokenizer = _create(spec, weights_path)
    except ModelLoadError:
        raise
    except Exception as e:
        missing = isinstance(e, ImportError) and (e.name or "").split(".")[0] in ("transformers", "tokenizers",
                                                                                  "sentencepiece")
        if missing or "install transformers" in str(e).lower():
            raise ModelLoadError(
                f"{spec.label} has a Hugging Face text tower, which needs the transformers and tokenizers packages; "
                "pip install 'imgsearch[multilingual]'") from None
        if "download" in str(e).lower():
            raise ModelLoadError(
                f"cannot download the weights of {spec.label} and no cached copy exists; connect to the internet "
                "once so open_clip caches them, or use --model local-dir:/path") from None
        raise ModelLoadError(f"cannot load model {spec.label}: {_short(e)}; check that the weights file matches "
                             "the model architecture") from None
    model = model.to(device).eval()
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    return Encoder(spec, model, preprocess, tokenizer, device, precision, fingerprint, weights_path)


def _create(spec: ModelSpec, weights_path: str | None, on_meta: bool = True):
    """(model with the checkpoint's weights on the CPU, eval preprocess, tokenizer) as open_clip's factory makes
    them, without its root-logger calls (logging.info() there would turn the program's later basicConfig into a
    no-op). ``on_meta``: see _load_on_meta."""
    open_clip = import_open_clip()
    from open_clip.factory import load_checkpoint
    from open_clip.model import set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    model_cfg, preprocess_cfg, weights_path, folder = _model_source(spec, weights_path)
    text_cfg, vision_cfg = model_cfg["text_cfg"], model_cfg["vision_cfg"]
    # The checkpoint holds every tower's weights: never fetch pretrained ones for a tower.
    if "hf_model_name" in text_cfg:
        text_cfg["hf_model_pretrained"] = False
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False
    tokenizer = _tokenizer(text_cfg, folder)
    custom = model_cfg.pop("custom_text", False) or "hf_model_name" in text_cfg
    cls = (open_clip.CoCa if "multimodal_cfg" in model_cfg else open_clip.CustomTextCLIP) if custom else open_clip.CLIP
    model = _load_on_meta(cls, model_cfg, weights_path) if on_meta else None
    if model is None:
        model = cls(**model_cfg)
        load_checkpoint(model, weights_path)
    preprocess_cfg = merge_preprocess_dict(PreprocessCfg(), preprocess_cfg)
    preprocess_cfg["size"] = getattr(model.visual, "image_size", preprocess_cfg["size"])
    set_model_preprocess_cfg(model, preprocess_cfg)
    return model, image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False), tokenizer


def _load_on_meta(cls, model_cfg: dict, weights_path: str):
    """The model built on torch's meta device with the checkpoint's tensors assigned to it; None when some
    tensor would be left without a value (then it is built the ordinary way).

    The ordinary build spent ~4 s of a ~6.5 s ViT-B-32 load (2 cores) in random init and copying the checkpoint
    over it. The default-device context is thread-local. Buffers computed in __init__ stay empty on meta: the
    known ones are remade here."""
    import copy

    import torch
    from open_clip.factory import load_checkpoint

    try:
        with torch.device("meta"):
            model = cls(**copy.deepcopy(model_cfg))
    except Exception:  # an __init__ that needs real numbers
        return None
    kinds = {k: t.dtype for k, t in model.state_dict(keep_vars=True).items()}

    def assign(state_dict, strict=True):
        # An assigned tensor keeps its own dtype (an fp16 checkpoint): convert it as copying into it would.
        fitted = {k: v.to(kinds[k]) if k in kinds else v for k, v in state_dict.items()}
        return type(model).load_state_dict(model, fitted, strict=strict, assign=True)

    model.load_state_dict = assign  # on this one instance, for open_clip's checkpoint conversions
    try:
        load_checkpoint(model, weights_path)
    finally:
        del model.load_state_dict
    remade = {  # made as their modules' __init__ makes them (the tests compare them with an ordinary build)
        "attn_mask": lambda shape, dtype: torch.full(shape, float("-inf"), dtype=dtype).triu_(1),  # causal
        "position_ids": lambda shape, dtype: torch.arange(shape[-1], dtype=dtype).expand(shape),  # HF towers
        "token_type_ids": lambda shape, dtype: torch.zeros(shape, dtype=dtype),
    }
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_meta and name in remade:
                module._buffers[name] = remade[name](buf.shape, buf.dtype)
    return None if any(t.is_meta for t in (*model.parameters(), *model.buffers())) else model


def _model_source(spec: ModelSpec, weights_path: str | None) -> tuple[dict, dict, str, Path | None]:
    """(model config, preprocess config, weights file, local-dir folder or None) of ``spec``."""
    open_clip = import_open_clip()
    name, folder = spec.name, None
    if name.startswith(LOCAL_DIR):
        folder = Path(name[len(LOCAL_DIR):])
        config = read_local_config(folder)
        text_cfg = config["model_cfg"]["text_cfg"]
        tower = text_cfg.get("hf_model_name")
        # open_clip resolves a Hugging Face tower's folder against the working directory; a folder we wrote
        # names it relative to itself, so the model still loads after it is moved.
        if isinstance(tower, str) and tower and not os.path.isabs(tower) and (folder / tower / "config.json").is_file():
            text_cfg["hf_model_name"] = str((folder / tower).resolve())
    elif name.startswith(HF_HUB):
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(name[len(HF_HUB):], CONFIG_FILE, local_files_only=_hub_offline())
        config = read_local_config(Path(path).parent)
    else:
        tag = open_clip.get_pretrained_cfg(name, spec.pretrained or "")
        config = {"model_cfg": open_clip.get_model_config(name), "preprocess_cfg": tag}
        # A tag's weights: from the hub (cache alone when offline), else a URL (urllib fails at once offline).
        weights_path = weights_path or (_hub_weights(*os.path.split(tag["hf_hub"])) if tag.get("hf_hub")
                                        else open_clip.pretrained.download_pretrained(tag))
    text_cfg = config["model_cfg"]["text_cfg"]
    if folder is None and _hub_offline():  # a hub tower's files from the cache alone, without the retries
        from huggingface_hub import snapshot_download

        for key in ("hf_model_name", "hf_tokenizer_name"):
            if text_cfg.get(key):
                text_cfg[key] = snapshot_download(text_cfg[key], local_files_only=True)
    return config["model_cfg"], config.get("preprocess_cfg") or {}, weights_path, folder


def _tokenizer(text_cfg: dict, folder: Path | None):
    """The tokenizer open_clip.get_tokenizer picks for this config (every SigLIP config names its HF one)."""
    from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer, SimpleTokenizer

    length = text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH)
    extra = text_cfg.get("tokenizer_kwargs", {})
    if text_cfg.get("hf_tokenizer_name"):
        return HFTokenizer(str(folder) if folder else text_cfg["hf_tokenizer_name"], context_length=length,
                           tokenizer_mode=text_cfg.get("tokenizer_mode"), **extra)
    return SimpleTokenizer(context_length=length, **extra)


_cache: dict[tuple, Encoder] = {}
_cache_lock = threading.Lock()


def load(spec: ModelSpec, device: str = "auto", precision: str = "auto") -> Encoder:
    """Like build() but keeps one loaded encoder per (model, device, precision) in this process."""
    spec = spec.canonical()
    key = (spec, device, precision)
    with _cache_lock:
        enc = _cache.get(key)
        # A re-written local-dir model (new fine-tune into the same folder) must be reloaded.
        if enc is not None and (enc.weights_path is None or (
                os.path.exists(enc.weights_path) and file_fingerprint(enc.weights_path) == enc.fingerprint)):
            return enc
        enc = _cache[key] = build(spec, device, precision)
        return enc


def read_local_config(folder: str | os.PathLike) -> dict:
    from .config import read_json

    return read_json((Path(folder) / CONFIG_FILE).read_text(encoding="utf-8"))


MODEL_KIND = "model"


def model_owner_token(folder: str | os.PathLike) -> str | None:
    """The ownership token imgsearch wrote into a model folder's config, or None."""
    try:
        token = read_local_config(folder).get("imgsearch", {}).get("owner_token")
    except (OSError, ValueError, AttributeError):
        return None
    return token if isinstance(token, str) else None


def why_not_replaceable(out: str | os.PathLike) -> str | None:
    """None when ``out`` may be replaced by a new model (absent, empty, or a model folder imgsearch wrote)."""
    from . import owned

    out = Path(out)
    if not os.path.lexists(out):
        return None
    if out.is_symlink():
        return "it is a symbolic link"
    if not out.is_dir():
        return "it is not a folder"
    try:
        if not any(os.scandir(out)):
            return None
    except OSError as e:
        return f"it cannot be listed ({e.strerror or e})"
    token = model_owner_token(out)
    if token is None:
        return "it is not a model folder imgsearch wrote (no ownership token in its config)"
    return owned.why_not_ours(out, MODEL_KIND, token)


def save_local_dir(model, model_cfg: dict, out_dir: str | os.PathLike, preprocess_cfg: dict | None = None,
                   extra_files: dict[str, str | bytes] | None = None, tokenizer=None) -> Path:
    """Write ``model`` as an open_clip local-dir model (config + safetensors) into a temporary sibling folder
    renamed into place, so a crash never leaves a half-written model where it would load.

    A Hugging Face text tower is written with its config and ``tokenizer``'s files, the config naming the folder
    itself ("."), so the model loads offline and after a move. An existing ``out_dir`` is replaced only when it
    is empty or a model folder imgsearch wrote (its ownership marker); anything else raises UsageError."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    from . import owned
    from .config import held, sweep_temps

    config = getattr(getattr(model, "text", None), "config", None)
    if hasattr(config, "save_pretrained") and hasattr(tokenizer, "save_pretrained"):
        with tempfile.TemporaryDirectory(prefix="imgsearch-hf-") as d:
            tokenizer.save_pretrained(d)
            config.save_pretrained(d)
            hf_files = {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}
        extra_files = {**hf_files, **(extra_files or {})}
        text_cfg = {**model_cfg["text_cfg"], "hf_model_name": ".", "hf_tokenizer_name": "."}
        model_cfg = {**model_cfg, "text_cfg": text_cfg}
    elif not model_cfg.get("text_cfg", {}).get("hf_tokenizer_name"):
        # CLIP's BPE table beside the weights, as a hub repo has it: the default install has no open_clip to provide it
        import importlib.util

        from .bpe import MERGES, read_merges

        table = Path(list(importlib.util.find_spec("open_clip").submodule_search_locations)[0], MERGES)
        extra_files = {"merges.txt": "#version: 0.2\n" + "\n".join(read_merges(table)) + "\n", **(extra_files or {})}
    out = Path(out_dir).absolute()
    reason = why_not_replaceable(out)
    if reason is not None:
        raise UsageError(f"{out} already exists and {reason}; nothing was written, choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    token = owned.new_token()
    final = Path(os.path.realpath(out.parent)) / out.name
    leftover = re.compile(rf"\.{re.escape(out.name)}\.[a-z0-9_]{{8}}")  # mkdtemp's names below
    for name in filter(leftover.fullmatch, os.listdir(out.parent)):  # saves of this --out killed before the rename
        info = owned.read_marker(out.parent / name) or {}
        if (info.get("kind"), info.get("path")) == (MODEL_KIND, os.path.realpath(final)):
            sweep_temps(out.parent, re.escape(name))  # unless a save still writes it (it holds a lock)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with held(tmp):
            owned.start_marker(tmp, MODEL_KIND, token, where=final)
            config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {},
                      "imgsearch": {"owner_token": token}}
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
            state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_FILE))
            for name, data in (extra_files or {}).items():
                (tmp / name).write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
            owned.record(tmp, CONFIG_FILE, WEIGHTS_FILE, *(extra_files or {}))
            _swap_into_place(tmp, out)
    except BaseException:
        # tmp is the folder mkdtemp made for this call alone, so everything in it is ours.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _swap_into_place(tmp: Path, out: Path) -> None:
    import tempfile

    from . import owned

    if not os.path.lexists(out):
        tmp.rename(out)
        return
    reason = why_not_replaceable(out)  # again: it may have changed while the model was being written
    if reason is not None:
        raise UsageError(f"{out} already exists and {reason}; nothing was written, choose a new folder")
    old_token = model_owner_token(out)
    if old_token is None:  # an empty folder: rmdir refuses if anything has been put in it meanwhile
        os.rmdir(out)
        tmp.rename(out)
        return
    # Renaming onto a fresh empty folder of our own never clobbers an existing name.
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    try:
        os.replace(out, old)
        tmp.rename(out)
    except BaseException:  # Ctrl-C or a failure between the two renames: the previous model goes back
        if not os.path.lexists(out):
            with contextlib.suppress(OSError):
                os.rename(old, out)
        with contextlib.suppress(OSError):
            os.rmdir(old)  # the empty folder made above, when nothing was moved into it
        raise
    left = owned.remove(old, MODEL_KIND, old_token, where=Path(os.path.realpath(out.parent)) / out.name)
    if left is not None:
        logging.getLogger(__name__).warning("left the previous model in %s: %s", old, left)
