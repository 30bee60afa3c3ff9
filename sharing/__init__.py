"""Sharing models: export to the HuggingFace format, prepare and install Hub folders, import original nanochat checkpoints."""
