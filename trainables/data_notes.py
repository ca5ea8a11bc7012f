"""One-line notes on what the data does to the numbers: images resized without being asked, and a
validation split so small that one example moves the score by more than a point."""

from __future__ import annotations

from flatbasin.trainables.data import Data
from flatbasin.trainables.data_spec import DataSpec

# Below this many validation examples one of them is worth more than a point of accuracy.
POINT = 100


def data_notes(spec: DataSpec, data: Data) -> list[str]:
    """What `train` and a search say before they start, once per data set."""
    notes = []
    if spec.dataset == "image_folder":
        size = spec.image_size
        notes.append(
            f"image folder {spec.data_dir}: every image is resized to {size}x{size} pixels "
            f"(stretched to a square, bilinear); the image_size setting changes it (8 to 512, "
            f"e.g. --set image_size=64)"
        )
    examples = data.size("val")
    if 0 < examples < POINT:
        notes.append(
            f"data set '{spec.dataset}': the validation split holds {examples} example"
            f"{'s' * (examples != 1)}, so one example moves the score (validation accuracy) by "
            f"{100 / examples:.1f} points; a larger val_frac or more data ranks trials more surely"
        )
    return notes
