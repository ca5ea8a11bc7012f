"""A report's statistics: fANOVA parameter importances of the study rebuilt from the recorded
trials, and the confirmation's verdict over the runs read back (the search's own, confirm.py)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

from flatbasin.search.confirm import confirmation_stats
from flatbasin.search.report_data import Importances, Report, Trial
from flatbasin.spaces.loader import Dist, Space

MIN_IMPORTANCE_TRIALS = 4  # fANOVA of 2 or 3 trials says nothing: no panel, a line says why


FEW_TRIALS = 10  # fANOVA over fewer trials than this is drawn, with a warning in its title


ONLY_ONE = "the only searched parameter: its importance is 1 by definition"


def _distribution(dist: Dist) -> Any:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if dist.kind == "loguniform":
        return FloatDistribution(float(dist.values[0]), float(dist.values[1]), log=True)
    if dist.kind == "uniform":
        return FloatDistribution(float(dist.values[0]), float(dist.values[1]))
    if dist.kind == "int":
        return IntDistribution(int(dist.values[0]), int(dist.values[1]))
    return CategoricalDistribution(list(dist.values))


def _value(dist: Dist, text: str) -> Any:
    """A param as MLflow holds it (a string) back in its distribution's type."""
    if dist.kind in ("loguniform", "uniform"):
        return float(text)
    if dist.kind == "int":
        return int(float(text))
    for choice in dist.values:
        if str(choice) == text:
            return choice
    raise ValueError(f"{text!r} is not one of {list(dist.values)}")


def _inside(dist: Dist, value: Any) -> bool:
    return dist.kind == "choice" or dist.values[0] <= value <= dist.values[1]


def _study_importances(
    title: str, rows: list[tuple[dict[str, Any], dict[str, Any], float]]
) -> Importances:
    import optuna

    result = Importances(title, len(rows))
    if len(rows) < MIN_IMPORTANCE_TRIALS:
        result.reason = f"not enough trials ({len(rows)}; importances need at least {MIN_IMPORTANCE_TRIALS})"  # fmt: skip
        return result
    if len({value for _, _, value in rows}) == 1:  # fANOVA would fail, or call one parameter 1
        result.reason = "every trial scored the same: nothing to attribute"
        return result
    study = optuna.create_study(direction="maximize")
    for params, distributions, value in rows:
        study.add_trial(
            optuna.trial.create_trial(params=params, distributions=distributions, value=value)
        )
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)  # seeded: the same page twice
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except RuntimeError as err:  # fANOVA: every trial scored the same
        result.reason = (
            "every trial scored the same: nothing to attribute"
            if "variance" in str(err)
            else f"not computed: {err}"
        )
        return result
    result.values = {k: float(v) for k, v in values.items() if math.isfinite(v)}
    if not result.values:
        result.reason = "not enough trials: no parameter varied"
    return result


def importances(trials: list[Trial], space: Space | None, problem: str) -> list[Importances]:
    """fANOVA importances of the study rebuilt from the recorded trials: overall ('variant') when
    the space has several variants, and per variant over its '<variant>/<key>' parameters.

    Diverged trials count with the score they reported (0), as the sampler saw them."""
    from optuna.distributions import CategoricalDistribution

    if space is None:
        return [Importances("all trials", 0, reason=problem)]
    done = [t for t in trials if t.done and t.score is not None and t.variant in space.variants]
    out = []
    if len(space.variants) > 1:
        choice = {"variant": CategoricalDistribution(list(space.variants))}
        rows = [({"variant": t.variant}, choice, float(t.score or 0.0)) for t in done]
        if len({t.variant for t in done}) < 2:
            out.append(Importances("variant (all trials)", len(rows), reason="not enough trials: only one variant finished"))  # fmt: skip
        else:
            out.append(_study_importances("variant (all trials)", rows))
    for variant, (searched, fixed) in space.variants.items():
        mine = [t for t in done if t.variant == variant]
        if not mine:
            continue
        if not searched:
            out.append(Importances(variant, len(mine), reason="no searched parameters"))
            continue
        distributions = {f"{variant}/{k}": _distribution(d) for k, d in searched.items()}
        rows, skipped = [], 0
        for t in mine:
            try:
                values = {k: _value(d, t.params[k]) for k, d in searched.items() if k in t.params}
                if not all(_inside(searched[k], v) for k, v in values.items()):
                    raise ValueError("outside the space's range")
                _absent_as_idle(
                    variant, set(searched) - set(values), {**space.settings, **fixed, **values}
                )
            except (KeyError, ValueError):
                skipped += 1  # a trial of another version of the space: not part of this study
                continue
            params = {f"{variant}/{k}": v for k, v in values.items()}
            given = {name: distributions[name] for name in params}  # the study of what acted
            rows.append((params, given, float(t.score or 0.0)))
        result = _study_importances(variant, rows)
        if skipped:
            result.reason += f" ({skipped} trial(s) outside the logged space left out)"
        out.append(result)
    return out


def _absent_as_idle(variant: str, absent: set[str], values: dict[str, Any]) -> None:
    """KeyError unless every searched key a trial lacks did nothing in it (swa_lr_max with
    swa_mode constant is not sampled: trainables/conditions.py); fANOVA then rates the keys
    every trial has."""
    from flatbasin.trainables.config import idle_settings

    if not absent:
        return
    try:
        idle = idle_settings(variant, {**values, **dict.fromkeys(absent)})
    except TypeError:  # a key it depends on is absent too
        idle = {}
    if not absent <= set(idle):
        raise KeyError(sorted(absent - set(idle)))


@dataclass
class Confirmed:
    variant: str
    seeds: int
    diverged: int
    val_mean: float
    val_std: float
    test_mean: float | None
    test_std: float | None
    p_value: float | None  # the paired test of the leader's lead over it; None for the leader
    verdict: str
    lead: tuple[float, float, float] | None = None  # the leader's mean lead, 95% interval
    models: int = 1  # models per prediction


def confirmation_rows(report: Report) -> list[dict[str, Any]]:
    """The search's own statistics (flatbasin.search.confirm) over the confirmation runs read back
    from MLflow: mean ± std over the runs, best first, and the paired test against the leader."""
    finals: dict[str, list[dict[str, Any]]] = {}
    for c in report.confirmations:
        finals.setdefault(c.variant, []).append(
            {"score": c.score, "test_acc": c.test_acc, "diverged": c.diverged, "pair": c.pair,
             "models": c.models}
        )  # fmt: skip
    return [
        {**row, "val_size": report.val_size, "fresh_splits": report.fresh_splits}
        for row in confirmation_stats(finals, report.val_size)
    ]


def confirmed(report: Report) -> list[Confirmed]:
    tests = {
        c.variant for c in report.confirmations if c.test_acc is not None
    }  # variants with a test accuracy in at least one run
    return [
        Confirmed(
            row["variant"],
            row["n"],
            row["diverged"],
            row["val_mean"],
            row["val_std"],
            row["test_mean"] if row["variant"] in tests else None,
            row["test_std"] if row["variant"] in tests else None,
            row["p_vs_best"],
            row["verdict"],
            (row["diff_mean"], row["diff_low"], row["diff_high"])
            if row["diff_low"] is not None
            else None,
            row["models"],
        )
        for row in confirmation_rows(report)
    ]


def drawn_importances(report: Report) -> list[Importances]:
    """The studies whose importances carry information: computed (enough trials, scores that
    differ) over more than one parameter (the only parameter of a study is important by definition)."""
    return [i for i in report.importances if len(i.values) > 1]
