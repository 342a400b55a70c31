"""imgsearch: local semantic image search with CLIP, FAISS and SQLite."""

__version__ = "0.1.0"
