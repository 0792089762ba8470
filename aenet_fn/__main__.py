"""``python -m aenet_fn`` and the ``aenet-fn`` console script: see :mod:`aenet_fn.cli`."""

from __future__ import annotations

import sys

from aenet_fn.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
