"""Run the Python examples of Markdown files (README.md, docs/*.md) as a reader would.

A fenced block whose info string is exactly ``python`` is an example that must run. Blocks meant
only to be read (shell-like snippets, GPU-only code, fragments) use another info string, e.g.
``{.python .no-run}`` (rendered as Python by mkdocs) or ``pycon``/``text``/``bash``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_RUNNABLE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(path: Path) -> list[str]:
    """The runnable Python blocks of the Markdown file ``path``, in order."""
    return _RUNNABLE.findall(path.read_text(encoding="utf-8"))


def run_block(code: str, label: str, namespace: dict[str, Any], monkeypatch) -> None:
    """Execute ``code`` in ``namespace`` with the project root as working directory, where a
    reader runs them (the examples read the package's data, ``aenet_fn.examples``)."""
    monkeypatch.chdir(ROOT)
    exec(compile(code, label, "exec"), namespace)
