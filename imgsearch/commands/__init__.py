"""CLI command groups kept out of cli.py; each module registers its commands on cli.app."""
