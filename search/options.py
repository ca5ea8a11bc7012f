"""A search's options as validated at the edge (SearchOptions, from the command line or
flatbasin.search), and what a search ended with (Outcome)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from flatbasin.search.preflight import check_cpu_share, check_gpu_share
from flatbasin.spaces.loader import NAME


class SearchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Every number has a range, the one `flatbasin search --help` states (tests/test_bad_inputs.py
    # reads the help and holds both to each other).
    samples: int | None = Field(None, ge=1, le=100_000)  # None: the space file's `samples`
    concurrency: int = Field(2, ge=1, le=100_000)
    address: str | None = None  # None: $RAY_ADDRESS, else a new local Ray on this machine
    tracking_uri: str
    storage: Path
    name: str | None = Field(None, pattern=NAME.pattern)  # None: the space's name
    resume: bool = False
    scheduler: Literal["asha", "fifo"] = "fifo"
    cpus_per_trial: float = Field(1.0, ge=0.0001, le=10_000)  # whole CPUs, or 1/N of one
    gpus_per_trial: float = Field(0.0, ge=0, le=16)  # whole GPUs, or 1/N of one
    seed: int = Field(0, ge=0, le=2**32 - 1)  # what Optuna's sampler (numpy) takes
    time_budget_s: float | None = Field(None, ge=1, le=31_536_000)  # a second to a year
    max_failures: int = Field(2, ge=0, le=100)  # retries of a trial whose worker died
    checkpoint_every: int = Field(1, ge=1, le=10_000)  # epochs (a trial's budget is at most 10,000)
    checkpoint_interval_s: float = Field(
        20.0, ge=0, le=86_400
    )  # at most one checkpoint per this many seconds
    confirm_seeds: int | None = Field(None, ge=0, le=100)  # None: the space's confirm_seeds
    start_from: str | None = None  # --from: base, an MLflow run id or a checkpoint file (see
    # search/post_convergence.py); None: the space's `from:`, if it has one
    soup: bool | None = None  # --soup/--no-soup (search/soup.py); None: on with a start, else off
    # Callables handed to flatbasin.search from Python, pickled by value, by their `callable:NAME`:
    # every trial (and a base phase trained as a Ray task) gets them from Ray's object store.
    passed: dict[str, bytes] = Field(default_factory=dict, repr=False)

    @field_validator("gpus_per_trial")
    @classmethod
    def _whole_trials_per_gpu(cls, gpus: float) -> float:
        return check_gpu_share(gpus)

    @field_validator("cpus_per_trial")
    @classmethod
    def _whole_trials_per_cpu(cls, cpus: float) -> float:
        return check_cpu_share(cpus)


@dataclass(frozen=True)
class Outcome:
    name: str
    experiment_path: Path
    best: list[dict[str, Any]]  # best trial per variant, best first
    parent_run_id: str
    unwritten: int  # trials whose MLflow writes are still pending (server away at the end)
    seconds: dict[str, float] = field(default_factory=dict)  # start-up, trials, finish
    interrupted: bool = False  # Ctrl-C: trials left unfinished, resumable
    disk: str = ""  # a full or read-only disk stopped the search (resumable once there is room)
    # Why trials are left unwritten, when it lasts, and its kind (full, read-only, deleted).
    store: tuple[str, str] = ("", "")
    errors: list[str] = field(default_factory=list)  # one line per failed trial, first first
    resume_command: str = ""
    confirmed: list[dict[str, Any]] = field(default_factory=list)  # per variant over fresh seeds
    trials_per_variant: dict[str, int] = field(default_factory=dict)
    untried: list[str] = field(default_factory=list)  # variants of the space that got no trial
    out_of_time: str = ""  # "the --time-budget of 60 s ran out after 3 of 16 trials", when it did

    @property
    def state(self) -> str:
        return search_state(
            bool(self.errors or self.disk), self.interrupted, bool(self.out_of_time)
        )


def search_state(failed: bool, interrupted: bool, out_of_time: bool) -> str:
    """What the search's run records: a failure first, then a search left to resume, else finished."""
    if failed:
        return "failed"
    return "interrupted" if interrupted or out_of_time else "finished"
