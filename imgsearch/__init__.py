"""imgsearch: local semantic image search with CLIP, FAISS and SQLite.

The Python API is ``imgsearch.Library`` (see library.py). Names are resolved on first use, so
``import imgsearch`` (and the CLI's --help) never imports numpy, SQLAlchemy or torch.
"""

from .config import VERSION as __version__

_LAZY = {
    "Library": "library",
    "Hit": "results", "IndexReport": "results", "LibraryStatus": "results", "ModelStatus": "results",
    "ImgSearchError": "errors", "UsageError": "errors", "ParamError": "errors", "LibraryError": "errors",
    "ModelLoadError": "errors", "ModelMismatchError": "errors", "DecodeError": "errors", "DataError": "errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'imgsearch' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
