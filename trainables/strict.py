"""A pydantic base that refuses `true` where a number belongs.

Pydantic's lax mode reads True as 1 for an int or float field, so `epochs: yes` or `lr: true` in a
space file would train for one epoch or at learning rate 1.0 without a word. Every config model here
derives from this one; strings like "0.1" stay accepted (MLflow and the command line give strings).
"""

from __future__ import annotations

import types
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, model_validator


def _number_field(annotation: Any) -> bool:
    """int or float, possibly inside Optional/Union or a tuple of them, and never bool."""
    if annotation in (int, float):
        return True
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType, tuple):
        args = [a for a in get_args(annotation) if a is not type(None) and a is not Ellipsis]
        return bool(args) and bool not in args and all(_number_field(a) for a in args)
    return False


class NoBoolNumbers(BaseModel):
    # A setting is a finite number: nan and inf fail here with pydantic's own "finite number"
    # message, not at a bound they happen to break ("less than or equal to 10 (got nan)").
    model_config = ConfigDict(allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bools_for_numbers(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        for name, field in cls.model_fields.items():
            value = values.get(name)
            items = value if isinstance(value, list | tuple) else [value]
            if any(isinstance(v, bool) for v in items) and _number_field(field.annotation):
                raise ValueError(f"{name} takes a number, got {value!r} (a yes/no value)")
        return values
