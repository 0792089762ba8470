"""The project stands alone: nothing in it refers to a folder beside the project root.

The project was developed against reference material kept in a folder next to it, which a
user's clone does not have. What the package, tests, docs and benchmarks need from it is copied
in with a provenance note (``aenet_fn/example_data/README.md``, ``tests/data/README.md``); this
test fails on any file that still points outside: the relative path, or a path built by joining
that folder's name to a parent of the project.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("aenet_fn", "benchmarks", "docs", "tests")
FILES = ("README.md", "mkdocs.yml")

# Built from pieces so that this file does not match its own patterns.
_NAME = "sha" + "red"
PATTERNS = (
    re.compile(re.escape("../" + _NAME)),  # the relative path, in text, a link or a string
    re.compile(r"/\s*[\"']" + _NAME + r"[\"']"),  # a path join: parents[1] / "<name>"
)


def project_files() -> Iterator[Path]:
    """README.md, mkdocs.yml and every file under the searched folders (caches left out)."""
    for name in FILES:
        yield ROOT / name
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                yield path


def text_of(path: Path) -> str | None:
    """The file as UTF-8 text, or ``None`` for a binary file."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def references(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` of each line of ``text`` that refers to the folder."""
    return [
        (number, line.strip())
        for number, line in enumerate(text.splitlines(), start=1)
        if any(pattern.search(line) for pattern in PATTERNS)
    ]


def test_the_patterns_find_a_reference():
    planted = [
        f'af.read_structures("../{_NAME}/data/tio2")',
        f"runs the test suite. It reads the reference data in `../{_NAME}/data`",
        f'DATA = Path(__file__).resolve().parents[1].parent / "{_NAME}" / "data"',
        f"GUIDE = ROOT.parents[2] / '{_NAME}' / 'spec'",
    ]
    for line in planted:
        assert references(line) == [(1, line)], line
    innocent = [
        "members = init_committee(params, arch, train, config, seeds, shared_batches=True)",
        f'@pytest.mark.parametrize(("policy", "{_NAME}"), [("uniform", True)])',
        "on the project's shared 2-core development machine",
    ]
    assert references("\n".join(innocent)) == []


def test_nothing_refers_to_the_folder_beside_the_project():
    files = list(project_files())
    assert ROOT / "README.md" in files and Path(__file__).resolve() in files
    found = []
    for path in files:
        text = text_of(path)
        if text is not None:
            found += [f"{path.relative_to(ROOT)}:{n}: {line}" for n, line in references(text)]
    assert not found, (
        "these lines refer to a folder beside the project, which a user's clone does not have "
        "(copy what they need into the project with a provenance note):\n" + "\n".join(found)
    )
