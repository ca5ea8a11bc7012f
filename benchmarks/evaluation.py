"""Test-time augmentation and ensemble diversity, measured side by side on the same trained models.

    python benchmarks/evaluation.py [--dataset mnist1d] [--epochs 20] [--seeds 3] [--augment]

Each seed trains `sgd` and `snapshot` once (TTA changes no training step, so one training gives both
numbers): test accuracy of the deployed model without and with TTA (`flip_shift`), and for the
snapshot ensemble the diversity of its members (disagreement and error correlation, all members) and
the gain of the ensemble over its newest member. Prints Markdown.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from flatbasin.trainables.config import make_config
from flatbasin.trainables.curve import accuracy
from flatbasin.trainables.data import load_data
from flatbasin.trainables.loop import load_deployed, predict, train

VARIANTS: dict[str, dict[str, object]] = {"sgd": {}, "snapshot": {}}


def one(variant: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    config = make_config(
        variant,
        {**VARIANTS[variant], "dataset": args.dataset, "epochs": args.epochs, "seed": seed,
         "augment": args.augment, "threads": 1, "device": "cpu"},
    )  # fmt: skip
    data = load_data(config.data_spec, "cpu")
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "last.pt"
        last = config.epochs
        result = train(
            config,
            data=data,
            on_epoch=lambda m, save: save(checkpoint) if m.epoch == last else None,
        )
        deployed = load_deployed(config, checkpoint, data)
    with_tta = accuracy(predict(deployed, data.inputs("test"), "flip_shift"), data.y_test)
    row = {"variant": variant, "seed": seed, "test": result.test_acc, "test_tta": with_tta,
           "gap": result.history[-1].gen_gap}  # fmt: skip
    if result.diversity:
        full = result.diversity[-1]
        row |= {"members": full.count, "disagreement": full.disagreement,
                "error_corr": full.error_corr,
                "ensemble_gain": result.curve[-1].test_acc - result.curve[0].test_acc}  # fmt: skip
    return row


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="mnist1d")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--augment", action="store_true", help="train with augmentation")
    args = parser.parse_args()
    # Trials run on one thread; the data is normalised under the same, as `flatbasin train` does
    # (a reduction over other threads rounds differently, and training amplifies the difference).
    torch.set_num_threads(1)
    rows = [one(v, s, args) for v in VARIANTS for s in range(args.seeds)]
    print(
        f"{args.dataset}, {args.epochs} epochs, augment {args.augment}, seeds 0..{args.seeds - 1}\n"
    )
    print("| variant | test acc | with TTA | TTA gain (points) | last-epoch gap |")
    print("|---|---|---|---|---|")
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        gains = [100 * (r["test_tta"] - r["test"]) for r in mine]
        print(f"| {variant} | {mean_std([r['test'] for r in mine])} | "
              f"{mean_std([r['test_tta'] for r in mine])} | "
              f"{' '.join(f'{g:+.1f}' for g in gains)} | "
              f"{mean_std([r['gap'] for r in mine])} |")  # fmt: skip
    print("\n| seed | snapshot members | disagreement | error corr | ensemble - newest member |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "members" in r:
            corr = "n/a" if r["error_corr"] is None else f"{r['error_corr']:.3f}"
            print(f"| {r['seed']} | {r['members']} | {r['disagreement']:.3f} | {corr} | "
                  f"{100 * r['ensemble_gain']:+.1f} points |")  # fmt: skip


if __name__ == "__main__":
    main()
