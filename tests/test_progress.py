"""The progress line: what it counts, and a time left that comes from how long trials take."""

from __future__ import annotations

import io
from types import SimpleNamespace

from rich.console import Console

from flatbasin.search.callbacks import Progress


def trial(trial_id: str, status: str = "RUNNING") -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, status=status, config={"variant": "sgd"})


def test_counts_and_time_left(monkeypatch):
    out = io.StringIO()
    progress = Progress(6, Console(file=out, width=200), every_s=1e9)
    clock = iter([0.0, 0.0, 10.0, 10.0, 12.0, 12.0, 20.0, 20.0])
    monkeypatch.setattr("flatbasin.search.callbacks.time.monotonic", lambda: next(clock))
    a, b, c = trial("a"), trial("b"), trial("c")
    progress.on_trial_start(0, [a, b], a)
    progress.on_trial_start(0, [a, b], b)
    a.status = "TERMINATED"
    progress.on_trial_complete(0, [a, b, c], a)  # took 10 s; b and c run, 3 wait
    line = out.getvalue().splitlines()[-1]
    assert "1/6 done · 2 running · 0 failed" in line
    assert "~00:20 left" in line  # 3 waiting × 10 s / 2 running + 5 s for the running ones
    # A trial that reports a permanent error and returns is failed, not done, and counted once.
    progress.on_trial_result(0, [b, c], b, {"permanent_error": "DataError: x", "score": 0.0})
    progress.on_trial_complete(0, [b, c], b)
    assert "1/6 done · 1 running · 1 failed" in out.getvalue().splitlines()[-1]


def test_a_resumed_search_counts_the_trials_that_ended_before_it():
    out = io.StringIO()
    progress = Progress(6, Console(file=out, width=200), every_s=1e9)
    earlier = [
        SimpleNamespace(trial_id=i, status="TERMINATED", config={"variant": "swa"}, last_result=r)
        for i, r in (("a", {"final": True, "score": 0.91}), ("b", {"final": True, "score": 0.93}),
                     ("c", {"permanent_error": "DataError: x"}))
    ]  # fmt: skip
    d = SimpleNamespace(trial_id="d", status="RUNNING", config={"variant": "sgd"}, last_result={})
    progress.on_step_begin(0, [*earlier, d])
    progress.on_step_begin(1, [*earlier, d])  # counted once
    d.status = "TERMINATED"
    progress.on_trial_complete(1, [*earlier, d], d)
    line = out.getvalue().splitlines()[-1]
    assert "3/6 done · 0 running · 1 failed" in line and "best 0.9300 (swa)" in line, line


def test_a_failed_trial_is_one_line_not_the_workers_traceback():
    import logging
    import sys

    from ray.exceptions import RayTaskError

    from flatbasin.search.tune_logs import TrialFailures

    cause = RuntimeError(
        "Unable to set up cluster storage with the following settings:\nStorageContext<>"
    )
    try:
        raise RayTaskError("train", "Traceback (most recent call last):\n  ...", cause)
    except RayTaskError:
        record = logging.LogRecord(
            "ray.tune.execution.tune_controller", logging.ERROR, __file__, 1,
            "Trial task failed for trial %s", ("sgd_1",), sys.exc_info(),
        )  # fmt: skip
    assert TrialFailures().filter(record)
    text = logging.Formatter().format(record)
    assert (
        text
        == "Trial task failed for trial sgd_1: RuntimeError: Unable to set up cluster storage with the following settings:"
    ), text


def test_a_time_budget_that_cut_the_search_short_is_named():
    from flatbasin.search.options import SearchOptions
    from flatbasin.search.tune_results import ran_out_of_time

    records = {i: SimpleNamespace(final={"score": 0.9} if i < 3 else None) for i in range(5)}
    writer = SimpleNamespace(records=records)
    budget = SearchOptions(tracking_uri="sqlite:///x.db", storage="runs", time_budget_s=60)
    assert (
        ran_out_of_time(budget, writer, 16, 60.2)
        == "the --time-budget of 60 s ran out after 3 of 16 trial(s)"
    )
    assert ran_out_of_time(budget, writer, 3, 60.2) == ""  # all it asked for finished
    assert (
        ran_out_of_time(budget, writer, 16, 30.0) == ""
    )  # ended for another reason (errors, Ctrl-C)
    assert (
        ran_out_of_time(
            SearchOptions(tracking_uri="sqlite:///x.db", storage="runs"), writer, 16, 600.0
        )
        == ""
    )


def test_a_best_score_at_chance_level_is_named():
    import torch

    from flatbasin.search.tune_results import learned_nothing
    from flatbasin.trainables.loop import chance_level

    chance = chance_level(torch.tensor([0, 1, 1, 2, 1]))
    assert chance == 0.6  # always answering class 1

    def best(score: float) -> list[dict]:
        return [{"score": score, "final": {"chance": chance}}]

    assert "no better than chance (0.6000" in learned_nothing(best(0.61))
    assert learned_nothing(best(0.65)) == ""  # learned a little: not this warning's business
    assert learned_nothing([{"score": 0.1, "final": {}}]) == ""  # a trial from before the field
    assert learned_nothing([]) == ""
