"""Decode images safely: EXIF orientation, reduced-size JPEG decode, pixel cap, odd modes."""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from datetime import datetime

from .errors import DecodeError

_EXIF_IFD = 0x8769
_DATETIME_ORIGINAL = 36867
_DATETIME = 306
_ORIENTATION = 274


@dataclass(frozen=True)
class ImageInfo:
    width: int  # as displayed, after EXIF orientation
    height: int
    taken_at: str | None  # ISO 8601 from EXIF, when present


def _register_heif() -> None:
    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
    except ImportError:
        pass


_heif_done = False


def _pil():
    global _heif_done
    from PIL import Image

    if not _heif_done:
        _register_heif()
        # We enforce our own pixel cap with a readable message; Pillow's would raise mid-decode.
        Image.MAX_IMAGE_PIXELS = None
        _heif_done = True
    return Image


def _taken_at(exif) -> str | None:
    raw = None
    try:
        raw = exif.get_ifd(_EXIF_IFD).get(_DATETIME_ORIGINAL) or exif.get(_DATETIME)
    except Exception:  # malformed EXIF must never fail the image
        return None
    if not raw or not isinstance(raw, str):
        return None
    try:
        return datetime.strptime(raw.strip("\x00 ")[:19], "%Y:%m:%d %H:%M:%S").isoformat()
    except ValueError:
        return None


def _to_rgb(im):
    Image = _pil()
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # High bit depth grayscale: stretch to 8 bits instead of clipping to white.
        import numpy as np

        arr = np.asarray(im, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        im = Image.fromarray(arr.astype("uint8"), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im.convert("RGB")


def open_image(source: bytes | str | os.PathLike, *, draft_size: int | None = None,
               max_pixels: int = 100_000_000):
    """Decode ``source`` (file bytes or a path) to an RGB PIL image plus its ImageInfo.

    ``draft_size``: for JPEGs, let libjpeg decode at a reduced scale whose short side stays at or above
    this many pixels (much faster on large photos; the model resizes further anyway).
    Raises DecodeError with a reason for anything that is not a readable image within the pixel cap.
    """
    Image = _pil()
    from PIL import ImageOps, UnidentifiedImageError

    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise DecodeError("empty file (0 bytes)")
        fp = io.BytesIO(source)
    else:
        try:
            if os.path.getsize(source) == 0:
                raise DecodeError("empty file (0 bytes)")
        except OSError as e:
            raise DecodeError(f"cannot read file: {e.strerror or e}") from None
        fp = source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(fp)
            w, h = im.size
            if w * h > max_pixels:
                raise DecodeError(
                    f"image too large: {w}x{h} = {w * h / 1e6:.0f} MP exceeds the {max_pixels / 1e6:.0f} MP cap "
                    "(raise IMGSEARCH_MAX_PIXELS if this file is genuine)"
                )
            exif = im.getexif()
            orientation = exif.get(_ORIENTATION, 1) if exif else 1
            taken = _taken_at(exif) if exif else None
            if orientation in (5, 6, 7, 8):
                w, h = h, w
            if draft_size and im.format == "JPEG" and min(im.size) > 2 * draft_size:
                im.draft("RGB", (draft_size, draft_size))
            im.load()
            if orientation != 1:
                im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not an image Pillow can read (unknown or corrupt format)") from None
    except Image.DecompressionBombError as e:
        raise DecodeError(f"image too large: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        text = str(e) or type(e).__name__
        if "truncated" in text.lower():
            raise DecodeError("truncated image file (incomplete download or copy?)") from None
        raise DecodeError(f"corrupt image: {text}") from None
    except MemoryError:
        raise DecodeError("not enough memory to decode this image") from None
    return im, ImageInfo(w, h, taken)


def image_info(path: str | os.PathLike) -> ImageInfo:
    """Dimensions and date taken without decoding pixels."""
    Image = _pil()
    try:
        with Image.open(path) as im:
            w, h = im.size
            exif = im.getexif()
            if exif and exif.get(_ORIENTATION, 1) in (5, 6, 7, 8):
                w, h = h, w
            return ImageInfo(w, h, _taken_at(exif) if exif else None)
    except Exception as e:
        raise DecodeError(f"cannot read image header: {e}") from None
