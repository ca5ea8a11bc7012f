"""A report as one self-contained HTML page: every string that comes from a run is data, never
markup (escaped), the figures inline."""

from __future__ import annotations

import base64
import html
import math
import re
import statistics
import time

import flatbasin
import flatbasin.search.confirm as confirm
import flatbasin.search.soup as soup
from flatbasin.search.confirm import ALPHA
from flatbasin.search.credentials import redact_uri
from flatbasin.search.report_data import Report, Trial, status_counts
from flatbasin.search.report_stats import (
    ONLY_ONE,
    Importances,
    confirmation_rows,
    confirmed,
    drawn_importances,
)
from flatbasin.search.tags import STATE

esc = html.escape  # every string that comes from a run is data, never markup


STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 70em; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { padding: 0.3em 0.7em; border-bottom: 1px solid #ddd; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
p.verdict { font-size: 1.15em; padding: 0.6em 0.9em; background: #eef6ee; border-left: 4px solid #4a8;
            margin: 0.8em 0 0.4em; }
p.verdict.unconfirmed { background: #fdf6e3; border-left-color: #c93; }
tr.best td { background: #eef6ee; } .muted { color: #666; } .bad { color: #a33; }
code { font-size: 0.92em; } img { max-width: 100%; border: 1px solid #eee; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.15em 1em; }
dt { color: #666; } dd { margin: 0; }
"""


def _pct(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{100 * value:.2f}%"


def _param(text: str) -> str:
    try:
        number = float(text)
    except ValueError:
        return text
    return text if re.fullmatch(r"-?\d+", text) else f"{number:.4g}"


def _searched(report: Report, variant: str) -> list[str]:
    if report.space is not None and variant in report.space.variants:
        return list(report.space.variants[variant][0])
    # No space file: the settings that differ between the variant's trials are the searched ones.
    mine = [t.params for t in report.trials if t.variant == variant]
    keys = sorted({k for p in mine for k in p})
    return [k for k in keys if len({p.get(k) for p in mine}) > 1]


def _params_text(report: Report, trial: Trial) -> str:
    keys = _searched(report, trial.variant)
    return ", ".join(f"{k}={_param(trial.params[k])}" for k in keys if k in trial.params) or "–"


def _table(header: list[str], rows: list[list[str]], numeric: set[int], classes: list[str] | None = None) -> str:  # fmt: skip
    """Cells arrive escaped."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        cells = "".join(
            f'<td class="num">{c}</td>' if j in numeric else f"<td>{c}</td>"
            for j, c in enumerate(row)
        )
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _image(images: dict[str, bytes], name: str, alt: str) -> str:
    data = base64.b64encode(images[name]).decode("ascii")
    return f'<p><img src="data:image/png;base64,{data}" alt="{esc(alt)}"></p>'


def _best_section(report: Report) -> str:
    variants = list(report.best) + sorted({t.variant for t in report.trials} - set(report.best))
    rows = []
    for variant in variants:
        mine = [t for t in report.trials if t.variant == variant]
        scores = sorted(t.score for t in mine if t.status == "finished" and t.score is not None)
        best = report.best.get(variant)
        curve = report.curves.get(variant, {}).get("curve", [])
        path = " → ".join(f"{100 * p['val_acc']:.1f}" for p in curve) if len(curve) > 1 else "final model"  # fmt: skip
        other = ", ".join(
            f"{n} {s}"
            for s in ("diverged", "stopped early", "failed", "unfinished")
            if (n := sum(t.status == s for t in mine))
        )
        rows.append(
            [
                esc(variant),
                esc(_pct(best.score)) if best else "–",
                esc(_pct(best.test_acc)) if best else "–",
                esc(_params_text(report, best)) if best else "no finished trial",
                esc(path),
                str(len(scores)),
                esc(" / ".join(_pct(v) for v in (scores[0], statistics.median(scores), scores[-1])))
                if scores
                else "–",
                esc(other) or "0",
                f"<code>{esc(best.run_id)}</code>" if best else "–",
            ]
        )
    header = ["variant", "best val score", "its test acc", "its searched params",
              "its curve (val %, 1..K models)", "finished trials", "val score min / median / max",
              "not counted", "MLflow run"]  # fmt: skip
    classes = ["best" if i == 0 and report.best else "" for i in range(len(rows))]
    return (
        "<h2>Best trial per variant</h2>"
        '<p class="muted">Variants ordered by their best validation score (the accuracy of the model '
        "each deploys); the spread is over the variant's finished trials; diverged, stopped and "
        "failed trials are counted apart. The test accuracy is reported, never used to choose.</p>"
        + _table(header, rows, {1, 2, 5, 6}, classes)
    )


def _verdict_section(report: Report) -> str:
    """The answer first: the confirmation's verdict and how sure it is, or, without one, the best
    search trial and why it is not yet an answer."""
    if report.confirmations:
        verdict = confirm.verdict(confirmation_rows(report))
        how = (
            "Each variant's best configuration was retrained on fresh seeds"
            + (", each run on a fresh validation split, " if report.fresh_splits else ", ")
            + "the same seeds and splits for every variant, and compared run by run with the leader "
            f"(a t-test of the paired differences against the noise pooled over variants, p < {ALPHA}: "
            "beyond noise). Chosen on validation accuracy only; the test accuracy is reported."
        )
        return (
            f'<h2>Verdict</h2><p class="verdict">{esc(verdict.text)}</p>'
            f'<p class="muted">{esc(how)}</p>'
        )
    if not report.best:
        return (
            '<h2>Verdict</h2><p class="verdict unconfirmed">No answer: no variant has a finished, '
            "non-diverged trial.</p>"
        )
    variant, trial = next(iter(report.best.items()))
    finished = sum(t.status == "finished" for t in report.trials)
    text = (
        f"Not confirmed: the best search trial is {variant}'s, {_pct(trial.score)} validation "
        f"accuracy, one seed on one validation split, the best of {finished} finished trials (so it "
        "flatters). How sure that is, is unknown: run the search with --confirm-seeds 3 (or "
        "confirm_seeds: 3 in the space) to retrain each variant's best on fresh seeds and splits."
    )
    return f'<h2>Verdict</h2><p class="verdict unconfirmed">{esc(text)}</p>'


def _confirmed_section(report: Report) -> str:
    if not report.confirmations:
        return ""
    rows = confirmed(report)
    seeds = max(r.seeds for r in rows)
    body = [
        [
            esc(r.variant),
            esc(f"{r.seeds} ({r.diverged} diverged)" if r.diverged else str(r.seeds)),
            esc(f"{100 * r.val_mean:.2f} ± {100 * r.val_std:.2f}"),
            esc(f"{100 * r.test_mean:.2f} ± {100 * (r.test_std or 0.0):.2f}")
            if r.test_mean is not None
            else "–",
            esc(f"{100 * r.lead[0]:+.2f} ({100 * r.lead[1]:+.2f} to {100 * r.lead[2]:+.2f})")
            if r.lead is not None
            else "–",
            "–" if r.p_value is None else esc(f"{r.p_value:.3g}"),
            str(r.models),
            esc(r.verdict),
        ]
        for r in rows
    ]
    splits = " and validation splits" if report.fresh_splits else ""
    header = ["variant", "runs", "val acc (%)", "test acc (%)", "leader's lead (points)", "p",
              "models", "verdict"]  # fmt: skip
    return (
        f"<h2>Confirmed over {seeds} seeds{splits}</h2>"
        '<p class="muted">Each variant\'s best configuration retrained; mean ± standard deviation '
        "in accuracy points over its runs (a diverged run counts with score 0). Lead: how far the "
        "leader's validation accuracy is above the variant's, the mean of their paired differences "
        f"with its 95% interval; p ≥ {ALPHA}: within noise of the leader. Models: how many models "
        "the deployed model runs per prediction.</p>"
        + _table(
            header, body, {1, 2, 3, 4, 5, 6}, ["best" if r.verdict == "best" else "" for r in rows]
        )
    )


def _importance_section(report: Report, images: dict[str, bytes]) -> str:
    parts = ["<h2>Parameter importances</h2>"]
    drawn = drawn_importances(report)
    if drawn:
        parts.append(
            '<p class="muted">fANOVA (Optuna) on the study rebuilt from the recorded trials and the '
            "space file's distributions: the share of the validation score's variance each "
            "searched parameter explains. Few trials make these rough; diverged trials count with "
            "score 0.</p>"
        )
        parts.append(_image(images, "importances.png", "parameter importances"))
    absent = [i for i in report.importances if i not in drawn]
    if absent:
        why = "; ".join(f"{i.title}: {_absent(i)}" for i in absent)
        lead = "No panel for" if drawn else "No importance panels"
        parts.append(f'<p class="muted">{esc(f"{lead}: {why}.")}</p>')
    return "".join(parts)


def _absent(study: Importances) -> str:
    """Why a study has no panel, in a few words."""
    if len(study.values) == 1:
        return ONLY_ONE
    return study.reason.strip() or "nothing to show"


def _trials_section(report: Report) -> str:
    rows, classes = [], []
    for t in report.trials:
        note = esc(t.error) if t.error else ""
        rows.append(
            [esc(t.variant), f"<code>{esc(t.trial_id)}</code>", esc(t.status), esc(_pct(t.score)),
             esc(_pct(t.test_acc)), esc(_params_text(report, t)), note]
        )  # fmt: skip
        classes.append("bad" if t.status in ("failed", "diverged") else "")
    return f"<h2>All trials ({len(report.trials)})</h2>" + _table(
        ["variant", "trial", "status", "val score", "test acc", "searched params", "error"],
        rows,
        {3, 4},
        classes,
    )


def _soup_section(report: Report) -> str:
    """Soups and the greedy ensemble beside the best single trial and the confirmed choice: the
    winner, else the variant recommended among those that tie."""
    tags = report.parent.data.tags
    choice = tags.get("flatbasin.winner") or tags.get("flatbasin.recommended")
    row = next((c for c in confirmed(report) if c.variant == choice), None)
    label = (
        "confirmed winner"
        if choice and choice == tags.get("flatbasin.winner")
        else "confirmed choice, a tie"
    )
    return soup.html_section(report.soups, next(iter(report.best.values()), None), row, label)


def render_html(report: Report, images: dict[str, bytes]) -> str:
    tags, params = report.parent.data.tags, report.parent.data.params
    datasets = sorted({t.params.get("dataset", "?") for t in report.trials})
    epochs = sorted({t.params.get("epochs", "?") for t in report.trials})
    facts: list[tuple[str, str]] = [
        ("search run", f"<code>{esc(report.parent.info.run_id)}</code>"),
        ("tracking URI", f"<code>{esc(redact_uri(report.uri))}</code>"),
        ("state", esc(tags.get(STATE, report.parent.info.status.lower()))),
        ("data", esc(", ".join(datasets))
         + (esc(f" (validation set: {report.val_size} examples)") if report.val_size else "")),
        ("budget", esc(f"{', '.join(epochs)} epochs per trial")),
        ("trials", esc(status_counts(report.trials))),
        ("sampler", esc(f"{params.get('sampler', '?')}, seed {params.get('seed', '?')}, "
                        f"scheduler {params.get('scheduler', '?')}")),
        ("space", esc(params.get("space", "?"))),
    ]  # fmt: skip
    if report.space_problem:
        facts.append(("space file", f'<span class="bad">{esc(report.space_problem)}</span>'))
    facts_html = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    # The answer first (the verdict, how sure it is, the confirmed table), then the details.
    sections = [
        _verdict_section(report),
        _confirmed_section(report),
        f"<h2>The search</h2><dl>{facts_html}</dl>",
        _best_section(report),
        "<h2>Accuracy against models averaged</h2>"
        + _image(images, "curves.png", "validation accuracy of each variant's best trial")
        + '<p class="muted">Each variant\'s best search trial: one seed, chosen as the best of '
        "several, so its score flatters; where the search confirmed them, the panel on the right "
        "gives each variant's mean ± sd over its confirmation runs, the numbers to compare. Curves "
        "are nudged sideways slightly so none hides another. Variants that deploy one final model "
        "(sgd, ema) are horizontal lines.</p>",
        _soup_section(report),
        _importance_section(report, images),
        _trials_section(report),
    ]
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(f'flatbasin report: {report.name}')}</title><style>{STYLE}</style></head>"
        f"<body><h1>{esc(f'Search {report.name}')}</h1>"
        + "".join(sections)
        + f'<p class="muted">Written by flatbasin {esc(flatbasin.__version__)} at {esc(when)}.</p>'
        + "</body></html>\n"
    )
