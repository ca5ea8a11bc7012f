"""What a trial and a search print, on the command line and from Python alike: a trial's epochs and
curve, a search's summary (best trial per variant, the confirmed table, the winner, what to
reproduce). The rules the summary states (the winner, the trial to reproduce) are functions here, so
that the printed summary and `flatbasin.search`'s result say the same."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

import flatbasin.search.confirm as confirm
from flatbasin.search.confirm import recommended, to_reproduce, winner
from flatbasin.search.errors import plain_console, stderr

CONSOLE = plain_console()


def print_epoch(m: Any, epochs: int, console: Console = CONSOLE) -> None:
    lr = (
        f"{m.lr:.5f}"
        if m.lr_low is None or m.lr_low == m.lr_high
        else f"{m.lr_low:.5f}-{m.lr_high:.5f}"
    )
    gap = "" if m.gen_gap is None else f"  gap {m.gen_gap:+.4f}"
    # An epoch without a pass over the data (prior_guided's focus epochs) has no training loss.
    trained = (
        f"loss {m.train_loss:7.4f}  train acc {m.train_acc:.4f}"
        if m.train_loss is not None
        else f"{m.phase + ' epoch, no data pass':<31}"
    )
    console.print(
        f"epoch {m.epoch:>3}/{epochs}  {trained}  "
        f"val acc {m.val_acc:.4f}{gap}  deployed val acc {m.score:.4f}  lr {lr}  members {m.members}"
    )


def runtime_summary(runtime: dict[str, Any]) -> str:
    """'bf16, channels-last, compiled': how the trial ran (accel.Runtime.record)."""
    parts = [str(runtime.get("precision", "fp32"))]
    parts += ["channels-last"] if runtime.get("channels_last") else []
    parts += ["compiled"] if runtime.get("compile") else []
    return ", ".join(parts)


def print_curve(result: Any, console: Console = CONSOLE) -> None:
    table = Table(title=f"{result.config.variant}: accuracy vs. models averaged / ensembled")
    table.add_column("count", justify="right")
    table.add_column("val_acc", justify="right")
    table.add_column("test_acc", justify="right")
    extras = result.extra_curves
    for name in extras:
        table.add_column(f"{name} val", justify="right")
    for i, p in enumerate(result.curve):
        cells = [str(p.count), f"{p.val_acc:.4f}", f"{p.test_acc:.4f}"]
        cells += [f"{extras[n][i].val_acc:.4f}" if i < len(extras[n]) else "" for n in extras]
        table.add_row(*cells)
    console.print(table)
    if result.diversity:
        print_diversity(result.diversity, console)


def print_diversity(points: list[Any], console: Console = CONSOLE) -> None:
    """Under the curve: members that err on the same examples add nothing to the ensemble."""
    table = Table(title="members' diversity on the test split (first k members, mean over pairs)")
    for column in ("count", "disagreement", "error corr"):
        table.add_column(column, justify="right")
    for p in points:
        corr = "n/a" if p.error_corr is None else f"{p.error_corr:.4f}"
        table.add_row(str(p.count), f"{p.disagreement:.4f}", corr)
    console.print(table)


def print_trial_end(result: Any, console: Console = CONSOLE) -> None:
    """After a trial's epochs: how it ended, its curve and deployed model, and what it took."""
    last = result.history[-1].epoch if result.history else 0
    epochs = result.config.epochs
    if result.diverged:
        console.print(f"diverged at epoch {last}: the loss is not finite", style="yellow")
    else:
        if last < epochs:
            console.print(f"stopped early after epoch {last} of {epochs} (patience)")
        print_curve(result, console)
        console.print(
            f"deployed model ({result.model}): val acc {result.score:.4f} (the score)   "
            f"test acc {result.test_acc:.4f}"
        )
    to_best = result.seconds.get("to_best")
    console.print(
        f"{result.seconds['total']:.1f} s on {result.device} ({runtime_summary(result.runtime)}), "
        f"{result.threads} thread(s)"
        + (f", {to_best:.1f} s of training to the best epoch" if to_best is not None else "")
        + f"; plan {result.plan}"
    )


# ----------------------------------------------------------------------------- a search's summary


def reproduced(variant: str, confirmed: list[dict[str, Any]]) -> str:
    """What the trial `Reproduce:` names is (the search run's tag flatbasin.reproduce_run)."""
    if not confirmed:
        return f"the best search trial ({variant}; no confirmation)"
    if winner(confirmed) is None:
        return f"{variant}'s best search trial (the cheapest of the variants that tie after confirmation)"
    return f"the confirmed winner's best search trial ({variant})"


def print_confirmed(rows: list[dict[str, Any]], console: Console = CONSOLE) -> None:
    """Each variant's best configuration over fresh seeds (and validation splits), the leader's lead
    over each with its 95% interval, and the verdict in words."""
    seeds = max(row["n"] for row in rows)
    spread = seeds > 1  # one seed has no spread: a ± 0 would claim a certainty it does not have
    splits = " and validation splits" if rows[0].get("fresh_splits") else ""
    title = "%, mean ± std; paired test vs the leader" if spread else "%, one seed each: no test"
    # 79 columns at most, numbers never wrapped: only the verdict's words may take a second line.
    table = Table(
        title=f"confirmed over {seeds} fresh seed{'s' * spread}{splits} ({title})",
        box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True,
    )  # fmt: skip
    for column in ("variant", "val acc", "test acc", "leader's lead, 95%"):
        table.add_column(column, no_wrap=True)
    table.add_column("verdict")
    for row in rows:
        verdict = row["verdict"] + (
            f" (p {row['p_vs_best']:.3g})" if row["p_vs_best"] is not None else ""
        )
        verdict += f", {row['diverged']} diverged" if row["diverged"] else ""
        lead = (
            f"{100 * row['diff_mean']:+.2f} ({100 * row['diff_low']:+.2f}, {100 * row['diff_high']:+.2f})"
            if row.get("diff_low") is not None
            else ""
        )
        table.add_row(
            row["variant"],
            f"{100 * row['val_mean']:.2f}" + (f" ± {100 * row['val_std']:.2f}" if spread else ""),
            f"{100 * row['test_mean']:.2f}" + (f" ± {100 * row['test_std']:.2f}" if spread else ""),
            lead,
            verdict,
        )
    console.print(table, width=console.width - 1)  # an 80-column terminal: no wrapped line
    console.print(f"Verdict:      {confirm.verdict(rows).text}")


def print_summary(
    outcome: Any, tracking_uri: str, console: Console = CONSOLE, soups: Any = None
) -> None:
    from flatbasin.search.credentials import redact_uri
    from flatbasin.search.tracking_uri import browse_hint
    from flatbasin.search.tune_results import learned_nothing

    tracking_uri = redact_uri(tracking_uri)  # every command printed here: without credentials

    if not outcome.best:
        console.print(f"search '{outcome.name}': no trial finished, so there is no best trial yet")
    # 79 columns at most: an 80-column terminal shows it whole, each run id on one line (the
    # params, of any length, follow as text).
    table = Table(
        title=f"search '{outcome.name}': best trial per variant",
        box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
    )  # fmt: skip
    for column in ("variant", "trials", "val acc", "test acc", "MLflow run"):
        table.add_column(column, no_wrap=True, justify="left" if column in ("variant", "MLflow run") else "right")  # fmt: skip
    for row in outcome.best:
        table.add_row(
            row["variant"],
            str(outcome.trials_per_variant.get(row["variant"], "")),
            f"{row['score']:.4f}",
            f"{row['test_acc']:.4f}",
            row.get("run_id") or "-",
        )
    if outcome.best:
        console.print(table)
        for row in outcome.best:
            params = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in row["params"].items()
            )
            line = Text(f"{row['variant']}: ", style="bold") + Text(params or "(nothing searched)")
            console.print(Padding(line, (0, 0, 0, 2), expand=False), soft_wrap=False)
    if warning := learned_nothing(outcome.best):
        console.print(f"warning: {warning}", style="yellow", markup=False)
    if outcome.untried:
        why = (
            "the time budget ran out before they got one"
            if outcome.out_of_time
            else "--samples below the number of variants gives some none"
        )
        console.print(
            f"No trial for: {', '.join(outcome.untried)} ({why}); they are not part of this "
            "comparison",
            style="yellow",
        )
    if outcome.confirmed:
        print_confirmed(outcome.confirmed, console)
    if soups is not None:  # beside the best trial and the winner: soups and ensemble (--soup)
        from flatbasin.search.soup import print_table

        print_table(soups, console)
    if outcome.unwritten and not outcome.store[0]:  # else a paragraph of its own says it
        console.print(
            f"{outcome.unwritten} trial(s) could not be written to MLflow; once it is back run:",
            style="yellow",
        )
        console.print(
            f"  flatbasin sync {shlex.quote(str(outcome.experiment_path))} --tracking-uri {shlex.quote(tracking_uri)}"
        )
    if outcome.seconds:
        console.print(
            "Time:         " + ", ".join(f"{k} {v:.1f} s" for k, v in outcome.seconds.items())
        )
    console.print(f"Tune results: {outcome.experiment_path}")
    console.print(f"Browse:       {browse_hint(tracking_uri)}")
    row = to_reproduce(outcome.best, recommended(outcome.confirmed))
    if row is not None and row.get("run_id"):
        console.print(
            f"Reproduce:    flatbasin reproduce {row['run_id']} --tracking-uri {shlex.quote(tracking_uri)}"
            f"  # {reproduced(row['variant'], outcome.confirmed)}"
        )
    print_credentials_note(console)


def print_credentials_note(console: Console = CONSOLE) -> None:
    """The commands printed carry no credentials: say so when this one had them in its URI."""
    from flatbasin.search.credentials import from_uri

    if from_uri():
        console.print(
            "(the flatbasin commands printed here leave out the credentials given in the tracking URI: set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD before running them)"
        )


def write_search_report(
    parent_run_id: str, tracking_uri: str, console: Console = CONSOLE
) -> Path | None:
    """The report at the end of a search; one that cannot be written is a warning, never a failure."""
    from flatbasin.search.credentials import redact_uri, scrub

    try:
        from flatbasin.search.report import write_report

        page = write_report(parent_run_id, tracking_uri)
    except Exception as err:  # the search's results are safe in MLflow whatever happens here
        stderr.print(
            f"warning: the report was not written ({type(err).__name__}: {scrub(str(err))}); "
            f"try: flatbasin report {parent_run_id} --tracking-uri "
            f"{shlex.quote(redact_uri(tracking_uri))}",
            style="yellow",
        )
        return None
    console.print(f"Report:       {page}")
    return Path(page)


def print_search_end(outcome: Any, console: Console = CONSOLE) -> None:
    """What a search that did not run to its end says after its summary (an interruption, a time
    budget that ran out with trials to compare); failures are the caller's to report."""
    if outcome.interrupted:
        import flatbasin.search.signals as signals

        console.print(
            f"The search was interrupted ({signals.name()}); finished trials are kept. "
            "Continue it with:",
            style="yellow",
        )
        console.print(f"  {outcome.resume_command}")
    elif outcome.out_of_time and not outcome.errors and outcome.best:
        console.print(
            f"{outcome.out_of_time.capitalize()}; the table compares those that finished, without "
            f"confirmation runs. Continue it with:\n  {outcome.resume_command}",
            style="yellow",
        )
