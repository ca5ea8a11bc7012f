"""Search spaces: YAML files validated whole before anything starts, turned into Optuna define-by-run
functions. Names inside Optuna carry the variant's prefix ('swa/swa_lr') so TPE never mixes meanings."""

from flatbasin.spaces.loader import Space, SpaceError, load_space

__all__ = ["Space", "SpaceError", "load_space"]
