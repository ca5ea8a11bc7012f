"""Whether a search's confirmed ranking on validation holds on test: the bundled `compare` search over
several search seeds, and the rank correlation of its variants' confirmed validation and test means.

    python benchmarks/confirmation.py run [--seeds 0 1 2] [--space compare] [--out /tmp/confirmation]
    python benchmarks/confirmation.py table --tracking-uri sqlite:////tmp/confirmation/mlflow.db \
        [--only sgd swa snapshot fge]

`run` runs `flatbasin search SPACE --seed S --name SPACE-sS` for each seed, one after the other, each
in a fresh process with its own Ray folder, all recorded in one SQLite store under --out; it prints
each search's wall time. `table` reads every confirmed search in a store (any flatbasin version's,
so that a store written by an earlier version is tabulated the same way) and prints, per search:
the variants in the order of their confirmed mean validation accuracy, their confirmed test means,
Spearman's rho and Kendall's tau between the two (scipy), and the verdict. `--only` restricts the
variants, to compare stores whose searches had different variants on the same footing. Markdown,
for docs/results.md. Test accuracy chooses nothing here either: it is only compared afterwards.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path


def run(args: argparse.Namespace) -> None:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    for seed in args.seeds:
        ray = out / f"ray-{seed}"
        ray.mkdir(exist_ok=True)
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "flatbasin", "search", args.space, "--seed", str(seed),
             "--name", f"{Path(args.space).stem}-s{seed}", "--storage", str(out / "runs"),
             "--tracking-uri", uri],
            cwd=out, env={**os.environ, "RAY_TMPDIR": str(ray)}, capture_output=True, text=True,
            start_new_session=True,
        )  # fmt: skip
        (out / f"search-s{seed}.log").write_text(done.stdout + done.stderr)
        print(f"seed {seed}: exit {done.returncode}, {time.perf_counter() - started:.0f} s "
              f"(load average {os.getloadavg()[0]:.1f} at the end)", flush=True)  # fmt: skip
    print(f"\npython benchmarks/confirmation.py table --tracking-uri {uri}")


def table(args: argparse.Namespace) -> None:
    from mlflow import MlflowClient
    from scipy import stats

    from flatbasin.search import confirm
    from flatbasin.search.errors import UsageError
    from flatbasin.search.report import confirmation_rows, read_report

    client = MlflowClient(args.tracking_uri)
    lines = [
        "| search | confirmed ranking on validation (val % / test %) | Spearman rho | Kendall tau | "
        "val leader's rank on test | verdict |",
        "|---|---|---|---|---|---|",
    ]
    rhos, taus, leaders = [], [], []
    searches = sorted(
        (e.name for e in client.search_experiments() if e.name != "Default"),
        key=lambda name: (len(name), name),
    )
    for name in searches:
        experiment = client.get_experiment_by_name(name)
        parents = client.search_runs(
            [experiment.experiment_id], "tags.`flatbasin.role` = 'search'", max_results=1
        )
        if not parents:
            continue
        try:
            report = read_report(client, parents[0], args.tracking_uri)
        except UsageError:  # no finished trial yet
            continue
        if args.only:
            report.confirmations = [c for c in report.confirmations if c.variant in args.only]
        rows = confirmation_rows(report)
        if len(rows) < 3:
            continue
        val = [r["val_mean"] for r in rows]
        test = [r["test_mean"] for r in rows]
        with warnings.catch_warnings():  # a constant input gives nan and a warning: shown as nan
            warnings.simplefilter("ignore")
            rho = float(stats.spearmanr(val, test).statistic)
            tau = float(stats.kendalltau(val, test).statistic)
        on_test = sorted(rows, key=lambda r: -r["test_mean"])
        leader = 1 + on_test.index(rows[0])
        rhos.append(rho), taus.append(tau), leaders.append(leader)
        ranking = ", ".join(
            f"`{r['variant']}` {100 * r['val_mean']:.2f} / {100 * r['test_mean']:.2f}" for r in rows
        )
        found = confirm.verdict(rows)
        said = (
            f"winner {found.winner}"
            if found.winner
            else f"tie: {', '.join(found.leading)} (cheapest {found.recommended})"
        )
        lines.append(
            f"| {name} | {ranking} | {rho:+.2f} | {tau:+.2f} | {leader} of {len(rows)} | {said} |"
        )
    if not rhos:
        raise SystemExit(f"no confirmed search with 3 or more variants in {args.tracking_uri}")
    lines.append(
        f"\nOver {len(rhos)} searches: Spearman rho {statistics.fmean(rhos):+.2f} "
        f"(from {min(rhos):+.2f} to {max(rhos):+.2f}), Kendall tau {statistics.fmean(taus):+.2f}; "
        f"the validation leader placed {', '.join(map(str, leaders))} on test."
    )
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    running = commands.add_parser("run", help="run the searches")
    running.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    running.add_argument("--space", default="compare")
    running.add_argument("--out", default="confirmation-benchmark")
    tabling = commands.add_parser("table", help="tabulate the confirmed searches in a store")
    tabling.add_argument("--tracking-uri", required=True)
    tabling.add_argument("--only", nargs="+", help="the variants to rank (default: all confirmed)")
    args = parser.parse_args()
    run(args) if args.command == "run" else table(args)


if __name__ == "__main__":
    main()
