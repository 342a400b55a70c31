"""Which model the user asked for, in one canonical form, which keys libraries and caches and the server client
compares a server's model against. Standard library only (the client must not import numpy)."""

from __future__ import annotations

import os
from dataclasses import dataclass

LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")

# Short names for good defaults. "multilingual": XLM-R base text tower, ViT-B-32 image tower (Korean R@1 on XM3600
# 0.435 against 0.001 for the English default) for a 1.1 GB download once, at the default's image tower speed.
PRESETS = {"multilingual": ("xlm-roberta-base-ViT-B-32", "laion5b_s13b_b90k")}

# open_clip tags whose Hugging Face repo holds weights, config and BPE tables (merges.txt): the default model and
# common ViTs, resolved and exported without torch or open_clip (onnx_image.checkpoint_source).
HUB_TAGS = {
    ("ViT-B-32", "laion2b_s34b_b79k"): "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
    ("ViT-B-32", "datacomp_xl_s13b_b90k"): "laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K",
    ("ViT-B-16", "laion2b_s34b_b88k"): "laion/CLIP-ViT-B-16-laion2B-s34B-b88K",
    ("ViT-B-16", "datacomp_xl_s13b_b90k"): "laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K",
    ("ViT-L-14", "laion2b_s32b_b82k"): "laion/CLIP-ViT-L-14-laion2B-s32B-b82K",
    ("ViT-L-14", "datacomp_xl_s13b_b90k"): "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K",
    ("ViT-H-14", "laion2b_s32b_b79k"): "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
}

# Name parts of open_clip models whose text tower reads many languages (XLM-R, mT5/SigLIP-i18n, NLLB, Gemma).
_MULTILINGUAL_NAMES = ("xlm-roberta", "xlm_roberta", "nllb", "i18n", "mt5", "siglip2", "multilingual", "mclip")


def looks_like_file(value: str) -> bool:
    """Whether a --pretrained value names a checkpoint file rather than an open_clip tag like 'openai'."""
    return os.sep in value or value.endswith(WEIGHT_SUFFIXES) or os.path.exists(value)


@dataclass(frozen=True)
class ModelSpec:
    """What the user asked for: an open_clip name (or local-dir:/hf-hub: identifier) and weights."""

    name: str
    pretrained: str | None = None

    def canonical(self) -> "ModelSpec":
        """Absolute paths for local dirs and checkpoint files, so the same model always has one key."""
        name, pretrained = self.name, self.pretrained or None
        if name in PRESETS:
            name, pretrained = PRESETS[name][0], pretrained or PRESETS[name][1]
        if name.startswith(LOCAL_DIR):
            name = LOCAL_DIR + os.path.abspath(os.path.expanduser(name[len(LOCAL_DIR):]))
            pretrained = None
        elif name.startswith(HF_HUB):
            pretrained = None
        elif pretrained and looks_like_file(pretrained):
            pretrained = os.path.abspath(os.path.expanduser(pretrained))
        return ModelSpec(name, pretrained)

    def same_model(self, name: str | None, pretrained: str | None) -> bool:
        """Whether a recorded (name, pretrained) pair, e.g. a server's, is this model in canonical form."""
        mine = self.canonical()
        return mine.name == name and mine.pretrained == (pretrained or None)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.pretrained})" if self.pretrained else self.name


def hub_repo(spec: ModelSpec) -> str | None:
    """The Hugging Face repo holding ``spec``'s open_clip files (an hf-hub: name, or a tag in HUB_TAGS)."""
    spec = spec.canonical()
    if spec.name.startswith(HF_HUB):
        return spec.name[len(HF_HUB):].strip("/")
    return HUB_TAGS.get((spec.name, spec.pretrained or ""))


def english_only(spec: ModelSpec, unreadable: bool = False) -> bool:
    """Whether the model's text tower is English-only, judged without open_clip: a local-dir model when its
    config names no Hugging Face tower or tokenizer (an unreadable one counts as ``unreadable``: for a hint, as
    not, since a missing hint costs less than a wrong one), other models by their name."""
    spec = spec.canonical()
    if spec.name.startswith(LOCAL_DIR):
        from .config import read_json

        try:
            with open(os.path.join(spec.name[len(LOCAL_DIR):], "open_clip_config.json"), encoding="utf-8") as f:
                text_cfg = read_json(f.read())["model_cfg"]["text_cfg"]
        except (OSError, ValueError, KeyError, TypeError):
            return unreadable
        return not any(str(text_cfg.get(k) or "").strip() for k in ("hf_model_name", "hf_tokenizer_name"))
    return not any(part in spec.name.lower() for part in _MULTILINGUAL_NAMES)
