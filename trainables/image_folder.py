"""An image folder (ROOT/CLASS/**/IMAGE, torchvision's layout) scanned and decoded without surprises.

torchvision's ImageFolder takes every sub-folder as a class (`.ipynb_checkpoints` included), follows
symbolic links into loops, opens a FIFO named `x.png` and waits forever, and lets a corrupt file fail
mid-epoch. Here the scan skips hidden entries, visits each real folder once, takes only regular files,
and decoding collects every unreadable file, so a user sees the whole list at once, before training
(`flatbasin data check DIR` prints it).
"""

from __future__ import annotations

import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

# torchvision's IMG_EXTENSIONS
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SHOWN = 10  # problems named in an error message; `flatbasin data check` lists them all


@dataclass
class Scan:
    """What an image folder holds: classes in label order, (path, label) samples, and problems."""

    root: Path
    classes: list[str] = field(default_factory=list)
    samples: list[tuple[Path, int]] = field(default_factory=list)
    problems: list[tuple[Path, str]] = field(default_factory=list)  # (file, what is wrong)
    empty_classes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        per = dict.fromkeys(self.classes, 0)
        for _, label in self.samples:
            per[self.classes[label]] += 1
        return per


def _hidden(name: str) -> bool:
    return name.startswith((".", "__"))  # .ipynb_checkpoints, .DS_Store, __MACOSX


def scan(root: Path) -> Scan:
    """Classes are the visible sub-folders of `root`; a class's images are the regular files with an
    image extension anywhere below it. Links are followed, each real folder once (no loops)."""
    found = Scan(root)
    found.classes = sorted(
        e.name for e in os.scandir(root) if not _hidden(e.name) and e.is_dir(follow_symlinks=True)
    )

    # Real folders already taken: the root and every class folder, so that a link back up the
    # tree, or into another class, is never walked (its images would count twice, or as this class).
    def key(path: Path | str) -> tuple[int, int]:
        st = os.stat(path)
        return st.st_dev, st.st_ino

    seen = {key(root), *(key(root / name) for name in found.classes)}
    for label, name in enumerate(found.classes):
        before = len(found.samples)
        for folder, dirs, files in os.walk(root / name, followlinks=True):
            if folder != str(root / name):
                if key(folder) in seen:
                    dirs[:] = []
                    continue
                seen.add(key(folder))
            dirs[:] = sorted(d for d in dirs if not _hidden(d))
            for file in sorted(files):
                path = Path(folder) / file
                if _hidden(file) or not file.lower().endswith(EXTENSIONS):
                    continue
                try:
                    mode = os.stat(path).st_mode
                except OSError as err:
                    found.problems.append((path, f"cannot be read: {err.strerror or err}"))
                    continue
                if not stat.S_ISREG(mode):
                    found.problems.append((path, "not a regular file (a pipe, socket or device)"))
                    continue
                found.samples.append((path, label))
        if len(found.samples) == before:
            found.empty_classes.append(name)
    return found


def decode(path: Path, size: int) -> np.ndarray:
    """One image as uint8 (3, size, size). 16-bit and float images are scaled to 0..255 first (PIL's
    RGB conversion would clip a 16-bit PNG to white). Raises ValueError saying what is wrong."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # decodes now: a truncated file fails here, not later
                rgb = _to_8bit(img).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
                return np.asarray(rgb).transpose(2, 0, 1)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"too large to decode safely ({err})") from err
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"not a readable image ({detail})") from err


def _to_8bit(img: Image.Image) -> Image.Image:
    from PIL import Image

    if img.mode not in ("I", "F") and not img.mode.startswith("I;16"):
        return img
    values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if img.mode == "F":
        top = 1.0 if values.max(initial=0) <= 1.0 else 255.0
    else:  # 16-bit, or 32-bit integers holding 16-bit values (how PIL reads many 16-bit PNGs)
        top = 65535.0 if img.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
    scaled = np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def problem_list(problems: list[tuple[Path, str]], root: Path) -> str:
    """'a/x.png (not a readable image ...); b/y.jpg (...)' for the first few, with the count of the rest."""
    shown = "; ".join(f"{_relative(p, root)}: {why}" for p, why in problems[:SHOWN])
    rest = len(problems) - SHOWN
    return shown + (f"; and {rest} more" if rest > 0 else "")


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)
