"""The names flatbasin gives MLflow: run tags, per-epoch metrics and artifacts, one meaning each
(what tracking.py and search_run.py write, and report_read.py, soup.py and reproduce.py read back)."""

from __future__ import annotations

# Per-epoch metrics, step = epoch. train_loss and train_acc are absent in an epoch without a pass over
# the data (prior_guided's focus epochs); elapsed_s is training time since the trial started. A
# variant with epochs without data logs each epoch's phase as a metric (phase_flags: prior_guided's
# `focus`, 1 in a focus epoch, 0 in a data epoch); other variants' runs have no such metric.
EPOCH_METRICS = (
    "train_loss", "train_acc", "val_loss", "val_acc", "lr", "score", "members", "gen_gap", "elapsed_s",
)  # fmt: skip


ROLE, VARIANT, TRIAL_ID, SEARCH_KEY = (
    "flatbasin.role",
    "flatbasin.variant",
    "flatbasin.trial_id",
    "flatbasin.search",
)


FINAL = "flatbasin.final_logged"


STATE = "flatbasin.state"  # of a search: running, finished, failed, interrupted


ERROR = "flatbasin.error"  # of a trial that reported a permanent error


STOPPED = "flatbasin.stopped"  # why a trial ended before its last epoch


STOP_REASONS = {
    "FINISHED": "early stopping (the scheduler or the time budget)",
    "INTERRUPTED": "the search was interrupted; --resume continues this trial",
    "STOPPED": "the search stopped at another trial's permanent error",
}


LOST = (
    "lost: the search's driver was killed before Tune saved this trial, so --resume ran its place "
    "again as another trial; not part of the search"
)


CONFIRMS = "flatbasin.confirms"  # of a confirmation run: the trial id whose best config it retrains


# Post-convergence: the run whose checkpoint.pt holds the converged model a trial (and its search)
# continues, the SHA-256 of those weights, and, on a base run, what the weights came from.
SPACE_DIGEST = "flatbasin.space_digest"  # of a search: what its space file said (space_digest)


BASE_RUN = "flatbasin.base_run"


FROM_SHA = "flatbasin.from_sha256"


BASE_SOURCE = "flatbasin.base_source"


CHECKPOINT_ARTIFACT = "checkpoint.pt"  # a run's final weights: what --from RUN_ID continues


CODE_ARTIFACTS = "code"  # the user's own modules (model:, dataset: module:callable) as they ran


CODE_SHA256 = "flatbasin.code_sha256"


# A search run's answers, one meaning per tag. BEST_SEARCH_RUN: the trial with the best search
# score (validation accuracy of one seed: the maximum of noisy numbers, biased upward); WINNER: the
# variant better than every other beyond noise over the confirmation's fresh seeds and splits
# (absent without a confirmation, or when the leading variants tie); RECOMMENDED: the variant to
# use, the winner or else the cheapest of the variants that tie; VERDICT: the confirmation's answer
# in words; REPRODUCE_RUN: the run the printed `Reproduce:` names (and SearchResult.best_trial): the
# recommended variant's best search trial, else the best search trial. OLD_BEST_RUN:
# BEST_SEARCH_RUN under its former name, kept for the scripts that read it.
BEST_SEARCH_RUN = "flatbasin.best_search_run"


WINNER = "flatbasin.winner"


RECOMMENDED = "flatbasin.recommended"


VERDICT = "flatbasin.verdict"


REPRODUCE_RUN = "flatbasin.reproduce_run"


OLD_BEST_RUN = "flatbasin.best_run_id"


ANSWER_TAGS = (BEST_SEARCH_RUN, OLD_BEST_RUN, WINNER, RECOMMENDED, VERDICT, REPRODUCE_RUN)


# The experiment tag MLflow 3's UI reads for what an experiment holds (the value its own "experiment
# type" selector writes): training runs open on "Training runs", not on the GenAI overview and its
# "Detect issues" prompt. Set on the experiments a search makes, and on existing ones without it
# (a kind a user chose is left alone).
EXPERIMENT_KIND, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
