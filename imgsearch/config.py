"""Settings. The only module that reads environment variables."""

from __future__ import annotations

import os
import re
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path

VERSION = "0.1.0"  # imgsearch.__version__; here so the modules below the package can read it

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"

# Every extension Pillow opens by itself (no Ghostscript, no Windows-only or stub plugins), so `index`
# takes them without opening the file; files with other or no extensions are sniffed (formats.py).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".gif", ".bmp", ".dib",
                              ".tif", ".tiff", ".jp2", ".j2k", ".j2c", ".jpc", ".jpf", ".jpx", ".pnm", ".pbm", ".pgm",
                              ".ppm", ".pfm", ".tga", ".icb", ".vda", ".vst", ".ico", ".cur", ".icns", ".dds", ".pcx",
                              ".dcx", ".sgi", ".rgb", ".rgba", ".bw", ".ras", ".xbm", ".xpm", ".psd", ".qoi", ".blp",
                              ".avif", ".avifs", ".mpo", ".im", ".msp"})
HEIC_EXTENSIONS = frozenset({".heic", ".heif"})
HEIC_NEEDS_EXTRA = "HEIC/HEIF file: install the heic extra (pip install 'imgsearch[heic]')"
# Camera RAW files, read through rawpy (the `raw` extra); without it they are reported, never "corrupt".
RAW_EXTENSIONS = frozenset({".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".sr2", ".srf", ".raf", ".orf",
                            ".rw2", ".rwl", ".pef", ".srw", ".3fr", ".fff", ".iiq", ".mos", ".mrw", ".kdc", ".dcr",
                            ".erf", ".mef"})
RAW_NEEDS_EXTRA = "RAW file: install the raw extra (pip install 'imgsearch[raw]')"

# The decompression-bomb cap (IMGSEARCH_MAX_PIXELS): Pillow's own default limit, so that no picture we accept
# makes Pillow warn. Pillow refuses above twice its limit (PIL.Image.MAX_IMAGE_PIXELS, the host program's).
MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3

# What the imgsearch program set in its own environment (quickcli.main), so servers it starts do not inherit it.
CLI_ENV: dict[str, str] = {}
# Most results one search returns, in-process and through `serve` alike.
MAX_K = 10_000


def is_ray_address(text: str) -> bool:
    """What `index --ray ADDRESS` accepts: local, auto, ray://HOST[:PORT] or HOST:PORT (anything else is a path)."""
    return bool(re.fullmatch(r"local|auto|ray://[^\s/]+|[A-Za-z0-9_.\-\[\]:]*[A-Za-z0-9_.\-\]]:\d+", text))


# Folders that hold app metadata, not photos (Synology, macOS, Windows, VCS).
SKIP_DIR_NAMES = frozenset({"@eaDir", "#recycle", "#snapshot", "$RECYCLE.BIN", "System Volume Information",
                            "__MACOSX", "lost+found", "node_modules"})

# A library home holds HOME_DB and HOME_MARKER; `index` skips such folders (their thumbnails are not photos).
HOME_DB = "library.db"
HOME_MARKER = ".imgsearch-home"


def make_home(home: str | os.PathLike) -> Path:
    """The library home, created private to this user (0700) when missing: it holds every path, caption
    and thumbnail. A folder that already exists keeps the permissions its owner gave it."""
    home = Path(home)
    home.parent.mkdir(parents=True, exist_ok=True)
    home.mkdir(mode=0o700, exist_ok=True)  # the umask can only take bits away: never wider than 0700
    return home


@contextmanager
def atomic_file(path: str | os.PathLike, durable: bool = False, sweep: bool = False):
    """A new binary file beside ``path``, renamed onto it when the block ends (removed if the block fails), so
    readers see the old file or the new one, never half of one. mkstemp creates it exclusively and 0600: no
    file another process or user owns is ever truncated. ``durable``: fsync'd before the rename. ``sweep``:
    first remove what writers of ``path`` that were killed left behind."""
    import tempfile

    path = Path(path)
    if sweep:
        sweep_temps(path.parent, rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")  # mkstemp's names below
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            held = _flock(fd)  # kept until after the rename: a sweep never takes a file still being written
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
            if held:
                os.replace(tmp, path)
        if not held:  # no flock (Windows), where an open file cannot be renamed
            os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def _flock(fd: int) -> bool:
    """An exclusive lock on an open file or folder, without waiting; False when another process holds one."""
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except (ImportError, OSError):
        return False


@contextmanager
def held(folder: str | os.PathLike):
    """Lock ``folder`` while imgsearch writes into it, so that sweep_temps leaves it alone."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        _flock(fd)
        yield
    finally:
        os.close(fd)


def sweep_temps(folder: str | os.PathLike, pattern: str) -> None:
    """Remove what killed writers left in ``folder``, a folder of imgsearch's home: entries whose whole name
    ``pattern`` matches (the writer's own temporary names) that no process holds locked (each writer locks its
    own before it writes a byte into it, so an empty one may be a write about to begin and is left): a file,
    or a folder's plain files and then the folder."""
    import stat

    names = re.compile(pattern)
    with suppress(OSError):
        for name in os.listdir(folder):
            if not names.fullmatch(name):
                continue
            path = os.path.join(folder, name)
            with suppress(OSError):
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
                try:
                    st = os.fstat(fd)
                    inside = os.listdir(path) if stat.S_ISDIR(st.st_mode) else None
                    started = bool(inside) if inside is not None else stat.S_ISREG(st.st_mode) and st.st_size > 0
                    if not started or not _flock(fd) or not os.path.samestat(st, os.lstat(path)):
                        continue
                    for entry in [os.path.join(path, n) for n in inside or ()]:
                        if os.path.isfile(entry) and not os.path.islink(entry):
                            os.unlink(entry)
                    (os.rmdir if inside is not None else os.unlink)(path)  # rmdir keeps a folder holding more
                finally:
                    os.close(fd)


NESTED_JSON = "nested too deeply"  # read_json's JSONDecodeError message for a RecursionError


def read_json(text: str | bytes):
    """json.loads for files a user or another program gave: JSON nested too deeply for the parser (a RecursionError,
    which no ``except ValueError`` sees) is a JSONDecodeError too, so the caller's one-line message covers it."""
    import json

    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError(NESTED_JSON, text if isinstance(text, str) else "", 0) from None


def model_exports_dir(home: str | os.PathLike, fingerprint: str) -> Path:
    """Where a model's exported towers live: <home>/exports/<weights fingerprint, file-name safe>/."""
    return Path(home) / "exports" / re.sub(r"[^A-Za-z0-9._-]", "_", fingerprint)[:120]


def default_home() -> Path:
    """Per-user data dir: $XDG_DATA_HOME/imgsearch or ~/.local/share/imgsearch."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "imgsearch"


def user_cache_dir() -> Path:
    """Per-user cache dir: $XDG_CACHE_HOME/imgsearch or ~/.cache/imgsearch."""
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "imgsearch")


def check_device(device: str) -> None:
    """A UsageError for a --device imgsearch does not know (Settings, and finetune's own --device)."""
    if device not in ("auto", "cpu", "cuda", "mps") and not device.startswith("cuda:"):
        from .errors import UsageError

        raise UsageError(f"unknown device {device!r}; use auto, cpu, cuda or mps")


def check_precision(precision: str) -> None:
    """A UsageError for a --precision imgsearch does not know (Settings, and finetune's own --precision)."""
    if precision not in ("auto", "fp32", "bf16", "fp16", "int8"):
        from .errors import UsageError

        raise UsageError(f"unknown precision {precision!r}; use auto, fp32, bf16, fp16 or int8")


def _env_number(name: str, default, kind=int, what: str = "a whole number"):
    """The environment variable ``name`` as a ``kind``; ``default`` when unset or empty."""
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return kind(value)
    except ValueError:
        from .errors import UsageError

        raise UsageError(f"{name}={value!r} is not {what}; unset it or give e.g. {default}") from None


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
    max_pixels: int = MAX_PIXELS  # decompression-bomb cap
    max_file_mb: int = 256  # larger files are not read: peak memory stays near workers x this
    write_batch: int = 256  # rows per transaction while indexing
    flat_max: int = 50_000  # exact FAISS search up to this many vectors, IVF above
    index_budget_mb: int = 4096  # raw vectors above this use IVF-PQ codes instead
    recall_target: float = 0.95  # recall@10 the IVF probe count is tuned for
    gpu_decode: str = "auto"  # auto (on with CUDA) | on | off: batched torchvision/nvJPEG decode of JPEGs
    image_backend: str = "auto"  # auto (measured per CPU) | torch | onnx: who runs the fp32 image tower on CPU
    torch_free: bool = True  # index without torch from a verified ONNX export (IMGSEARCH_TORCH_FREE=0: never)
    lang: str | None = None  # NLLB code of the query language (lang.py); None: guessed from the script
    # True only in imgsearch's own process (the CLI): process-wide settings (torch's thread count, Ray's
    # environment) may then be changed for a run; in a program using the library they stay the program's.
    own_process: bool = False

    def __post_init__(self):
        from .errors import UsageError

        for name in ("model", "pretrained", "device", "precision", "gpu_decode", "image_backend", "lang"):
            if not isinstance(getattr(self, name), (str, type(None))):  # Library(lang=5) failed inside a check
                raise UsageError(f"{name} must be text, not {getattr(self, name)!r} ({name}=)")
        # checked here, at every door: an unknown value reached the torch-free path as a reason it "needs torch"
        check_precision(self.precision)
        check_device(self.device)
        for name, least in (("batch_size", 1), ("workers", 0), ("max_pixels", 1), ("max_file_mb", 1)):
            value = getattr(self, name)  # Library(batch_size="8") failed deep in the first index run
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UsageError(f"{name} must be a whole number from {least}, not {value!r} "
                                 f"(IMGSEARCH_{name.upper()} or {name}=)")

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
        # The other fields each read IMGSEARCH_<FIELD NAME>, e.g. IMGSEARCH_GPU_DECODE, IMGSEARCH_MAX_FILE_MB.
        for key in ("device", "precision", "gpu_decode", "image_backend", "lang"):
            if env.get(f"IMGSEARCH_{key.upper()}"):
                values[key] = env[f"IMGSEARCH_{key.upper()}"]
        for key in ("batch_size", "workers", "max_pixels", "max_file_mb", "flat_max", "index_budget_mb"):
            values[key] = _env_number(f"IMGSEARCH_{key.upper()}", getattr(cls, key))
        values["torch_free"] = env.get("IMGSEARCH_TORCH_FREE", "1") != "0"
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

    def without_library(self) -> "Settings":
        """These settings, for work that never creates a library (eval; score and classify of loose files): its
        exports stay in the library's home where there is one, else in this user's cache (a shared /tmp folder
        was another user's to own, or to fill with exports of their making)."""
        return self if self.home.exists() else self.with_(home=user_cache_dir() / "eval-exports")

    def decode_workers(self, device: str = "cpu") -> int:
        return thread_budget(device=device, workers=self.workers).decode

    @property
    def int8_min_cosine(self) -> float:
        """Lowest int8-vs-fp32 cosine on a sample of the user's images that `index --precision int8` accepts."""
        return _env_number("IMGSEARCH_INT8_MIN_COSINE", INT8_MIN_COSINE, float, "a number")


# Measured on ViT-B-32-256 (see docs/cli.md, "int8 on the CPU"): at this cosine the top-10 neighbours of a
# query stay mostly the same; below it retrieval visibly reorders.
INT8_MIN_COSINE = 0.99


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def cpuinfo(field: str) -> str | None:
    """The value of the first ``field`` line of /proc/cpuinfo (Linux), else None."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(field)), None)
    except OSError:
        return None


@dataclass(frozen=True)
class ThreadBudget:
    """How many threads each stage of an image pipeline may use so that together they fit the cores.
    ``overlap`` False: decoding and encoding take turns, so at most max(decode, encoder) threads are busy."""

    cores: int
    encoder: int  # intra-op threads of torch / onnxruntime
    decode: int  # image decode threads
    overlap: bool


def draft_size_for(image_size: int) -> int:
    """The short side a JPEG is decoded at (at least) for a model with ``image_size`` input: 1.5x the input.
    libjpeg decodes at 1/2, 1/4 or 1/8 scale in the DCT, the model's antialiased resize does the rest. On AMD
    EPYC (Zen 3), ViT-B-32-256, 1024x768 photos: 10.2 ms per image at 1/2 scale against 18.3 ms in full,
    embedding cosine >= 0.99999 (bench/index_throughput.py --draft)."""
    return (3 * int(image_size) + 1) // 2


def thread_budget(cores: int | None = None, device: str = "cpu", workers: int = 0) -> ThreadBudget:
    """The one worker-count policy (indexing, eval, training data checks, duplicate fingerprints).
    On a CPU, decode threads preempting the encoder's intra-op threads stall its GEMMs at every barrier (42%
    of the model-only rate lost on 2 loaded cores); decoding a batch with every core, then encoding it with
    every core, keeps the encoder >= 90% busy (decode ~10 ms, encode ~130 ms per image, ViT-B-32, 2 cores).
    On a GPU the encoder needs no cores: decode overlaps, up to 8 threads. ``workers`` sets the decode threads."""
    n = cores or cpu_cores()
    gpu = device.startswith(("cuda", "mps"))
    decode = workers if workers > 0 else max(1, min(8, n)) if gpu else n
    return ThreadBudget(n, encoder=1 if gpu else n, decode=decode, overlap=gpu)


@contextmanager
def torch_threads(settings: Settings, n: int):
    """torch's intra-op thread count set to ``n`` for the block and put back after, in imgsearch's own process:
    it is process-wide, so in someone else's program the count stays theirs (torch's default, one per core, is
    the budget's too unless an affinity mask or a container limits the cores)."""
    if not settings.own_process:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def training_workers(device: str = "cpu", workers: int = 0, cores: int | None = None) -> int:
    """DataLoader decode processes for fine-tuning, from the same policy as indexing: a training step costs
    about three encodes per image, so on a CPU a quarter of the cores keeps it fed; on a GPU as indexing."""
    budget = thread_budget(cores, device, workers)
    return budget.decode if workers > 0 or budget.overlap else max(1, budget.cores // 4)
