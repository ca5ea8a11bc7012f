"""flatbasin: hyperparameter search for training methods that find flat minima by averaging.

From Python (a notebook), as Ray Tune and Optuna are used:

    import flatbasin
    result = flatbasin.search({"name": "mine", "epochs": 10, "variants": {"swa": {}}},
                              model=build, data=load, samples=8)
    result.winner, result.best[0].run_id
    flatbasin.train("swa", model=build, data=load, epochs=10)
    flatbasin.soup("mine")   # weight soups and greedy ensemble of a finished search

One import name for the repository's folders: `flatbasin.search` (driver: CLI, Tuner, MLflow; the
module is callable, as `flatbasin.search(...)`), `flatbasin.trainables` (worker: plain PyTorch) and
`flatbasin.spaces` (search spaces). Importing flatbasin imports neither torch nor Ray.
"""

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("flatbasin")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0.0.0+unknown"

# Reached through the package, imported on first use (search/api.py); `search` is the callable
# subpackage flatbasin.search itself.
_API = (
    "train",
    "soup",
    "SearchResult",
    "BestTrial",
    "ConfirmedVariant",
    "UsageError",
    "SearchFailed",
)
__all__ = ["search", *_API]


def __getattr__(name: str) -> Any:
    if name == "search":
        import flatbasin.search

        return flatbasin.search
    if name in _API:
        from flatbasin.search import api

        return getattr(api, name)
    raise AttributeError(f"module 'flatbasin' has no attribute {name!r}")
