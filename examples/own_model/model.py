"""A user's own network: any function (input_shape, num_classes, **model_args) -> nn.Module."""

import math

from torch import nn


def build(input_shape, num_classes, width=32, depth=2, dropout=0.0):
    """An MLP on flattened inputs, without batch norm, with its own dropout: every variant trains it."""
    layers: list[nn.Module] = [nn.Flatten()]
    features = math.prod(input_shape)
    for _ in range(depth):
        layers += [nn.Linear(features, width), nn.ReLU(), nn.Dropout(dropout)]
        features = width
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)
