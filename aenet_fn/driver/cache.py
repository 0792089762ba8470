"""Bounded caches whose eviction decision is a pure function.

:func:`lru_evictions` decides which keys leave a cache (least recently used first);
:class:`LRUCache` is the plain dict that applies it. A cache lives in one process: every
DataLoader worker holds its own, as the guide's runtime caches do.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Hashable
from itertools import islice
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)


def lru_evictions(recency: Collection[K], capacity: int | None) -> list[K]:
    """Keys to evict so that at most ``capacity`` remain (None: unbounded), given the cached
    keys ordered from least to most recently used: the oldest ones."""
    if capacity is None:
        return []
    excess = len(recency) - max(int(capacity), 0)
    return list(islice(recency, excess)) if excess > 0 else []


class LRUCache(Generic[K]):
    """At most ``capacity`` entries (None: unbounded, 0: stores nothing)."""

    def __init__(self, capacity: int | None) -> None:
        if capacity is not None and (isinstance(capacity, bool) or capacity < 0):
            raise ValueError(f"cache capacity must be None or an integer >= 0, got {capacity!r}")
        self.capacity = capacity
        self._entries: OrderedDict[K, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> Any | None:
        """The entry of ``key`` (now the most recently used), or None."""
        if key not in self._entries:
            return None
        self._entries.move_to_end(key)
        return self._entries[key]

    def put(self, key: K, value: Any) -> None:
        """Store ``value`` under ``key``, evicting as :func:`lru_evictions` decides."""
        self._entries[key] = value
        self._entries.move_to_end(key)
        for old in lru_evictions(self._entries.keys(), self.capacity):
            del self._entries[old]
