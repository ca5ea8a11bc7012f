"""What a search costs beyond its trials: N short digits trials run serially in one process, then the
same trials four ways on 2 CPUs (local Ray, MLflow on SQLite), side by side in one invocation:

- the floor: Ray alone, the trials split between two plain Ray tasks (no Tune, no MLflow);
- hand-written: the Ray Tune + OptunaSearch + MLflowLoggerCallback script a user writes, Tune's
  defaults (a fresh actor per trial);
- hand-written, reuse_actors=True;
- `flatbasin search` on the same trials.

    python benchmarks/search_overhead.py [--trials 16] [--epochs 4] [--repeats 1]
    python benchmarks/search_overhead.py --epochs 36     # trials of about 10 s

Each run is a fresh Python process with its own Ray (Ray and Tune read environment variables once), and
the rounds interleave the five so that a busy machine slows all of them alike. Prints, per way: the whole
search as a multiple of the ideal (the serial time / 2 CPUs), the trial phase (Tuner.fit) likewise, the
fixed seconds before and after Tuner.fit, and the seconds per trial beyond training (the trial phase on
2 CPUs less the serial training time, per trial). Times start after imports, at the call that starts
Ray (or run_search), and end when it returns.

Then where the CPU went: the seconds (user + system, from /proc) of each run's driver, of Ray's
workers (the trials' processes, and any Ray prestarts) and of Ray's other processes (GCS, raylet,
agents), against the serial training time and against what 2 CPUs offer over the run's process
lifetime (imports included). On 2 CPUs every second of it that is not training is a second the
trials wait.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SPACE = """
name: overhead
samples: {trials}
epochs: {epochs}
variants:
  sgd:
    lr: {{loguniform: [0.02, 0.1]}}
"""
WAYS = {
    "floor": "Ray tasks, no Tune or MLflow",
    "hand": "hand-written, Tune defaults",
    "hand-reuse": "hand-written, reuse_actors",
    "flatbasin": "flatbasin search",
}


def serial(args: argparse.Namespace) -> dict[str, float]:
    """The trials one after another in this process, one thread each: the training time itself."""
    import torch

    from flatbasin.trainables.config import make_config
    from flatbasin.trainables.data import load_data
    from flatbasin.trainables.data_spec import DataSpec
    from flatbasin.trainables.loop import train

    torch.set_num_threads(1)  # one CPU per trial, as in the searches
    data = load_data(DataSpec(), "cpu")
    train(make_config("sgd", {"epochs": 1, "threads": 1}), data=data)  # warm-up
    tick = time.perf_counter()
    for i in range(args.trials):
        train(make_config("sgd", {"epochs": args.epochs, "threads": 1, "seed": i}), data=data)
    return {"total": time.perf_counter() - tick}


def train_seeds(seeds: list[int], epochs: int) -> None:
    """Trials one after another in a Ray worker: the floor's half of the search."""
    import torch

    from flatbasin.trainables.config import make_config
    from flatbasin.trainables.data import load_data
    from flatbasin.trainables.data_spec import DataSpec
    from flatbasin.trainables.loop import train

    torch.set_num_threads(1)
    data = load_data(DataSpec(), "cpu")
    for seed in seeds:
        train(make_config("sgd", {"epochs": epochs, "threads": 1, "seed": seed}), data=data)


def ray_floor(args: argparse.Namespace) -> dict[str, float]:
    """What Ray itself costs: a local Ray, and the trials split between two plain tasks of one CPU
    each. No Tune, no search, no MLflow, nothing reported: no search that runs on Ray does less."""
    import ray

    tick = time.perf_counter()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    started = time.perf_counter()
    task = ray.remote(num_cpus=1)(train_seeds)
    ray.get([task.remote(list(range(half, args.trials, 2)), args.epochs) for half in (0, 1)])
    ended = time.perf_counter()
    ray.shutdown()
    return {"total": time.perf_counter() - tick, "before": started - tick,
            "trials": ended - started, "after": time.perf_counter() - ended}  # fmt: skip


def hand_trial(config: dict[str, Any]) -> None:
    """The trial a hand-written script runs: flatbasin's training loop, reported every epoch."""
    from ray import tune

    from flatbasin.trainables.config import make_config
    from flatbasin.trainables.loop import train

    trial = make_config("sgd", {"epochs": config["epochs"], "lr": config["lr"], "threads": 1})
    train(trial, on_epoch=lambda metrics, save: tune.report({"score": metrics.score}))


def hand_written(args: argparse.Namespace, reuse: bool) -> dict[str, float]:
    import ray
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.search.optuna import OptunaSearch

    with tempfile.TemporaryDirectory() as tmp:
        tick = time.perf_counter()
        ray.init(address="local")
        tuner = tune.Tuner(
            hand_trial,
            param_space={"lr": tune.loguniform(0.02, 0.1), "epochs": args.epochs},
            tune_config=tune.TuneConfig(
                search_alg=OptunaSearch(), metric="score", mode="max", num_samples=args.trials,
                max_concurrent_trials=2, reuse_actors=reuse,
            ),
            run_config=tune.RunConfig(
                name="hand", storage_path=f"{tmp}/runs", verbose=0,
                callbacks=[MLflowLoggerCallback(f"sqlite:///{tmp}/mlflow.db", experiment_name="hand")],
            ),
        )  # fmt: skip
        fit_started = time.perf_counter()
        results = tuner.fit()
        fit_ended = time.perf_counter()
        assert not results.errors and len(results) == args.trials, results.errors
        ray.shutdown()
        ended = time.perf_counter()
    return {
        "total": ended - tick,
        "before": fit_started - tick,
        "trials": fit_ended - fit_started,
        "after": ended - fit_ended,
    }


def flatbasin_search(args: argparse.Namespace) -> dict[str, float]:
    import ray
    from rich.console import Console

    from flatbasin.search.cluster import local_ray_on_loopback
    from flatbasin.search.options import SearchOptions
    from flatbasin.search.running import run_search
    from flatbasin.spaces import load_space

    local_ray_on_loopback()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "overhead.yaml"
        path.write_text(SPACE.format(trials=args.trials, epochs=args.epochs))
        options = SearchOptions(
            concurrency=2, tracking_uri=f"sqlite:///{tmp}/mlflow.db", storage=Path(tmp) / "runs"
        )
        tick = time.perf_counter()
        outcome = run_search(load_space(path), options, Console(quiet=True))
        ray.shutdown()
        ended = time.perf_counter()
    assert not outcome.errors and outcome.best, outcome
    seconds = outcome.seconds
    return {
        "total": ended - tick,
        "before": seconds["start-up"],
        "trials": seconds["trials"],
        "after": ended - tick - seconds["start-up"] - seconds["trials"],
    }


def measure(way: str, args: argparse.Namespace) -> dict[str, float]:
    """One run in a fresh process: its seconds, and the CPU seconds of its processes by role."""
    command = [sys.executable, __file__, "--one", way, "--trials", str(args.trials),
               "--epochs", str(args.epochs)]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env)
        cpu: dict[int, tuple[str, float]] = {}  # pid -> (role, CPU seconds when last seen)
        while child.poll() is None:
            for pid, (role, seconds) in _tree(child.pid).items():
                # A worker is one once seen as one: an exiting process (a zombie) has no cmdline.
                was = cpu.get(pid, (role, 0.0))[0]
                cpu[pid] = (was if "worker" in was else role, seconds)
            time.sleep(0.25)
        lifetime = time.perf_counter() - started
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if child.returncode != 0:
        sys.exit(f"{way} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    seconds = json.loads(stdout.strip().splitlines()[-1])
    seconds["process"] = lifetime  # imports included, as in the CPU seconds
    for role in ROLES:
        seconds[f"cpu {role}"] = sum(c for r, c in cpu.values() if r == role)
    return seconds


ROLES = ("driver", "Ray workers", "Ray's other processes")


def _tree(root: int) -> dict[int, tuple[str, float]]:
    """The CPU seconds (user + system) so far of `root` and every process under it, from /proc:
    the driver, Ray's workers (the trials' processes among them) and Ray's other processes."""
    parents, stats = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # gone meanwhile
            continue
        fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (name) "
        parents[int(entry)] = int(fields[1])
        ticks = int(fields[11]) + int(fields[12])  # utime + stime
        agent = cmdline.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent"))
        worker = "default_worker" in cmdline or (cmdline.startswith("ray::") and not agent)
        stats[int(entry)] = ("Ray workers" if worker else "Ray's other processes", ticks / TICKS)
    found = {root: ("driver", stats.get(root, ("", 0.0))[1])}
    added = True
    while added:
        added = False
        for pid, parent in parents.items():
            if parent in found and pid not in found:
                found[pid] = stats[pid]
                added = True
    return found


TICKS = os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(
        description="\n\n".join(__doc__.split("\n\n")[:2]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--trials", type=int, default=16, help="trials per way (default 16)")
    parser.add_argument(
        "--epochs", type=int, default=4, help="epochs per trial: 4 is about 1 s, 36 about 10 s"
    )
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all five runs")
    parser.add_argument("--one", choices=["serial", *WAYS], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run = {"serial": serial, "floor": ray_floor, "hand": lambda a: hand_written(a, reuse=False),
               "hand-reuse": lambda a: hand_written(a, reuse=True), "flatbasin": flatbasin_search}  # fmt: skip
        print(json.dumps(run[args.one](args)))
        return

    rounds: list[dict[str, dict[str, float]]] = []
    for _ in range(args.repeats):
        rounds.append({way: measure(way, args) for way in ("serial", *WAYS)})
    per_trial = statistics.median(r["serial"]["total"] for r in rounds) / args.trials
    serial_cpu = per_trial * args.trials
    print(f"{args.trials} sgd trials of {args.epochs} epochs on digits, {per_trial:.2f} s each "
          f"serially; ideal = serial / 2 CPUs; medians of {args.repeats} round(s)")  # fmt: skip
    print(f"{'':30} {'whole/ideal':>11} {'trials/ideal':>12} {'before s':>9} {'after s':>8} "
          f"{'s/trial beyond training':>24}")  # fmt: skip
    for way, label in WAYS.items():

        def med(f: Any, way: str = way) -> float:
            return statistics.median(f(r[way], r["serial"]["total"]) for r in rounds)

        print(
            f"{label:30} {med(lambda w, s: w['total'] / (s / 2)):11.2f} "
            f"{med(lambda w, s: w['trials'] / (s / 2)):12.2f} {med(lambda w, s: w['before']):9.1f} "
            f"{med(lambda w, s: w['after']):8.1f} "
            f"{med(lambda w, s: (2 * w['trials'] - s) / args.trials):24.2f}"
        )
    print(
        f"\nCPU seconds (medians), beside the {serial_cpu:.1f} s the training itself takes serially:"
    )
    print(
        f"{'':30} {'driver':>8} {'Ray workers':>12} {'other Ray':>10} {'total':>8} {'2 CPUs x process wall':>22}"
    )
    for way, label in WAYS.items():
        cpu = [statistics.median(r[way][f"cpu {role}"] for r in rounds) for role in ROLES]
        wall = statistics.median(r[way]["process"] for r in rounds)
        print(
            f"{label:30} {cpu[0]:8.1f} {cpu[1]:12.1f} {cpu[2]:10.1f} {sum(cpu):8.1f} {2 * wall:22.1f}"
        )


if __name__ == "__main__":
    main()
