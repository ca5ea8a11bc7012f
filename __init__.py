"""flatbasin: hyperparameter search for training methods that find flat minima by averaging.

One import name for the repository's folders: `flatbasin.search` (driver: CLI, Tuner, MLflow),
`flatbasin.trainables` (worker: plain PyTorch) and `flatbasin.spaces` (search spaces).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("flatbasin")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0.0.0+unknown"
