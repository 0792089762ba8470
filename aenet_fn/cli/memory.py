"""``aenet-fn train --check``'s memory estimate: what a run would hold (its structures'
features, their derivatives where force training keeps them, the networks) against the memory
this machine has available."""

from __future__ import annotations

import os
from collections.abc import Sequence

from aenet_fn.cli.config import RunConfig
from aenet_fn.cli.errors import CLIError
from aenet_fn.cli.files import read_structure_files
from aenet_fn.core.structure import Structure
from aenet_fn.io.database import open_database
from aenet_fn.torch_training.sources import MemoryEstimate, estimate_training_memory

GIB = 2**30


def size_text(size: float) -> str:
    """``size`` bytes in MiB below a GiB, else in GiB."""
    return f"{size / 2**20:.3g} MiB" if size < GIB else f"{size / GIB:.3g} GiB"


def available_memory() -> int | None:
    """Bytes of memory available to a new process (Linux ``MemAvailable``, else the free
    physical pages), or None where the system does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def run_structures(run: RunConfig) -> Sequence[Structure]:
    """Every structure a run of ``run`` reads (training and test files, or its database)."""
    if run.hdf5 is not None:
        with open_database(run.hdf5) as database:
            return database.structures()
    paths = [*run.paths, *(run.test_paths or [])]
    return read_structure_files(paths, run.format)


def describe(estimate: MemoryEstimate) -> str:
    """One line: the estimate's total and what it is made of."""
    data = estimate.data
    if estimate.derivatives_kept:
        derivatives = "derivatives kept in memory"
    elif data.neighbours_per_atom > 0:
        derivatives = "derivatives recomputed per batch, beyond memory_budget_gib"
    else:
        derivatives = "energies only"
    return (
        f"about {size_text(estimate.held_bytes)} for {data.n_structures} structures, "
        f"{data.n_atoms} atoms ({derivatives}; {data.neighbours_per_atom:.0f} neighbours per "
        f"atom), networks {size_text(estimate.network_bytes)}"
    )


def check_memory(run: RunConfig) -> str:
    """The memory line of ``--check``; refuses a run that would hold more than is available."""
    members = 1 if run.committee is None else run.committee.num_members
    structures = run_structures(run)
    estimate = estimate_training_memory(run.descriptor, run.arch, structures, run.training, members)
    available = available_memory()
    line = describe(estimate)
    if available is not None and estimate.held_bytes > available:
        raise CLIError(
            f"{run.source}: the run would hold {line}, more than the "
            f"{size_text(available)} available (lower memory_budget_gib to recompute the "
            "derivatives per batch, or train on fewer structures)"
        )
    if available is None:
        return f"memory: {line} (available memory unknown)"
    return f"memory: {line}; {size_text(available)} available"
