"""GPU throughput: one flatbasin trial against a bare fused loop on the same model, then the total
throughput of 1, 2, 4 and 8 trials sharing one GPU through `flatbasin search`, side by side.

    python benchmarks/gpu_throughput.py [--epochs 4] [--batch-size 512] [--repeats 3]
    python benchmarks/gpu_throughput.py --device cpu --small    # smoke run on the CPU, under a minute

Data: the built-in `synthetic` set shaped like CIFAR-10 (50,000 training images of 3x32x32 before
the validation split, 10 classes), resident on the device. Models: resnet18 (CIFAR stem) and the
airbench net. Both loops run the device's fast path as flatbasin resolves it (on CUDA: bf16
autocast, channels-last, cuDNN autotuning), flip and 2-pixel crop on whole batches on the device, and
SGD with Nesterov momentum; the bare loop uses torch's fused SGD and draws its augmentation on the
device. Images per second count training images; each side's time includes its evaluation (the bare
loop scores the validation split every epoch; flatbasin also scores its generalisation-gap sample and
the deployed model, which is part of what a trial costs). Pairs alternate (bare, flatbasin, ...) so
that machine noise hits both; the median of the per-pair ratios is printed.

The search part runs `flatbasin search` (local Ray, MLflow on SQLite in a temporary folder) with
N trials at --gpus-per-trial 1/N and --concurrency N; throughput is all trials' training images over
the trial phase (Tuner.fit), which includes each worker's start and data load. It runs first, while
this process holds no CUDA context of its own.
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"
)  # local Ray on loopback, before Ray is imported

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import Tensor

from flatbasin.trainables import accel
from flatbasin.trainables.config import TrialConfig, make_config
from flatbasin.trainables.data import Data, load_data
from flatbasin.trainables.loop import train
from flatbasin.trainables.models import build_model

LR = 0.05  # peak of a cosine schedule, both loops
MODELS = ("resnet18", "airbench")

SPACE = """
name: {name}
samples: {trials}
epochs: {epochs}
dataset: synthetic
model: {model}
fixed: {{synthetic_images: {images}, test_frac: {test_frac}, batch_size: {batch_size},
        augment: true, optimizer: nesterov}}
variants:
  sgd:
    lr: {{loguniform: [0.02, 0.1]}}
"""


def settings(args: argparse.Namespace, model: str) -> dict[str, object]:
    return {
        "dataset": "synthetic", "synthetic_images": args.images, "test_frac": args.test_frac,
        "model": model, "epochs": args.epochs, "batch_size": args.batch_size, "lr": LR,
        "optimizer": "nesterov", "augment": True, "device": args.device, "threads": args.threads,
    }  # fmt: skip


def augment(x: Tensor, pad: int = 2) -> Tensor:
    """Random flip and translation by up to `pad` pixels, every draw on the device (airbench's way)."""
    n, _, h, w = x.shape
    x = torch.where(torch.rand(n, 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
    padded = F.pad(x, (pad,) * 4, mode="reflect")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n, 1, 1), device=x.device)
    rows = (dy + torch.arange(h, device=x.device)[None, :, None]).expand(n, h, w)
    cols = (dx + torch.arange(w, device=x.device)[None, None, :]).expand(n, h, w)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def bare(config: TrialConfig, data: Data, run: accel.Runtime) -> float:
    """The fast loop anyone would write for this model; returns its wall time in seconds."""
    torch.manual_seed(config.seed)
    model = build_model(config.model, data.shape, data.num_classes)
    model = model.to(run.device).to(memory_format=run.memory_format)
    fused = {"fused": True} if run.device.type == "cuda" else {}
    opt = torch.optim.SGD(
        model.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=5e-4, **fused
    )
    n, batch = len(data.x_train), config.batch_size
    steps = n // batch
    total = config.epochs * steps
    synchronize(run.device)
    tick = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(n, device=run.device)
        for k in range(steps):
            idx = order[k * batch : (k + 1) * batch]
            for group in opt.param_groups:
                group["lr"] = LR * (1 + math.cos(math.pi * (epoch * steps + k) / total)) / 2
            x = augment(data.x_train[idx]).contiguous(memory_format=run.memory_format)
            with run.autocast():
                loss = F.cross_entropy(model(x), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            hits = sum(
                (model(x).argmax(1) == y).sum()
                for x, y in zip(
                    data.x_val.split(run.eval_batch_size),
                    data.y_val.split(run.eval_batch_size),
                    strict=True,
                )
            )
        float(hits)  # read back once per epoch, as flatbasin does
    synchronize(run.device)
    return time.perf_counter() - tick


def train_examples(images: int, test_frac: float, val_frac: float = 0.1) -> int:
    """The training split of the synthetic set, cut as data.load_data cuts it."""
    rest = images - round(images * test_frac)
    return rest - round(rest * val_frac)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trial_vs_bare(args: argparse.Namespace, device: torch.device) -> None:
    for name in MODELS:
        config = make_config("sgd", settings(args, name))
        data = load_data(config.data_spec, str(device))
        run = accel.resolve(device, data.shape)  # the same fast path for both loops
        if not args.small:  # warm-up: kernel selection, allocator, lazy imports
            warm = config.model_copy(update={"epochs": 1})
            bare(warm, data, run)
            train(warm, data=data)
        images = args.epochs * (len(data.x_train) // args.batch_size) * args.batch_size
        ratios, bare_rates, ours_rates = [], [], []
        for _ in range(args.repeats):
            t_bare = bare(config, data, run)
            tick = time.perf_counter()
            train(config, data=data)
            t_ours = time.perf_counter() - tick
            bare_rates.append(images / t_bare)
            ours_rates.append(images / t_ours)
            ratios.append(t_bare / t_ours)
        print(
            f"{name:>9}: flatbasin trial {statistics.median(ours_rates):8.0f} img/s, "
            f"bare loop {statistics.median(bare_rates):8.0f} img/s, flatbasin / bare = "
            f"{statistics.median(ratios):.3f} (pairs: {', '.join(f'{r:.3f}' for r in ratios)})"
        )
        del data
        load_data.cache_clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def search_throughput(args: argparse.Namespace, device: torch.device) -> None:
    """N trials at 1/N of a GPU each (on the CPU: N trials at once), through `flatbasin search`."""
    import ray

    from flatbasin.search.options import SearchOptions
    from flatbasin.search.running import run_search
    from flatbasin.spaces import load_space

    steps = train_examples(args.images, args.test_frac) // args.batch_size
    rows = []
    for trials in args.trials:
        gpus = 1 / trials if device.type == "cuda" else 0.0
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "throughput.yaml"
            space = SPACE.format(
                name=f"throughput-{trials}", trials=trials, epochs=args.search_epochs,
                model=args.search_model, images=args.images, test_frac=args.test_frac,
                batch_size=args.batch_size,
            )  # fmt: skip
            path.write_text(space)
            options = SearchOptions(
                concurrency=trials, gpus_per_trial=round(gpus, 4),
                cpus_per_trial=args.cpus_per_trial, tracking_uri=f"sqlite:///{tmp}/mlflow.db",
                storage=Path(tmp) / "runs",
            )  # fmt: skip
            outcome = run_search(load_space(path), options, Console(quiet=True))
            ray.shutdown()
        if outcome.errors:
            raise SystemExit(f"the search of {trials} trial(s) failed: {outcome.errors[0]}")
        seconds = outcome.seconds["trials"]
        rows.append((trials, gpus, seconds, trials * args.search_epochs * steps * args.batch_size))
    base = rows[0][3] / rows[0][2]
    print(
        f"{args.search_model}, {args.search_epochs} epoch(s) per trial, batch {args.batch_size}, "
        f"{args.cpus_per_trial:g} CPU(s) per trial:"
    )
    for trials, gpus, seconds, images in rows:
        share = f"{gpus:.4g} GPU" if gpus else "CPU"
        print(
            f"  {trials} trial(s) at {share} each: trial phase {seconds:6.1f} s, "
            f"{images / seconds:8.0f} img/s in all, x{images / seconds / base:.2f} of one trial"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument(
        "--small", action="store_true", help="40 images, one epoch, no warm-up: a smoke run"
    )
    parser.add_argument("--epochs", type=int, default=4, help="per run of the trial-vs-bare part")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--search-epochs", type=int, default=10)
    parser.add_argument("--search-model", choices=MODELS, default="airbench")
    parser.add_argument("--trials", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--cpus-per-trial", type=float, default=None)
    parser.add_argument("--skip-search", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "error: no CUDA device here; this benchmark measures a GPU. For a smoke run of its "
            "code on the CPU: python benchmarks/gpu_throughput.py --device cpu --small",
            file=sys.stderr,
        )
        raise SystemExit(2)
    args.images, args.test_frac = 60_000, 1 / 6  # CIFAR-10: 50,000 train / 10,000 test
    if args.small:
        args.images, args.epochs, args.batch_size, args.repeats = 40, 1, 16, 1
        args.search_epochs, args.trials = 1, [1, 2]
    args.threads = 1 if device.type == "cuda" else max(1, torch.get_num_threads())
    if args.cpus_per_trial is None:
        args.cpus_per_trial = max(1, (os.cpu_count() or 1) // max(args.trials))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}; synthetic CIFAR-shaped data ({args.images} images), batch {args.batch_size}")
    if not args.skip_search:
        search_throughput(args, device)
    trial_vs_bare(args, device)


if __name__ == "__main__":
    main()
