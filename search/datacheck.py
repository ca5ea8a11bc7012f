"""`flatbasin data check DIR`: every file of an image folder decoded once, every problem listed.

Training refuses a folder with any unreadable file before its first epoch, naming the first few; this
command names them all, so they can be fixed in one go. Exit status 2 when there is anything to fix.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from flatbasin.search.errors import UsageError


def check_folder(root: Path, image_size: int, console: Console) -> int:
    """Print the classes and every problem; return how many problems were found."""
    from flatbasin.trainables import image_folder

    root = root.expanduser()
    if not root.is_dir():
        what = "is a file" if root.exists() else "does not exist"
        raise UsageError(f"{root} {what}; give an image folder laid out as DIR/CLASS_NAME/IMAGE")
    found = image_folder.scan(root)
    if not found.classes:
        raise UsageError(f"{root}: no class folders (expected {root}/CLASS_NAME/IMAGE files)")
    problems = list(found.problems)
    for path, _ in found.samples:
        try:
            image_folder.decode(path, image_size)
        except ValueError as err:
            problems.append((path, str(err)))
    bad_per_class: dict[str, int] = {}
    for path, _ in problems:
        name = path.relative_to(root).parts[0] if path.is_relative_to(root) else "?"
        bad_per_class[name] = bad_per_class.get(name, 0) + 1

    table = Table(
        title=f"{root}: {len(found.classes)} classes, {len(found.samples) + len(found.problems)} "
        f"image files, {len(problems)} unreadable"
    )
    for column in ("class", "label", "readable", "unreadable"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for label, (name, count) in enumerate(found.counts().items()):
        bad = bad_per_class.get(name, 0)
        readable = count + sum(1 for p, _ in found.problems if p.is_relative_to(root / name)) - bad
        table.add_row(name, str(label), str(readable), str(bad))
    console.print(table)
    for name in found.empty_classes:
        console.print(f"empty class: {name} (no image files below {root / name})", style="red")
    for path, why in problems:
        console.print(f"unreadable: {path}: {why}", style="red")
    few = len(found.classes) < 2
    if few:
        console.print(
            f"one class only ({found.classes[0]}): a classifier needs at least 2", style="red"
        )
    total = len(problems) + len(found.empty_classes) + few
    if total:
        console.print(
            f"{total} problem(s); training on this folder is refused until they are fixed"
        )
    else:
        console.print("every image decodes; the folder is ready to train on")
    return total
