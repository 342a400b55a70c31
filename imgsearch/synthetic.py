"""Captioned synthetic images (coloured shapes) and a tiny CLIP trained on them, for the tests, the benches
and `make run`'s demo: retrieval is checked without downloading anything ("a red circle" finds red circles).
"""

from __future__ import annotations

import csv
import math
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .encoder import save_local_dir

COLORS: dict[str, tuple[int, int, int]] = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220),
                                           "yellow": (235, 220, 30), "purple": (140, 40, 170),
                                           "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")
TEMPLATES = ("a {c} {s}", "a photo of a {c} {s}", "{c} {s}", "a picture of a {c} {s}")


@dataclass(frozen=True)
class Sample:
    path: str
    color: str
    shape: str

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape}"


def draw_shape(color: str, shape: str, size: int = 64, rng: random.Random | None = None,
               rgb: tuple[int, int, int] | None = None):
    """One image: a coloured shape on a dark, slightly noisy background, with random placement."""
    from PIL import Image, ImageDraw

    rng = rng or random.Random()
    bg = tuple(rng.randint(0, 60) for _ in range(3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    fill = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in rgb or COLORS[color])
    r = rng.uniform(0.25, 0.4) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a))
               for a in (-math.pi / 2, -math.pi / 2 + 2 * math.pi / 3, -math.pi / 2 + 4 * math.pi / 3)]
        d.polygon(pts, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape}")
    return im


def generate(folder: str | os.PathLike, per_class: int = 4, colors=None, shapes=SHAPES, size: int = 64,
             fmt: str = "png", seed: int = 0, captions_file: str | None = "captions.csv",
             subfolders: bool = False) -> list[Sample]:
    """Write ``per_class`` images for every colour x shape into ``folder`` (+ a captions CSV)."""
    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    samples: list[Sample] = []
    for color in (colors or list(COLORS)):
        for shape in shapes:
            sub = folder / f"{color}_{shape}" if subfolders else folder
            sub.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                path = sub / f"{color}_{shape}_{i:03d}.{fmt}"
                im = draw_shape(color, shape, size, rng)
                im.save(path, quality=92) if fmt in ("jpg", "jpeg") else im.save(path)
                samples.append(Sample(str(path), color, shape))
    if captions_file:
        with open(folder / captions_file, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["path", "caption"])
            w.writerows([os.path.relpath(s.path, folder), s.caption] for s in samples)
    return samples


def tiny_model_config(embed_dim: int = 64, image_size: int = 32, width: int = 64, layers: int = 2,
                      context_length: int = 16) -> dict:
    """An open_clip model_cfg small enough to train on a CPU in seconds (~4M parameters)."""
    return {"embed_dim": embed_dim,
            "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "head_width": 32,
                           "patch_size": 8},
            "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": width, "heads": 2,
                         "layers": layers}}


def build_tiny_clip(seed: int = 0, **cfg_overrides):
    """A randomly initialised tiny open_clip CLIP (the starting point for the training below)."""
    import open_clip
    import torch

    cfg = tiny_model_config(**cfg_overrides)
    torch.manual_seed(seed)
    return open_clip.CLIP(**cfg), cfg


def pretrain_tiny_clip(out_dir: str | os.PathLike, steps: int = 300, colors=None, shapes=SHAPES,
                       seed: int = 0, batch_size: int = 64, lr: float = 2e-3, n_images: int = 720):
    """Train a tiny CLIP on generated shapes for a few seconds; returns the local-dir model folder it saved.
    Captions are varied templates, so the text tower learns the colour and shape words, not one sentence."""
    import open_clip

    model, cfg = build_tiny_clip(seed)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=cfg["text_cfg"]["context_length"])
    return _train_and_save(model, cfg, tokenizer, lambda c, s: [t.format(c=c, s=s) for t in TEMPLATES], out_dir,
                           steps, colors, shapes, seed, batch_size, lr, n_images)


def _train_and_save(model, cfg: dict, tokenizer, captions_of, out_dir, steps: int, colors, shapes, seed: int,
                    batch_size: int, lr: float, n_images: int, save_tokenizer: bool = False):
    """Contrastive training on generated shapes (``captions_of(colour, shape)`` lists a class's captions),
    then the model saved as a local-dir model in ``out_dir`` (with its tokenizer if ``save_tokenizer``)."""
    import open_clip
    import torch
    import torch.nn.functional as F

    rng = random.Random(seed)
    size = cfg["vision_cfg"]["image_size"]
    preprocess = open_clip.image_transform(size, is_train=False)
    classes = [(c, s) for c in list(colors or COLORS) for s in shapes]
    labels_t = torch.arange(n_images) % len(classes)
    images_t = torch.stack([preprocess(draw_shape(*classes[i % len(classes)], 64, rng)) for i in range(n_images)])
    captions = [captions_of(c, s) for c, s in classes]
    tokens = {(k, j): tokenizer([captions[k][j]])[0] for k in range(len(classes)) for j in range(len(captions[k]))}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        idx = torch.randint(0, n_images, (batch_size,), generator=g)
        lab = labels_t[idx]
        txt = torch.stack([tokens[(int(k), rng.randrange(len(captions[int(k)])))] for k in lab])
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / steps))
        img_f, txt_f, scale = model(images_t[idx], txt)
        logits = scale * img_f @ txt_f.t()
        same = (lab[:, None] == lab[None, :]).float()
        target = same / same.sum(1, keepdim=True)  # same-class pairs are positives, not negatives
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
    model.eval()
    preprocess_cfg = {"size": size, "mean": list(open_clip.OPENAI_DATASET_MEAN),
                      "std": list(open_clip.OPENAI_DATASET_STD)}
    return save_local_dir(model, cfg, out_dir, preprocess_cfg, tokenizer=tokenizer if save_tokenizer else None)


# Korean captions for the shapes: the multilingual tiny model learns them next to the English ones.
KOREAN_COLORS = {"red": "빨간", "green": "초록", "blue": "파란", "yellow": "노란", "purple": "보라색", "white": "하얀"}
KOREAN_SHAPES = {"circle": "원", "square": "사각형", "triangle": "삼각형"}
KOREAN_TEMPLATES = ("{c} {s}", "{c} {s} 사진", "{c} {s} 그림", "{c} {s}의 사진")
# XLM-R's special tokens, at XLM-R's ids, so the tower's config (pad 1, bos 0, eos 2) matches.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")


def bilingual_captions(color: str, shape: str) -> list[str]:
    return ([t.format(c=color, s=shape) for t in TEMPLATES]
            + [t.format(c=KOREAN_COLORS[color], s=KOREAN_SHAPES[shape]) for t in KOREAN_TEMPLATES])


def train_tokenizer(texts: list[str], folder: str | os.PathLike, vocab_size: int = 400):
    """A small BPE tokenizer (sentencepiece-style word boundaries) trained on ``texts``, saved with
    ``save_pretrained`` so transformers' AutoTokenizer (and open_clip's HFTokenizer) load it from ``folder``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                                       show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", mask_token="<mask>", cls_token="<s>", sep_token="</s>")
    fast.save_pretrained(str(folder))
    return fast


def pretrain_tiny_multilingual_clip(out_dir: str | os.PathLike, steps: int = 300, colors=None, shapes=SHAPES,
                                    seed: int = 0, batch_size: int = 64, lr: float = 2e-3, n_images: int = 720,
                                    width: int = 64):
    """Like pretrain_tiny_clip, with a locally trained tokenizer and a tiny XLM-R text tower, on English and
    Korean captions; saved as a local-dir model that holds its tokenizer and tower config."""
    import open_clip
    import torch
    from open_clip.tokenizer import HFTokenizer
    from transformers import XLMRobertaConfig

    with tempfile.TemporaryDirectory(prefix="imgsearch-tiny-hf-") as tmp:
        texts = [t for c in list(colors or COLORS) for s in shapes for t in bilingual_captions(c, s)]
        train_tokenizer(texts, tmp)
        context_length = 16
        XLMRobertaConfig(vocab_size=len(HFTokenizer(tmp).tokenizer), hidden_size=width,
                         num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * width,
                         max_position_embeddings=context_length + 2, pad_token_id=1, bos_token_id=0,
                         eos_token_id=2).save_pretrained(tmp)
        # The text tower: a Hugging Face XLM-R built from the config in ``tmp`` (new, so no weights to fetch).
        cfg = {**tiny_model_config(width=width, context_length=context_length),
               "text_cfg": {"hf_model_name": tmp, "hf_tokenizer_name": tmp, "hf_proj_type": "linear",
                            "hf_pooler_type": "mean_pooler", "context_length": context_length,
                            "hf_model_pretrained": False}}
        torch.manual_seed(seed)
        model = open_clip.CustomTextCLIP(**cfg)
        tokenizer = HFTokenizer(tmp, context_length=context_length)
        cfg["text_cfg"].update(hf_model_name=".", hf_tokenizer_name=".")  # the model is built: saved beside it
        return _train_and_save(model, cfg, tokenizer, bilingual_captions, out_dir, steps, colors, shapes, seed,
                               batch_size, lr, n_images, save_tokenizer=True)
