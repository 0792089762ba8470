"""Writing a database: sources read in order (in worker processes with ``build_workers > 1``),
featurized where asked, appended in chunks to a temporary file renamed into place at the end."""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any

import ase
import attrs
import numpy as np
import torch
from ase.data import atomic_numbers
from tqdm.auto import tqdm

from aenet_fn.core.descriptor import ChebyshevParams
from aenet_fn.core.featurized import FeaturizedSet, featurize_structures
from aenet_fn.core.local_derivatives import ATOM_INDEX_FIELDS, LocalDerivatives
from aenet_fn.core.sampling import energy_filter_mask
from aenet_fn.core.splits import referenced_energies_per_atom
from aenet_fn.core.structure import Structure
from aenet_fn.io.ase_io import from_ase, read_structures
from aenet_fn.io.atomic import replacing
from aenet_fn.io.database.schema import (
    PathLike,
    missing_file,
    plain_atomic_energies,
)
from aenet_fn.io.database.write import Chunk, Writer, repack

_SOURCES_PER_TASK = 16
"""Sources parsed (and featurized) together in one unit of work. Fixed, so that serial and
parallel builds do the same computations and write the same bytes."""


@attrs.frozen
class BuildSummary:
    """What :func:`build_database` wrote: ``n_structures`` entries (``n_atoms`` atoms) from
    ``n_sources`` sources, after ``n_removed`` structures were dropped by the energy filter."""

    path: Path
    n_sources: int
    n_structures: int
    n_atoms: int
    n_removed: int


@attrs.frozen
class _Source:
    """Build source number ``index``: a structure file (``item`` a path) or an in-memory
    structure."""

    index: int
    kind: str
    source_id: str
    display_name: str
    item: str | Structure

    @property
    def label(self) -> str:
        """How messages name the source."""
        return self.source_id or self.display_name or f"source {self.index} ({self.kind})"


@attrs.frozen
class _Task:
    """A unit of build work: consecutive sources and what to compute for them."""

    sources: tuple[_Source, ...]
    params: ChebyshevParams | None
    features: bool
    derivatives: bool
    max_energy: float | None
    atomic_energies: dict[str, float] | None


# ---------------------------------------------------------------------------------------------
# Layout: one table drives writing and checking


def _collect_sources(items: Any) -> list[_Source]:
    """Build sources from paths (a directory stands for its ``*.xsf`` files, sorted), Structure
    records and ASE Atoms, in order."""
    if isinstance(items, (str, os.PathLike, Structure, ase.Atoms)):
        items = [items]
    if items is None:
        items = []
    found: list[tuple[str, str, str | Structure]] = []  # kind, name, item
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            path = Path(os.fspath(item))
            if path.is_dir():
                files = sorted(
                    p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".xsf"
                )
                if not files:
                    raise ValueError(f"{path}: the directory contains no *.xsf files")
                found.extend(("file", str(p), str(p)) for p in files)
            elif path.is_file():
                found.append(("file", str(path), str(path)))
            else:
                raise missing_file(path)
        elif isinstance(item, Structure):
            found.append(("structure", item.name or "", item))
        elif isinstance(item, ase.Atoms):
            structure = from_ase(item)
            found.append(("atoms", structure.name or "", structure))
        else:
            raise TypeError(
                f"build_database: cannot use a {type(item).__name__} as a source "
                "(expected a path, a Structure or ase.Atoms)"
            )
    if not found:
        raise ValueError("build_database: no sources given")
    return [
        _Source(index, kind, name if kind == "file" else "", name, item)
        for index, (kind, name, item) in enumerate(found)
    ]


def _load(source: _Source) -> list[Structure]:
    if isinstance(source.item, Structure):
        return [source.item]
    try:
        return read_structures(source.item)
    except Exception as err:
        raise RuntimeError(f"failed to load build source {source.label!r}: {err}") from err


def _check_species(structures: Sequence[Structure], params: ChebyshevParams, label: str) -> None:
    unknown = sorted({x for s in structures for x in s.species} - set(params.species))
    if unknown:
        raise ValueError(
            f"build source {label!r}: species {unknown} are not in the descriptor's species "
            f"{list(params.species)}"
        )


def _structure_arrays(structures: Sequence[Structure]) -> dict[str, np.ndarray]:
    """The ``/structures`` rows of ``structures`` (all but offsets and source indices)."""
    cells = np.zeros((len(structures), 3, 3))
    for k, structure in enumerate(structures):
        if structure.cell is not None:
            cells[k] = structure.cell.numpy()
    return {
        "structures/name": np.array([s.name or "" for s in structures], dtype=object),
        "structures/cell": cells,
        "structures/has_cell": np.array([s.cell is not None for s in structures]),
        "structures/pbc": np.array([s.pbc for s in structures], dtype=np.bool_).reshape(-1, 3),
        "structures/energy": np.array(
            [math.nan if s.energy is None else s.energy for s in structures], dtype=np.float64
        ),
        "structures/has_forces": np.array([s.has_forces() for s in structures]),
        "structures/stress": np.array(
            [
                np.full((3, 3), math.nan) if s.stress is None else s.stress.numpy()
                for s in structures
            ]
        ).reshape(-1, 3, 3),
        "structures/numbers": np.array(
            [atomic_numbers[x] for s in structures for x in s.species], dtype=np.uint8
        ),
        "structures/positions": np.concatenate([s.positions.numpy() for s in structures]),
        "structures/forces": np.concatenate(
            [
                np.full((s.n_atoms, 3), math.nan) if s.forces is None else s.forces.numpy()
                for s in structures
            ]
        ),
    }


def _derivative_arrays(data: FeaturizedSet) -> dict[str, np.ndarray]:
    """``/local_derivatives`` rows of a featurized set, atom indices made structure-local."""
    local = data.local
    first_atom = {
        kind: data.atom_start[data.structure_index[centres]]
        for kind, centres in (("radial", local.radial_centre), ("triplet", local.triplet_centre))
    }
    arrays = {}
    for field in attrs.fields(LocalDerivatives):
        value = getattr(local, field.name)
        if field.name in ATOM_INDEX_FIELDS:
            kind = "radial" if field.name.startswith("radial") else "triplet"
            value = (value - first_atom[kind]).to(torch.int32)
        arrays[f"local_derivatives/{field.name}"] = value.numpy()
    return arrays


def _descriptor_arrays(task: _Task, structures: list[Structure]) -> tuple[dict, dict]:
    """Features (all structures) and local derivatives (those with forces) as arrays, plus the
    per-structure derivative entry counts."""
    arrays: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    labelled = [k for k, s in enumerate(structures) if s.has_forces()] if task.derivatives else []
    others = sorted(set(range(len(structures))) - set(labelled))
    if task.derivatives:
        for kind in ("radial", "triplet"):
            counts[f"local_derivatives/{kind}_offset"] = np.zeros(len(structures), np.int64)
    per_structure: list[torch.Tensor | None] = [None] * len(structures)
    for group, with_derivatives in ((labelled, True), (others, False)):
        if not group or not (task.features or with_derivatives):
            continue
        data = featurize_structures(
            task.params, [structures[k] for k in group], with_derivatives=with_derivatives
        )
        for k, rows in zip(group, data.features.split(data.n_atoms.tolist())):
            per_structure[k] = rows
        if with_derivatives:
            arrays.update(_derivative_arrays(data))
            for kind, values in (("radial", data.radial_count), ("triplet", data.triplet_count)):
                counts[f"local_derivatives/{kind}_offset"][labelled] = values.numpy()
    if task.features:
        arrays["features/values"] = torch.cat(per_structure).numpy()
    return arrays, counts


def _prepare(task: _Task) -> Chunk:
    """Load, filter and (optionally) featurize the sources of one task (runs in a worker)."""
    kept: list[Structure] = []
    source_index: list[int] = []
    frames: list[int] = []
    rows = []
    n_removed = 0
    for position, source in enumerate(task.sources):
        structures = _load(source)
        rows.append((source.source_id, source.kind, source.display_name, len(structures)))
        if task.params is not None:
            _check_species(structures, task.params, source.label)
        keep = [True] * len(structures)
        if task.max_energy is not None:
            per_atom = referenced_energies_per_atom(structures, task.atomic_energies)
            keep = energy_filter_mask(per_atom, task.max_energy).tolist()
        for frame, (structure, chosen) in enumerate(zip(structures, keep)):
            if chosen:
                kept.append(structure)
                source_index.append(position)
                frames.append(frame)
            else:
                n_removed += 1
    arrays: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    if kept:
        arrays = _structure_arrays(kept)
        arrays["structures/source_index"] = np.array(source_index, dtype=np.int64)
        arrays["structures/frame"] = np.array(frames, dtype=np.int64)
        counts["structures/atom_offset"] = np.array([s.n_atoms for s in kept], dtype=np.int64)
        if task.features or task.derivatives:
            descriptor_arrays, descriptor_counts = _descriptor_arrays(task, kept)
            arrays.update(descriptor_arrays)
            counts.update(descriptor_counts)
    return Chunk(tuple(rows), arrays, counts, n_removed)


def _init_worker(parent: int) -> None:
    """Set up a build worker: one torch thread, and (on Linux) a SIGTERM when the parent dies,
    so that a killed build leaves no orphaned workers."""
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


_PR_SET_PDEATHSIG = 1
"""Linux ``prctl`` option: the signal a process receives when its parent dies."""


@contextmanager
def _chunks(tasks: Sequence[_Task], workers: int) -> Iterator[Iterable[Chunk]]:
    """The prepared chunks of ``tasks``, in task order: serially for ``workers <= 1``, else by
    a pool of processes with at most ``2 * workers`` tasks in flight. The pool is started on
    entry (before the caller opens its output file, so workers inherit no open HDF5 handle)."""
    if workers <= 1:
        yield map(_prepare, tasks)
        return
    # fork: workers inherit the imported modules (a fresh interpreter spends seconds on torch)
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    pool = ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(os.getpid(),)
    )
    waiting = iter(tasks)
    pending: deque[Future] = deque()

    def ordered() -> Iterator[Chunk]:
        while pending:
            chunk = pending.popleft().result()
            following = next(waiting, None)
            if following is not None:
                pending.append(pool.submit(_prepare, following))
            yield chunk

    try:
        pending.extend(pool.submit(_prepare, t) for t in islice(waiting, 2 * workers))
        yield ordered()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def compression_filters(compression: str | None, level: int | None) -> dict[str, Any]:
    """h5py filter arguments: gzip (alias "zlib", ``level`` 0-9), lzf or None; shuffled bytes
    and a Fletcher-32 checksum per chunk, so that corruption is detected on read."""
    if compression == "zlib":
        compression = "gzip"
    if compression not in ("gzip", "lzf", None):
        raise ValueError(
            f"compression must be 'gzip' (alias 'zlib'), 'lzf' or None, got {compression!r}"
        )
    filters: dict[str, Any] = {"fletcher32": True}
    if compression is None:
        return filters
    filters.update(compression=compression, shuffle=True)
    if compression == "gzip":
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 9:
            raise ValueError(f"compression_level must be an integer 0-9, got {level!r}")
        filters["compression_opts"] = level
    return filters


def build_database(
    path: PathLike,
    sources: Any,
    *,
    descriptor_params: ChebyshevParams | None = None,
    persist_features: bool = False,
    persist_force_derivatives: bool = False,
    max_energy: float | None = None,
    atomic_energies: Mapping[str, float] | None = None,
    build_workers: int = 0,
    show_progress: bool = True,
    compression: str | None = "gzip",
    compression_level: int = 5,
) -> BuildSummary:
    """Write a structure database to ``path`` (atomically: a temporary file beside it, then a
    rename; on failure the temporary file is removed and an existing ``path`` is untouched).

    Args:
        path: the database file.
        sources: a path, Structure or ase.Atoms, or a sequence of them, in order. A file gives
            all its frames (any format ASE reads; XSF by :func:`aenet_fn.read_structures`); a
            directory stands for its ``*.xsf`` files, sorted by name.
        descriptor_params: the descriptor to store with the database (needed to persist).
        persist_features: store the raw features ``[N, F]`` (computed in float64).
        persist_force_derivatives: store the local descriptor derivatives of the structures
            with force labels.
        max_energy: drop structures whose referenced energy per atom
            ``(E − Σ E_atom) / N`` exceeds it (eV/atom); None keeps all.
        atomic_energies: atomic reference energies (eV) for the filter (missing species: 0);
            stored with the database either way.
        build_workers: 0 or 1 build in this process; more parse and featurize in that many
            processes (results written in source order; the file is the same).
        show_progress: show a tqdm bar over the sources.
        compression: "gzip" (alias "zlib"), "lzf" or None; ``compression_level`` 0-9 for gzip.
            The arrays training batches read (:func:`batch_column`) are stored uncompressed
            either way, so that readers map them into memory.

    Raises ``ValueError`` for no sources, bad options or a ``path`` that is one of the sources
    (it would be destroyed), ``FileNotFoundError`` for a missing
    source, ``RuntimeError`` naming a source that cannot be read, ``TypeError`` for an
    unsupported source.
    """
    if isinstance(build_workers, bool) or not isinstance(build_workers, int) or build_workers < 0:
        raise ValueError(f"build_workers must be an integer >= 0, got {build_workers!r}")
    if (persist_features or persist_force_derivatives) and descriptor_params is None:
        raise ValueError("build_database: persisting features or derivatives needs a descriptor")
    if max_energy is not None:
        max_energy = float(max_energy)
    filters = compression_filters(compression, compression_level)
    references = plain_atomic_energies(atomic_energies)
    items = _collect_sources(sources)
    tasks = [
        _Task(
            tuple(items[first : first + _SOURCES_PER_TASK]),
            descriptor_params,
            bool(persist_features),
            bool(persist_force_derivatives),
            max_energy,
            references,
        )
        for first in range(0, len(items), _SOURCES_PER_TASK)
    ]
    path = Path(path)
    if path.exists() and any(
        source.kind == "file" and path.samefile(source.item) for source in items
    ):
        raise ValueError(
            f"build_database: {path} is one of its sources; writing the database there would "
            "destroy that input: choose another path"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as temporary:
        appended = temporary.with_name(f"{temporary.name}.appended")
        try:
            with (
                _chunks(tasks, build_workers) as chunks,  # workers fork before threads start
                tqdm(
                    total=len(items), desc=path.name, unit="source", disable=not show_progress
                ) as bar,
            ):
                writer = Writer(
                    appended,
                    descriptor_params,
                    persist_features,
                    persist_force_derivatives,
                    filters,
                )
                try:
                    for chunk in chunks:
                        writer.append(chunk)
                        bar.update(len(chunk.sources))
                    writer.finish(max_energy, references)
                    n_atoms = int(writer.file["structures/atom_offset"][-1])
                finally:
                    writer.close()
            repack(appended, temporary)
        finally:
            appended.unlink(missing_ok=True)
    return BuildSummary(path, writer.n_sources, writer.n_structures, n_atoms, writer.n_removed)


# ---------------------------------------------------------------------------------------------
# Reading
