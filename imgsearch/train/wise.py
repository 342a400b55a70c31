"""WiSE-FT (Wortsman et al. 2022): blend original and fine-tuned weights to keep zero-shot robustness."""

from __future__ import annotations


def interpolate(original: dict, finetuned: dict, alpha: float) -> dict:
    """State dict (1 - alpha) * original + alpha * finetuned; alpha 0 and 1 give either one bit for bit."""
    import torch

    if not 0.0 <= alpha <= 1.0:
        from ..errors import UsageError

        raise UsageError(f"--wise-alpha must be between 0 and 1, got {alpha}")
    if set(original) != set(finetuned):
        missing = sorted(set(original) ^ set(finetuned))[:3]
        raise ValueError(f"state dicts do not match (e.g. {missing}); WiSE-FT needs the same architecture")
    out = {}
    for name, a in original.items():
        b = finetuned[name]
        if alpha == 0.0:
            out[name] = a.detach().clone()
        elif alpha == 1.0 or not torch.is_floating_point(b):
            out[name] = b.detach().clone()  # integer buffers (ids, counters) are not blended
        else:
            out[name] = torch.lerp(a.detach().to(b.dtype), b.detach(), alpha)
    return out
