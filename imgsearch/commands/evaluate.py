"""Commands: evaluate (being written)."""
