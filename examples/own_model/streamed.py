"""A user's own data as two map-style torch Datasets, streamed through a DataLoader (for data that does
not fit in memory): items are (input_tensor, integer_label)."""

import numpy as np
import torch
from torch.utils.data import Dataset


class Blobs(Dataset):
    """Each item made on demand from its index, as a Dataset reading files from disk would."""

    def __init__(self, n, classes, features, noise, seed, offset=0):
        rng = np.random.default_rng(seed)
        self.centres = torch.from_numpy(rng.normal(size=(classes, features)) * 1.5).float()
        self.n, self.classes, self.noise, self.seed, self.offset = n, classes, noise, seed, offset

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        if not 0 <= index < self.n:
            raise IndexError(index)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.offset + index)
        label = int(torch.randint(0, self.classes, (), generator=g))
        x = self.centres[label] + self.noise * torch.randn(self.centres.shape[1], generator=g)
        return x, label


def load(n=1200, classes=4, features=16, noise=2.5, seed=0):
    test = n // 4
    return (
        Blobs(n - test, classes, features, noise, seed),
        Blobs(test, classes, features, noise, seed, offset=n),
    )
