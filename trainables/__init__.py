"""Worker side of flatbasin: plain PyTorch data, models, schedules, averagers and the one training loop."""

__version__ = "0.1.0"
