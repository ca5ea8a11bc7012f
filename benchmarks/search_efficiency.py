"""How much a search's choices buy: TPE against random search, and ASHA against FIFO, on MNIST-1D.

    python benchmarks/search_efficiency.py tpe  [--trials 24] [--seeds 3] [--epochs 20] [--workers 2]
    python benchmarks/search_efficiency.py asha [--trials 16] [--epochs 20] [--confirm 3]

`tpe`: one space (the bundled `swa` space on mnist1d at `--epochs`), searched by the same define-by-run
function `flatbasin search` hands to OptunaSearch, with Optuna's TPE sampler and with its random
sampler, once per search seed, each trial a real `train()` with one thread (studies in `--workers`
processes). Prints, per seed, the best validation score random search finds in its whole budget and
the number of trials TPE needed to reach it (the goal: at most 40% of random search's trials).

`asha`: the same space through `flatbasin search` twice (local Ray, MLflow on a temporary SQLite file),
`--scheduler fifo` and `--scheduler asha`, same seed, each best retrained with `--confirm` fresh seeds;
prints epochs trained in total and the confirmed best of each, side by side.

Scores are validation accuracies; the test split chooses nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SPACE = "swa"


def study(sampler: str, seed: int, trials: int, epochs: int) -> list[float]:
    """Validation scores of one study's trials, in order."""
    import optuna

    from flatbasin.spaces import load_space
    from flatbasin.trainables.config import trial_config
    from flatbasin.trainables.loop import train

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(SPACE).with_settings(
        dataset="mnist1d", epochs=epochs, threads=1, device="cpu"
    )
    # TPE starts with random trials drawn by a RandomSampler of its own seed: with the same seed as
    # the random search they would be the same trials, and TPE would match random's best for free
    # whenever random found it early. Another seed stream keeps the two searches independent.
    chosen_sampler: optuna.samplers.BaseSampler
    if sampler == "tpe":
        chosen_sampler = optuna.samplers.TPESampler(seed=10_000 + seed)
    else:
        chosen_sampler = optuna.samplers.RandomSampler(seed=seed)
    chosen = optuna.create_study(direction="maximize", sampler=chosen_sampler)
    scores = []
    for _ in range(trials):
        trial = chosen.ask()
        config = space.define_by_run(trial)
        variant = config["variant"]
        # OptunaSearch unflattens 'swa/lr' into {'swa': {'lr': ...}}; so does this.
        sampled = {k.split("/", 1)[1]: v for k, v in trial.params.items()}
        result = train(trial_config({**config, variant: sampled}))
        scores.append(result.score)
        chosen.tell(trial, result.score)
    return scores


def tpe(args: argparse.Namespace) -> None:
    jobs = [(s, seed) for seed in range(args.seeds) for s in ("random", "tpe")]
    started = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        futures = {job: pool.submit(study, *job, args.trials, args.epochs) for job in jobs}
        runs = {job: f.result() for job, f in futures.items()}
    wall = time.perf_counter() - started
    print(f"| search seed | random: best val % in {args.trials} trials | TPE: trials to reach it | "
          f"TPE: best val % in {args.trials} trials |")  # fmt: skip
    print("|---|---|---|---|")
    needed = []
    for seed in range(args.seeds):
        target = max(runs[("random", seed)])
        tpe_scores = runs[("tpe", seed)]
        reach = next((i + 1 for i, s in enumerate(tpe_scores) if s >= target), None)
        needed.append(reach if reach is not None else args.trials + 1)
        shown = str(reach) if reach is not None else f"not within {args.trials}"
        print(f"| {seed} | {100 * target:.2f} | {shown} | {100 * max(tpe_scores):.2f} |")
    share = statistics.mean(min(n, args.trials) for n in needed) / args.trials
    print(
        f"\nTPE needed on average {100 * share:.0f}% of random search's {args.trials} trials to reach "
        f"random search's best (a seed where it never did counts as 100%); {len(jobs) * args.trials} "
        f"trials of {args.epochs} epochs in {wall:.0f} s on {args.workers} worker process(es)."
    )


def asha(args: argparse.Namespace) -> None:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from rich.console import Console

    from flatbasin.search.options import SearchOptions
    from flatbasin.search.running import run_search
    from flatbasin.search.tracking import Tracker
    from flatbasin.spaces import load_space

    space = load_space(SPACE).with_settings(dataset="mnist1d", epochs=args.epochs)
    quiet = Console(quiet=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        for scheduler in ("fifo", "asha"):
            options = SearchOptions(
                samples=args.trials, concurrency=2, tracking_uri=uri, storage=Path(tmp) / "runs",
                name=f"eff-{scheduler}", scheduler=scheduler, seed=0, confirm_seeds=args.confirm,
            )  # fmt: skip
            tick = time.perf_counter()
            outcome = run_search(space, options, quiet)
            wall = time.perf_counter() - tick
            tracker = Tracker(uri, f"eff-{scheduler}", search_key=str(outcome.experiment_path))
            runs = tracker.client.search_runs(
                [tracker.experiment_id], "tags.`flatbasin.role` = 'trial'", max_results=10_000
            )
            epochs = sum(
                len(tracker.client.get_metric_history(r.info.run_id, "score")) for r in runs
            )
            best = outcome.confirmed[0] if outcome.confirmed else None
            rows.append((scheduler, epochs, wall, best))
    print(f"| scheduler | epochs trained by {args.trials} trials | wall s (with confirmation) | "
          f"confirmed best: val % | test % (mean ± std, {args.confirm} seeds) |")  # fmt: skip
    print("|---|---|---|---|---|")
    for scheduler, epochs, wall, best in rows:
        val = f"{100 * best['val_mean']:.2f} ± {100 * best['val_std']:.2f}" if best else "-"
        test = f"{100 * best['test_mean']:.2f} ± {100 * best['test_std']:.2f}" if best else "-"
        print(f"| {scheduler} | {epochs} | {wall:.0f} | {val} | {test} |")
    print(f"\nASHA trained {rows[1][1] / rows[0][1]:.2f} × FIFO's epochs.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("tpe", "asha"))
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--confirm", type=int, default=3)
    args = parser.parse_args()
    args.trials = args.trials or (24 if args.what == "tpe" else 16)
    tpe(args) if args.what == "tpe" else asha(args)


if __name__ == "__main__":
    main()
