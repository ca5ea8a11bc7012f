"""Worker side of flatbasin: plain PyTorch data, models, schedules, averagers and the one training loop."""
