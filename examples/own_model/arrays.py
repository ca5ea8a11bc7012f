"""A user's own data as arrays: (x_train, y_train, x_test, y_test), held in memory like the built-in sets."""

import numpy as np


def load(n=1200, classes=4, features=16, noise=2.5, seed=0):
    """Gaussian blobs: `classes` centres in `features` dimensions, `n` examples, a quarter held out for test."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, features)) * 1.5
    y = rng.integers(0, classes, n)
    x = (centres[y] + noise * rng.normal(size=(n, features))).astype(np.float32)
    cut = n * 3 // 4
    return x[:cut], y[:cut], x[cut:], y[cut:]
