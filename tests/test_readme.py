"""The README's Python examples run as written (from the project root)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, shared_data, capsys):
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {})
    finally:
        os.chdir(cwd)
    if "evaluate" in BLOCKS[index]:
        printed = capsys.readouterr().out.strip().splitlines()
        rmse = [float(re.search(r"'rmse_energy': ([0-9.e-]+)", line).group(1)) for line in printed]
        assert rmse[-1] < rmse[0], "the custom loop should reduce the training error"
