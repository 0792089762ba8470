"""Shared helpers of the benchmarks: timing, setup description, JSON + table output."""

from __future__ import annotations

import json
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def best_time(function: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Best wall time (s) of ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def setup_info(**extra: Any) -> dict[str, Any]:
    """Versions, threads and machine of this run, plus ``extra``."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        **extra,
    }


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def report(name: str, setup: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Print the results as JSON, then as a short table."""
    print(json.dumps({"benchmark": name, "setup": setup, "results": rows}, indent=2))
    if not rows:
        return
    columns = list(rows[0])
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print()
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(_fmt(row.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
