"""Commands: apps (being written)."""
