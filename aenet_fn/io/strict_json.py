"""JSON read strictly: a key given twice in one object is an error, not a silent overwrite.

Python's :func:`json.loads` keeps the last of repeated keys, so a configuration or metadata
file with a key written twice would be read with one of the two values silently dropped.
"""

from __future__ import annotations

import json
from typing import Any


def strict_json_loads(text: str) -> Any:
    """The value of the JSON ``text``; raises :class:`json.JSONDecodeError` for malformed
    text and ``ValueError`` naming the key for an object that repeats one."""
    return json.loads(text, object_pairs_hook=_unique_keys)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key!r} appears twice in one JSON object")
        result[key] = value
    return result
