"""What a trial records after each epoch: the one record the loop writes, checkpoints keep and the
variants read to decide the next epoch. Plain data, no imports from the rest of trainables/, so every
module can share it without importing the loop."""

from __future__ import annotations

from dataclasses import dataclass, field

DATA_PHASE = "data"  # an epoch of ordinary steps over the training data


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int  # 1-based: metrics after this many epochs
    step: int  # optimizer steps so far (an epoch without data takes none)
    train_loss: float | None  # None in an epoch without a pass over the data
    train_acc: float | None
    val_loss: float  # of the live weights
    val_acc: float
    lr: float  # of the last step of the epoch
    score: float  # validation accuracy of the model the variant would deploy now
    members: int  # models averaged or ensembled so far
    lr_low: float | None = None  # the lowest and highest lr of the epoch's steps: with cycles
    lr_high: float | None = None  # shorter than an epoch the last step's lr alone says little
    # Accuracy on as many training examples as the validation split has, scored like val_acc (eval
    # mode, no augmentation, same TTA), minus val_acc. None in histories written before it existed.
    gen_gap: float | None = None
    phase: str = DATA_PHASE  # or the variant's own epoch without data (prior_guided: "focus")
    # Wall-clock seconds of training since the trial started, carried over a resume. Left out of
    # equality: a resumed trial is the same trial, bit for bit, whatever the clock said.
    elapsed_s: float = field(default=0.0, compare=False)
