"""The README's Python examples run as written (from the project root)."""

from __future__ import annotations

import re

import pytest

from tests.markdown_examples import ROOT, python_blocks, run_block

BLOCKS = python_blocks(ROOT / "README.md")


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, capsys, monkeypatch):
    run_block(BLOCKS[index], f"README.md block {index}", {}, monkeypatch)
    if "evaluate" in BLOCKS[index]:
        printed = capsys.readouterr().out.strip().splitlines()
        rmse = [float(re.search(r"'rmse_energy': ([0-9.e-]+)", line).group(1)) for line in printed]
        assert rmse[-1] < rmse[0], "the custom loop should reduce the training error"
