"""The front door holds together: every relative link in README.md reaches a file (and a heading, where
it names one), the README stays short, and the documentation site builds with `mkdocs build --strict`,
which fails on a broken link or anchor between pages and on a page left out of the navigation."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# [text](target) and ![alt](target); a target ends at whitespace (an optional "title" follows) or ")".
LINK = re.compile(r"""!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+(?:"[^"]*"|'[^']*'))?\s*\)""")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def links(markdown: str) -> list[str]:
    """Every link target outside code: a link shown as code is an example, not a link."""
    prose = INLINE_CODE.sub("", FENCE.sub("", markdown))
    return LINK.findall(prose)


def slug(heading: str) -> str:
    """The anchor Python-Markdown's toc extension (MkDocs, and GitHub alike) gives a heading."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(markdown: str) -> set[str]:
    return {slug(h) for h in HEADING.findall(FENCE.sub("", markdown))}


def relative(target: str) -> bool:
    return not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE)


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """The relative links of a Markdown page that reach no file inside `root`, or no heading of the
    page they name."""
    broken = []
    for target in links(page.read_text(encoding="utf-8")):
        if not relative(target):
            continue
        path, _, fragment = unquote(target).partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif not resolved.is_relative_to(root):
            broken.append(f"{target}: outside the repository")
        elif (
            fragment
            and resolved.suffix == ".md"
            and fragment not in anchors(resolved.read_text(encoding="utf-8"))
        ):
            broken.append(f"{target}: {resolved.name} has no heading #{fragment}")
    return broken


def test_every_relative_link_in_the_readme_reaches_a_file():
    found = links(README.read_text(encoding="utf-8"))
    assert any(relative(t) for t in found), "the README links to nothing: the parser is broken"
    assert broken_links(README) == []


def test_the_readme_shows_a_picture_the_repository_holds():
    images = [t for t in re.findall(r"!\[[^\]]*\]\(([^)\s]+)", README.read_text()) if relative(t)]
    assert images, "the README shows no picture of an answer"
    for image in images:
        data = (ROOT / image).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{image} is not a PNG"


def test_the_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= 160, f"README.md has {lines} lines: the reference belongs in docs/"


@pytest.mark.parametrize(
    ("markdown", "expected"),
    [
        ("[a](docs/missing.md) and [b](docs/page.md)", ["docs/missing.md: no such file"]),
        ("![pic](docs/img/none.png 'title')", ["docs/img/none.png: no such file"]),
        ("[a](docs/page.md#no-such-heading)", ["docs/page.md#no-such-heading: page.md has no"]),
        ("[a](docs/page.md#the-title-here) [b](#also-here) [c](docs/)", []),
        ("[a](../outside.md)", ["../outside.md: outside the repository"]),
        ("`[a](missing.md)` and\n```\n[b](missing.md)\n```\n[c](https://example.org/x)", []),
    ],
)
def test_the_link_check_finds_what_is_broken(tmp_path, markdown, expected):
    """The checker itself: a missing file, image or heading and a link out of the repository are
    found; links shown as code, URLs and headings that exist are not."""
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "page.md").write_text("# The `title` here\n\ntext\n", encoding="utf-8")
    (tmp_path / "outside.md").write_text("# Outside\n", encoding="utf-8")
    page = root / "README.md"
    page.write_text(f"# Also here\n\n{markdown}\n", encoding="utf-8")
    found = broken_links(page, root)
    assert len(found) == len(expected), found
    for message, start in zip(found, expected, strict=True):
        assert message.startswith(start), message


def test_headings_slug_as_mkdocs_does():
    assert slug("Each variant's best as a search found and confirmed it") == (
        "each-variants-best-as-a-search-found-and-confirmed-it"
    )
    assert slug("The bundled `compare` search") == "the-bundled-compare-search"
    assert slug("Measured: plain SGD against prior_guided") == (
        "measured-plain-sgd-against-prior_guided"
    )
    assert slug("Can the model learn at all?") == "can-the-model-learn-at-all"


@pytest.mark.slow
def test_the_docs_site_builds_strict(tmp_path):
    """`mkdocs build --strict`, as .ci/run runs it (never with --quiet, which hides the warnings that
    --strict counts). mkdocs-material is in the dev extra, so CI has it."""
    for module in ("mkdocs", "material"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[dev]')")
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict",
         "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert (site / "index.html").is_file()
    pages = {p.stem for p in (ROOT / "docs").glob("*.md")} - {"index"}
    built = {p.parent.name for p in site.glob("*/index.html")}
    assert pages <= built, f"pages not built: {sorted(pages - built)}"
