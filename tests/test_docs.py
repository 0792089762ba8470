"""The documentation pages' Python examples run (CI also builds the site with
``mkdocs build --strict``, which checks the nav, links and anchors).

The ```python blocks of each page run in order in one fresh namespace per page, from the project
root, as in the README (the examples read the package's data, ``aenet_fn.examples``). Blocks
that are only to be read (GPU-only code, fragments, shell sessions) are fenced
```{.python .no-run}, ```pycon or ```text and are not run (see tests/markdown_examples.py).
"""

from __future__ import annotations

import re

import pytest

from tests.markdown_examples import ROOT, python_blocks, run_block

DOCS = ROOT / "docs"
PAGES = sorted(p.name for p in DOCS.glob("*.md"))


@pytest.mark.parametrize("page", PAGES)
def test_python_fences_render(page):
    """mkdocs renders ```python and ```{.python .no-run}; ```python with more words does not."""
    text = (DOCS / page).read_text(encoding="utf-8")
    assert not re.findall(r"^```python[^\n]+$", text, re.M)


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(DOCS / p)])
def test_page_examples_run(page, monkeypatch):
    namespace: dict = {}
    for index, block in enumerate(python_blocks(DOCS / page)):
        run_block(block, f"docs/{page} block {index}", namespace, monkeypatch)


def test_the_testing_page_is_a_test_file_that_passes(monkeypatch):
    """docs/testing.md's first example is a pytest file: its tests run and pass."""
    namespace: dict = {}
    run_block(python_blocks(DOCS / "testing.md")[0], "docs/testing.md", namespace, monkeypatch)
    tests = {name: value for name, value in namespace.items() if name.startswith("test_")}
    assert len(tests) >= 5
    for test in tests.values():
        test()
