"""booksmith's bundled Phi-style trainer: model.py (the model), data.py (the token-shard loader),
train.py (the loop, DDP under torchrun), checkpoint.py, export.py (Hugging Face format)."""
