"""The focus library of prior-guided training (seed 004, the paper's 对焦库): for each conv layer and
each kind of parameter (weight, bias), a regression that predicts the gradient from the parameters,
fitted on a harvesting run of plain SGD on a similar data set (focus_harvest.py runs it).

The regression is element-wise ridge, g ≈ a⊙w + c: each parameter element has its own slope and
intercept, fitted over the harvest's iterations. The paper's regression (its eq. 4-5) maps a layer's
parameters to its gradient linearly; a full map from P parameters to P gradients has P² coefficients
(3.5 million for one 25x25x3 layer of cnn1d, 5.6e12 for a 512x512x3x3 VGG layer) and a harvest gives a
few thousand iterations, so it is hopelessly underdetermined and cannot even be stored. The diagonal of
that map plus an intercept keeps its form (gradient linear in the parameters) at 2P coefficients,
estimable from streaming sufficient statistics (n, Σw, Σg, Σw², Σwg, and Σg² for the fit's R²): no
iteration is stored, a harvest costs six float64 copies of the conv weights whatever its length, and
the fit is closed form. The ridge penalty keeps the slope of a parameter that hardly moved during the
harvest (a near-zero variance of w, so an unstable least-squares slope) near 0, its prediction near
its mean gradient; it is scaled by the layer's mean variance, so one value fits layers of any scale.
`layer` (one slope and one intercept per layer and kind, pooled over its elements) is the coarse
alternative: it transfers a trend, not a position.

A focus step w ← w − η·s·(a⊙w + c) is a linear recurrence whose fixed point is w* = −c/a, where the
regressed gradient vanishes: repeated focus steps move each conv weight towards where the harvesting
run's gradients said it was heading.

File: torch.save of plain tensors and metadata, with its own format name and version, read back with
weights_only=True (no pickled code runs).
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from flatbasin.trainables.files import write_whole

FORMAT = "flatbasin.focus_library"
VERSION = 1
KINDS = ("weight", "bias")
Regression = Literal["elementwise", "layer"]
# The penalty on the slope, in units of the layer's mean variance of w over the harvest.
DEFAULT_RIDGE = 0.1
CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
MAKE_ONE = "fit one with `flatbasin focus-library OUT.pt --dataset ... [--set model=...]`"


class LibraryError(ValueError):
    """A focus library that cannot be used: missing, not a library, another format version, damaged,
    or fitted on other conv layers than the model's."""


def conv_layers(model: nn.Module) -> dict[str, dict[str, list[int] | None]]:
    """Conv layer name -> {"weight": shape, "bias": shape or None}, in the model's order."""
    return {
        name: {kind: _shape(getattr(module, kind)) for kind in KINDS}
        for name, module in model.named_modules()
        if isinstance(module, CONV)
    }


def _shape(parameter: Tensor | None) -> list[int] | None:
    return None if parameter is None else list(parameter.shape)


def conv_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """'layer.kind' -> the parameter itself, for every conv weight and bias the model has."""
    return {
        f"{name}.{kind}": getattr(module, kind)
        for name, module in model.named_modules()
        if isinstance(module, CONV)
        for kind in KINDS
        if getattr(module, kind) is not None
    }


def ridge_fit(
    sums: Tensor, n: int, regression: Regression, ridge: float
) -> tuple[Tensor, Tensor, float]:
    """(slope a, intercept c, R²) of g ≈ a·w + c from sufficient statistics.

    `sums` stacks Σw, Σg, Σw², Σwg, Σg² over n iterations, each of the parameter's shape (float64).
    Per element it minimises Σ_t (g_t − a·w_t − c)² + λ·a², with λ = ridge × the mean over the layer of
    Σ_t (w_t − w̄)² (the intercept is not penalised): a = S_wg / (S_ww + λ), c = ḡ − a·w̄. With
    `layer`, all elements share one a and one c (the sums pooled over the layer, λ = ridge × S_ww).
    R² is pooled over the layer: the share of the gradients' variance around their (per-element or
    pooled) means that the fit explains.
    """
    sw, sg, sww, swg, sgg = sums.unbind(0)
    shape = sw.shape
    if regression == "layer":
        sw, sg, sww, swg, sgg = (s.sum() for s in (sw, sg, sww, swg, sgg))
        n = n * max(1, shape.numel())
    mw, mg = sw / n, sg / n
    sxx = (sww - n * mw * mw).clamp_min(0)
    sxy = swg - n * mw * mg
    syy = (sgg - n * mg * mg).clamp_min(0)
    denominator = sxx + ridge * sxx.mean()
    slope = torch.where(denominator > 0, sxy / denominator.clamp_min(1e-300), 0.0)
    intercept = mg - slope * mw
    sse = (syy - 2 * slope * sxy + slope * slope * sxx).clamp_min(0)
    total = float(syy.sum())
    r2 = 1.0 - float(sse.sum()) / total if total > 0 else 0.0
    return slope.expand(shape).clone(), intercept.expand(shape).clone(), r2


class Harvest:
    """Streaming sufficient statistics of (parameter, gradient) pairs of every conv weight and bias,
    one record per iteration, taken after the backward pass and before the optimizer step."""

    def __init__(self, model: nn.Module):
        self.layers = conv_layers(model)
        self.parameters = conv_parameters(model)
        self.count = 0
        self.sums = {
            key: torch.zeros((5, *p.shape), dtype=torch.float64, device=p.device)
            for key, p in self.parameters.items()
        }

    def record(self) -> None:
        for key, p in self.parameters.items():
            if p.grad is None:
                raise LibraryError(f"conv parameter {key} has no gradient to record")
            w, g = p.detach().double(), p.grad.detach().double()
            sums = self.sums[key]
            sums[0] += w
            sums[1] += g
            sums[2] += w * w
            sums[3] += w * g
            sums[4] += g * g
        self.count += 1

    def fit(self, regression: Regression, ridge: float, meta: dict[str, Any]) -> FocusLibrary:
        if self.count < 2:
            raise LibraryError(
                f"{self.count} iteration(s) harvested; a regression needs at least 2"
            )
        slopes, intercepts, r2 = {}, {}, {}
        for key, sums in self.sums.items():
            a, c, fit = ridge_fit(sums, self.count, regression, ridge)
            slopes[key], intercepts[key], r2[key] = a.float().cpu(), c.float().cpu(), fit
        meta = {
            **meta,
            "regression": regression,
            "ridge": ridge,
            "iterations": self.count,
            "r2": r2,
        }
        return FocusLibrary(self.layers, slopes, intercepts, meta)


@dataclass(frozen=True)
class FocusLibrary:
    layers: dict[str, dict[str, list[int] | None]]  # conv layer -> {"weight": shape, "bias": shape}
    slopes: dict[str, Tensor]  # "layer.kind" -> a, shaped like the parameter
    intercepts: dict[str, Tensor]  # "layer.kind" -> c
    meta: dict[str, Any]  # source data and fingerprint, model, regression, ridge, iterations, R²
    path: str = field(default="", compare=False)  # where it was read from, for messages

    def gradient(self, key: str, parameter: Tensor) -> Tensor:
        """The regressed gradient a⊙w + c of conv parameter `key` at its present value."""
        return torch.addcmul(self.intercepts[key], self.slopes[key], parameter)

    def to(self, device: torch.device | str) -> FocusLibrary:
        move = lambda tensors: {k: v.to(device) for k, v in tensors.items()}  # noqa: E731
        return FocusLibrary(
            self.layers, move(self.slopes), move(self.intercepts), self.meta, self.path
        )

    def save(self, path: Path | str) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "format": FORMAT,
            "version": VERSION,
            "layers": self.layers,
            "slopes": self.slopes,
            "intercepts": self.intercepts,
            "meta": self.meta,
        }
        # A library is either the old file or the new one, never half; never over a device.
        write_whole(path, lambda handle: torch.save(state, handle), f"focus library {path}")

    @classmethod
    def load(cls, path: Path | str, device: torch.device | str = "cpu") -> FocusLibrary:
        """Read a library, refusing (LibraryError, one paragraph) anything that is not one of this
        format version."""
        path = Path(path).expanduser()
        where = f"focus library {path}"
        if path.is_dir():
            raise LibraryError(
                f"{where} is a folder; give the .pt file that flatbasin focus-library wrote"
            )
        if not path.exists():
            raise LibraryError(f"{where} does not exist; {MAKE_ONE}")
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except Exception as err:  # RuntimeError, UnpicklingError, EOFError, ...: not a torch file
            # torch's own text is left out: it advises loading with weights_only=False, which
            # runs whatever code the file holds.
            raise LibraryError(
                f"{where} cannot be read (not a torch file, truncated or corrupt; "
                f"{type(err).__name__})"
            ) from err
        found = state.get("format") if isinstance(state, dict) else None
        if found != FORMAT:
            raise LibraryError(
                f"{where} is not a flatbasin focus library (format {reprlib.repr(found)}, expected {FORMAT!r}); "
                + MAKE_ONE
            )
        if state.get("version") != VERSION:
            raise LibraryError(
                f"{where} is a focus library of format version {reprlib.repr(state.get('version'))}; this "
                f"flatbasin reads version {VERSION}: {MAKE_ONE}"
            )
        library = cls(
            state["layers"], state["slopes"], state["intercepts"], state["meta"], str(path)
        )
        library._check_complete()
        return library

    def _check_complete(self) -> None:
        for name, kinds in self.layers.items():
            for kind, shape in kinds.items():
                key = f"{name}.{kind}"
                if shape is None:
                    continue
                for table in (self.slopes, self.intercepts):
                    if key not in table or list(table[key].shape) != shape:
                        raise LibraryError(
                            f"focus library {self.path} is damaged: the coefficients of {key} are "
                            f"missing or not of shape {tuple(shape)}; {MAKE_ONE}"
                        )

    def check(self, model: nn.Module) -> None:
        """Refuse, naming the layer, a model whose conv layers are not the ones this library was
        fitted on: a layer missing, an extra layer, or another shape of weight or bias."""
        ours = conv_layers(model)
        problem = None
        for name in [*self.layers, *(n for n in ours if n not in self.layers)]:  # first one wins
            if name not in ours:
                problem = f"the library's conv layer '{name}' is missing from the model"
            elif name not in self.layers:
                problem = f"the model's conv layer '{name}' is not in the library"
            else:
                problem = next(
                    (
                        f"conv layer '{name}' has a {kind} of shape {_shown(ours[name][kind])} in "
                        f"the model and {_shown(self.layers[name].get(kind))} in the library"
                        for kind in KINDS
                        if ours[name][kind] != self.layers[name].get(kind)
                    ),
                    None,
                )
            if problem:
                break
        if problem:
            fitted = ", ".join(f"{n} {_shown(k.get('weight'))}" for n, k in self.layers.items())
            source = self.meta.get("source", {}).get("dataset", "?")
            raise LibraryError(
                f"focus library {self.path} does not fit the model: {problem}. It was fitted on "
                f"model '{self.meta.get('model', '?')}' for data set '{source}' (conv layers "
                f"{fitted}); {MAKE_ONE}"
            )

    def select(self, layers: str) -> list[str]:
        """Conv layer names from a `layers` setting: "all", or names separated by commas."""
        if layers == "all":
            return list(self.layers)
        names = [name.strip() for name in layers.split(",")]
        for name in names:
            if name not in self.layers:
                raise LibraryError(
                    f"layers: '{name}' is not a conv layer of focus library {self.path}; it has "
                    f"{', '.join(self.layers)} (or give all)"
                )
        return names


def _shown(shape: list[int] | None) -> str:
    return "none" if shape is None else "(" + ", ".join(map(str, shape)) + ")"
