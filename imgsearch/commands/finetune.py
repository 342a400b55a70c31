"""Commands: finetune (being written)."""
