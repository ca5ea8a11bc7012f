"""A user's own network: any function (input_shape, num_classes, **model_args) -> nn.Module."""

from torch import nn


def build(input_shape, num_classes, width=32, depth=2, dropout=0.0):
    """A small MLP on flattened inputs: no batch norm, with dropout (the averaging methods still work)."""
    features = 1
    for size in input_shape:
        features *= size
    layers: list[nn.Module] = [nn.Flatten()]
    for _ in range(depth):
        layers += [nn.Linear(features, width), nn.ReLU(), nn.Dropout(dropout)]
        features = width
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)
