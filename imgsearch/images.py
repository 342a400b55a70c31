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


def _check_pixels(w: int, h: int, max_pixels: int) -> None:
    if w * h > max_pixels:
        raise DecodeError(
            f"image too large: {w}x{h} = {w * h / 1e6:.0f} MP exceeds the {max_pixels / 1e6:.0f} MP cap "
            "(raise IMGSEARCH_MAX_PIXELS if this file is genuine)")


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
            _check_pixels(w, h, max_pixels)
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



# --- batched tensor decode (nvJPEG on CUDA) ---------------------------------------------------------
def jpeg_header(data: bytes, max_pixels: int = 100_000_000) -> tuple[ImageInfo, int]:
    """Size, date and EXIF orientation of JPEG bytes without decoding pixels."""
    Image = _pil()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
            if im.format != "JPEG":
                raise DecodeError("not a JPEG")
            w, h = im.size
            _check_pixels(w, h, max_pixels)
            if im.mode not in ("RGB", "L"):
                raise DecodeError(f"{im.mode} JPEG")  # CMYK/YCCK: leave to Pillow
            exif = im.getexif()
            orientation = exif.get(_ORIENTATION, 1) if exif else 1
            if orientation in (5, 6, 7, 8):
                w, h = h, w
            return ImageInfo(w, h, _taken_at(exif) if exif else None), orientation
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError(f"corrupt image: {e}") from None


def normalization_of(preprocess) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the Normalize step in a torchvision preprocess pipeline."""
    for t in getattr(preprocess, "transforms", []):
        if type(t).__name__ == "Normalize":
            return tuple(float(m) for m in t.mean), tuple(float(s) for s in t.std)
    return (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _orient(t, orientation: int):
    """Apply an EXIF orientation to a CHW tensor (same result as ImageOps.exif_transpose)."""
    import torch

    if orientation == 2:
        return torch.flip(t, dims=[2])
    if orientation == 3:
        return torch.flip(t, dims=[1, 2])
    if orientation == 4:
        return torch.flip(t, dims=[1])
    if orientation == 5:
        return t.transpose(1, 2)
    if orientation == 6:
        return torch.rot90(t, k=-1, dims=[1, 2])
    if orientation == 7:
        return torch.flip(t.transpose(1, 2), dims=[1, 2])
    if orientation == 8:
        return torch.rot90(t, k=1, dims=[1, 2])
    return t


def preprocess_tensor(t, size: int, mean, std):
    """CHW uint8 -> normalised float CHW at size x size: shortest-side bicubic resize + centre crop, like
    open_clip's eval preprocess, but on whatever device the tensor is on."""
    import torch
    import torch.nn.functional as F

    _, h, w = t.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = t.unsqueeze(0).float()
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[:, :, top:top + size, left:left + size].clamp_(0, 255).div_(255.0)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return ((x - m) / s)[0]


def decode_jpegs(datas: list[bytes], orientations: list[int], size: int, mean, std, device: str) -> list:
    """Decode a batch of JPEGs with torchvision (nvJPEG when ``device`` is CUDA) and preprocess them there.

    Returns one entry per input: a normalised CHW tensor on ``device``, or None where decoding failed (the
    caller falls back to Pillow for those).
    """
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
    out = []
    for t, o in zip(decoded, orientations):
        out.append(None if t is None else preprocess_tensor(_orient(t, o), size, mean, std))
    return out
