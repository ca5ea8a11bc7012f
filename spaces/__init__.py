"""Search spaces: YAML files (or dicts) validated whole before anything starts, turned into Optuna
define-by-run functions. Names inside Optuna carry the variant's prefix ('swa/swa_lr') so TPE never
mixes meanings."""

from flatbasin.spaces.loader import Space, SpaceError, load_space, space_from_dict

__all__ = ["Space", "SpaceError", "load_space", "space_from_dict"]
