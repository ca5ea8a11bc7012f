"""Whether a search's confirmed ranking on validation holds on test: the bundled `compare` search over
several search seeds, and the rank correlation of its variants' confirmed validation and test means.

    python benchmarks/confirmation.py run [--seeds 0 1 2] [--space compare] [--out /tmp/confirmation]
    python benchmarks/confirmation.py table --tracking-uri sqlite:////tmp/confirmation/mlflow.db \
        [--only sgd swa snapshot fge]

`run` runs `flatbasin search SPACE --seed S --name SPACE-sS` for each seed, one after the other, each
in a fresh process with its own Ray folder, all recorded in one SQLite store under --out; it prints
each search's wall time. `table` reads every finished, confirmed search in a store (any flatbasin version's:
what each search recorded, its summary.json and its winner tag) and prints, per search: the variants
in the order of their confirmed mean validation accuracy, their confirmed test means, Spearman's rho
and Kendall's tau between the two (scipy), what the search said (the winner it named, the variants it
called worse than the leader) and how many of those claims held on test. `--only` restricts the
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
    """One row per confirmed search, from what the search itself recorded: its summary.json's
    confirmed rows (means and verdicts as that version computed them) and its winner tag."""
    import json
    import tempfile

    from mlflow import MlflowClient
    from scipy import stats

    client = MlflowClient(args.tracking_uri)
    lines = [
        "| search | confirmed ranking on validation (val % / test %) | Spearman rho | Kendall tau | "
        "what the search said | its claims that held on test |",
        "|---|---|---|---|---|---|",
    ]
    rhos, taus, held, made = [], [], 0, 0
    searches = sorted(
        (e.name for e in client.search_experiments() if e.name != "Default"),
        key=lambda name: (len(name), name),
    )
    for name in searches:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            continue
        parents = client.search_runs(
            [experiment.experiment_id], "tags.`flatbasin.role` = 'search'", max_results=1
        )
        if not parents or parents[0].data.tags.get("flatbasin.state") != "finished":
            continue
        parent = parents[0]
        with tempfile.TemporaryDirectory() as folder:
            path = client.download_artifacts(parent.info.run_id, "summary.json", folder)
            rows = json.loads(Path(path).read_text()).get("confirmed") or []
        rows = [r for r in rows if not args.only or r["variant"] in args.only]
        if len(rows) < 3:
            continue
        val = [r["val_mean"] for r in rows]
        test = [r["test_mean"] for r in rows]
        with warnings.catch_warnings():  # a constant input gives nan and a warning: shown as nan
            warnings.simplefilter("ignore")
            rho = float(stats.spearmanr(val, test).statistic)
            tau = float(stats.kendalltau(val, test).statistic)
        rhos.append(rho)
        taus.append(tau)
        ranking = ", ".join(
            f"`{r['variant']}` {100 * r['val_mean']:.2f} / {100 * r['test_mean']:.2f}" for r in rows
        )
        # Its claims: the winner it named (best on test?) and each variant it called worse than the
        # leader (below the leader on test?).
        winner = parent.data.tags.get("flatbasin.winner")
        worse = [r for r in rows[1:] if r["verdict"] == "worse"]
        claims = []
        if winner in {r["variant"] for r in rows}:
            claims.append((f"{winner} wins", max(test) == rows[[r["variant"] for r in rows].index(winner)]["test_mean"]))  # fmt: skip
        claims += [(f"{r['variant']} worse", r["test_mean"] < rows[0]["test_mean"]) for r in worse]
        said = "; ".join(c for c, _ in claims) or "no winner, nothing worse"
        if not winner:
            said = f"tie, led by {rows[0]['variant']}" + (f"; {said}" if claims else "")
        held += sum(ok for _, ok in claims)
        made += len(claims)
        kept = f"{sum(ok for _, ok in claims)} of {len(claims)}" if claims else "-"
        lines.append(f"| {name} | {ranking} | {rho:+.2f} | {tau:+.2f} | {said} | {kept} |")
    if not rhos:
        raise SystemExit(
            f"no finished, confirmed search with 3 or more variants in {args.tracking_uri}"
        )
    lines.append(
        f"\nOver {len(rhos)} searches: Spearman rho {statistics.fmean(rhos):+.2f} "
        f"(from {min(rhos):+.2f} to {max(rhos):+.2f}), Kendall tau {statistics.fmean(taus):+.2f}; "
        f"{held} of {made} claims held on test."
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
