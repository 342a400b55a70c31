"""Decode images safely: EXIF orientation, reduced-size JPEG decode, size checks before decoding, odd modes.

Pillow's process-wide settings are never touched: its own bomb check stays on, our cap is passed per call.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import math
import os
import re
import struct
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timedelta

from . import formats
from .config import HEIC_NEEDS_EXTRA, IMAGE_EXTENSIONS, MAX_PIXELS, RAW_NEEDS_EXTRA
from .errors import DecodeError

# EXIF tags
_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_DATETIME, _MAKE, _MODEL, _ORIENTATION = 306, 271, 272, 274
_DATETIME_ORIGINAL, _OFFSET_TIME, _OFFSET_TIME_ORIGINAL = 36867, 36880, 36881
_OFFSET = re.compile(r"^([+-])(\d{2}):?(\d{2})$")
_PRELOADED = ("JPEG", "PNG", "GIF", "BMP", "DIB", "PPM")  # registered before Pillow imports any other plugin


@dataclass(frozen=True)
class ImageInfo:
    width: int  # as displayed, after EXIF orientation
    height: int
    taken_at: str | None = None  # local wall-clock time from EXIF (ISO 8601, no offset), when present
    taken_utc: str | None = None  # the same instant in UTC; local time taken as UTC when no offset is recorded
    taken_offset: str | None = None  # "+02:00" as recorded (OffsetTimeOriginal / OffsetTime), else None
    gps_lat: float | None = None  # decimal degrees, north positive
    gps_lon: float | None = None  # decimal degrees, east positive
    camera_make: str | None = None
    camera_model: str | None = None

    def meta(self) -> dict:
        """The library's per-image metadata columns (EXIF only: the indexer supplies the file-time fallback)."""
        return {"taken_at": self.taken_at, "taken_utc": self.taken_utc, "taken_offset": self.taken_offset,
                "taken_source": "exif" if self.taken_at else None, "gps_lat": self.gps_lat,
                "gps_lon": self.gps_lon, "camera_make": self.camera_make, "camera_model": self.camera_model}


def _exif_text(value, limit: int = 64) -> str | None:
    """An EXIF ASCII field as clean text: NULs and padding stripped, control characters dropped. Cameras (phones
    named "Xiaomi 红米") write UTF-8 there: read as UTF-8, else latin-1 (Pillow gives its bytes as latin-1 text)."""
    with suppress(UnicodeError, AttributeError):
        value = (value.encode("latin-1") if isinstance(value, str) else value).decode("utf-8")
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str):
        return None
    value = "".join(ch for ch in value.replace("\x00", " ") if ch.isprintable()).strip()
    return value[:limit] or None


def _offset(raw) -> tuple[str, timedelta] | None:
    m = _OFFSET.match(_exif_text(raw) or "")
    if not m:
        return None
    hours, minutes = int(m[2]), int(m[3])
    if hours > 14 or minutes >= 60:  # real UTC offsets span -12:00..+14:00
        return None
    sign = -1 if m[1] == "-" else 1
    return f"{m[1]}{hours:02d}:{minutes:02d}", sign * timedelta(hours=hours, minutes=minutes)


def _degrees(value, ref, refs: str, limit: float) -> float | None:
    """EXIF GPS (degrees, minutes, seconds) rationals and an N/S or E/W ref (``refs``: "NS" or "EW") as
    signed decimal degrees; None when either is malformed, a missing or unknown ref included (no sign)."""
    ref = (_exif_text(ref) or "").upper()
    if len(ref) != 1 or ref not in refs:
        return None
    try:
        parts = [float(v) for v in (value if isinstance(value, (tuple, list)) else (value,))]
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if not 1 <= len(parts) <= 3 or any(not math.isfinite(v) or v < 0 for v in parts) or max(parts[1:], default=0) >= 60:
        return None  # a zero denominator reads as nan; negative parts, or minutes or seconds past 59, are not DMS
    deg = sum(v / 60 ** i for i, v in enumerate(parts))
    if deg > limit:
        return None
    return -deg if ref == refs[1] else deg


def _exif_meta(exif) -> dict:
    """Capture time (with offset), GPS position and camera from parsed EXIF; each part on its own, so one
    malformed field never loses the others (and never fails the image)."""
    out: dict = {}
    try:
        sub = exif.get_ifd(_EXIF_IFD)
    except Exception:
        sub = {}
    with suppress(ValueError, TypeError, OverflowError, AttributeError):
        # The capture time, else the file's own date-time where that one is blank or "0000:00:00 00:00:00".
        for raw, offset in ((sub.get(_DATETIME_ORIGINAL), sub.get(_OFFSET_TIME_ORIGINAL) or sub.get(_OFFSET_TIME)),
                            (exif.get(_DATETIME), sub.get(_OFFSET_TIME))):
            text = (_exif_text(raw) or "")[:19]  # "2019:06:01 12:00:00"; some tools write 2019-06-01 or a T
            with suppress(ValueError):
                local = datetime.strptime(f"{text[:4]}:{text[5:7]}:{text[8:10]} {text[11:]}", "%Y:%m:%d %H:%M:%S")
                break
        else:
            raise ValueError("no date")
        out["taken_at"] = local.isoformat()
        off = _offset(offset)
        out["taken_offset"] = off[0] if off else None
        out["taken_utc"] = (local - off[1] if off else local).isoformat()
    with suppress(Exception):
        gps = exif.get_ifd(_GPS_IFD)
        if gps:
            lat, lon = _degrees(gps.get(2), gps.get(1), "NS", 90.0), _degrees(gps.get(4), gps.get(3), "EW", 180.0)
            # 0,0 is what receivers without a fix write; a photo taken there is rarer than that bug.
            if lat is not None and lon is not None and (lat, lon) != (0.0, 0.0):
                out["gps_lat"], out["gps_lon"] = round(lat, 7), round(lon, 7)
    with suppress(Exception):
        out["camera_make"], out["camera_model"] = _exif_text(exif.get(_MAKE)), _exif_text(exif.get(_MODEL))
    return out


def read_meta(path: str | os.PathLike, max_pixels: int = MAX_PIXELS) -> tuple[int, int, dict]:
    """(width, height, metadata columns) from a file's header only (no pixels decoded), for backfilling
    libraries indexed before these columns existed; DecodeError when unreadable."""
    with _opened(path, max_pixels) as im:
        info, _ = _header(im)
    return info.width, info.height, info.meta()


def _to_rgb(im):
    from PIL import Image

    if "transparency" in im.info and im.mode in ("1", "P", "L", "RGB"):  # a colour key: onto white like an alpha
        im = im.convert("RGBA")
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # High bit depth grayscale: scaled from its nominal range (16 bits; else the first of 0..1 for floats,
        # 8 or 16 bits that holds it), as a viewer shows it: a dark scan stays dark, none is clipped to white.
        import numpy as np

        arr = np.nan_to_num(np.asarray(im, dtype=np.float32))
        tops = {"I": (255.0, 65535.0), "F": (1.0, 255.0, 65535.0)}.get(im.mode, (65535.0,))
        top = next((t for t in tops if arr.max() <= t), float(arr.max()))
        im = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).round().astype("uint8"), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im.convert("RGB")


# The model scales a picture's short side to ~224 px before its centre crop: a 1x120000 strip (0.12 MP) would
# become 224 x 27 million pixels. Within this ratio that stays within 100 model inputs; no real photo is longer.
MAX_ASPECT = 100


def _reduced(im, draft_size: int | None) -> bool:
    """Whether libjpeg will decode ``im``, just opened, at 1/2 to 1/8 of its size for ``draft_size`` (as
    _decode drafts) holding a few rows of blocks: a sequential JPEG (or an MPO's first picture) whose first scan
    holds every component. A progressive one, or one whose components come in separate scans, holds every
    coefficient of the full-size picture whatever the scale (1 GB for a 1.8 kB file claiming 169 MP, where the
    host program lets Pillow load truncated files)."""
    if not draft_size or im.format not in ("JPEG", "MPO") or im.info.get("progressive") \
            or min(im.size) < 2 * draft_size:
        return False
    fp, end = im.fp, im.fp.tell()
    fp.seek(2)  # the markers after SOI, each FFxx and a length, up to the first scan's (FFDA)
    while len(seg := fp.read(4)) == 4 and seg[0] == 0xFF and seg[1] != 0xDA and (size := seg[2] << 8 | seg[3]) >= 2:
        fp.seek(size - 2, 1)
    components = fp.read(1)
    fp.seek(end)
    return seg[:2] == b"\xff\xda" and components == bytes([len(im.layer)])


def check_size(w: int, h: int, max_pixels: int, what: str = "image", reduced: bool = False) -> None:
    """Refuse a picture over the pixel cap, or too elongated to scale, before its pixels are decoded. A JPEG
    decoded reduced (at most a quarter of its pixels) may be twice the cap, Pillow's own refusal threshold:
    100 MP camera photos pass."""
    cap = max_pixels * (2 if reduced else 1)
    if w * h > cap:
        raise DecodeError(
            f"{what} too large: {w}x{h} = {w * h / 1e6:.0f} MP exceeds the {cap / 1e6:.0f} MP cap "
            "(raise IMGSEARCH_MAX_PIXELS if this file is genuine)")
    if max(w, h) > MAX_ASPECT * max(1, min(w, h)):
        raise DecodeError(f"{what} too elongated: {w}x{h}, one side over {MAX_ASPECT} times the other "
                          "(crop it to index it)")


def _icon_pictures(fp, head: bytes):
    """(width, height) of every picture an ICO, CUR or ICNS file holds, from each picture's own header (the
    directory's size need not be the embedded PNG's), checked before Pillow, which decodes an ICO on open."""
    from PIL import Image

    blocks = []  # (offset, length) of each picture
    if head[:4] in (b"\0\0\1\0", b"\0\0\2\0"):  # ICO, CUR: 16-byte entries, data length at +8, offset at +12
        fp.seek(6)
        table = fp.read(16 * int.from_bytes(head[4:6], "little"))
        blocks = [struct.unpack_from("<II", table, k + 8)[::-1] for k in range(0, len(table) - 15, 16)]
    elif head[:4] == b"icns":  # blocks of type, length (header included), data
        pos, end = 8, int.from_bytes(head[4:8], "big")
        while pos + 8 <= end:
            fp.seek(pos + 4)
            length = int.from_bytes(fp.read(4), "big")
            if length < 8:
                break
            blocks.append((pos + 8, length - 8))
            pos += length
    for offset, length in blocks:
        fp.seek(offset)
        top = fp.read(24)
        if top[:8] == formats.PNG_SIGNATURE:
            yield struct.unpack(">II", top[16:24])
        elif int.from_bytes(top[:4], "little") in formats.DIB_HEADER_SIZES:  # an ICO bitmap; its height counts the mask
            w, h = struct.unpack_from("<HH" if top[0] == 12 else "<ii", top, 4)
            yield abs(w), abs(h) // 2
        elif top[:4] == b"\xff\x4f\xff\x51" or top[:12] == b"\0\0\0\x0cjP  \r\n\x87\n":  # JPEG 2000 (ICNS)
            fp.seek(offset)
            with Image.open(io.BytesIO(fp.read(length)), formats=["JPEG2000"]) as sub:  # header only
                yield sub.size


def _binary(source):
    """``source`` (bytes or a path) as a readable binary file; DecodeError when empty or unreadable."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise DecodeError("empty file (0 bytes)")
        return io.BytesIO(source)
    try:
        f = formats.open_regular(source)
    except OSError as e:
        raise DecodeError(f"cannot read file: {e.strerror or e}") from None
    if os.fstat(f.fileno()).st_size == 0:
        f.close()
        raise DecodeError("empty file (0 bytes)")
    return f


def _heif(fp):
    """A HEIC/HEIF photo through pillow-heif's image class, without registering it with Pillow."""
    try:
        from pillow_heif import HeifImageFile
    except ImportError:
        raise DecodeError(HEIC_NEEDS_EXTRA) from None
    fp.seek(0)
    return HeifImageFile(fp)


def _pillow_open(fp):
    """Pillow's image of ``fp`` in one of the formats of IMAGE_EXTENSIONS only: left to itself Pillow tries
    every plugin it has, and its EPS one runs Ghostscript (an outside interpreter, fed a temp file) on whatever
    the bytes hold. A JPEG or PNG imports no other plugin."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(fp, formats=_PRELOADED)
    except UnidentifiedImageError:
        return Image.open(fp, formats=_other_formats())


@functools.cache
def _other_formats() -> tuple[str, ...]:
    from PIL import Image

    Image.init()
    names = Image.registered_extensions()
    return tuple(sorted({names.get(e) for e in IMAGE_EXTENSIONS} & set(Image.OPEN) - set(_PRELOADED)))


@contextmanager
def _opened(source, max_pixels: int, draft_size: int | None = None):
    """The one way a file is opened for decoding: Pillow's image of ``source`` (path or bytes), no pixel
    decoded, once its size (and every picture's in an icon file) passes :func:`check_size`, at the reduced
    size a JPEG will be decoded at for ``draft_size``. Failures, in the ``with`` body too, become DecodeError.
    Pillow's own bomb check (the host program's setting) stays on."""
    from PIL import Image, UnidentifiedImageError

    fp = _binary(source)
    try:
        with fp:
            head = fp.read(formats.HEAD_BYTES)
            for w, h in _icon_pictures(fp, head):
                check_size(w, h, max_pixels, "picture inside this icon file")
            fp.seek(0)
            try:
                im = _pillow_open(fp)
            except UnidentifiedImageError:
                if head[:4] == b"8BPS" and (head[4:6] == b"\0\2" or head[22:24] in (b"\0\x10", b"\0\x20")):
                    kind = "large-document (PSB)" if head[4:6] == b"\0\2" else f"{head[23]}-bit"
                    raise DecodeError(f"{kind} Photoshop file: Pillow reads 8-bit PSDs only "
                                      "(save an 8-bit copy or a TIFF to index it)") from None
                if formats.sniff(head) != "heic":
                    raise
                im = _heif(fp)
            check_size(*im.size, max_pixels, reduced=_reduced(im, draft_size))
            yield im
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not an image Pillow can read (unknown or corrupt format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # the warning, if made an error
        raise DecodeError(f"image too large: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as e:
        text = " ".join(str(e).split()) or type(e).__name__  # one line: libheif's messages end in a newline
        if "truncated" in text.lower() or "end of file" in text.lower():  # libheif: "Unexpected end of file"
            raise DecodeError("truncated image file (incomplete download or copy?)") from None
        raise DecodeError(f"corrupt image: {text}") from None
    except MemoryError:
        raise DecodeError("not enough memory to decode this image") from None


def _header(im) -> tuple[ImageInfo, int]:
    """ImageInfo (size as displayed) and the EXIF orientation left to apply of an image from :func:`_opened`."""
    exif = im.getexif()
    orientation = exif.get(_ORIENTATION, 1) if exif else 1
    tiff = im.format == "TIFF"  # Pillow turns a TIFF upright as it loads it (and from 11 reports that size)
    w, h = (im.tag_v2.get(256), im.tag_v2.get(257)) if tiff else im.size
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return (ImageInfo(w, h, **_exif_meta(exif)) if exif else ImageInfo(w, h)), 1 if tiff else orientation


# EXIF orientation -> the PIL transpose that shows the picture upright (Image.Transpose values, as
# ImageOps.exif_transpose maps them; that one also rewrites the EXIF and fails on a malformed block)
_UPRIGHT = {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}


def _decode(im, draft_size: int | None):
    """(upright RGB image, ImageInfo, EXIF orientation) of an image from :func:`_opened`."""
    info, orientation = _header(im)
    # MPO: a JPEG with more pictures after it (phones' HDR gain maps, stereo cameras); the first is the photo
    if draft_size and im.format in ("JPEG", "MPO") and min(im.size) >= 2 * draft_size:  # else no scale fits
        im.draft("RGB", (draft_size, draft_size))
    im.load()
    if orientation in _UPRIGHT:
        im = im.transpose(_UPRIGHT[orientation])
    return _to_rgb(im), info, orientation


def open_image(source: bytes | str | os.PathLike, *, draft_size: int | None = None, max_pixels: int = MAX_PIXELS):
    """Decode ``source`` (file bytes or a path) to an RGB PIL image plus its ImageInfo.

    ``draft_size``: let libjpeg decode a JPEG at a reduced scale whose short side stays at or above this (much
    faster on large photos). DecodeError with a reason for anything that is not a readable image within the
    caps (:func:`check_size`, checked before any pixel is decoded). Camera RAW goes through rawpy.
    """
    if not isinstance(source, (bytes, bytearray, memoryview)) and os.path.exists(source) \
            and not os.path.isfile(source):  # /dev/zero, a FIFO, a folder: no image, and a read may never end
        raise DecodeError("not a regular file")
    if _is_raw(source):
        return _open_raw(source, draft_size, max_pixels)
    try:
        with _opened(source, max_pixels, draft_size) as im:
            return _decode(im, draft_size)[:2]
    except DecodeError:
        # Bytes have no extension to tell a TIFF-based RAW (DNG, NEF, CR2, ARW) from a TIFF: libraw may.
        if (isinstance(source, (bytes, bytearray, memoryview)) and bytes(source[:4]) in (b"II*\x00", b"MM\x00*")
                and importlib.util.find_spec("rawpy") is not None):
            with suppress(DecodeError):
                return _open_raw(source, draft_size, max_pixels)
        raise


# --- camera RAW (rawpy, the `raw` extra) --------------------------------------------------------------
def _is_raw(source) -> bool:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return formats.sniff(bytes(source[:formats.HEAD_BYTES])) == "raw"
    path = os.fspath(source)  # with no telling extension, the content decides: a CR3 renamed .dat is still RAW
    return (formats.kind_by_extension(path) or formats.sniff(formats.read_head(path))) == "raw"


# libraw's flip code -> the PIL transpose that shows the picture upright
_RAW_FLIP = {3: 3, 5: 2, 6: 4}  # Image.Transpose.ROTATE_180, ROTATE_90 (counter-clockwise), ROTATE_270


def _open_raw(source, draft_size: int | None, max_pixels: int):
    """A RAW photo: its embedded preview when it is big enough for the model (no demosaicing), else a
    half-size demosaic. ImageInfo gives the sensor picture's size, upright."""
    try:
        import rawpy
    except ImportError:
        raise DecodeError(RAW_NEEDS_EXTRA) from None
    from PIL import Image

    _binary(source).close()  # an empty or unreadable file gets the reason any image would
    fp = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) else os.fspath(source)
    try:
        with rawpy.imread(fp) as raw:
            sizes = raw.sizes
            w, h = (sizes.height, sizes.width) if sizes.flip in (5, 6) else (sizes.width, sizes.height)
            check_size(w, h, max_pixels)  # the sensor's picture, before libraw demosaics it
            im, taken = _raw_preview(raw, rawpy, min(draft_size or 224, w, h), max_pixels)
            if im is None:
                im = Image.fromarray(raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8))
    except DecodeError:
        raise
    except MemoryError:
        raise DecodeError("not enough memory to decode this image") from None
    except Exception as e:  # rawpy.LibRawError and its kin: libraw could not read the file
        text = str(e) or type(e).__name__
        raise DecodeError(f"corrupt or unsupported RAW file: {text}") from None
    return _to_rgb(im), ImageInfo(w, h, taken)


def _raw_preview(raw, rawpy, min_side: int, max_pixels: int):
    """(upright preview image, its EXIF date) or (None, None) when there is none at least ``min_side`` px."""
    from PIL import Image

    try:
        thumb = raw.extract_thumb()
    except Exception:  # no preview, or one libraw cannot hand over: demosaic instead
        return None, None
    try:  # a preview over the caps or unreadable: demosaic instead
        if thumb.format == rawpy.ThumbFormat.JPEG:
            with _opened(thumb.data, max_pixels) as im:  # the preview's own size is checked before decoding
                im, info, orientation = _decode(im, min_side)
            taken, tagged = info.taken_at, orientation != 1
        elif thumb.format == rawpy.ThumbFormat.BITMAP:  # libraw has decoded it (within its own thumbnail limit)
            check_size(thumb.data.shape[1], thumb.data.shape[0], max_pixels)
            im, taken, tagged = Image.fromarray(thumb.data), None, False
        else:
            return None, None
    except DecodeError:
        return None, None
    if min(im.size) < min_side:
        return None, None
    flip = _RAW_FLIP.get(raw.sizes.flip)
    if flip is not None and not tagged:  # previews usually carry no orientation of their own
        im = im.transpose(flip)
    return im, taken


# --- batched tensor decode (nvJPEG on CUDA) ---------------------------------------------------------
def jpeg_header(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[ImageInfo, int]:
    """Size, EXIF metadata and orientation of JPEG bytes without decoding pixels."""
    with _opened(data, max_pixels) as im:
        if im.format != "JPEG":
            raise DecodeError("not a JPEG")
        if im.mode not in ("RGB", "L"):
            raise DecodeError(f"{im.mode} JPEG")  # CMYK/YCCK: leave to Pillow
        return _header(im)


class UnsupportedPreprocess(ValueError):
    """The model's preprocess has an option the batched tensor path does not reproduce: use Pillow for it."""


_TENSOR_RESIZE = ("shortest", "squash")
_TENSOR_INTERPOLATION = ("bicubic", "bilinear")


@dataclass(frozen=True)
class TensorPreprocess:
    """The model's eval preprocess for CHW uint8 tensors on any device (the batched decode path); built only by
    :func:`tensor_preprocess` from the model's own ``preprocess_cfg``, nothing falls back to a default."""
    size: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bicubic" | "bilinear"
    resize_mode: str  # "shortest" (resize the short side, centre crop) | "squash" (resize to size, any aspect)

    def geometry(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(height, width) a h x w picture is resized to, and (top, left) of the centre crop of ``size``."""
        th, tw = self.size
        if self.resize_mode == "squash":
            nh, nw = th, tw
        elif h <= w:  # torchvision Resize(int): the short side to size, the long side truncated
            nh, nw = th, int(th * w / h)
        else:
            nh, nw = int(tw * h / w), tw
        return nh, nw, int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))

    def __call__(self, t):
        """CHW uint8 (any device) -> normalised float CHW, as torchvision's Resize/CenterCrop/Normalize do it."""
        import torch
        import torch.nn.functional as F

        _, h, w = t.shape
        (th, tw), (nh, nw, top, left) = self.size, self.geometry(h, w)
        x = t.unsqueeze(0).float()
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode=self.interpolation, antialias=True, align_corners=False)
        # Pillow rounds to 8 bits after resizing; so does this, so both paths see the same pixels.
        x = x.clamp_(0, 255).round_()
        x = x[:, :, top:top + th, left:left + tw].div_(255.0)
        m = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return ((x - m) / s)[0]


class NumpyPreprocess:
    """The model's eval preprocess on a PIL image in Pillow + numpy (the torch-free path): open_clip resizes PIL
    input with Pillow itself, so the same steps give the same pixels. Built from a checked TensorPreprocess."""

    def __init__(self, spec: TensorPreprocess):
        import numpy as np

        self.spec = spec
        self._mean = np.asarray(spec.mean, dtype=np.float32).reshape(3, 1, 1) * 255.0
        self._scale = 1.0 / (np.asarray(spec.std, dtype=np.float32).reshape(3, 1, 1) * 255.0)

    def __call__(self, im):
        """RGB PIL image -> normalised float32 CHW numpy array."""
        import numpy as np

        from PIL import Image

        w, h = im.size
        (th, tw), (nh, nw, top, left) = self.spec.size, self.spec.geometry(h, w)
        if (nw, nh) != (w, h):
            resample = Image.BICUBIC if self.spec.interpolation == "bicubic" else Image.BILINEAR
            im = im.resize((nw, nh), resample)
        if top or left or (nh, nw) != (th, tw):
            im = im.crop((left, top, left + tw, top + th))
        x = np.asarray(im, dtype=np.float32).transpose(2, 0, 1)
        return (x - self._mean) * self._scale


def numpy_preprocess(cfg: dict) -> NumpyPreprocess:
    """The torch-free preprocess for a model's recorded ``preprocess_cfg``; UnsupportedPreprocess if it has none."""
    return NumpyPreprocess(tensor_preprocess(cfg))


def preprocess_cfg_of(model) -> dict:
    """open_clip's ``preprocess_cfg`` of a loaded model (what its own torchvision preprocess was built from)."""
    module = getattr(model, "visual", model)
    return dict(getattr(module, "preprocess_cfg", None) or {})


def tensor_preprocess(cfg: dict, preprocess=None) -> TensorPreprocess:
    """The tensor path for a model's ``preprocess_cfg``, else UnsupportedPreprocess saying why. ``preprocess``
    (the model's torchvision pipeline), when given, must normalise as ``cfg`` says, else Pillow is left to it."""
    missing = [k for k in ("size", "mean", "std") if k not in cfg]
    if missing:
        raise UnsupportedPreprocess(f"the model's preprocess_cfg has no {', '.join(missing)}")
    mode, resize = cfg.get("mode", "RGB"), cfg.get("resize_mode", "shortest")
    interp = cfg.get("interpolation", "bicubic")
    for what, value, allowed in (("image mode", mode, ("RGB",)), ("resize_mode", resize, _TENSOR_RESIZE),
                                 ("interpolation", interp, _TENSOR_INTERPOLATION)):
        if value not in allowed:
            raise UnsupportedPreprocess(f"{what} {value!r}")
    size = cfg["size"]
    size = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(v) for v in size)
    if len(size) != 2 or (resize == "shortest" and size[0] != size[1]):
        raise UnsupportedPreprocess(f"size {cfg['size']!r} with resize_mode {resize!r}")

    def triple(v, name):
        v = (float(v),) * 3 if isinstance(v, (int, float)) else tuple(float(x) for x in v)
        if len(v) != 3:
            raise UnsupportedPreprocess(f"{name} {cfg[name]!r} is not one value per RGB channel")
        return v

    mean, std = triple(cfg["mean"], "mean"), triple(cfg["std"], "std")
    if preprocess is not None:
        norm = next((t for t in getattr(preprocess, "transforms", []) if type(t).__name__ == "Normalize"), None)
        if norm is None:
            raise UnsupportedPreprocess("the model's preprocess has no Normalize step")
        given = [float(v) for part in (norm.mean, norm.std) for v in (list(part) * 3 if len(part) == 1 else part)]
        if any(abs(a - b) > 1e-6 for a, b in zip(given, mean + std)):
            raise UnsupportedPreprocess("the model's preprocess normalises differently from its preprocess_cfg")
    return TensorPreprocess(size, mean, std, interp, resize)


# EXIF orientation -> (transpose H and W first, then flip these CHW dims); 6 and 8 are the two rotations.
_ORIENT = {2: (False, [2]), 3: (False, [1, 2]), 4: (False, [1]),
           5: (True, []), 6: (True, [2]), 7: (True, [1, 2]), 8: (True, [1])}


def _orient(t, orientation: int):
    """Apply an EXIF orientation to a CHW tensor (same result as ImageOps.exif_transpose)."""
    import torch

    transpose, dims = _ORIENT.get(orientation, (False, []))
    t = t.transpose(1, 2) if transpose else t
    return torch.flip(t, dims=dims) if dims else t


def decode_jpegs(datas: list[bytes], orientations: list[int], pre: TensorPreprocess, device: str) -> list:
    """Decode a batch of JPEGs with torchvision (nvJPEG when ``device`` is CUDA) and preprocess them there: a
    normalised CHW tensor on ``device`` per input, or None where decoding failed (Pillow's, then)."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        decoded = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
    except Exception:
        decoded = []
        for r in raw:  # one bad file must not send the whole batch to the slow path
            try:
                decoded.append(decode_jpeg(r, mode=ImageReadMode.RGB, device=device))
            except Exception:
                decoded.append(None)
    return [None if t is None else pre(_orient(t, o)) for t, o in zip(decoded, orientations)]


# --- the one decode pipeline ------------------------------------------------------------------------
def decode_many(items, decode, workers: int, ahead: int | None = None, overlap: bool = True):
    """Yield ``decode(item)`` for each item, in order, decoded by ``workers`` threads (< 1: this thread).

    Any exception is yielded in the item's place as a DecodeError (one broken file must not stop a run). At
    most ``ahead`` items are in flight, so memory stays bounded. ``overlap`` True: decoding runs ahead while
    the consumer works (e.g. a GPU encoder); False: chunks of ``ahead`` are decoded, then handed over, so
    decode and a CPU encoder take turns at the cores.
    """
    workers = max(0, int(workers))
    ahead = max(1, ahead if ahead is not None else 4 * max(1, workers))

    def safe(item):
        try:
            return decode(item)
        except DecodeError as e:
            return e
        except Exception as e:  # a decoder bug on one file
            return DecodeError(f"cannot decode: {type(e).__name__}: {e}")

    if workers < 1:
        for item in items:
            yield safe(item)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(workers, thread_name_prefix="decode")
    queue: deque = deque()
    try:
        it = iter(items)
        if overlap:
            for item in it:
                queue.append(pool.submit(safe, item))
                if len(queue) >= ahead:
                    yield queue.popleft().result()
            while queue:
                yield queue.popleft().result()
        else:
            while True:
                queue.extend(pool.submit(safe, item) for _, item in zip(range(ahead), it))
                if not queue:
                    return
                done = [f.result() for f in queue]  # the whole chunk, before the consumer runs again
                queue.clear()
                yield from done
    finally:
        for fut in queue:
            fut.cancel()
        pool.shutdown(wait=True)
