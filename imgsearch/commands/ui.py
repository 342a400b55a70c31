"""Commands: ui (being written)."""
