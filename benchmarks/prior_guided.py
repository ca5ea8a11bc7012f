"""Prior-guided training (seed 004) against plain SGD, as the paper measures it: the same model and
data, early stopping with patience 5 for both, 20 seeds each, the focus library fitted beforehand on a
similar but different data set.

    python benchmarks/prior_guided.py [--seeds 20] [--workers 2] [--epochs 100] [--source-seed 7]
    python benchmarks/prior_guided.py --diagnose 3     # why: the regressed gradient on SGD's weights

Target: MNIST-1D's published draw (data_seed 42) with its cnn1d. Source: another draw of MNIST-1D
(data_seed 7: other signals from the same templates), where plain SGD runs `--harvest-epochs` epochs
and the library is fitted (`flatbasin focus-library`). Both methods: SGD with momentum at a constant
lr (the trial default 0.05), batch 64, the same seeds, so that a `prior_guided` trial is the `sgd`
trial of its seed up to its first focus epoch. `--epochs` is only a cap: early stopping ends trials.

Printed beside the paper's claims (VGG-11..19 on CIFAR-10): time to the best validation accuracy
(ratio, the paper: about 25% less), the best validation accuracy (difference, the paper: under 0.5
point), and the spread (max − min) over seeds of the test accuracy where early stopping ends (the
paper: under 1 point against 5 for SGD). Epochs to the best are printed too: they do not depend on
how busy the machine is, wall time does. Trials run in `--workers` processes with one thread each,
the two methods interleaved so that both see the same load; CPU time to the best (process time) is
printed beside wall time, since it is not inflated by other work on the machine. Prints Markdown
(for docs/prior_guided.md).
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
from flatbasin.trainables.data import load_data
from flatbasin.trainables.focus import DEFAULT_RIDGE
from flatbasin.trainables.focus_harvest import fit_focus_library
from flatbasin.trainables.history import best_epoch
from flatbasin.trainables.loop import train

TARGET = {"dataset": "mnist1d", "threads": 1, "device": "cpu", "schedule": "constant"}
PATIENCE = 5  # the paper's "5 redundant epochs" of early stopping


def one(variant: str, seed: int, epochs: int, extra: dict[str, Any]) -> dict[str, Any]:
    """One trial and what the table needs from it."""
    config = make_config(
        variant, {**TARGET, "epochs": epochs, "seed": seed, "patience": PATIENCE, **extra}
    )
    # CPU seconds of this process at each epoch's end: unlike wall time, not inflated when other
    # work shares the machine's cores (one torch thread, so process time is the trial's own).
    cpu: dict[int, float] = {}
    cpu_start = time.process_time()
    result = train(
        config, on_epoch=lambda m, save: cpu.__setitem__(m.epoch, time.process_time() - cpu_start)
    )
    best = best_epoch(result.history)
    assert best is not None
    return {
        "variant": variant,
        "seed": seed,
        "diverged": result.diverged,
        "seconds_to_best": best.elapsed_s,
        "cpu_seconds_to_best": cpu.get(best.epoch, float("nan")),
        "epochs_to_best": best.epoch,
        "data_epochs_to_best": sum(m.phase == "data" for m in result.history[: best.epoch]),
        "best_val": best.score,
        "test_at_stop": result.test_acc,
        "epochs_run": len(result.history),
        "focus_epochs": sum(m.phase == "focus" for m in result.history),
        "ended_on_focus": result.history[-1].phase == "focus",
        "seconds": result.history[-1].elapsed_s,
        # (score, wall s, CPU s) per epoch: when plain SGD first reaches prior_guided's best
        "curve": [(m.score, m.elapsed_s, cpu.get(m.epoch, float("nan"))) for m in result.history],
    }


def warm_up() -> None:
    """Each worker generates the target data once, before its first trial is timed."""
    torch.set_num_threads(1)
    load_data(make_config("sgd", TARGET).data_spec, "cpu")


def fit_library(args: argparse.Namespace, folder: Path) -> tuple[Path, str]:
    source = make_config(
        "sgd",
        {**TARGET, "data_seed": args.source_seed, "epochs": args.harvest_epochs, "seed": 0},
    )
    started = time.perf_counter()
    library, result = fit_focus_library(source, ridge=args.ridge)
    path = folder / "focus_library.pt"
    library.save(path)
    r2 = ", ".join(f"{k.removesuffix('.weight')} {v:.4f}" for k, v in library.meta["r2"].items())
    note = (
        f"Focus library: plain SGD on MNIST-1D data_seed {args.source_seed} (seed 0, "
        f"{args.harvest_epochs} epochs, constant lr 0.05; test acc {100 * (result.test_acc or 0):.1f}%), "
        f"{library.meta['iterations']} iterations harvested, element-wise ridge {args.ridge:g}; "
        f"R² per conv layer: {r2}; {time.perf_counter() - started:.0f} s (not counted below)."
    )
    return path, note


def mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * std:.{digits}f}"


def spread(values: list[float]) -> float:
    return 100 * (max(values) - min(values))


def table(runs: list[dict[str, Any]], seeds: int) -> str:
    sgd = [r for r in runs if r["variant"] == "sgd" and not r["diverged"]]
    pg = [r for r in runs if r["variant"] == "prior_guided" and not r["diverged"]]
    col = lambda rows, key: [float(r[key]) for r in rows]  # noqa: E731
    t_sgd, t_pg = (
        statistics.mean(col(sgd, "seconds_to_best")),
        statistics.mean(col(pg, "seconds_to_best")),
    )
    paired = [
        b["seconds_to_best"] / a["seconds_to_best"]
        for a in sgd
        for b in pg
        if a["seed"] == b["seed"] and a["seconds_to_best"] > 0
    ]
    best_diff = 100 * (statistics.mean(col(pg, "best_val")) - statistics.mean(col(sgd, "best_val")))
    # The same accuracy, not each method's own best: the first epoch at which the sgd trial of a seed
    # matches the best validation accuracy the prior_guided trial of that seed reached.
    matched = []
    for b in pg:
        a = next((a for a in sgd if a["seed"] == b["seed"]), None)
        hit = (
            next((i for i, row in enumerate(a["curve"]) if row[0] >= b["best_val"]), None)
            if a
            else None
        )
        if a is not None and hit is not None:
            matched.append((hit + 1, a["curve"][hit][1], a["curve"][hit][2], b))
    lines = [
        f"| measure ({seeds} seeds each) | plain SGD | prior_guided | prior_guided vs SGD | the paper's claim |",
        "|---|---|---|---|---|",
        f"| time to best val acc, s (mean ± std) | {mean_std(col(sgd, 'seconds_to_best'))} | "
        f"{mean_std(col(pg, 'seconds_to_best'))} | ratio of means {t_pg / t_sgd:.2f} "
        f"(median per seed {statistics.median(paired):.2f}) | about 0.75 (25% less time) |",
        f"| CPU time to best, s (mean ± std) | {mean_std(col(sgd, 'cpu_seconds_to_best'))} | "
        f"{mean_std(col(pg, 'cpu_seconds_to_best'))} | ratio of means "
        f"{statistics.mean(col(pg, 'cpu_seconds_to_best')) / statistics.mean(col(sgd, 'cpu_seconds_to_best')):.2f} | - |",
        f"| plain SGD to prior_guided's best (same seed; reached in {len(matched)} of {len(pg)}): "
        f"epochs, wall s, CPU s (means) | {statistics.mean(m[0] for m in matched):.1f}, "
        f"{statistics.mean(m[1] for m in matched):.2f}, {statistics.mean(m[2] for m in matched):.2f} | "
        f"{statistics.mean(m[3]['epochs_to_best'] for m in matched):.1f}, "
        f"{statistics.mean(m[3]['seconds_to_best'] for m in matched):.2f}, "
        f"{statistics.mean(m[3]['cpu_seconds_to_best'] for m in matched):.2f} | CPU ratio "
        f"{statistics.mean(m[3]['cpu_seconds_to_best'] for m in matched) / statistics.mean(m[2] for m in matched):.2f} | - |",
        f"| epochs to best (mean ± std) | {mean_std(col(sgd, 'epochs_to_best'), digits=1)} | "
        f"{mean_std(col(pg, 'epochs_to_best'), digits=1)} | of which data epochs: "
        f"{mean_std(col(pg, 'data_epochs_to_best'), digits=1)} | - |",
        f"| best val acc, % (mean ± std) | {mean_std(col(sgd, 'best_val'), 100)} | "
        f"{mean_std(col(pg, 'best_val'), 100)} | {best_diff:+.2f} points | within 0.5 point |",
        f"| test acc where early stopping ends, % (mean ± std) | "
        f"{mean_std(col(sgd, 'test_at_stop'), 100)} | {mean_std(col(pg, 'test_at_stop'), 100)} | "
        f"{100 * (statistics.mean(col(pg, 'test_at_stop')) - statistics.mean(col(sgd, 'test_at_stop'))):+.2f} points | - |",
        f"| spread (max − min) of that test acc, points | {spread(col(sgd, 'test_at_stop')):.2f} | "
        f"{spread(col(pg, 'test_at_stop')):.2f} | - | under 1 against 5 for SGD |",
        f"| epochs run before early stopping (mean) | {statistics.mean(col(sgd, 'epochs_run')):.1f} | "
        f"{statistics.mean(col(pg, 'epochs_run')):.1f} (focus epochs {statistics.mean(col(pg, 'focus_epochs')):.1f}) | - | - |",
        f"| trials whose last epoch was a focus epoch (their test acc at stop, %) | - | "
        f"{sum(r['ended_on_focus'] for r in pg)} of {len(pg)} "
        f"({mean_std([100 * r['test_at_stop'] for r in pg if r['ended_on_focus']] or [0.0])}) | - | - |",
        f"| diverged trials | {sum(r['diverged'] for r in runs if r['variant'] == 'sgd')} | "
        f"{sum(r['diverged'] for r in runs if r['variant'] == 'prior_guided')} | - | - |",
    ]
    return "\n".join(lines)


def diagnose(library_path: Path, seeds: int, at_epochs: tuple[int, ...] = (5, 15)) -> str:
    """Why the table comes out as it does, on plain SGD's weights after `at_epochs` epochs: the cosine
    between the regressed gradient and the true full-batch gradient per conv layer, and the validation
    accuracy after one focus epoch (as prior_guided runs it, batch-norm statistics left as they were),
    after the same focus epoch with the statistics recomputed, and with only the recomputation."""
    import copy

    import torch.nn.functional as F
    from torch.optim.swa_utils import update_bn

    from flatbasin.trainables.curve import accuracy
    from flatbasin.trainables.focus import FocusLibrary
    from flatbasin.trainables.loop import load_deployed, predict

    library = FocusLibrary.load(library_path)
    lines = [
        "| seed | after epoch | cos(regressed, true gradient) per conv layer | val acc % | "
        "after a focus epoch | same, BN statistics recomputed | BN recomputed, no focus |",
        "|---|---|---|---|---|---|---|",
    ]
    data = load_data(make_config("sgd", TARGET).data_spec, "cpu")
    val = lambda m: 100 * accuracy(predict(m, data.inputs("val")), data.y_val)  # noqa: E731
    for seed in range(seeds):
        for epochs in at_epochs:
            config = make_config("sgd", {**TARGET, "epochs": epochs, "seed": seed})
            with tempfile.TemporaryDirectory() as folder:
                checkpoint = Path(folder) / "ckpt.pt"
                train(config, data=data, on_epoch=lambda m, save: save(checkpoint))  # noqa: B023
                model = load_deployed(config, checkpoint, data)
            probe = copy.deepcopy(model).train()
            F.cross_entropy(
                probe(data.x_train), data.y_train
            ).backward()  # full batch, BN in train mode
            params = dict(probe.named_parameters())
            grads = {k: p.grad for k, p in params.items() if p.grad is not None}
            cosines = [
                F.cosine_similarity(
                    library.gradient(key, params[key].detach()).flatten(),
                    grads[key].flatten(),
                    dim=0,
                ).item()
                for key in library.slopes
            ]
            focused = copy.deepcopy(model)
            variant = make_config(
                "prior_guided", {**TARGET, "library": str(library_path)}
            ).build_variant()
            variant.epoch_without_data("focus", focused, config.lr, data.steps_per_epoch(64))
            stale = val(focused)
            update_bn(data.inputs("train", 64), focused)
            refreshed_only = copy.deepcopy(model)
            update_bn(data.inputs("train", 64), refreshed_only)
            lines.append(
                f"| {seed} | {epochs} | {', '.join(f'{c:+.3f}' for c in cosines)} | {val(model):.1f} | "
                f"{stale:.1f} | {val(focused):.1f} | {val(refreshed_only):.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=100, help="cap; early stopping ends trials")
    parser.add_argument("--source-seed", type=int, default=7, help="MNIST-1D draw of the library")
    parser.add_argument("--harvest-epochs", type=int, default=20)
    parser.add_argument("--ridge", type=float, default=DEFAULT_RIDGE)
    parser.add_argument("--library", type=Path, help="use this library instead of fitting one")
    parser.add_argument(
        "--diagnose", type=int, metavar="SEEDS", default=0,
        help="instead of the table: how the regressed gradient and one focus epoch act on plain "
        "SGD's weights, for this many seeds",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)  # before any data is loaded: its normalisation depends on the threads
    if args.diagnose:
        with tempfile.TemporaryDirectory() as folder:
            library, note = (
                (args.library, f"Focus library: {args.library}.")
                if args.library is not None
                else fit_library(args, Path(folder))
            )
            print(note, end="\n\n")
            print(diagnose(library, args.diagnose))
        return

    with tempfile.TemporaryDirectory() as folder:
        if args.library is not None:
            library, note = args.library, f"Focus library: {args.library}."
        else:
            library, note = fit_library(args, Path(folder))
        jobs = [
            (variant, seed, args.epochs, extra)
            for seed in range(args.seeds)
            for variant, extra in (("sgd", {}), ("prior_guided", {"library": str(library)}))
        ]  # interleaved: both methods run under the same load
        started = time.perf_counter()
        with ProcessPoolExecutor(args.workers, initializer=warm_up) as pool:
            runs = list(pool.map(one, *zip(*jobs, strict=True)))
        wall = time.perf_counter() - started
    print(note)
    print()
    print(table(runs, args.seeds))
    print(
        f"\n{len(jobs)} trials in {wall:.0f} s on {args.workers} worker process(es), one thread each."
    )
    print(
        "\nPer seed: seed, then for sgd | prior_guided: epochs to best, wall s to best, CPU s to "
        "best, test acc % at stop"
    )
    by_seed = {(r["variant"], r["seed"]): r for r in runs}
    for seed in range(args.seeds):
        a, b = by_seed[("sgd", seed)], by_seed[("prior_guided", seed)]
        print(
            f"  {seed:>2}: {a['epochs_to_best']:>3} {a['seconds_to_best']:6.1f} "
            f"{a['cpu_seconds_to_best']:6.1f} {100 * (a['test_at_stop'] or 0):5.1f} | "
            f"{b['epochs_to_best']:>3} {b['seconds_to_best']:6.1f} {b['cpu_seconds_to_best']:6.1f} "
            f"{100 * (b['test_at_stop'] or 0):5.1f}"
            f" (focus epochs {b['focus_epochs']})"
        )


if __name__ == "__main__":
    main()
