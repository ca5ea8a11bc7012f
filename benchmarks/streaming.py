"""Streamed data against data in memory and against a bare PyTorch DataLoader loop, side by side.

    python benchmarks/streaming.py [--images 1000] [--image-size 32] [--epochs 2] [--rounds 4]
                                   [--workers 2] [--threads 1] [--batch-size 64] [--decode]

The same `sgd` trial (flatbasin's `train`, small_cnn, 3 x SIZE x SIZE images, batch 64, cosine
schedule) three ways, on the same images:

- bare: the loop anyone would write: a DataLoader over a map-style Dataset (shuffle, drop_last,
  WORKERS persistent workers), per-batch cosine learning rate, a validation pass through a second
  DataLoader every epoch, a test pass through a third at the end. The reference.
- streamed: `train` on the same Dataset given to flatbasin as a user's Dataset (user_data.streamed:
  a seeded batch order, three persistent loaders; every epoch scores the validation split and the
  "fit" sample of the training split, the generalisation gap).
- memory: `train` on the same images held as tensors (the built-in synthetic set, split by its
  seeded split into sets of the same sizes), as flatbasin holds built-in sets and a user's arrays
  (the fastest way when the data fits).

The Dataset returns precomputed uint8 tensors read from a NumPy file mapped into memory, as a fast
disk-backed data set would (the file stays in the page cache). With --decode, two more ways read
each image from PNG bytes decoded by Pillow per item, as an image folder would: bare and streamed.

Each way starts its own DataLoader workers in each trial; the clock stops when the trial has its
result, before the workers are stopped (in a search, one worker process keeps its streamed loaders
from trial to trial), and whatever a way leaves behind is collected before the next way starts. The ways take turns, round after round, in an order that
rotates, so that a busy machine slows each alike. Prints training images per second of each
(epochs x steps x batch over the trial's wall time, evaluation included), and per way the median over
rounds of its ratio to the bare loop of the same round. Goal (issue 16): streamed >= 0.9 x bare.
Also the share of the trial spent in the per-epoch evaluation and the CPU seconds of the training
process itself (its workers not counted): on a machine busy with other work, where wall times move
by tens of percent from round to round, the work each way does in its own process moves much less.
"""

from __future__ import annotations

import argparse
import gc
import io
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from flatbasin.trainables import user_data
from flatbasin.trainables.config import make_config
from flatbasin.trainables.data import Data, load_data, load_raw
from flatbasin.trainables.data_spec import DataSpec
from flatbasin.trainables.loop import train
from flatbasin.trainables.models import build_model

LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4  # the trial's and the bare loop's
EVAL_BATCH = 1024  # the bare loop's evaluation batch (flatbasin's on a CPU, too)


class MappedImages(Dataset):
    """uint8 (C, H, W) images from a NumPy file mapped into memory: one copy per item, no decoding."""

    def __init__(self, path: Path, labels: np.ndarray):
        self.images = np.load(path, mmap_mode="r")
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.array(self.images[index])), int(self.labels[index])


class PNGImages(Dataset):
    """The same images as PNG files' bytes, decoded by Pillow at every read."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.encoded = []
        for image in images:
            buffer = io.BytesIO()
            Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
            self.encoded.append(buffer.getvalue())
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(io.BytesIO(self.encoded[index])) as image:
            pixels = np.asarray(image.convert("RGB"))
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy()), int(self.labels[index])


# What a way returns: the seconds of its per-epoch evaluation, and what stops its DataLoader workers
# (called after the clock stops, for every way alike: in a search they outlive the trial).
Outcome = tuple[float, Callable[[], None]]


def bare(streamed: user_data.StreamedData, args: argparse.Namespace, seed: int = 0) -> Outcome:
    """The bare DataLoader loop on `streamed`'s Datasets and splits."""
    torch.manual_seed(seed)
    model = build_model("small_cnn", streamed.shape, streamed.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    workers = {"num_workers": args.workers, "persistent_workers": args.workers > 0}
    train_loader = DataLoader(
        Subset(streamed.train_set, streamed.train_index.tolist()),
        batch_size=args.batch_size, shuffle=True, drop_last=True,
        generator=torch.Generator().manual_seed(seed), **workers,
    )  # fmt: skip
    val_loader = DataLoader(
        Subset(streamed.train_set, streamed.val_index.tolist()), batch_size=EVAL_BATCH, **workers
    )
    scale = lambda x: x.float().div_(255.0)  # noqa: E731
    total, step, eval_s = args.epochs * len(train_loader), 0, 0.0
    for _ in range(args.epochs):
        model.train()
        for x, y in train_loader:
            for group in opt.param_groups:
                group["lr"] = LR * (1 + math.cos(math.pi * step / total)) / 2
            loss = F.cross_entropy(model(scale(x)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        tick = time.perf_counter()
        model.eval()
        with torch.no_grad():
            hits = sum(int((model(scale(x)).argmax(1) == y).sum()) for x, y in val_loader)
        eval_s += time.perf_counter() - tick
    test_loader = DataLoader(streamed.test_set, batch_size=EVAL_BATCH, **workers)
    with torch.no_grad():
        hits = sum(int((model(scale(x)).argmax(1) == y).sum()) for x, y in test_loader)
    assert 0 <= hits <= streamed.size("test")
    loaders = [train_loader, val_loader, test_loader]
    return eval_s, loaders.clear


def flatbasin(data: Data | user_data.StreamedData, args: argparse.Namespace) -> Outcome:
    """flatbasin's trial; (test accuracy, seconds of the per-epoch evaluation: validation, the
    deployed model's score, the "fit" sample)."""
    config = make_config(
        "sgd", {"epochs": args.epochs, "batch_size": args.batch_size, "threads": args.threads,
                "model": "small_cnn", "lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY,
                "loader_workers": args.workers},
    )  # fmt: skip
    if isinstance(data, user_data.StreamedData):
        data = data.to(torch.device("cpu"))  # a fresh copy: new loaders, new workers, as a trial
    # train() reads streamed data through Data's interface; its annotation (and load_data's) says
    # Data only: a gap in trainables' types, not in what runs.
    result = train(config, data=data)  # type: ignore[arg-type]
    assert result.test_acc is not None
    return result.seconds["eval"], data.close


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )  # fmt: skip
    parser.add_argument(
        "--images", type=int, default=1000, help="images in all (1/4 are the test set)"
    )
    parser.add_argument("--image-size", type=int, default=32, help="height and width in pixels")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each trial")
    parser.add_argument("--rounds", type=int, default=4, help="times each way runs")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of every loader")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of the training process"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--decode", action="store_true", help="add the PNG-decoding Dataset's two ways"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    # CIFAR-shaped images (the built-in synthetic set); test_frac 1/4 carves the in-memory test split.
    spec = DataSpec(dataset="synthetic", synthetic_images=args.images, image_size=args.image_size,
                    test_frac=0.25)  # fmt: skip
    memory = load_data(spec, "cpu")
    images, labels, _, _ = load_raw(spec)
    cut = len(images) - len(memory.y_test)  # the same split sizes as the in-memory set
    folder = tempfile.TemporaryDirectory()
    np.save(Path(folder.name) / "train.npy", images[:cut])
    np.save(Path(folder.name) / "test.npy", images[cut:])

    def streamed(train_set: Dataset, test_set: Dataset) -> user_data.StreamedData:
        own = DataSpec(dataset="streaming:bench", loader_workers=args.workers)
        return user_data.streamed(own, (train_set, test_set), source="benchmarks/streaming.py")

    mapped = streamed(
        MappedImages(Path(folder.name) / "train.npy", labels[:cut]),
        MappedImages(Path(folder.name) / "test.npy", labels[cut:]),
    )
    ways: dict[str, Callable[[], Outcome]] = {
        "bare DataLoader loop": lambda: bare(mapped, args),
        "flatbasin, streamed": lambda: flatbasin(mapped, args),
        "flatbasin, in memory": lambda: flatbasin(memory, args),
    }
    reference = {name: "bare DataLoader loop" for name in ways}
    if args.decode:
        png = streamed(PNGImages(images[:cut], labels[:cut]), PNGImages(images[cut:], labels[cut:]))
        ways |= {
            "bare DataLoader loop, PNG": lambda: bare(png, args),
            "flatbasin, streamed PNG": lambda: flatbasin(png, args),
        }
        reference |= {name: "bare DataLoader loop, PNG" for name in ways if "PNG" in name}
    assert mapped.size("train") == memory.size("train") and mapped.size("val") == memory.size("val")
    per_trial = args.epochs * mapped.steps_per_epoch(args.batch_size) * args.batch_size
    print(
        f"sgd, small_cnn, {args.images} images of 3x{args.image_size}x{args.image_size} "
        f"({memory.size('train')} train / {memory.size('val')} val / {memory.size('test')} test), "
        f"batch {args.batch_size}, {args.epochs} epochs ({per_trial} training images a trial), "
        f"{args.workers} workers, {args.threads} thread(s), {args.rounds} rounds"
    )
    bare(mapped, argparse.Namespace(**{**vars(args), "epochs": 1}))[1]()  # warm-up, not timed
    gc.collect()

    rates: dict[str, list[float]] = {name: [] for name in ways}
    eval_share: dict[str, list[float]] = {name: [] for name in ways}
    cpu: dict[str, list[float]] = {name: [] for name in ways}  # the training process's own
    names = list(ways)
    for round_ in range(args.rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            tick, cpu_tick = time.perf_counter(), time.process_time()
            eval_s, stop_workers = ways[name]()
            seconds = time.perf_counter() - tick
            cpu[name].append(time.process_time() - cpu_tick)
            stop_workers()
            gc.collect()  # nothing of this way's is left to be collected in the next one's time
            rates[name].append(per_trial / seconds)
            eval_share[name].append(eval_s / seconds)
        print(f"round {round_ + 1}: " + ", ".join(f"{n} {rates[n][-1]:.0f}/s" for n in names))

    print()
    print(
        "| way | training images / s (median) | / bare loop (median of rounds) | rounds | "
        "per-epoch evaluation, share of the trial | CPU s of the training process (median) |"
    )
    print("|---|---|---|---|---|---|")
    for name in names:
        ratios = [a / b for a, b in zip(rates[name], rates[reference[name]], strict=True)]
        print(
            f"| {name} | {statistics.median(rates[name]):.0f} | {statistics.median(ratios):.3f} | "
            f"{', '.join(f'{r:.3f}' for r in ratios)} | "
            f"{100 * statistics.median(eval_share[name]):.1f}% | "
            f"{statistics.median(cpu[name]):.2f} |"
        )
    mapped.close()
    folder.cleanup()


if __name__ == "__main__":
    main()
