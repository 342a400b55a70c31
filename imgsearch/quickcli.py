"""Console-script entry point."""

from __future__ import annotations


def main() -> None:
    from .cli import app

    app(prog_name="imgsearch")
