"""train() against a bare PyTorch loop on the same model, data and epochs, timed side by side.

    python benchmarks/trial_loop.py [--epochs 10] [--repeats 5] [--threads 1]

Runs alternate (bare, flatbasin, bare, ...) in one process so that machine noise hits both; prints the
median of the per-pair ratios for `sgd` and `swa`, and the share of the trial spent averaging (weight
average, BN pass and scoring each new member).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn

from flatbasin.trainables.config import make_config
from flatbasin.trainables.data import Data, load_data
from flatbasin.trainables.data_spec import DataSpec
from flatbasin.trainables.loop import train
from flatbasin.trainables.models import SmallCNN


def bare(data: Data, epochs: int, swa_start: int | None, seed: int = 0) -> float:
    """The loop anyone would write: per-batch cosine (or SWA's) lr, eval every epoch, test at the end."""
    torch.manual_seed(seed)
    model = SmallCNN(1, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    swa = AveragedModel(model) if swa_start is not None else None
    g, spe = torch.Generator().manual_seed(seed), len(data.x_train) // 64
    total = epochs * spe
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(data.x_train), generator=g)
        for k in range(spe):
            step = epoch * spe + k
            if swa_start is None:
                lr = 0.05 * (1 + math.cos(math.pi * step / total)) / 2
            else:
                t = step / (swa_start * spe)
                lr = 0.05 if t <= 0.5 else 0.05 - 0.04 * min((t - 0.5) / 0.4, 1.0)
            for group in opt.param_groups:
                group["lr"] = lr
            idx = perm[k * 64 : (k + 1) * 64]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        deployed: nn.Module = model
        if swa is not None and swa_start is not None and epoch + 1 > swa_start:
            swa.update_parameters(model)
            update_bn([data.x_train[i : i + 1024] for i in range(0, len(data.x_train), 1024)], swa)
            deployed = swa
        deployed.eval()
        with torch.no_grad():
            val_acc = (deployed(data.x_val).argmax(1) == data.y_val).float().mean().item()
    with torch.no_grad():
        return (deployed(data.x_test).argmax(1) == data.y_test).float().mean().item() + 0 * val_acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_data(DataSpec(), "cpu")
    swa_start = args.epochs - max(1, round(0.25 * args.epochs))
    cases = {
        "sgd": (make_config("sgd", {"epochs": args.epochs, "threads": args.threads}), None),
        "swa": (
            make_config("swa", {"epochs": args.epochs, "threads": args.threads, "swa_lr": 0.01}),
            swa_start,
        ),
    }
    bare(data, 1, None)  # warm-up: first convolutions pay for kernel selection
    print(
        f"digits, small CNN, {args.epochs} epochs, {args.threads} thread(s), {args.repeats} pairs each"
    )
    for name, (config, start) in cases.items():
        ratios, shares = [], []
        for _ in range(args.repeats):
            tick = time.perf_counter()
            bare(data, args.epochs, start)
            t_bare = time.perf_counter() - tick
            tick = time.perf_counter()
            result = train(config, data=data)
            t_ours = time.perf_counter() - tick
            ratios.append(t_ours / t_bare)
            shares.append(result.seconds["averaging"] / result.seconds["total"])
        print(
            f"{name:>4}: train() / bare loop = {statistics.median(ratios):.3f} "
            f"(pairs: {', '.join(f'{r:.3f}' for r in ratios)}); bare {t_bare:.2f} s; "
            f"averaging + BN + member scoring = {100 * statistics.median(shares):.1f}% of the trial"
        )


if __name__ == "__main__":
    main()
