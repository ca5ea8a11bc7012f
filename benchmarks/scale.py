"""What a search costs at the sizes users run, against what Ray alone costs, in one invocation.

Each case runs the same `sgd` trials two ways, each in a fresh Python process with its own local
Ray (loopback) and a new SQLite store, the ways taking turns round after round:

- the floor: Ray alone, the trials split between two plain Ray tasks of one CPU each (no Tune, no
  Optuna, no MLflow, nothing reported): no search that runs on Ray does less;
- `flatbasin.search` (what `flatbasin search` runs): preflight, Ray, Tune, Optuna, MLflow, the
  summary and the report at the end.

    python benchmarks/scale.py fast                  # 16 trials of 100 epochs of ~30 ms
    python benchmarks/scale.py many --sizes 100 300 1000   # trials of ~0.2 s, then report and sync
    python benchmarks/scale.py 1s                    # 16 digits trials of ~1 s (4 epochs)
    python benchmarks/scale.py 10s                   # 16 digits trials of ~10 s (36 epochs)

Printed, each with its goal: the whole search against the floor; for fast epochs, the wall time per
reported epoch beyond the floor; for many trials, the driver's CPU seconds and peak memory per trial,
how they grow from the smallest size to the largest (per trial added), the MLflow store's size, and
on the largest search the time of the printed summary, of `flatbasin report` and of `flatbasin sync`.
"process" is each way's process from its start to its end, imports and Ray's shutdown included:
what a user of `flatbasin search` waits for, and what the goals are held to; "whole" starts after
the imports, at the call that starts Ray (or the search), and ends when it returns and Ray is down.
Every row carries the 1-minute load average seen during its run (the run's own processes included:
about 2 to 3 of it), since the machine may be shared; the CPU seconds of each way's processes,
which move less with the load than wall time, are printed beside the wall-time ratios.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The trial of each case: flat settings for make_config (the floor) and for the space's `fixed:`.
# synthetic at 8x8 with 200 images: 144 training images, 3 steps of 64 and an evaluation, about
# 30 ms an epoch on one thread; digits: the bundled 8x8 digits, about 0.3 s an epoch.
TINY = {"dataset": "synthetic", "synthetic_images": 200, "image_size": 8}
CASES: dict[str, dict[str, Any]] = {
    "fast": {"data": TINY, "epochs": 100, "trials": 16, "what": "100 epochs of ~30 ms"},
    "many": {"data": TINY, "epochs": 6, "trials": 100, "what": "~0.2 s (6 epochs of ~30 ms)"},
    "1s": {"data": {"dataset": "digits"}, "epochs": 4, "trials": 16, "what": "~1 s (digits, 4 epochs)"},
    "10s": {"data": {"dataset": "digits"}, "epochs": 36, "trials": 16, "what": "~10 s (digits, 36 epochs)"},
}  # fmt: skip
GOALS = {"many": 1.3, "1s": 1.20, "10s": 1.10}  # whole search / floor
EPOCH_GOAL_S = 0.002  # fast: wall seconds per reported epoch beyond the floor
SPACE = """
name: scale
samples: {trials}
epochs: {epochs}
fixed: {fixed}
variants:
  sgd:
    lr: {{loguniform: [0.02, 0.1]}}
"""
WAYS = {"floor": "floor: two plain Ray tasks", "flatbasin": "flatbasin search"}
ROLES = ("driver", "Ray workers", "Ray's other processes")
TICKS = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- the two ways (child)


def train_seeds(seeds: list[int], epochs: int, data_settings: dict[str, Any]) -> None:
    """Trials one after another in a Ray worker, the data loaded once: the floor's half."""
    import torch

    from flatbasin.trainables.config import make_config
    from flatbasin.trainables.data import load_data
    from flatbasin.trainables.loop import train

    torch.set_num_threads(1)
    data = None
    for seed in seeds:
        config = make_config("sgd", {**data_settings, "epochs": epochs, "threads": 1, "seed": seed})
        data = data or load_data(config.data_spec, "cpu")
        train(config, data=data)


def ray_floor(case: dict[str, Any], trials: int, folder: Path) -> dict[str, float]:
    import ray

    tick = time.perf_counter()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    started = time.perf_counter()
    task = ray.remote(num_cpus=1)(train_seeds)
    halves = [list(range(half, trials, 2)) for half in (0, 1)]
    ray.get([task.remote(seeds, case["epochs"], case["data"]) for seeds in halves])
    ended = time.perf_counter()
    ray.shutdown()
    return {"total": time.perf_counter() - tick, "before": started - tick,
            "trials": ended - started, "after": time.perf_counter() - ended}  # fmt: skip


def flatbasin_search(case: dict[str, Any], trials: int, folder: Path) -> dict[str, float]:
    """`flatbasin.search` as the command runs it, in `folder` (kept for report and sync)."""
    from rich.console import Console

    import flatbasin
    from flatbasin.search import api, output

    timed: dict[str, float] = {}

    def timing(name: str, function: Any) -> Any:
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            tick = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                timed[name] = timed.get(name, 0.0) + time.perf_counter() - tick

        return timed_call

    from flatbasin.search import running

    entered: list[float] = []
    run_search = running.run_search

    def entering(*args: Any, **kwargs: Any) -> Any:
        entered.append(time.perf_counter())  # api.search imports and checks before this
        return run_search(*args, **kwargs)

    running.run_search = entering
    output.print_summary = timing("summary", output.print_summary)
    output.write_search_report = timing("report", output.write_search_report)
    api._stop_ray = timing("ray shutdown", api._stop_ray)
    fixed = json.dumps({**case["data"], "batch_size": 64})
    space = folder / "scale.yaml"
    space.write_text(SPACE.format(trials=trials, epochs=case["epochs"], fixed=fixed))
    os.chdir(folder)  # the report goes to ./reports/scale
    tick = time.perf_counter()
    # flatbasin.search is a module made callable at run time (search/__init__.py): mypy sees a module.
    result = flatbasin.search(  # type: ignore[operator]
        str(space), tracking_uri=f"sqlite:///{folder / 'mlflow.db'}", storage=folder / "runs",
        console=Console(quiet=True),
    )  # fmt: skip
    total = time.perf_counter() - tick
    assert result.state == "finished" and not result.errors and result.best, result
    # What the trials waited in Tune's report (their own clock, in each final result), per epoch
    waited = reports = epochs = 0.0
    for path in (folder / "runs" / "scale").glob("*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        final = rows[-1]
        waited += final.get("report_wait_s", 0.0)
        reports += final.get("reports", 0) + 1
        epochs += len({row["epoch"] for row in rows if "epoch" in row})
    seconds = result.seconds
    before = entered[0] - tick + seconds["start-up"]
    return {
        "total": total,
        "before": before,
        "trials": seconds["trials"],
        "after": total - before - seconds["trials"],
        "finish": seconds["finish"],
        **timed,
        "report wait s": waited,
        "reports": reports,
        "epochs": epochs,
        "store MB": (folder / "mlflow.db").stat().st_size / 2**20,
    }


def one(way: str, case_name: str, trials: int, folder: Path) -> None:
    """The child: one way, then its figures as one JSON line (with its own memory, from /proc)."""
    from flatbasin.search.cluster import local_ray_on_loopback

    local_ray_on_loopback()
    import ray  # noqa: F401  (the clock starts after imports; the process lifetime holds them)

    if way == "flatbasin":  # what `flatbasin search` imports before it starts anything
        import flatbasin.search.api
        import flatbasin.search.running  # noqa: F401

    rss_before = _status_mb("VmRSS")
    run = {"floor": ray_floor, "flatbasin": flatbasin_search}[way]
    figures = run(CASES[case_name], trials, folder)
    figures |= {"rss before MB": rss_before, "peak rss MB": _status_mb("VmHWM")}
    print(json.dumps(figures))


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


# ----------------------------------------------------------------------------- measuring (parent)


def measure(way: str, case_name: str, trials: int, folder: Path) -> dict[str, float]:
    """One run in a fresh process: its figures, the CPU seconds of its processes by role, and the
    load average seen while it ran."""
    command = [sys.executable, __file__, case_name, "--one", way, "--trials", str(trials),
               "--folder", str(folder)]  # fmt: skip
    ray_tmp = tempfile.mkdtemp(prefix="fbsr-", dir="/tmp")  # Ray's own: no address file left behind
    env = {**_user_env(), "RAY_TMPDIR": ray_tmp}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env)
        cpu: dict[int, tuple[str, float]] = {}  # pid -> (role, CPU seconds when last seen)
        loads = []
        while child.poll() is None:
            for pid, (role, seconds) in _tree(child.pid).items():
                # A worker is one once seen as one: an exiting process (a zombie) has no cmdline.
                was = cpu.get(pid, (role, 0.0))[0]
                cpu[pid] = (was if "worker" in was else role, seconds)
            loads.append(os.getloadavg()[0])
            time.sleep(0.5)
        lifetime = time.perf_counter() - started
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    shutil.rmtree(ray_tmp, ignore_errors=True)
    if child.returncode != 0:
        sys.exit(f"{way} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    figures = json.loads(stdout.strip().splitlines()[-1])
    figures["process"] = lifetime
    figures["load"] = statistics.mean(loads) if loads else os.getloadavg()[0]
    for role in ROLES:
        figures[f"cpu {role}"] = sum(c for r, c in cpu.values() if r == role)
    return figures


def _user_env() -> dict[str, str]:
    """This environment as a user's would be: Python writes and reads its bytecode caches (a
    PYTHONDONTWRITEBYTECODE here made every process compile flatbasin's modules afresh)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PYTHONWARNINGS": "ignore"}


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


def timed_command(args: list[str], folder: Path) -> float:
    """A flatbasin command in a fresh process, as a user runs it: its wall seconds."""
    tick = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flatbasin", *args], cwd=folder,
                          capture_output=True, text=True, env=_user_env())  # fmt: skip
    seconds = time.perf_counter() - tick
    if done.returncode != 0:
        sys.exit(
            f"flatbasin {args[0]} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        )
    return seconds


# ----------------------------------------------------------------------------- printing


def med(rounds: list[dict[str, dict[str, float]]], way: str, key: str) -> float:
    return statistics.median(r[way].get(key, 0.0) for r in rounds)


def verdict(value: float, goal: float) -> str:
    return "met" if value <= goal else "MISSED"


def print_runs(rounds: list[dict[str, dict[str, float]]], title: str) -> None:
    print(title)
    print(f"{'':28} {'process s':>9} {'whole s':>8} {'before s':>9} {'trials s':>9} {'after s':>8} "
          f"{'driver CPU s':>13} {'workers CPU s':>14} {'other Ray CPU s':>16} {'load':>5}")  # fmt: skip
    for way, label in WAYS.items():
        print(f"{label:28} {med(rounds, way, 'process'):9.1f} {med(rounds, way, 'total'):8.1f} "
              f"{med(rounds, way, 'before'):9.1f} "
              f"{med(rounds, way, 'trials'):9.1f} {med(rounds, way, 'after'):8.1f} "
              f"{med(rounds, way, 'cpu driver'):13.1f} {med(rounds, way, 'cpu Ray workers'):14.1f} "
              f"{med(rounds, way, 'cpu Ray' + chr(39) + 's other processes'):16.1f} "
              f"{med(rounds, way, 'load'):5.1f}")  # fmt: skip
    after = {
        k: med(rounds, "flatbasin", k) for k in ("finish", "ray shutdown", "summary", "report")
    }
    print("  flatbasin's after: " + ", ".join(f"{k} {v:.1f} s" for k, v in after.items()))


def run_case(
    case_name: str, trials: int, repeats: int, keep: Path | None = None
) -> list[dict[str, dict[str, float]]]:
    rounds = []
    for _ in range(repeats):
        row = {}
        for way in WAYS:
            folder = Path(tempfile.mkdtemp(prefix=f"fbscale-{way}-"))
            try:
                row[way] = measure(way, case_name, trials, folder)
                if way == "flatbasin" and keep is not None:
                    shutil.rmtree(keep, ignore_errors=True)
                    shutil.move(folder, keep)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        rounds.append(row)
    return rounds


def ratio_line(rounds: list[dict[str, dict[str, float]]], goal: float | None) -> float:
    ratios = [r["flatbasin"]["process"] / r["floor"]["process"] for r in rounds]
    ratio = statistics.median(ratios)
    spread = f" (rounds: {', '.join(f'{x:.2f}' for x in ratios)})" if len(ratios) > 1 else ""
    aim = f" (goal <= {goal:.2f}: {verdict(ratio, goal)})" if goal is not None else ""
    called = statistics.median(r["flatbasin"]["total"] / r["floor"]["total"] for r in rounds)
    print(f"  whole search / floor, each process start to end (imports included): {ratio:.2f}{aim}"
          f"{spread}; from the call that starts Ray or the search: {called:.2f}")  # fmt: skip
    # CPU seconds move less than wall time with the machine's load: what each way spent, all of its
    # processes together, against the floor's
    cpu = [_cpu(r["flatbasin"]) / _cpu(r["floor"]) for r in rounds]
    print(f"  CPU seconds, all processes / floor's: {statistics.median(cpu):.2f}")
    return ratio


def _cpu(figures: dict[str, float]) -> float:
    return sum(figures[f"cpu {role}"] for role in ROLES)


def main() -> None:
    parser = argparse.ArgumentParser(
        description="\n\n".join(__doc__.split("\n\n")[:3]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("case", choices=list(CASES))
    parser.add_argument("--trials", type=int, help="trials per way (default: the case's)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000],
                        help="many: the search sizes, smallest first (default 100 300 1000)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=1, help="rounds of both ways")
    parser.add_argument("--one", choices=list(WAYS), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    case = CASES[args.case]
    if args.one:
        one(args.one, args.case, args.trials, args.folder)
        return
    if args.case != "many":
        trials = args.trials or case["trials"]
        rounds = run_case(args.case, trials, args.repeats)
        print_runs(rounds, f"{trials} sgd trials of {case['what']}, 2 CPUs, concurrency 2; "
                           f"medians of {args.repeats} round(s)")  # fmt: skip
        if args.case == "fast":
            epochs = trials * case["epochs"]
            beyond = [(r["flatbasin"]["process"] - r["floor"]["process"]) / epochs for r in rounds]
            in_trials = [(r["flatbasin"]["trials"] - r["floor"]["trials"]) / epochs for r in rounds]
            goal = EPOCH_GOAL_S
            waited = med(rounds, "flatbasin", "report wait s") / med(rounds, "flatbasin", "epochs")
            print(f"  the trials waited in Tune's report {1000 * waited:.2f} ms per epoch "
                  f"({med(rounds, 'flatbasin', 'reports'):.0f} reports for "
                  f"{med(rounds, 'flatbasin', 'epochs'):.0f} epochs)")  # fmt: skip
            print(f"  wall per reported epoch beyond the floor ({epochs} epochs): whole search "
                  f"{1000 * statistics.median(beyond):.1f} ms (goal <= {1000 * goal:.0f} ms: "
                  f"{verdict(statistics.median(beyond), goal)}); trial phase alone "
                  f"{1000 * statistics.median(in_trials):.1f} ms")  # fmt: skip
        ratio_line(rounds, GOALS.get(args.case))
        return

    sizes = sorted(args.sizes)
    results: dict[int, list[dict[str, dict[str, float]]]] = {}
    kept = Path(tempfile.mkdtemp(prefix="fbscale-kept-")) / "search"
    try:
        for size in sizes:
            keep = kept if size == sizes[-1] else None
            results[size] = run_case("many", size, args.repeats, keep)
            print_runs(
                results[size],
                f"{size} sgd trials of {case['what']}; medians of {args.repeats} round(s)",
            )
            ratio_line(results[size], GOALS["many"])
            driver = med(results[size], "flatbasin", "cpu driver")
            memory = med(results[size], "flatbasin", "peak rss MB") - med(
                results[size], "flatbasin", "rss before MB"
            )
            print(f"  driver: {driver / size:.3f} CPU s and {1024 * memory / size:.0f} KiB of peak "
                  f"memory per trial; MLflow store {med(results[size], 'flatbasin', 'store MB'):.1f} MB")  # fmt: skip
        if len(sizes) > 1:
            small, large = sizes[0], sizes[-1]
            # Per trial added, between the sizes: what the fixed costs (Ray, imports, the end) do
            # not blur. Nothing that grows with the trials already done: the last step's cost per
            # trial within 10% of the first's.
            print(f"\nPer trial added, from {small} to {large} trials (goal: the last step within "
                  "10% of the first)")  # fmt: skip
            for key, unit, scale in (("cpu driver", "CPU s", 1.0), ("peak rss MB", "KiB", 1024.0)):
                at = {n: med(results[n], "flatbasin", key) - (med(results[n], "flatbasin", "rss before MB") if "rss" in key else 0.0) for n in sizes}  # fmt: skip
                steps = [(a, b, (at[b] - at[a]) / (b - a)) for a, b in itertools.pairwise(sizes)]
                first, last = steps[0][2], steps[-1][2]
                shown = ", ".join(f"{scale * v:.3f} ({a}->{b})" for a, b, v in steps)
                check = f"{verdict(last, 1.1 * first)}" if len(steps) > 1 else "needs 3 sizes"
                print(f"  driver {unit} per trial: {shown}; overall per trial at {small}: "
                      f"{scale * at[small] / small:.3f}, at {large}: {scale * at[large] / large:.3f} "
                      f"({check})")  # fmt: skip
        folder = kept
        runs = folder / "runs" / "scale"
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        summary = med(results[sizes[-1]], "flatbasin", "summary")
        report = timed_command(
            ["report", "scale", "--tracking-uri", uri, "--out", str(folder / "report2")], folder
        )
        sync = timed_command(["sync", str(runs), "--tracking-uri", uri], folder)
        print(f"\nOn the {sizes[-1]}-trial search: summary {summary:.2f} s; flatbasin report {report:.1f} s "
              f"(goal < 30 s: {verdict(report, 30)}); flatbasin sync {sync:.1f} s; the search's own report "
              f"{med(results[sizes[-1]], 'flatbasin', 'report'):.1f} s")  # fmt: skip
    finally:
        shutil.rmtree(kept.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
