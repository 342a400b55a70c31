"""Contrastive fine-tuning of open_clip models on image–caption pairs (`imgsearch finetune`): data.py reads,
splits and batches captions, loss.py is CLIP's loss, loop.py trains and evaluates with checkpoints, wise.py
blends weights. Heavy imports stay inside functions."""
