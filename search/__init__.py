"""Driver side of flatbasin: the CLI, search configuration, Tuner assembly, MLflow logging, reproduce.

The package is also the function: `flatbasin.search(space, **options)` runs a search from Python
(search/api.py, where its options are described) and returns a SearchResult.
"""

import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    """`flatbasin.search` is this package and `flatbasin.search(...)` the API's search: the
    package's name is taken by the folder, and Python lets a module's class define a call."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from flatbasin.search.api import search

        return search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
