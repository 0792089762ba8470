"""Shared parts of the benchmarks: the TiO2 setup, timing, setup description, JSON + tables."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import aenet_fn as af
from aenet_fn.examples import TIO2_STRUCTURES

ROOT = Path(__file__).resolve().parents[1]

PARAMS = af.ChebyshevParams(
    species=["Ti", "O"], rad_order=10, rad_cutoff=6.0, ang_order=3, ang_cutoff=3.5, min_cutoff=0.5
)
DESCRIPTOR = "[Ti,O] rad 10/6.0 ang 3/3.5 min 0.5 (30 features)"
ARCH = {"Ti": [(10, "tanh"), (10, "tanh")], "O": [(10, "tanh"), (10, "tanh")]}
ARCH_TEXT = "2x(10,tanh) per species"
BATCH_SIZE = 16
FORCE_WEIGHT = 0.1


def tio2_structures(limit: int | None = None) -> list[af.Structure]:
    """The TiO2 reference structures (sorted by file name), the first ``limit`` of them."""
    return af.read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf"))[:limit])


def data_description(structures: Sequence[af.Structure]) -> str:
    """``"tio2: <n> structures, <atoms> atoms"``."""
    return tio2_description(len(structures), sum(s.n_atoms for s in structures))


def tio2_description(n_structures: int, n_atoms: int) -> str:
    """``"tio2: <n_structures> structures, <n_atoms> atoms"``."""
    return f"tio2: {n_structures} structures, {n_atoms} atoms"


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


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def setup_info(**extra: Any) -> dict[str, Any]:
    """Versions, threads, machine, date and load (the 1-minute load average: other jobs on a
    shared machine slow the timings down) of this run, plus ``extra``."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "load_average": round(os.getloadavg()[0], 2),
        **extra,
    }


def tio2_setup_info(data: str, **extra: Any) -> dict[str, Any]:
    """:func:`setup_info` of a benchmark with the common descriptor, in float64 on the CPU."""
    return setup_info(dtype="float64", device="cpu", data=data, descriptor=DESCRIPTOR, **extra)


def training_setup_info(data: str, epochs: int, **extra: Any) -> dict[str, Any]:
    """:func:`tio2_setup_info` of a training benchmark (the common networks, Adam, batch,
    force weight) timed over ``epochs`` epochs."""
    return tio2_setup_info(
        data,
        arch=ARCH_TEXT,
        optimizer="adam",
        batch=BATCH_SIZE,
        force_weight=FORCE_WEIGHT,
        epochs_timed=epochs,
        **extra,
    )


def parse_benchmark_arguments(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """``parser`` with ``--threads`` (default 2) added, parsed; torch set to those threads."""
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB): ``VmHWM`` of /proc/self/status where
    there is one. (``ru_maxrss`` survives ``fork`` + ``exec``, so a benchmark subprocess would
    report its parent's peak when that is higher.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
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


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A Markdown table of ``rows`` with ``columns`` given as ``(key, header)`` pairs; numbers
    below 1000 keep 3 significant digits, larger ones are rounded to integers (``20 300``)."""
    lines = [
        "| " + " | ".join(header for _, header in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_fmt_markdown(row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _fmt_markdown(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "–"}[value]
    if isinstance(value, int):
        return f"{value:,}".replace(",", " ")
    if isinstance(value, float):
        if value >= 1000:
            return f"{value:,.0f}".replace(",", " ")
        return f"{value:.3g}"
    return str(value)
