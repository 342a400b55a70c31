"""What kind of file is this: image by extension, or by its first bytes when the extension says nothing.

The walk must stay fast on big trees, so nothing here decodes: a known image extension is taken as is, a
known non-image extension (text, video, archives, sidecars) is never opened, and only the rest (odd or
missing extensions) costs one 32-byte read, matched against the signatures below.
"""

from __future__ import annotations

import os
import stat

from .config import HEIC_EXTENSIONS, IMAGE_EXTENSIONS, RAW_EXTENSIONS

HEAD_BYTES = 32

# Never sniffed: not photos even when they hold image bytes (.thm: a video's thumbnail; .part: a download).
NOT_IMAGE_EXTENSIONS = frozenset(
    {".txt", ".md", ".rst", ".csv", ".tsv", ".json", ".jsonl", ".xml", ".html", ".htm", ".css", ".js", ".ts",
     ".py", ".pyc", ".ipynb", ".c", ".h", ".cpp", ".java", ".go", ".rs", ".rb", ".sh", ".yaml", ".yml", ".toml",
     ".ini", ".cfg", ".conf", ".log", ".sql", ".db", ".sqlite", ".sqlite3", ".db-wal", ".db-shm", ".lock",
     ".pdf", ".doc", ".docx", ".xls", ".xlsx", ".ppt", ".pptx", ".odt", ".ods", ".odp", ".rtf", ".epub",
     ".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".wmv", ".flv", ".mpg", ".mpeg", ".3gp", ".mts",
     ".m2ts", ".lrv", ".mp3", ".m4a", ".aac", ".wav", ".flac", ".ogg", ".opus", ".wma", ".aiff",
     ".zip", ".gz", ".tgz", ".bz2", ".xz", ".zst", ".7z", ".rar", ".tar", ".iso", ".dmg", ".exe", ".dll",
     ".so", ".dylib", ".o", ".a", ".class", ".jar", ".whl", ".xmp", ".aae", ".thm", ".pp3", ".dop", ".svg",
     ".xcf", ".kra", ".part", ".crdownload", ".tmp", ".swp", ".bak", ".faiss", ".safetensors", ".pt", ".npy"}
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DIB_HEADER_SIZES = {12, 40, 52, 56, 64, 108, 124}  # BMP info headers (also in ICO bitmaps)
_HEIC_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}
_FTYP_BRANDS = {b"avif": "image", b"avis": "image", b"crx ": "raw", **dict.fromkeys(_HEIC_BRANDS, "heic")}  # crx: CR3


def sniff(head: bytes) -> str | None:
    """"image", "raw", "heic" or None (not an image format we know) from a file's first bytes."""
    if head[:4] in (b"IIRO", b"IIRS", b"MMOR", b"IIU\x00") or head[:15] == b"FUJIFILMCCD-RAW":
        return "raw"  # Olympus, Panasonic, Fujifilm: TIFF-like but not TIFF
    if (head[:3] == b"\xff\xd8\xff" or head[:8] == PNG_SIGNATURE or head[:6] in (b"GIF87a", b"GIF89a")
            or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
            # TIFF; a TIFF-based RAW (DNG, NEF, CR2...) without its extension is read as TIFF
            or head[:4] in (b"II*\x00", b"MM\x00*")
            or (head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in DIB_HEADER_SIZES)
            # JPEG 2000: jp2 box, raw codestream
            or head[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n" or head[:4] == b"\xff\x4f\xff\x51"
            or _is_pnm(head)
            # ICO / CUR: image count > 0, reserved byte 0
            or (head[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00") and len(head) >= 10 and head[4] and head[9] == 0)
            # PSD, QOI, DDS, ICNS, Sun raster
            or head[:4] in (b"8BPS", b"qoif", b"DDS ", b"icns", b"\x59\xa6\x6a\x95")):
        return "image"
    return _FTYP_BRANDS.get(head[8:12]) if head[4:8] == b"ftyp" else None


def _is_pnm(head: bytes) -> bool:
    """The PNM family and PFM: "P1".."P7", "Pf", "PF", whitespace, then a number or a comment (or PAM's
    header words), so a text file that merely starts with "P1 " is not taken for a bitmap."""
    if head[:1] != b"P" or len(head) < 4 or head[1:2] not in (b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"f", b"F"):
        return False
    if head[2:3] not in (b" ", b"\t", b"\r", b"\n"):
        return False
    rest = head[2:].lstrip(b" \t\r\n")
    return rest[:1].isdigit() or rest[:1] == b"#" or (head[1:2] == b"7" and rest[:5] in (
        b"WIDTH", b"HEIGH", b"DEPTH", b"MAXVA", b"TUPLT", b"ENDHD"))


def open_regular(path: str | os.PathLike):
    """``path`` opened for binary reading when it is a regular file, else OSError "not a regular file". Opened
    without blocking and checked once open: a FIFO or a device put where a file was after the walk saw it (or
    given by name) is refused, never read forever."""
    nonblock = getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, os.O_RDONLY | nonblock)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file")
        if nonblock:
            os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
        f.raw.name = os.fsdecode(path)  # named as open() names it (Pillow and messages read it)
        return f
    except BaseException:
        os.close(fd)
        raise


def read_head(path: str) -> bytes:
    """The first bytes of a regular file; b"" when it cannot be read (O_NONBLOCK: a FIFO never blocks us)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return b""
    try:
        return os.read(fd, HEAD_BYTES)
    except OSError:
        return b""
    finally:
        os.close(fd)


def kind_by_extension(path: str) -> str | None:
    """"image", "raw", "heic", "other" (a known non-image type: never opened) or None (sniff to know)."""
    ext = os.path.splitext(path)[1].lower()
    kinds = (("image", IMAGE_EXTENSIONS), ("raw", RAW_EXTENSIONS), ("heic", HEIC_EXTENSIONS),
             ("other", NOT_IMAGE_EXTENSIONS))
    return next((kind for kind, exts in kinds if ext in exts), None)
