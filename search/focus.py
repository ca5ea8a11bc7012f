"""`flatbasin focus-library OUT.pt`: train plain SGD on the source data, recording every conv layer's
weights, bias and gradients at every iteration, and fit the focus library `prior_guided` trains with
(seed 004). The fit itself lives in trainables/focus.py; this is the command around it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, get_args

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from flatbasin.search.errors import Unwritten, UsageError, describe
from flatbasin.trainables.focus import FocusLibrary, Regression


def make_library(
    out: Path,
    settings: dict[str, Any],
    regression: str,
    ridge: float,
    console: Console,
    overwrite: bool = False,
) -> FocusLibrary:
    """Harvest, fit, write OUT and print the fit per layer; bad input raises UsageError before the
    harvesting run starts, a run that cannot work (its data, model, a divergence) after it."""
    from flatbasin.search.preflight import writable_file
    from flatbasin.trainables.config import code_in, make_config
    from flatbasin.trainables.data_spec import DataError
    from flatbasin.trainables.focus import LibraryError
    from flatbasin.trainables.focus_harvest import fit_focus_library

    if out.is_dir():
        raise UsageError(
            f"OUT.pt {out}: is a folder; name the library file to write, e.g. {out / 'focus.pt'}"
        )
    writable_file("OUT.pt", out)  # a device, a pipe or a socket there is refused, as any folder
    if out.exists() and not overwrite:  # a library may have taken an hour: never lost silently
        raise UsageError(f"{out} exists; name a new file, or pass --overwrite to replace it")
    if regression not in get_args(Regression):
        raise UsageError(f"--regression {regression!r}: choose {' or '.join(get_args(Regression))}")
    if not math.isfinite(ridge) or ridge < 0:
        raise UsageError(f"--ridge {ridge:g}: the penalty must be 0 or more")
    try:
        config = make_config("sgd", code_in(settings, Path.cwd()))
    except ValidationError as err:
        raise UsageError(
            f"invalid settings for the harvesting run (variant sgd):\n{describe(err)}"
        ) from err
    except ValueError as err:
        raise UsageError(str(err)) from err

    console.print(
        f"harvesting: sgd on {config.dataset} (data_seed {config.data_seed}), {config.epochs} epochs, "
        f"seed {config.seed}; every conv weight, bias and gradient at every iteration"
    )
    try:
        chosen: Regression = regression  # type: ignore[assignment]  # checked above
        library, result = fit_focus_library(config, regression=chosen, ridge=ridge)
    except (DataError, LibraryError, ValueError) as err:  # TrialError is a ValueError
        raise UsageError(str(err)) from err
    try:
        library.save(out)
    except OSError as err:  # a full disk: the fit is lost, but says so in one paragraph
        raise Unwritten(
            f"the focus library was fitted ({library.meta['iterations']} iterations), but {out} "
            f"could not be written ({err.strerror or err}); free space there or give another OUT.pt"
        ) from err

    table = Table(title=f"focus library {out}: {regression} ridge fit of g ≈ a·w + c")
    for column in ("parameter", "shape", "R²", "mean slope a", "mean |c|"):
        table.add_column(column, justify="left" if column == "parameter" else "right")
    for key, slope in library.slopes.items():
        table.add_row(
            key,
            "x".join(map(str, slope.shape)),
            f"{library.meta['r2'][key]:.4f}",
            f"{slope.mean().item():.4g}",
            f"{library.intercepts[key].abs().mean().item():.4g}",
        )
    console.print(table)
    test = "-" if result.test_acc is None else f"{result.test_acc:.4f}"
    console.print(
        f"source run ({result.model}): {library.meta['iterations']} iterations, val acc "
        f"{result.score:.4f}, test acc {test}, {result.seconds['total']:.1f} s"
    )
    console.print(
        f"use it: flatbasin train --variant prior_guided --dataset DATASET --set library={out}"
    )
    return library
