"""Parsing and limits of query arguments ('2:red car', '5:photo.jpg', k). Standard library only, so the server
client can share it with the search layer without importing numpy or the model."""

from __future__ import annotations

import math
import os
import re

from .config import MAX_K
from .errors import ParamError, UsageError

MAX_WEIGHT = 1000.0
_WEIGHT = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?)\s*:(.+)$", re.S)


def parse_weighted(raw: str) -> tuple[float, str]:
    """'2:red car' -> (2.0, 'red car'); 'red car' -> (1.0, 'red car')."""
    m = _WEIGHT.match(raw)
    if m:
        weight = float(m.group(1))
        # Beyond this, float32 query vectors overflow (inf/nan scores): reject rather than return nothing.
        if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
            digits = m.group(1) if len(m.group(1)) <= 12 else m.group(1)[:8] + "…"
            raise UsageError(f"weight {digits} in {raw[:40]!r} is out of range; use a number between "
                             f"-{MAX_WEIGHT:g} and {MAX_WEIGHT:g}, e.g. 2:\"red car\"")
        return weight, m.group(2).strip()
    return 1.0, raw.strip()


def split_image_spec(raw: str) -> tuple[float, str]:
    """'W:path' -> (W, path), unless 'W:path' is itself an existing file (then weight 1)."""
    if os.path.exists(raw):
        return 1.0, raw
    return parse_weighted(raw)


def check_k(k) -> int:
    """The one limit on results per search, shared by the CLI, the server and the Python API."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ParamError("k", f"give a whole number from 1 to {MAX_K}")
    return k
