"""One model from the whole search, measured: soups and ensembles of a `--from base` search against
an independent 5-ensemble of tuned sgd, on MNIST-1D, over several search seeds.

    python benchmarks/soup.py [--seeds 0 1 2] [--samples 12] [--base-epochs 20] [--tail-epochs 10]
        [--sgd-samples 6] [--concurrency 2]

Per search seed, in this process (one local Ray for every search; MLflow on a temporary SQLite
file; no confirmation runs in the soup's search, so its soups use the search's trials only):

- a compare-style post-convergence search (SPACE below: six variants' tails, `from: base`, the
  base a plain sgd run of `--base-epochs` trained once, each trial a `--tail-epochs` tail), then
  `flatbasin soup` of it: the best single trial (by validation), the uniform soup, the greedy soup,
  the greedy ensemble;
- tuned sgd: an `sgd` search from scratch over lr (`--sgd-samples` trials of base + tail epochs),
  its best configuration retrained with 5 fresh seeds (its confirmation runs): their mean test
  accuracy is tuned sgd's, and the softmax average of the five is the independent 5-ensemble.

Prints, in Markdown for docs/results.md: test accuracy (mean ± std over the seeds) of each, its
members and networks per prediction, the training epochs each costs, and the share of the
5-ensemble's gain over tuned sgd each recovers (from the means); then what Tune's storage kept per
trial and how long the soups took. Every choice is made on validation; test chooses nothing.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray on loopback

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

SPACE = """\
name: soup-bench-{seed}
samples: {samples}
epochs: {tail}
confirm_seeds: 0
dataset: mnist1d
fixed: {{batch_size: 64}}
from: base
base: {{epochs: {base}}}
variants:
  sgd: {{lr: {{loguniform: [0.005, 0.1]}}}}
  swa: {{swa_lr: {{loguniform: [0.005, 0.1]}}}}
  ema: {{lr: {{loguniform: [0.005, 0.1]}}, decay: {{uniform: [0.9, 0.999]}}}}
  cyclic_average: {{cycles: {{int: [1, 4]}}, lr_large: {{loguniform: [0.02, 0.2]}}, lr_small: {{loguniform: [0.001, 0.02]}}}}
  fge: {{cycles: {{int: [2, 4]}}, lr_1: {{loguniform: [0.02, 0.2]}}, lr_2: {{loguniform: [0.0005, 0.01]}}}}
  snapshot: {{lr: {{loguniform: [0.02, 0.2]}}, cycles: {{int: [2, 4]}}}}
"""
SGD_SPACE = """\
name: sgd-bench-{seed}
samples: {samples}
epochs: {epochs}
confirm_seeds: 5
dataset: mnist1d
fixed: {{batch_size: 64}}
variants:
  sgd: {{lr: {{loguniform: [0.02, 0.4]}}}}
"""


def search(text: str, folder: Path, seed: int, concurrency: int) -> Any:
    from flatbasin.search.options import SearchOptions
    from flatbasin.search.running import run_search
    from flatbasin.spaces import load_space

    path = folder / f"{text.split()[1]}.yaml"
    path.write_text(text)
    options = SearchOptions(
        concurrency=concurrency, tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
        storage=folder / "runs", seed=seed,
    )  # fmt: skip
    outcome = run_search(load_space(path), options, Console(quiet=True))
    if outcome.errors or not outcome.best:
        raise SystemExit(f"{path.name}: the search failed: {outcome.errors}")
    return outcome


def epochs(uri: str, name: str) -> int:
    """Every epoch of every base, trial and confirmation run of the search, from MLflow."""
    from flatbasin.search.tracking import Tracker

    tracker = Tracker(uri, name, search_key="")
    runs = tracker.client.search_runs([tracker.experiment_id], max_results=10_000)
    return sum(
        len(tracker.client.get_metric_history(r.info.run_id, "score"))
        for r in runs
        if r.data.tags.get("flatbasin.role") in ("base", "trial", "confirm")
    )


def five_ensemble(uri: str, name: str) -> tuple[float, float, int]:
    """Tuned sgd's mean single-model test accuracy over its 5 confirmation runs, the test accuracy
    of their equal softmax average, and the epochs they trained."""
    import torch

    from flatbasin.search import soup
    from flatbasin.trainables.curve import accuracy
    from flatbasin.trainables.data import load_data
    from flatbasin.trainables.loop import predict

    plan = soup.plan(name, uri, "ensemble")
    members = [c for c in plan.candidates if c.role == "confirm"]
    assert len(members) == 5, [c.trial_id for c in plan.candidates]
    config = soup._config(plan.client, members[0], "cpu")
    data = load_data(config.data_spec, "cpu")
    with torch.no_grad():
        probs = [
            predict(soup.load(plan.client, c, data, "cpu", False).deployed, data.inputs("test"))
            for c in members
        ]
    labels = data.labels("test")
    single = statistics.fmean(accuracy(p, labels) for p in probs)
    return (
        single,
        accuracy(torch.stack(probs).mean(0), labels),
        sum(c.epochs_run or 0 for c in members),
    )


def storage(folder: Path) -> dict[str, float]:
    """Mean bytes per trial that Tune kept, by variant (its checkpoint, result files)."""
    sizes: dict[str, list[int]] = {}
    for trial in folder.iterdir():
        if trial.is_dir():
            total = sum(f.stat().st_size for f in trial.rglob("*") if f.is_file())
            sizes.setdefault(trial.name.rsplit("_", 1)[0], []).append(total)
    return {k: statistics.fmean(v) for k, v in sorted(sizes.items())}


def one_seed(seed: int, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from flatbasin.search import soup

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    tick = time.perf_counter()
    name = f"soup-bench-{seed}"
    text = SPACE.format(
        seed=seed, samples=args.samples, tail=args.tail_epochs, base=args.base_epochs
    )
    outcome = search(text, folder, seed, args.concurrency)
    searched = time.perf_counter()
    report = soup.make(name, uri, "all", "cpu", Console(quiet=True))
    souped = time.perf_counter()
    sgd_name = f"sgd-bench-{seed}"
    sgd_text = SGD_SPACE.format(
        seed=seed, samples=args.sgd_samples, epochs=args.base_epochs + args.tail_epochs
    )
    sgd = search(sgd_text, folder, seed, args.concurrency)
    single, ensemble, confirm_epochs = five_ensemble(uri, sgd_name)
    done = time.perf_counter()
    results = {r.kind: r for r in report.results}
    print(
        f"seed {seed}: soup search {searched - tick:.0f} s, soups {souped - searched:.0f} s, "
        f"sgd search + 5 seeds {done - souped:.0f} s; best sgd lr "
        f"{sgd.best[0]['params'].get('lr', 0):.3g}",
        flush=True,
    )
    return {
        "search_epochs": epochs(uri, name),
        "sgd_search_epochs": epochs(uri, sgd_name) - confirm_epochs,
        "sgd_confirm_epochs": confirm_epochs,
        "best": outcome.best[0]["test_acc"], "best_variant": outcome.best[0]["variant"],
        "best_cost": report.references[0].inference_cost,
        "uniform": results["uniform"].test_acc, "greedy": results["greedy"].test_acc,
        "ensemble": results["ensemble"].test_acc,
        "greedy_members": len(results["greedy"].members),
        "ensemble_members": len(results["ensemble"].members),
        "ensemble_cost": results["ensemble"].inference_cost,
        "candidates": results["uniform"].candidates,
        "sgd": single, "sgd5": ensemble,
        "soup_seconds": souped - searched,
        "storage": storage(folder / "runs" / name),
    }  # fmt: skip


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.2f} ± {100 * spread:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--base-epochs", type=int, default=20)
    parser.add_argument("--tail-epochs", type=int, default=10)
    parser.add_argument("--sgd-samples", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()

    from flatbasin.search.ray_start import init_ray

    started = time.perf_counter()
    init_ray(None)
    rows = []
    here = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="flatbasin-soup-") as tmp:
        os.chdir(tmp)  # MLflow puts a SQLite store's artifacts in ./mlruns: keep them in here
        for seed in args.seeds:
            rows.append(one_seed(seed, args, Path(tmp)))
        os.chdir(here)
    wall = time.perf_counter() - started

    def col(key: str) -> list[float]:
        return [float(r[key]) for r in rows]

    sgd, sgd5 = statistics.fmean(col("sgd")), statistics.fmean(col("sgd5"))
    gain = sgd5 - sgd

    def share(key: str) -> str:
        return f"{100 * (statistics.fmean(col(key)) - sgd) / gain:.0f}%" if gain > 0 else "n/a"

    n, total = len(rows), args.samples
    search_epochs = f"{statistics.fmean(col('search_epochs')):.0f}"
    sgd_search = f"{statistics.fmean(col('sgd_search_epochs')):.0f}"
    one = args.base_epochs + args.tail_epochs
    members = lambda key: "/".join(str(r[key]) for r in rows)  # noqa: E731
    print(
        f"\nMNIST-1D, {n} search seeds ({', '.join(map(str, args.seeds))}); soup search: {total} "
        f"trials of {args.tail_epochs}-epoch tails from one {args.base_epochs}-epoch sgd base, "
        f"{args.concurrency} at a time; tuned sgd: {args.sgd_samples} trials of {one} epochs, the "
        f"best retrained with 5 fresh seeds. Test accuracy %, mean ± std over the seeds.\n"
    )
    print("| model | test acc % | members (per seed) | networks per prediction "
          "| training epochs | share of the 5-ensemble's gain |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    print(f"| tuned sgd (one model) | {mean_std(col('sgd'))} | 1 | 1 "
          f"| {sgd_search} search + {one} | 0% |")  # fmt: skip
    print(f"| 5-ensemble of tuned sgd | {mean_std(col('sgd5'))} | 5 | 5 "
          f"| {sgd_search} search + 5 × {one} | 100% |")  # fmt: skip
    print(f"| best single trial ({'/'.join(r['best_variant'] for r in rows)}) "
          f"| {mean_std(col('best'))} | 1 | {members('best_cost')} | {search_epochs} (the search) "
          f"| {share('best')} |")  # fmt: skip
    print(f"| uniform soup | {mean_std(col('uniform'))} | {members('candidates')} | 1 "
          f"| {search_epochs} + 0 | {share('uniform')} |")  # fmt: skip
    print(f"| greedy soup | {mean_std(col('greedy'))} | {members('greedy_members')} | 1 "
          f"| {search_epochs} + 0 | {share('greedy')} |")  # fmt: skip
    print(f"| greedy ensemble | {mean_std(col('ensemble'))} | {members('ensemble_members')} "
          f"| {members('ensemble_cost')} | {search_epochs} + 0 | {share('ensemble')} |")  # fmt: skip
    print(f"\nGains over tuned sgd: 5-ensemble {100 * gain:+.2f} points; goals: greedy soup ≥ 50% "
          f"({share('greedy')}), greedy ensemble ≥ 90% ({share('ensemble')}).")  # fmt: skip
    kept = rows[0]["storage"]
    print("Tune's storage per trial (checkpoint and result files), by variant: "
          + ", ".join(f"{k} {v / 1e3:.0f} kB" for k, v in kept.items()))  # fmt: skip
    print(f"Soups and ensemble of {total} trials: {statistics.fmean(col('soup_seconds')):.0f} s "
          f"per search (CPU). Wall time of the benchmark: {wall / 60:.1f} min; load average at "
          f"the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}.")  # fmt: skip


if __name__ == "__main__":
    main()
