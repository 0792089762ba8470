"""Type tests shared by the argument checks (``bool`` is an ``int`` in Python, never a count
or a number here)."""

from __future__ import annotations

from typing import Any


def is_integer(value: Any) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """An ``int`` or ``float`` that is not a ``bool`` (NaN and infinities included)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
