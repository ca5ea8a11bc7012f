"""Every variant at its defaults against `sgd` on MNIST-1D at one epoch budget, beside an independent
ensemble of `sgd` models (the upper reference, which costs `--members` times the budget).

    python benchmarks/methods.py [--epochs 40] [--seeds 5] [--members 5] [--workers 2]
    python benchmarks/methods.py --search compare --tracking-uri sqlite:///mlflow.db   # + a search's
                                                                                       #   confirmed bests

For each variant: test accuracy mean ± std over the seeds, and the share of the independent ensemble's
gain over `sgd` that the one-budget method recovers: (variant - sgd) / (ensemble - sgd). With
`--search`, a second table does the same for each variant's best configuration as a search found it and
confirmed it over fresh seeds (read from the search's MLflow run). The test split chooses nothing here:
defaults are fixed in advance, and a search ranks by validation accuracy only.

Trials run in `--workers` processes with one thread each; prints Markdown (for docs/results.md).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from flatbasin.trainables.config import make_config
from flatbasin.trainables.curve import accuracy
from flatbasin.trainables.data import load_data
from flatbasin.trainables.data_spec import DataSpec
from flatbasin.trainables.loop import load_deployed, predict, train
from flatbasin.trainables.variants import REGISTRY

DATA = {"dataset": "mnist1d", "threads": 1, "device": "cpu"}
# Variants that run at their defaults with nothing made first: prior_guided needs a focus library
# fitted beforehand (benchmarks/prior_guided.py measures it against sgd on its own terms).
VARIANTS = [name for name, variant in REGISTRY.items() if not variant.file_params]


def one(variant: str, settings: dict[str, Any]) -> dict[str, Any]:
    """One trial; the test probabilities of its deployed model come back for the ensemble."""
    config = make_config(variant, {**DATA, **settings})
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "last.pt"
        result = train(
            config, on_epoch=lambda m, save: save(checkpoint) if m.epoch == config.epochs else None
        )
        probs = None
        if not result.diverged:
            data = load_data(config.data_spec, "cpu")
            probs = predict(load_deployed(config, checkpoint, data), data.inputs("test"))
    return {"variant": variant, "seed": config.seed, "test_acc": result.test_acc, "val_acc": result.score,
            "seconds": result.seconds["total"], "probs": probs}  # fmt: skip


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"


def recovered(value: float, sgd: float, ensemble: float) -> str:
    gain = ensemble - sgd
    return f"{100 * (value - sgd) / gain:+.0f}%" if gain > 0 else "-"


def defaults_table(args: argparse.Namespace) -> tuple[str, float, float]:
    """The first table, and the sgd and ensemble means; cached in --cache as printed, so that a
    second run (e.g. for --search) does not train the 60 models again."""
    import json

    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.is_file():
        saved = json.loads(cache.read_text())
        return saved["table"], saved["sgd"], saved["ensemble"]
    table, sgd, ens = _defaults_table(args)
    if cache is not None:
        cache.write_text(json.dumps({"table": table, "sgd": sgd, "ensemble": ens}))
    return table, sgd, ens


def _defaults_table(args: argparse.Namespace) -> tuple[str, float, float]:
    jobs = [(v, {"epochs": args.epochs, "seed": s}) for v in VARIANTS for s in range(args.seeds)]
    # Ensemble members: seeds no single-model row uses, `members` per ensemble.
    base = 1000
    jobs += [("sgd", {"epochs": args.epochs, "seed": base + s * args.members + k})
             for s in range(args.seeds) for k in range(args.members)]  # fmt: skip
    started = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(one, *zip(*jobs, strict=True)))
    wall = time.perf_counter() - started
    singles, members = results[: len(VARIANTS) * args.seeds], results[len(VARIANTS) * args.seeds :]

    y_test = load_data(DataSpec(dataset="mnist1d"), "cpu").y_test
    ensembles = []
    for s in range(args.seeds):
        group = [
            m["probs"]
            for m in members[s * args.members : (s + 1) * args.members]
            if m["probs"] is not None
        ]
        ensembles.append(accuracy(torch.stack(group).mean(0), y_test))
    per = {
        v: [r["test_acc"] for r in singles if r["variant"] == v and r["test_acc"] is not None]
        for v in VARIANTS
    }
    sgd, ens = statistics.mean(per["sgd"]), statistics.mean(ensembles)

    lines = [
        f"| variant (defaults, {args.epochs} epochs) | test acc % (mean ± std, {args.seeds} seeds) | "
        f"recovered of the {args.members}-ensemble's gain | diverged | s per trial |",
        "|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        runs = [r for r in singles if r["variant"] == v]
        diverged = sum(r["test_acc"] is None for r in runs)
        seconds = statistics.mean(r["seconds"] for r in runs)
        share = recovered(statistics.mean(per[v]), sgd, ens) if per[v] and v != "sgd" else "-"
        lines.append(f"| `{v}` | {mean_std(per[v])} | {share} | {diverged} | {seconds:.1f} |")
    lines.append(
        f"| independent ensemble of {args.members} `sgd` ({args.members}× the budget) | "
        f"{mean_std(ensembles)} | 100% | - | - |"
    )
    lines.append(f"\n{len(jobs)} trials in {wall:.0f} s on {args.workers} worker process(es).")
    return "\n".join(lines), sgd, ens


def search_table(name: str, uri: str, ens: float) -> str:
    """Each variant's confirmed best from a finished search (its parent run's summary.json); the gain
    recovered is measured from the search's own tuned `sgd` (confirmed), as the issue asks."""
    import json

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise SystemExit(f"no search named {name!r} in {uri}")
    parents = client.search_runs(
        [experiment.experiment_id], "tags.`flatbasin.role` = 'search'", max_results=1
    )
    with tempfile.TemporaryDirectory() as folder:
        summary = json.loads(
            Path(
                client.download_artifacts(parents[0].info.run_id, "summary.json", folder)
            ).read_text()
        )
    rows = summary.get("confirmed") or []
    if not rows:
        raise SystemExit(f"search {name!r} has no confirmation (run it with --confirm-seeds N)")
    tuned = {row["variant"]: row for row in rows}.get("sgd")
    if tuned is None:
        raise SystemExit(f"search {name!r} has no confirmed sgd to measure the gain from")
    sgd = tuned["test_mean"]
    lines = [
        f"| variant (search '{name}', confirmed best) | test acc % (mean ± std, {rows[0]['n']} fresh seeds) "
        "| val acc % | recovered of the ensemble's gain over the tuned sgd | verdict vs the best (val) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| `{row['variant']}` | {100 * row['test_mean']:.2f} ± {100 * row['test_std']:.2f} | "
            f"{100 * row['val_mean']:.2f} ± {100 * row['val_std']:.2f} | "
            f"{recovered(row['test_mean'], sgd, ens) if row['variant'] != 'sgd' else '-'} | {row['verdict']} |"
        )
    lines.append(f"\nThe ensemble's mean is the first table's ({100 * ens:.2f}%); rows in the order of "
                 "confirmation (best mean validation accuracy first).")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--search", help="also tabulate this search's confirmed bests")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--cache", help="JSON file keeping the first table between runs")
    args = parser.parse_args()
    table, _, ens = defaults_table(args)
    print(table)
    if args.search:
        print()
        print(search_table(args.search, args.tracking_uri, ens))


if __name__ == "__main__":
    main()
