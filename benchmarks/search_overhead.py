"""What a search costs beyond its trials: N short digits trials run serially in this process, then the
same trials through `flatbasin search` with 2 CPUs (local Ray, MLflow on SQLite), side by side.

    python benchmarks/search_overhead.py [--trials 16] [--epochs 4]
    python benchmarks/search_overhead.py --warm-ab [--repeats 3]   # workers' warm-up hook off vs on

Prints the search's time divided by the ideal (serial time / 2 CPUs), twice: for the trial phase
(Tuner.fit, where trials, checkpoints and MLflow writes happen) and for the whole search, which adds Ray's
start-up and the end: summary, comparison figure and the best model logged to MLflow.
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"
)  # local Ray on loopback, before Ray is imported

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from flatbasin.search.tuner import SearchOptions, run_search
from flatbasin.spaces import load_space
from flatbasin.trainables.config import make_config
from flatbasin.trainables.data import DataSpec, load_data
from flatbasin.trainables.loop import train

SPACE = """
name: overhead
samples: {trials}
epochs: {epochs}
variants:
  sgd:
    lr: {{loguniform: [0.02, 0.1]}}
"""


def search_once(args: argparse.Namespace, warm: bool) -> tuple[float, dict[str, float]]:
    """One `flatbasin search` of the trials; (its wall time, its phases). Each in its own Ray."""
    import ray

    os.environ["FLATBASIN_WARM_WORKERS"] = "1" if warm else "0"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "overhead.yaml"
        path.write_text(SPACE.format(trials=args.trials, epochs=args.epochs))
        options = SearchOptions(
            concurrency=2, tracking_uri=f"sqlite:///{tmp}/mlflow.db", storage=Path(tmp) / "runs"
        )
        tick = time.perf_counter()
        outcome = run_search(load_space(path), options, Console(quiet=True))
        wall = time.perf_counter() - tick
        ray.shutdown()
    return wall, outcome.seconds


def warm_ab(args: argparse.Namespace) -> None:
    """Searches with and without the workers' warm-up hook, alternating, `--repeats` pairs."""
    rows: dict[bool, list[tuple[float, dict[str, float]]]] = {True: [], False: []}
    for _ in range(args.repeats):
        for warm in (False, True):
            rows[warm].append(search_once(args, warm))
    for warm in (False, True):
        trials = statistics.median(s["trials"] for _, s in rows[warm])
        wall = statistics.median(w for w, _ in rows[warm])
        print(
            f"warm-up hook {'on ' if warm else 'off'}: trial phase {trials:.1f} s, whole search {wall:.1f} s (medians)"
        )
    ratios = [
        on[1]["trials"] / off[1]["trials"] for on, off in zip(rows[True], rows[False], strict=True)
    ]
    print(
        f"trial phase with / without the hook: {statistics.median(ratios):.2f} (median of {len(ratios)} pairs)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument(
        "--warm-ab", action="store_true", help="compare the workers' warm-up hook on/off"
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.warm_ab:
        warm_ab(args)
        return

    torch.set_num_threads(1)  # one CPU per trial, as in the search
    data = load_data(DataSpec(), "cpu")
    train(make_config("sgd", {"epochs": 1, "threads": 1}), data=data)  # warm-up
    tick = time.perf_counter()
    for i in range(args.trials):
        train(make_config("sgd", {"epochs": args.epochs, "threads": 1, "seed": i}), data=data)
    serial = time.perf_counter() - tick
    search, seconds = search_once(args, warm=True)
    ideal = serial / 2
    trials = seconds["trials"]
    print(
        f"{args.trials} sgd trials of {args.epochs} epochs on digits ({serial / args.trials:.2f} s each serially)"
    )
    print(f"serial {serial:.1f} s; ideal on 2 CPUs {ideal:.1f} s")
    print("search phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    print(f"trial phase (Tuner.fit) / ideal = {trials / ideal:.2f}")
    print(
        f"whole search (Ray start-up, MLflow summary and model included) / ideal = {search / ideal:.2f}"
    )


if __name__ == "__main__":
    main()
