"""Which model the user asked for, in one canonical form. Standard library only.

The encoder keys libraries and caches by this form, and the server client compares a running server's
model against it; both import it from here so the rule exists once (the client must not import numpy).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


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
