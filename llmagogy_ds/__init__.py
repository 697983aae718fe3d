"""llmagogy_ds: curriculum pre-training of growing language models."""
__version__ = "0.1.0"
