"""The one MLflow writer. Trials and searches become runs here and nowhere else.

Every write is idempotent: runs are found again by their tags (the search's storage path, the trial id),
metrics already in MLflow are not logged twice, and the final results are written once. That is what
lets a restored search, a retry after the server came back, and `flatbasin sync` share this code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

import flatbasin
from flatbasin.search.search_run import SearchRun, base_tags, git_commit
from flatbasin.search.tags import (
    BASE_RUN,
    CODE_ARTIFACTS,
    CODE_SHA256,
    CONFIRMS,
    EPOCH_METRICS,
    ERROR,
    FINAL,
    ROLE,
    STOP_REASONS,
    STOPPED,
    TRIAL_ID,
    VARIANT,
)
from flatbasin.trainables.config import sampled, trial_config
from flatbasin.trainables.usercode import text_digest
from flatbasin.trainables.variants import phase_flags

RUNS_PAGE = 1000  # runs per search_runs call where a search reads all of its runs


@dataclass
class TrialRecord:
    """What Tune told us about one trial: its config, every result in order, and how it ended."""

    trial_id: str
    config: dict[str, Any]
    results: list[dict[str, Any]] = field(default_factory=list)
    status: str = "RUNNING"  # RUNNING, FINISHED, FAILED, INTERRUPTED, STOPPED

    @property
    def final(self) -> dict[str, Any] | None:
        return self.results[-1] if self.results and self.results[-1].get("final") else None

    @property
    def error(self) -> str | None:
        """The permanent error the trial reported (its data or model cannot work), if any."""
        last = self.results[-1] if self.results else {}
        return last.get("permanent_error") or None

    def add(self, result: dict[str, Any]) -> None:
        """One result per epoch: a result for an epoch already held replaces it (a trial restored from
        a checkpoint reports that epoch again; a finished trial may repeat its final result)."""
        epoch = result.get("epoch")
        last = self.results[-1].get("epoch") if self.results else -1
        if epoch is not None and last is not None and epoch > last:
            # The next epoch, as nearly always: appended, not a pass over every earlier one
            self.results.append(result)
            return
        if epoch is not None:
            self.results = [r for r in self.results if r.get("epoch") != epoch]
        self.results.append(result)
        self.results.sort(key=lambda r: (r.get("epoch") is None, r.get("epoch") or 0))

    def copy(self) -> TrialRecord:
        return TrialRecord(self.trial_id, self.config, list(self.results), self.status)


class Tracker(SearchRun):
    """The writer of a search's trial runs (and, through SearchRun and Store, of its own)."""

    def __init__(self, uri: str, experiment: str, search_key: str):
        super().__init__(uri, experiment, search_key)
        self._runs: dict[str, str] = {}  # trial id -> run id
        self._logged: dict[str, set[int]] = {}  # run id -> epochs already in MLflow
        self._finalised: set[str] = set()
        self._final_metrics: set[str] = set()  # runs whose final metrics are in, tag not yet
        self._ended: dict[str, str] = {}  # run id -> the record status its run was ended with
        self._stop_tagged: set[str] = set()  # runs tagged STOPPED, which a --resume may finish
        self._known: dict[str, Run] | None = None  # trial id -> its run, read once (_trial_runs)
        self._params: dict[str, list[Param]] = {}  # run id -> params not yet sent

    def _trial_runs(self) -> dict[str, Run]:
        """The runs already under the search's run, by trial id (the newest of each), read once, a
        page at a time: a search looked each trial up on its own, one query per trial. This tracker
        is the search's one writer, so the runs it makes itself are all it needs to add."""
        if self._known is None:
            parent, token = self.parent(), None
            known: dict[str, Run] = {}
            while True:
                page = self.client.search_runs(
                    [self.experiment_id],
                    filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}'",
                    max_results=RUNS_PAGE,
                    page_token=token,
                )  # newest first: MLflow's order
                for run in page:
                    if TRIAL_ID in run.data.tags:
                        known.setdefault(run.data.tags[TRIAL_ID], run)
                token = page.token
                if not token:
                    break
            self._known = known
        return self._known

    def run_for(self, record: TrialRecord) -> str:
        if record.trial_id in self._runs:
            return self._runs[record.trial_id]
        parent = self.parent()
        found = self._trial_runs().get(record.trial_id)
        if found is not None:
            run_id = found.info.run_id
            last = found.data.metrics.get("epochs_run")
            if found.data.tags.get(FINAL) == "true" and last is not None:
                # Whole: its closing batch went in with or after every epoch up to its last. One
                # query per trial less for a sync or a resumed search of a thousand trials.
                # Every epoch up to it, not only those the record holds now: a trial restored from
                # its checkpoint before the last (after a SIGKILL) reports its last epochs again,
                # and the mended result file brings the earlier ones later; none goes in twice.
                self._logged[run_id] = set(range(int(last) + 1))
            else:
                history = self.client.get_metric_history(run_id, "score")
                self._logged[run_id] = {m.step for m in history}
            if found.data.tags.get(STOPPED):
                self._stop_tagged.add(run_id)
            if found.info.status in ("FINISHED", "FAILED"):  # ended as such: not again
                self._ended[run_id] = found.info.status
            if found.data.tags.get(FINAL) == "true":
                self._finalised.add(run_id)
            elif "final_score" in found.data.metrics:
                # Its final metrics went in before the server went away, its tag did not: the
                # rest of the final write is repeated, the metrics are not (they would be twice).
                self._final_metrics.add(run_id)
        else:
            base_run = (record.config.get("start") or {}).get("run_id")
            try:
                config = trial_config(record.config)
                variant, dataset, flat = config.variant, config.dataset, config.flat()
            except ValueError:  # a config the trial itself rejected: record what was sampled
                variant = str(record.config.get("variant"))
                settings = record.config.get("settings", {})
                dataset = str(settings.get("dataset"))
                flat = {**settings, **record.config.get(variant, {}), "variant": variant}
            confirms = record.config.get("confirm_of")
            role = {ROLE: "confirm", CONFIRMS: str(confirms)} if confirms else {ROLE: "trial"}
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"{variant}-{'confirm-' if confirms else ''}{record.trial_id}",
                tags={MLFLOW_PARENT_RUN_ID: parent, **role, VARIANT: variant,
                      TRIAL_ID: record.trial_id, "flatbasin.dataset": dataset, **base_tags(),
                      **({BASE_RUN: base_run} if base_run else {})},
            )  # fmt: skip
            run_id = run.info.run_id
            self._trial_runs()[record.trial_id] = run
            # Sent with the run's first metrics, in one call (write)
            self._params[run_id] = [Param(k, str(v)) for k, v in sorted(flat.items())]
            self._logged[run_id] = set()
        self._runs[record.trial_id] = run_id
        return run_id

    def is_written(self, record: TrialRecord) -> bool:
        """Whether this tracker already brought the trial's run up to date with the record (nothing
        for `write` to do): every epoch logged, its final results or error in, its end status set."""
        run_id = self._runs.get(record.trial_id)
        if run_id is None:
            return False
        epochs = {int(r["epoch"]) for r in record.results if r.get("epoch") is not None}
        if not epochs <= self._logged.get(run_id, set()):
            return False
        ended = record.final is not None or record.error is not None
        if ended and run_id not in self._finalised:
            return False
        return record.status == "RUNNING" or self._ended.get(run_id) == record.status

    def write(self, record: TrialRecord) -> None:
        """Bring the trial's run up to date with the record; safe to call again and again.

        A trial's writes are few whatever its length: its run, then one log_batch with its params,
        its new epochs and, once it ended, its final metrics and tags (more only where MLflow's
        limits per call say so), its end status. Each write was a transaction (on SQLite a synced
        commit) on the driver, on the cores the trials train on."""
        run_id = self.run_for(record)
        now = int(time.time() * 1000)
        # Every epoch Tune holds and MLflow does not, whatever order they arrive in: after a restore,
        # an epoch reported just before the driver died arrives after later ones.
        variant = sampled(record.config).get("variant", "")
        epochs = [
            (int(r["epoch"]), _epoch_metrics(r, variant, now))
            for r in record.results
            if r.get("epoch") is not None and int(r["epoch"]) not in self._logged[run_id]
        ]
        if record.error is not None:  # failed for good, however often the record is written again
            tags: list[RunTag] = (
                [] if run_id in self._finalised else [RunTag(ERROR, record.error[:5000])]
            )
            self._log(run_id, epochs, tags=tags)
            self._finalised.add(run_id)
            self.client.set_terminated(run_id, "FAILED")
            self._ended[run_id] = record.status
            return
        final = record.final
        closing: list[Metric] = []
        tags = []
        if final is not None and run_id not in self._finalised:
            closing, tags = self._final_parts(run_id, record, final, now)
        if record.status != "RUNNING" and final is None:
            tags.append(RunTag(STOPPED, STOP_REASONS.get(record.status, "failed")))
        self._log(run_id, epochs, closing, tags)
        if final is not None:
            self._finalised.add(run_id)
            self._final_metrics.add(run_id)
        if record.status != "RUNNING":
            status = {"FINISHED": "FINISHED", "FAILED": "FAILED"}.get(record.status, "KILLED")
            if final is None:
                self._stop_tagged.add(run_id)
            elif run_id in self._stop_tagged:  # interrupted once, finished after --resume
                self.client.delete_tag(run_id, STOPPED)
                self._stop_tagged.discard(run_id)
            if self._ended.get(run_id) != record.status:  # a run found ended so needs no call
                self.client.set_terminated(run_id, status)
                self._ended[run_id] = record.status

    def _log(
        self,
        run_id: str,
        epochs: list[tuple[int, list[Metric]]],
        closing: list[Metric] | None = None,
        tags: list[RunTag] | None = None,
    ) -> None:
        """The run's unsent params, the epochs' metrics, then the closing metrics and tags, in as
        few log_batch calls as MLflow's limits allow (one for a short trial). What each call wrote
        is remembered as it goes: after a failure midway, a retry writes nothing twice."""
        from mlflow.utils.validation import (
            MAX_ENTITIES_PER_BATCH,
            MAX_METRICS_PER_BATCH,
            MAX_PARAMS_TAGS_PER_BATCH,
        )

        params, closing, tags = self._params.get(run_id, []), closing or [], tags or []
        metrics = [m for _, ms in epochs for m in ms] + closing
        if (
            len(params) <= MAX_PARAMS_TAGS_PER_BATCH
            and len(tags) <= MAX_PARAMS_TAGS_PER_BATCH
            and len(metrics) <= MAX_METRICS_PER_BATCH
            and len(params) + len(tags) + len(metrics) <= MAX_ENTITIES_PER_BATCH
        ):
            if params or tags or metrics:
                self.client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
            self._params.pop(run_id, None)
            self._logged[run_id].update(epoch for epoch, _ in epochs)
            return
        for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=params[start : start + MAX_PARAMS_TAGS_PER_BATCH])
        self._params.pop(run_id, None)
        chunk: list[Metric] = []
        sent: list[int] = []  # the epochs in `chunk`: whole epochs per call
        for epoch, ms in [*epochs, (-1, [])]:  # the sentinel sends the rest
            if chunk and (epoch < 0 or len(chunk) + len(ms) > MAX_METRICS_PER_BATCH):
                self.client.log_batch(run_id, metrics=chunk)
                self._logged[run_id].update(sent)
                chunk, sent = [], []
            chunk += ms
            sent.append(epoch)
        for start in range(0, len(closing), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=closing[start : start + MAX_METRICS_PER_BATCH])
        if closing:
            self._final_metrics.add(run_id)  # in: a retry of the tags must not send them again
        for start in range(0, len(tags), MAX_PARAMS_TAGS_PER_BATCH):  # FINAL is the last tag
            self.client.log_batch(run_id, tags=tags[start : start + MAX_PARAMS_TAGS_PER_BATCH])

    def _final_parts(
        self, run_id: str, record: TrialRecord, final: dict[str, Any], now: int
    ) -> tuple[list[Metric], list[RunTag]]:
        """The trial's final artifacts, written now (trial_config.json, the user's code), and its
        final metrics and tags for the closing batch, FINAL last: the tag says all of it is in."""
        metrics = (
            [Metric("test_acc", float(final["test_acc"]), now, 0)]
            if final.get("test_acc") is not None
            else []
        )
        metrics.append(Metric("final_score", float(final["score"]), now, 0))
        # Early stopping ends a trial before its budget: how far it went, and how long to its best.
        if final.get("epoch") is not None:
            metrics.append(Metric("epochs_run", float(final["epoch"]), now, 0))
        if final.get("seconds_to_best") is not None:
            metrics.append(Metric("seconds_to_best", float(final["seconds_to_best"]), now, 0))
        for p in final["curve"]:
            metrics += [Metric("curve/val_acc", p["val_acc"], now, p["count"]),
                        Metric("curve/test_acc", p["test_acc"], now, p["count"])]  # fmt: skip
        metrics += diversity_metrics(final.get("diversity", []), now)
        for name, points in final.get("extra_curves", {}).items():
            metrics += [
                Metric(f"curve/{name}/val_acc", p["val_acc"], now, p["count"]) for p in points
            ]
            metrics += [
                Metric(f"curve/{name}/test_acc", p["test_acc"], now, p["count"]) for p in points
            ]
        tags = [
            RunTag("flatbasin.diverged", str(bool(final["diverged"])).lower()),
            RunTag("flatbasin.data_fingerprint", final["data_fingerprint"]),
        ]
        if final.get("model_built"):  # the `model` param may read `auto`: this is what was built
            tags.append(RunTag("flatbasin.model", str(final["model_built"])))
        # The `precision` and `channels_last` params may read `auto` too: this is how it ran.
        for key, value in (final.get("runtime") or {}).items():
            tags.append(RunTag(f"flatbasin.runtime.{key}", str(value).lower()))
        code = final.get("code") or {}
        if code:  # the user's modules as the worker imported them: reproduce compares with these
            tags.append(RunTag(CODE_SHA256, text_digest(code)))
        self.client.log_dict(run_id, trial_record(record, final), "trial_config.json")
        for name, text in code.items():
            self.client.log_text(run_id, text, f"{CODE_ARTIFACTS}/{name}")
        # curve.png is drawn for each variant's best trial at the end (finish.finish_parent): a
        # figure cost the driver 70 ms of CPU per trial, more than the rest of its writes.
        tags.append(RunTag(FINAL, "true"))
        return [] if run_id in self._final_metrics else metrics, tags

    def run_id(self, trial_id: str) -> str | None:
        return self._runs.get(trial_id)


def _epoch_metrics(result: dict[str, Any], variant: str, now: int) -> list[Metric]:
    """One epoch's metrics, step = epoch; the phase as a metric only where the variant has epochs
    without data (phase_flags: prior_guided's `focus`)."""
    epoch = int(result["epoch"])
    metrics = [
        Metric(k, float(result[k]), now, epoch) for k in EPOCH_METRICS if result.get(k) is not None
    ]
    metrics += [
        Metric(name, flag, now, epoch)
        for name, flag in phase_flags(variant, result.get("phase")).items()
    ]
    return metrics


def diversity_metrics(points: list[dict[str, Any]], now: int) -> list[Metric]:
    """An ensemble's diversity with the curve: step = members, as for curve/test_acc."""
    return [
        Metric(f"diversity/{key}", float(p[key]), now, p["count"])
        for p in points
        for key in ("disagreement", "error_corr")
        if p.get(key) is not None
    ]


def trial_record(record: TrialRecord, final: dict[str, Any]) -> dict[str, Any]:
    """trial_config.json: everything `flatbasin reproduce` needs, and what it will compare against."""
    return {
        "config": final["trial_config"],
        "seed": final["trial_config"]["seed"],
        "threads": final["threads"],
        "runtime": final.get("runtime", {}),
        "data_fingerprint": final["data_fingerprint"],
        "flatbasin_version": flatbasin.__version__,
        "git_commit": git_commit(),
        "trial_id": record.trial_id,
        "recorded": {
            "score": final["score"],
            "test_acc": final["test_acc"],
            "diverged": final["diverged"],
            "curve": final["curve"],
            "history": [
                {k: r.get(k) for k in ("epoch", *EPOCH_METRICS, "phase")} for r in record.results
            ],
        },
    }
