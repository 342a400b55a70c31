"""CLIP's symmetric InfoNCE loss, with duplicates in a batch kept from acting as negatives."""

from __future__ import annotations

import math

MAX_LOGIT_SCALE = 100.0
MAX_LOG_SCALE = math.log(MAX_LOGIT_SCALE)


def contrastive_loss(image_features, text_features, logit_scale, image_ids, text_ids):
    """Mean of image→text and text→image cross-entropy over one batch; ``logit_scale`` is the model's learnable
    log-temperature (its scale capped at 100, as in CLIP). Row i's positive is column i; other columns with the
    same image or caption text are right answers too, so they leave the softmax instead of being pushed away."""
    import torch
    import torch.nn.functional as F

    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    scale = logit_scale.float().exp().clamp(max=MAX_LOGIT_SCALE)
    logits = scale * img @ txt.t()
    same = (image_ids[:, None] == image_ids[None, :]) | (text_ids[:, None] == text_ids[None, :])
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
