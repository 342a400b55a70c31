"""Settings. The only module that reads environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
)
HEIC_EXTENSIONS = frozenset({".heic", ".heif"})

# Most results one search returns, in-process and through `serve` alike.
MAX_K = 10_000

# Folders that hold app metadata, not photos (Synology, macOS, Windows, VCS).
SKIP_DIR_NAMES = frozenset(
    {"@eaDir", "#recycle", "#snapshot", "$RECYCLE.BIN", "System Volume Information",
     "__MACOSX", "lost+found", "node_modules"}
)


# A library home holds HOME_DB and HOME_MARKER; `index` skips such folders (their thumbnails are not photos).
HOME_DB = "library.db"
HOME_MARKER = ".imgsearch-home"


def default_home() -> Path:
    """Per-user data dir: $XDG_DATA_HOME/imgsearch or ~/.local/share/imgsearch."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "imgsearch"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        from .errors import UsageError

        raise UsageError(f"{name}={value!r} is not a whole number; unset it or give e.g. {default}") from None


@dataclass(frozen=True)
class Settings:
    """Everything a command needs to know about where and how to run."""

    home: Path = field(default_factory=default_home)
    model: str = DEFAULT_MODEL
    pretrained: str | None = DEFAULT_PRETRAINED
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    batch_size: int = 32
    workers: int = 0  # decode threads; 0 = pick from CPU count
    max_pixels: int = 100_000_000  # decompression-bomb cap
    max_file_mb: int = 256  # larger files are not read: peak memory stays near workers x this
    write_batch: int = 256  # rows per transaction while indexing
    flat_max: int = 50_000  # exact FAISS search up to this many vectors, IVF above
    index_budget_mb: int = 4096  # raw vectors above this use IVF-PQ codes instead
    recall_target: float = 0.95  # recall@10 the IVF probe count is tuned for
    gpu_decode: str = "auto"  # auto (on with CUDA) | on | off: batched torchvision/nvJPEG decode of JPEGs

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        """Defaults, then IMGSEARCH_* environment variables, then explicit overrides (None = unset)."""
        env = os.environ
        values: dict = {}
        if env.get("IMGSEARCH_HOME"):
            values["home"] = Path(env["IMGSEARCH_HOME"])
        if env.get("IMGSEARCH_MODEL"):
            values["model"] = env["IMGSEARCH_MODEL"]
            # A non-default model does not inherit the default model's pretrained tag.
            values["pretrained"] = None
        if "IMGSEARCH_PRETRAINED" in env:
            values["pretrained"] = env["IMGSEARCH_PRETRAINED"] or None
        if env.get("IMGSEARCH_DEVICE"):
            values["device"] = env["IMGSEARCH_DEVICE"]
        if env.get("IMGSEARCH_PRECISION"):
            values["precision"] = env["IMGSEARCH_PRECISION"]
        values["batch_size"] = _env_int("IMGSEARCH_BATCH_SIZE", cls.batch_size)
        values["workers"] = _env_int("IMGSEARCH_WORKERS", cls.workers)
        values["max_pixels"] = _env_int("IMGSEARCH_MAX_PIXELS", cls.max_pixels)
        values["max_file_mb"] = _env_int("IMGSEARCH_MAX_FILE_MB", cls.max_file_mb)
        values["flat_max"] = _env_int("IMGSEARCH_FLAT_MAX", cls.flat_max)
        if env.get("IMGSEARCH_GPU_DECODE"):
            values["gpu_decode"] = env["IMGSEARCH_GPU_DECODE"]
        values["index_budget_mb"] = _env_int("IMGSEARCH_INDEX_BUDGET_MB", cls.index_budget_mb)
        settings = cls(**values)
        clean = {k: v for k, v in overrides.items() if v is not None}
        if "model" in clean and "pretrained" not in clean and clean["model"] != DEFAULT_MODEL:
            clean["pretrained"] = values.get("pretrained") if "IMGSEARCH_PRETRAINED" in env else None
        if "home" in clean:
            clean["home"] = Path(clean["home"])
        return settings.with_(**clean)

    def with_(self, **changes) -> "Settings":
        return replace(self, **changes)

    @property
    def db_path(self) -> Path:
        return self.home / HOME_DB

    @property
    def index_dir(self) -> Path:
        return self.home / "index"

    def index_path(self, model_id: int) -> Path:
        """FAISS cache file for one model's vectors."""
        return self.index_dir / f"model-{model_id}.faiss"

    @property
    def thumbs_dir(self) -> Path:
        return self.home / "thumbs"

    def decode_workers(self) -> int:
        if self.workers > 0:
            return self.workers
        return max(2, min(8, (os.cpu_count() or 2)))
