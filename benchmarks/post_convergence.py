"""What training the base phase once saves: one search with and without `--from base`, on MNIST-1D.

    python benchmarks/post_convergence.py [--variant cyclic_average] [--samples 12] [--epochs 20]
        [--base-epochs 10] [--confirm 3] [--seed 0] [--concurrency 2]

Both sides search the same variant with the same samples, search seed and concurrency, through
`flatbasin search` in this process (one local Ray for both, started before either is timed; MLflow
on a temporary SQLite file):

- from scratch: every trial trains `--epochs` (the variant's base phase, base_frac 0.5 or
  swa_start_frac 0.5, then its tail), searching the base's lr with the tail's settings;
- `from: base`: the base phase (a plain sgd trial of `--base-epochs`, by default `--epochs / 2`, at
  the defaults: lr 0.05, cosine) trained once, then every trial spends the scratch trials' tail
  budget (`--epochs / 2`) on the tail alone.

Each side's best configuration is then retrained with `--confirm` fresh seeds (post-convergence: the
tail with fresh seeds, from the same base). Prints epochs trained (read back from MLflow: every
epoch of every base, trial and confirmation run), wall time and the best confirmed validation score
of each, side by side (Markdown, for docs/post_convergence.md), and Welch's t-test of the two
confirmed validation scores. Scores are validation accuracies; test accuracy is shown beside them
and chooses nothing.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray on loopback

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

# The tail's ranges are the same on both sides; only the scratch side searches the base's lr.
TAILS = {
    "cyclic_average": """
    cycles: {int: [1, 4]}
    lr_large: {loguniform: [0.02, 0.2]}
    lr_small: {loguniform: [0.001, 0.02]}""",
    "swa": """
    swa_lr: {loguniform: [0.005, 0.1]}
    swa_mode: {choice: [constant, cyclic]}
    swa_lr_max: {loguniform: [0.1, 0.2]}""",
    "fge": """
    cycles: {int: [1, 4]}
    lr_1: {loguniform: [0.02, 0.2]}
    lr_2: {loguniform: [0.0005, 0.01]}""",
}
SPLIT = {"cyclic_average": "base_frac: 0.5", "swa": "swa_start_frac: 0.5", "fge": "base_frac: 0.5"}


def spaces(variant: str, samples: int, epochs: int, base: int) -> dict[str, str]:
    """The two space files: from scratch, and from a base of `base` epochs trained once; the tail is
    as long on both sides (the scratch trials split their budget in half)."""
    head = f"samples: {samples}\ndataset: mnist1d\nfixed: {{batch_size: 64}}\n"
    tail = TAILS[variant]
    return {
        "from scratch": (
            f"name: pc-scratch\n{head}epochs: {epochs}\nvariants:\n  {variant}:\n"
            f"    lr: {{loguniform: [0.02, 0.2]}}\n    {SPLIT[variant]}{tail}\n"
        ),
        "from: base": (
            f"name: pc-from-base\n{head}epochs: {epochs - epochs // 2}\nfrom: base\n"
            f"base: {{epochs: {base}}}\nvariants:\n  {variant}:{tail}\n"
        ),
    }


def epochs_trained(uri: str, name: str) -> dict[str, int]:
    """Epochs of every run of the search, by role (base, trial, confirm), from MLflow."""
    from flatbasin.search.tracking import Tracker

    tracker = Tracker(uri, name, search_key="")
    runs = tracker.client.search_runs([tracker.experiment_id], max_results=10_000)
    counts: dict[str, int] = {}
    for run in runs:
        role = run.data.tags.get("flatbasin.role", "")
        if role in ("base", "trial", "confirm"):
            steps = tracker.client.get_metric_history(run.info.run_id, "score")
            counts[role] = counts.get(role, 0) + len(steps)
    return counts


def run_side(label: str, text: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    from flatbasin.search.options import SearchOptions
    from flatbasin.search.running import run_search
    from flatbasin.spaces import load_space

    path = folder / f"{label.replace(':', '').replace(' ', '-')}.yaml"
    path.write_text(text)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    space = load_space(path)
    options = SearchOptions(
        concurrency=args.concurrency, tracking_uri=uri, storage=folder / "runs",
        seed=args.seed, confirm_seeds=args.confirm,
    )  # fmt: skip
    tick = time.perf_counter()
    outcome = run_search(space, options, Console(quiet=True))
    wall = time.perf_counter() - tick
    if outcome.errors or not outcome.best:
        raise SystemExit(f"{label}: the search failed: {outcome.errors}")
    return {
        "label": label, "wall": wall, "seconds": outcome.seconds,
        "epochs": epochs_trained(uri, space.name), "best": outcome.best[0],
        "confirmed": outcome.confirmed[0] if outcome.confirmed else None,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(TAILS), default="cyclic_average")
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=20, help="a scratch trial's budget")
    parser.add_argument("--base-epochs", type=int, default=None, help="default: --epochs / 2")
    parser.add_argument("--confirm", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()

    from flatbasin.search.ray_start import init_ray

    init_ray(None)  # one local Ray for both sides, started before either is timed
    rows = []
    here = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="flatbasin-pc-") as tmp:
        os.chdir(tmp)  # MLflow puts a SQLite store's artifacts in ./mlruns: keep them in here
        base = args.base_epochs or args.epochs // 2
        for label, text in spaces(args.variant, args.samples, args.epochs, base).items():
            rows.append(run_side(label, text, Path(tmp), args))
        os.chdir(here)

    print(
        f"{args.variant} on mnist1d, {args.samples} trials per search (search seed {args.seed}, "
        f"{args.concurrency} at a time), each best confirmed over {args.confirm} fresh seeds\n"
    )
    print("| search | epochs: base + trials | epochs: confirmation "
          "| wall s: search / + confirmation | best trial val % | confirmed best val % "
          "| its test % |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        e, s, c = row["epochs"], row["seconds"], row["confirmed"]
        search_s = s["start-up"] + s["trials"]
        trained = (
            f"{e.get('base', 0)} + {e.get('trial', 0)} = {e.get('base', 0) + e.get('trial', 0)}"
        )
        val = f"{100 * c['val_mean']:.2f} ± {100 * c['val_std']:.2f}" if c else "-"
        test = f"{100 * c['test_mean']:.2f} ± {100 * c['test_std']:.2f}" if c else "-"
        print(f"| {row['label']} | {trained} | {e.get('confirm', 0)} "
              f"| {search_s:.0f} / {row['wall']:.0f} "
              f"| {100 * row['best']['score']:.2f} | {val} | {test} |")  # fmt: skip
    scratch, shared = rows
    before = scratch["epochs"].get("trial", 0)
    after = shared["epochs"].get("base", 0) + shared["epochs"].get("trial", 0)
    print(f"\n`from: base` trained {100 * (1 - after / before):.0f}% fewer epochs in the search "
          f"({after} against {before}).")  # fmt: skip
    if scratch["confirmed"] and shared["confirmed"]:
        diff = shared["confirmed"]["val_mean"] - scratch["confirmed"]["val_mean"]
        from scipy import stats

        a, b = shared["confirmed"]["val"], scratch["confirmed"]["val"]
        verdict = ""
        if min(len(a), len(b)) > 1:
            p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
            verdict = f" (Welch's t: p = {p:.2f}, {'within' if p >= 0.05 else 'beyond'} noise)"
        print(f"Confirmed best validation accuracy, `from: base` minus from scratch: "
              f"{100 * diff:+.2f} points{verdict}.")  # fmt: skip


if __name__ == "__main__":
    main()
