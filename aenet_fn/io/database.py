"""HDF5 structure databases (h5py): typed, offset-indexed storage of structures, with optional
persisted descriptor features and local descriptor derivatives.

Nothing in a database is a pickled Python object: every value is a typed array, so any HDF5 tool
can read it and reading never runs code. Per-atom arrays of all structures are concatenated and
indexed by offsets (CSR), so one structure is a contiguous slice. Layout (``B`` structures, ``N``
atoms, ``S`` sources; units Å, eV, eV/Å)::

    /                    attrs format="aenet_fn-structure-database", schema_version=1,
                         energy_filter_max_energy (eV/atom, NaN: no filter),
                         energy_filter_atomic_energies (compact sorted JSON, "": none)
    /sources/            source_id, kind ("file" | "structure" | "atoms"), display_name [S] str;
                         n_frames [S] i8 (frames the source held before filtering)
    /structures/         atom_offset [B+1] i8; source_index, frame [B] i8; name [B] str ("": none)
                         cell [B,3,3] f8 (zeros without a cell), has_cell [B] bool, pbc [B,3] bool
                         energy [B] f8 (NaN: unknown), has_forces [B] bool
                         numbers [N] u1 (atomic numbers), positions [N,3] f8,
                         forces [N,3] f8 (NaN rows where unknown)
    /descriptor          (optional) attrs kind="chebyshev", parameters (JSON), sha256
    /features/           (optional) attrs descriptor_sha256, n_features; values [N,F] f8 (raw)
    /local_derivatives/  (optional) attrs descriptor_sha256, n_radial, n_angular;
                         radial_offset, triplet_offset [B+1] i8;
                         radial_centre, radial_neighbour [E] i4 (atoms within the structure),
                         radial_spin [E] f8, radial [E,n_radial,3] f8 (1/Å);
                         triplet_centre, triplet_first, triplet_second [P] i4,
                         triplet_spin [P] f8, angular_first, angular_second [P,n_angular,3] f8

Local derivatives (:class:`~aenet_fn.core.local_derivatives.LocalDerivatives`) are stored only for
structures with force labels (the others have empty ranges): nothing uses them for the rest.
Persisted features and derivatives carry the sha256 of the descriptor parameters that made them
(:func:`descriptor_fingerprint`) and are refused for another descriptor.

:func:`build_database` writes a database (in parallel processes with ``build_workers > 1``,
always in source order) to a temporary file beside the target and renames it into place, so a
failed or killed build never leaves a partial file under the final name. :func:`open_database`
returns a read-only :class:`StructureDatabase`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import math
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import Any

import ase
import attrs
import h5py
import numpy as np
import torch
from ase.data import atomic_numbers, chemical_symbols
from tqdm.auto import tqdm

from aenet_fn.core.descriptor import ChebyshevParams
from aenet_fn.core.featurized import FeaturizedSet, featurize_structures
from aenet_fn.core.local_derivatives import LocalDerivatives
from aenet_fn.core.records import to
from aenet_fn.core.sampling import energy_filter_mask
from aenet_fn.core.splits import referenced_energies_per_atom
from aenet_fn.core.structure import Structure
from aenet_fn.io.ase_io import from_ase, read_structures
from aenet_fn.io.atomic import replacing

__all__ = [
    "FORMAT",
    "SCHEMA_VERSION",
    "BuildSummary",
    "DatabaseError",
    "EntryMetadata",
    "StructureDatabase",
    "build_database",
    "compression_filters",
    "descriptor_fingerprint",
    "descriptor_from_json",
    "descriptor_json",
    "entry_identifier",
    "open_database",
    "plain_atomic_energies",
]

FORMAT = "aenet_fn-structure-database"
SCHEMA_VERSION = 1

PathLike = str | os.PathLike[str]

_SOURCES_PER_TASK = 16
"""Sources parsed (and featurized) together in one unit of work. Fixed, so that serial and
parallel builds do the same computations and write the same bytes."""

_CHUNK_BYTES = 1 << 18
"""Target size of an HDF5 chunk (before compression): a structure read decompresses little."""

_LOCAL_ATOM_FIELDS = (
    "radial_centre",
    "radial_neighbour",
    "triplet_centre",
    "triplet_first",
    "triplet_second",
)


class DatabaseError(ValueError):
    """A file that is not a (readable, compatible) aenet_fn structure database."""


# ---------------------------------------------------------------------------------------------
# Descriptor identity


def descriptor_json(params: ChebyshevParams) -> str:
    """Compact, key-sorted JSON of the parameters that decide the descriptor's values: kind,
    species (in order), orders, cutoffs and ``min_cutoff`` (Å); not dtype or device."""
    return json.dumps(
        {
            "kind": "chebyshev",
            "species": list(params.species),
            "rad_order": int(params.rad_order),
            "rad_cutoff": float(params.rad_cutoff),
            "ang_order": int(params.ang_order),
            "ang_cutoff": float(params.ang_cutoff),
            "min_cutoff": float(params.min_cutoff),
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def descriptor_fingerprint(params: ChebyshevParams) -> str:
    """sha256 (hex) of :func:`descriptor_json`: equal exactly when the features are."""
    return hashlib.sha256(descriptor_json(params).encode()).hexdigest()


def descriptor_from_json(text: str) -> ChebyshevParams:
    """The :class:`~aenet_fn.ChebyshevParams` of a :func:`descriptor_json` text."""
    values = json.loads(text)
    if values.pop("kind", None) != "chebyshev":
        raise ValueError(f"not a Chebyshev descriptor: {text}")
    return ChebyshevParams(**values)


# ---------------------------------------------------------------------------------------------
# Records


@attrs.frozen
class EntryMetadata:
    """Where a database entry came from and its labels.

    Attributes:
        source_id: the source's identifier (a file path as given; "" for in-memory records).
        source_kind: "file", "structure" or "atoms".
        display_name: the source's name for outputs ("" when it has none).
        frame: index of the entry among its source's frames (from 0).
        n_frames: frames the source held (before the energy filter).
        name: the structure's name, or None.
        has_forces: whether force labels are stored.
        n_atoms: number of atoms.
        energy: total energy (eV), or None when unknown.
    """

    source_id: str
    source_kind: str
    display_name: str
    frame: int
    n_frames: int
    name: str | None
    has_forces: bool
    n_atoms: int
    energy: float | None


@attrs.frozen
class BuildSummary:
    """What :func:`build_database` wrote: ``n_structures`` entries (``n_atoms`` atoms) from
    ``n_sources`` sources, after ``n_removed`` structures were dropped by the energy filter."""

    path: Path
    n_sources: int
    n_structures: int
    n_atoms: int
    n_removed: int


def entry_identifier(
    index: int, display_name: str, source_id: str, name: str | None, frame: int, n_frames: int
) -> str:
    """Output identifier of entry ``index``: the first non-empty of ``display_name``,
    ``source_id``, ``name``, ``structure_{index:06d}``, with ``#frame={frame}`` appended for
    sources holding several frames (unless the chosen name already ends with it)."""
    base = display_name or source_id or name or f"structure_{index:06d}"
    suffix = f"#frame={frame}"
    if n_frames > 1 and not base.endswith(suffix):
        return base + suffix
    return base


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


@attrs.frozen
class _Chunk:
    """The arrays of one task, ready to append: ``sources`` rows (id, kind, display name,
    frames), ``arrays`` by dataset path (``source_index`` relative to the task) and the counts
    that extend the offset arrays."""

    sources: tuple[tuple[str, str, str, int], ...]
    arrays: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    n_removed: int


# ---------------------------------------------------------------------------------------------
# Layout: one table drives writing and checking


@attrs.frozen
class _Column:
    """A dataset: element dtype, trailing shape, and which count its first axis has."""

    dtype: Any
    shape: tuple[int, ...]
    rows: str  # "source" | "structure" | "offset" | "atom" | "radial" | "triplet"


_TEXT = h5py.string_dtype()

_BASE_COLUMNS = {
    "sources/source_id": _Column(_TEXT, (), "source"),
    "sources/kind": _Column(_TEXT, (), "source"),
    "sources/display_name": _Column(_TEXT, (), "source"),
    "sources/n_frames": _Column(np.int64, (), "source"),
    "structures/atom_offset": _Column(np.int64, (), "offset"),
    "structures/source_index": _Column(np.int64, (), "structure"),
    "structures/frame": _Column(np.int64, (), "structure"),
    "structures/name": _Column(_TEXT, (), "structure"),
    "structures/cell": _Column(np.float64, (3, 3), "structure"),
    "structures/has_cell": _Column(np.bool_, (), "structure"),
    "structures/pbc": _Column(np.bool_, (3,), "structure"),
    "structures/energy": _Column(np.float64, (), "structure"),
    "structures/has_forces": _Column(np.bool_, (), "structure"),
    "structures/numbers": _Column(np.uint8, (), "atom"),
    "structures/positions": _Column(np.float64, (3,), "atom"),
    "structures/forces": _Column(np.float64, (3,), "atom"),
}


def _feature_columns(n_features: int) -> dict[str, _Column]:
    return {"features/values": _Column(np.float64, (n_features,), "atom")}


def _derivative_columns(n_radial: int, n_angular: int) -> dict[str, _Column]:
    columns = {
        "local_derivatives/radial_offset": _Column(np.int64, (), "offset"),
        "local_derivatives/triplet_offset": _Column(np.int64, (), "offset"),
        "local_derivatives/radial_spin": _Column(np.float64, (), "radial"),
        "local_derivatives/radial": _Column(np.float64, (n_radial, 3), "radial"),
        "local_derivatives/triplet_spin": _Column(np.float64, (), "triplet"),
        "local_derivatives/angular_first": _Column(np.float64, (n_angular, 3), "triplet"),
        "local_derivatives/angular_second": _Column(np.float64, (n_angular, 3), "triplet"),
    }
    for field in _LOCAL_ATOM_FIELDS:
        rows = "radial" if field.startswith("radial") else "triplet"
        columns[f"local_derivatives/{field}"] = _Column(np.int32, (), rows)
    return columns


_OFFSET_ROWS = {
    "structures/atom_offset": "atom",
    "local_derivatives/radial_offset": "radial",
    "local_derivatives/triplet_offset": "triplet",
}


# ---------------------------------------------------------------------------------------------
# Building


def _missing(path: Path) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, f"No such file or directory: {str(path)!r}", str(path))


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
                raise _missing(path)
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
        if field.name in _LOCAL_ATOM_FIELDS:
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


def _prepare(task: _Task) -> _Chunk:
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
    return _Chunk(tuple(rows), arrays, counts, n_removed)


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
def _chunks(tasks: Sequence[_Task], workers: int) -> Iterator[Iterable[_Chunk]]:
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

    def ordered() -> Iterator[_Chunk]:
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


class _Writer:
    """Appends chunks to a new database file; :meth:`finish` marks it complete."""

    def __init__(
        self,
        path: Path,
        params: ChebyshevParams | None,
        features: bool,
        derivatives: bool,
        filters: dict[str, Any],
    ) -> None:
        self.file = h5py.File(path, "w-")
        self.columns = dict(_BASE_COLUMNS)
        if params is not None:
            group = self.file.create_group("descriptor")
            group.attrs["kind"] = "chebyshev"
            group.attrs["parameters"] = descriptor_json(params)
            group.attrs["sha256"] = descriptor_fingerprint(params)
        if features:
            group = self.file.create_group("features")
            group.attrs["descriptor_sha256"] = descriptor_fingerprint(params)
            group.attrs["n_features"] = params.n_features
            self.columns.update(_feature_columns(params.n_features))
        if derivatives:
            group = self.file.create_group("local_derivatives")
            group.attrs["descriptor_sha256"] = descriptor_fingerprint(params)
            group.attrs["n_radial"] = params.rad_order + 1
            group.attrs["n_angular"] = params.ang_order + 1
            self.columns.update(_derivative_columns(params.rad_order + 1, params.ang_order + 1))
        for path_, column in self.columns.items():
            row_bytes = np.dtype(column.dtype).itemsize * int(np.prod(column.shape, dtype=int))
            self.file.create_dataset(
                path_,
                shape=(1 if column.rows == "offset" else 0, *column.shape),
                maxshape=(None, *column.shape),
                dtype=column.dtype,
                chunks=(max(1, _CHUNK_BYTES // max(row_bytes, 8)), *column.shape),
                **({} if column.dtype is _TEXT else filters),  # HDF5 filters skip text
            )
        self.n_sources = self.n_structures = self.n_removed = 0

    def append(self, chunk: _Chunk) -> None:
        """Append ``chunk`` (its source indices shifted past the sources written so far)."""
        arrays = dict(chunk.arrays)
        if chunk.sources:
            ids, kinds, names, frames = zip(*chunk.sources)
            arrays["sources/source_id"] = np.array(ids, dtype=object)
            arrays["sources/kind"] = np.array(kinds, dtype=object)
            arrays["sources/display_name"] = np.array(names, dtype=object)
            arrays["sources/n_frames"] = np.array(frames, dtype=np.int64)
        if "structures/source_index" in arrays:
            arrays["structures/source_index"] = arrays["structures/source_index"] + self.n_sources
        for path_, counts in chunk.counts.items():
            dataset = self.file[path_]
            arrays[path_] = int(dataset[-1]) + np.cumsum(counts)
        for path_, values in arrays.items():
            if len(values):
                dataset = self.file[path_]
                start = dataset.shape[0]
                dataset.resize(start + len(values), axis=0)
                dataset[start:] = values
        self.n_sources += len(chunk.sources)
        self.n_structures += len(chunk.counts.get("structures/atom_offset", ()))
        self.n_removed += chunk.n_removed

    def finish(self, max_energy: float | None, atomic_energies: Mapping[str, float] | None) -> None:
        """Write the root attributes; the format mark comes last."""
        attributes = self.file.attrs
        attributes["energy_filter_max_energy"] = math.nan if max_energy is None else max_energy
        attributes["energy_filter_atomic_energies"] = (
            ""
            if atomic_energies is None
            else json.dumps(dict(atomic_energies), sort_keys=True, separators=(",", ":"))
        )
        attributes["schema_version"] = SCHEMA_VERSION
        attributes["format"] = FORMAT

    def close(self) -> None:
        """Close the file."""
        self.file.close()


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


def plain_atomic_energies(atomic_energies: Mapping[str, float] | None) -> dict[str, float] | None:
    """``atomic_energies`` as a plain ``{symbol: float}`` dict (eV), or None."""
    if atomic_energies is None:
        return None
    return {str(k): float(v) for k, v in dict(atomic_energies).items()}


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
        with (
            _chunks(tasks, build_workers) as chunks,  # workers fork before any thread starts
            tqdm(total=len(items), desc=path.name, unit="source", disable=not show_progress) as bar,
        ):
            writer = _Writer(
                temporary, descriptor_params, persist_features, persist_force_derivatives, filters
            )
            try:
                for chunk in chunks:
                    writer.append(chunk)
                    bar.update(len(chunk.sources))
                writer.finish(max_energy, references)
                n_atoms = int(writer.file["structures/atom_offset"][-1])
            finally:
                writer.close()
    return BuildSummary(path, writer.n_sources, writer.n_structures, n_atoms, writer.n_removed)


# ---------------------------------------------------------------------------------------------
# Reading


def open_database(path: PathLike) -> StructureDatabase:
    """Open the database at ``path`` read-only (see :class:`StructureDatabase`)."""
    return StructureDatabase(path)


class StructureDatabase:
    """A read-only handle on a database file; use as a context manager or :meth:`close` it.

    Raises ``FileNotFoundError`` for a missing file and :class:`DatabaseError` naming the file
    for one that is not HDF5, truncated, foreign (no aenet_fn format mark), of an unknown
    schema or internally inconsistent. Small per-structure arrays (offsets, labels flags) are
    held in memory; everything else is read on demand.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise _missing(self.path)
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as err:
            raise DatabaseError(f"{self.path}: not a readable HDF5 file ({err})") from err
        try:
            self._check()
        except BaseException:
            self._file.close()
            raise

    def _fail(self, problem: str) -> DatabaseError:
        return DatabaseError(f"{self.path}: {problem}")

    def _check(self) -> None:
        """Recognise the format and check every dataset's shape against the layout."""
        file = self._file
        mark = file.attrs.get("format")
        if mark != FORMAT:
            if "entries" in file:
                raise self._fail(
                    "a database of the reference ænet tools (pickled entries); aenet_fn never "
                    "unpickles files: rebuild it from its sources"
                )
            raise self._fail(f"not an aenet_fn structure database (format mark {mark!r})")
        schema = file.attrs.get("schema_version")
        if schema != SCHEMA_VERSION:
            raise self._fail(f"schema version {schema}; this version reads {SCHEMA_VERSION}")
        columns = dict(_BASE_COLUMNS)
        group_attrs = {}
        for name, build in (
            ("features", lambda a: _feature_columns(int(a["n_features"]))),
            (
                "local_derivatives",
                lambda a: _derivative_columns(int(a["n_radial"]), int(a["n_angular"])),
            ),
        ):
            if name in file:
                group_attrs[name] = dict(file[name].attrs)
                try:
                    columns.update(build(group_attrs[name]))
                except KeyError as err:
                    raise self._fail(f"/{name} lacks the attribute {err}") from None
        missing = [p for p in columns if p not in file]
        if missing:
            raise self._fail(f"incomplete database: missing {missing}")
        try:
            offsets = {p: file[p][:] for p in _OFFSET_ROWS if p in columns}
        except OSError as err:
            raise self._fail(f"corrupt offsets ({err})") from err
        n_rows = {
            "source": file["sources/kind"].shape[0],
            "offset": offsets["structures/atom_offset"].shape[0],
            "structure": offsets["structures/atom_offset"].shape[0] - 1,
        }
        for path_, values in offsets.items():
            monotonic = values.ndim == 1 and values.size > 0 and not (np.diff(values) < 0).any()
            if not monotonic or values[0] != 0:
                raise self._fail(f"{path_} is not a non-decreasing offset array from 0")
            n_rows[_OFFSET_ROWS[path_]] = int(values[-1])
        for path_, column in columns.items():
            dataset = file[path_]
            expected = (n_rows[column.rows], *column.shape)
            if column.dtype is _TEXT:
                right_type = h5py.check_string_dtype(dataset.dtype) is not None
            else:
                right_type = dataset.dtype == np.dtype(column.dtype)
            if dataset.shape != expected or not right_type:
                raise self._fail(
                    f"inconsistent database: {path_} is {dataset.dtype} {dataset.shape}, "
                    f"expected {np.dtype(column.dtype)} {expected}"
                )
        self._atom_offset = offsets["structures/atom_offset"]
        self._local_offsets = (
            offsets.get("local_derivatives/radial_offset"),
            offsets.get("local_derivatives/triplet_offset"),
        )
        self._group_attrs = group_attrs
        try:
            self._has_forces = file["structures/has_forces"][:]
            self._source_index = file["structures/source_index"][:]
        except OSError as err:
            raise self._fail(f"corrupt labels ({err})") from err

    # -- metadata ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._atom_offset.shape[0] - 1)

    def _index(self, index: int) -> int:
        length = len(self)
        position = int(index) + length if int(index) < 0 else int(index)
        if not 0 <= position < length:
            raise IndexError(f"{self.path}: index {index} out of range for {length} structures")
        return position

    @property
    def n_atoms(self) -> np.ndarray:
        """``[B]`` atom counts."""
        return np.diff(self._atom_offset)

    @property
    def has_forces(self) -> np.ndarray:
        """``[B]`` bool: entries with force labels."""
        return self._has_forces.copy()

    @property
    def max_energy(self) -> float | None:
        """The build-time ``max_energy`` (eV/atom), or None."""
        value = float(self._file.attrs["energy_filter_max_energy"])
        return None if math.isnan(value) else value

    @property
    def atomic_energies(self) -> dict[str, float] | None:
        """The atomic reference energies (eV) stored at build time, or None."""
        text = self._file.attrs["energy_filter_atomic_energies"]
        if not text:
            return None
        try:
            return plain_atomic_energies(json.loads(text))
        except (ValueError, TypeError, AttributeError) as err:
            raise self._fail(f"malformed atomic energies attribute {text!r} ({err})") from None

    @property
    def descriptor_params(self) -> ChebyshevParams | None:
        """The descriptor stored with the database, or None."""
        if "descriptor" not in self._file:
            return None
        text = self._file["descriptor"].attrs.get("parameters", "")
        try:
            return descriptor_from_json(text)
        except (ValueError, TypeError) as err:
            raise self._fail(f"malformed descriptor {text!r} ({err})") from None

    @property
    def has_features(self) -> bool:
        """Whether raw features are persisted."""
        return "features" in self._group_attrs

    @property
    def has_local_derivatives(self) -> bool:
        """Whether local derivatives are persisted (for the entries with forces)."""
        return "local_derivatives" in self._group_attrs

    def metadata(self, index: int) -> EntryMetadata:
        """Source and labels of entry ``index``."""
        i = self._index(index)
        file = self._file
        source = int(self._source_index[i])
        name = file["structures/name"].asstr()[i]
        energy = float(file["structures/energy"][i])
        return EntryMetadata(
            source_id=file["sources/source_id"].asstr()[source],
            source_kind=file["sources/kind"].asstr()[source],
            display_name=file["sources/display_name"].asstr()[source],
            frame=int(file["structures/frame"][i]),
            n_frames=int(file["sources/n_frames"][source]),
            name=name or None,
            has_forces=bool(self._has_forces[i]),
            n_atoms=int(self._atom_offset[i + 1] - self._atom_offset[i]),
            energy=None if math.isnan(energy) else energy,
        )

    def identifier(self, index: int) -> str:
        """Output identifier of entry ``index`` (see :func:`entry_identifier`)."""
        meta = self.metadata(index)
        return entry_identifier(
            self._index(index),
            meta.display_name,
            meta.source_id,
            meta.name,
            meta.frame,
            meta.n_frames,
        )

    # -- structures ----------------------------------------------------------------------------

    def structure(self, index: int) -> Structure:
        """The :class:`~aenet_fn.Structure` of entry ``index`` (one slice read per array)."""
        i = self._index(index)
        atoms = slice(int(self._atom_offset[i]), int(self._atom_offset[i + 1]))
        file = self._file
        return _structure(
            positions=file["structures/positions"][atoms],
            numbers=file["structures/numbers"][atoms],
            forces=file["structures/forces"][atoms] if self._has_forces[i] else None,
            cell=file["structures/cell"][i] if file["structures/has_cell"][i] else None,
            pbc=file["structures/pbc"][i],
            energy=float(file["structures/energy"][i]),
            name=file["structures/name"].asstr()[i],
        )

    def structures(self) -> list[Structure]:
        """All structures, in order (each array read once)."""
        file = self._file
        columns = {
            k: file[f"structures/{k}"][:]
            for k in ("positions", "numbers", "forces", "cell", "has_cell", "pbc", "energy")
        }
        names = file["structures/name"].asstr()[:]
        offsets = self._atom_offset
        return [
            _structure(
                positions=columns["positions"][offsets[i] : offsets[i + 1]],
                numbers=columns["numbers"][offsets[i] : offsets[i + 1]],
                forces=columns["forces"][offsets[i] : offsets[i + 1]]
                if self._has_forces[i]
                else None,
                cell=columns["cell"][i] if columns["has_cell"][i] else None,
                pbc=columns["pbc"][i],
                energy=float(columns["energy"][i]),
                name=names[i],
            )
            for i in range(len(self))
        ]

    # -- persisted descriptor data -------------------------------------------------------------

    def _require(self, group: str, params: ChebyshevParams) -> None:
        if group not in self._group_attrs:
            raise self._fail(f"no persisted {group.replace('_', ' ')}")
        stored = self._group_attrs[group].get("descriptor_sha256")
        if stored != descriptor_fingerprint(params):
            known = self.descriptor_params
            raise self._fail(
                f"the persisted {group.replace('_', ' ')} were computed with another descriptor "
                f"({descriptor_json(known) if known else stored}), not "
                f"{descriptor_json(params)}"
            )

    def features(
        self, index: int, params: ChebyshevParams, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """``[n_atoms, F]`` persisted raw features of entry ``index`` (stored in float64, cast
        to ``dtype``); ``params`` must be the descriptor they were computed with."""
        self._require("features", params)
        i = self._index(index)
        rows = slice(int(self._atom_offset[i]), int(self._atom_offset[i + 1]))
        values = torch.from_numpy(self._file["features/values"][rows])
        return self._finite(values, f"features of entry {i}").to(dtype)

    def local_derivatives(
        self, index: int, params: ChebyshevParams, dtype: torch.dtype = torch.float64
    ) -> LocalDerivatives | None:
        """Persisted local derivatives of entry ``index`` (values cast to ``dtype``, atom
        indices within the structure), or None when it has no force labels."""
        self._require("local_derivatives", params)
        i = self._index(index)
        if not self._has_forces[i]:
            return None
        radial_offset, triplet_offset = self._local_offsets
        ranges = {
            "radial": slice(int(radial_offset[i]), int(radial_offset[i + 1])),
            "triplet": slice(int(triplet_offset[i]), int(triplet_offset[i + 1])),
        }
        size = int(self._atom_offset[i + 1] - self._atom_offset[i])
        return self._local(ranges, None, lambda kind: size, dtype)

    def _local(
        self,
        ranges: dict[str, slice],
        atom_shift: Callable | None,
        atom_count: Callable,
        dtype: torch.dtype,
    ) -> LocalDerivatives:
        """Read the derivative rows ``ranges`` (by entry kind), values cast to ``dtype``;
        ``atom_shift(kind)`` gives the per-entry offset that makes atom indices global (None:
        keep them structure-local), ``atom_count(kind)`` the atoms of each entry's structure:
        an index outside its own structure, or a non-finite value, is refused naming the
        field and entry."""
        values = {}
        for field in attrs.fields(LocalDerivatives):
            kind = "radial" if field.name.startswith("radial") else "triplet"
            data = torch.from_numpy(self._file[f"local_derivatives/{field.name}"][ranges[kind]])
            if field.name in _LOCAL_ATOM_FIELDS:
                data = data.to(torch.long)
                outside = (data < 0) | (data >= atom_count(kind))
                if bool(outside.any()):
                    row = int(torch.nonzero(outside)[0, 0]) + (ranges[kind].start or 0)
                    raise self._fail(
                        f"local_derivatives/{field.name} row {row} indexes atom "
                        f"{int(data[outside][0])}, outside its own structure"
                    )
                if atom_shift is not None:
                    data = data + atom_shift(kind)
            else:
                data = self._finite(data, f"local_derivatives/{field.name}").to(dtype)
            values[field.name] = data
        return LocalDerivatives(**values)

    def _labels(self, values: np.ndarray, what: str) -> torch.Tensor:
        """Labels read from ``what``: NaN marks an unknown label; an infinite one is refused
        naming its row."""
        bad = np.isinf(values)
        if bad.any():
            row = int(np.nonzero(bad.reshape(bad.shape[0], -1).any(axis=1))[0][0])
            raise self._fail(f"{what}: infinite value in row {row}")
        return torch.from_numpy(values)

    def _finite(self, values: torch.Tensor, what: str) -> torch.Tensor:
        """``values``, refused (naming ``what`` and the first bad row) when not all finite."""
        bad = ~torch.isfinite(values)
        if bool(bad.any()):
            row = int(torch.nonzero(bad)[0, 0])
            raise self._fail(f"{what}: non-finite value in row {row}")
        return values

    def featurized(
        self,
        params: ChebyshevParams,
        *,
        with_derivatives: bool,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> FeaturizedSet:
        """The :class:`~aenet_fn.core.featurized.FeaturizedSet` of all entries: labels from the
        database, features persisted (cast to ``dtype``) or else computed in ``dtype``, and with
        ``with_derivatives`` the persisted local derivatives (which must exist); read on the
        CPU and moved to ``device`` once (default: stays on the CPU)."""
        if len(self) == 0:
            raise self._fail("the database is empty")
        if with_derivatives:
            self._require("local_derivatives", params)
        file = self._file
        offsets = torch.from_numpy(self._atom_offset)
        n_atoms = offsets[1:] - offsets[:-1]
        n_structures = len(self)
        lookup = np.full(len(chemical_symbols), -1, dtype=np.int64)
        lookup[[atomic_numbers[s] for s in params.species]] = np.arange(len(params.species))
        numbers = file["structures/numbers"][:]
        species_index = lookup[numbers]
        if (species_index < 0).any():
            unknown = sorted({chemical_symbols[z] for z in numbers[species_index < 0]})
            raise self._fail(
                f"species {unknown} are not in the descriptor's species {list(params.species)}"
            )
        species_index = torch.from_numpy(species_index)
        structure_index = torch.repeat_interleave(torch.arange(n_structures), n_atoms)
        n_species = len(params.species)
        counts = torch.bincount(
            structure_index * n_species + species_index, minlength=n_structures * n_species
        ).reshape(n_structures, n_species)
        if self.has_features:
            self._require("features", params)
            features = self._finite(torch.from_numpy(file["features/values"][:]), "features")
            features = features.to(dtype)
        else:
            features = featurize_structures(
                params, self.structures(), with_derivatives=False, dtype=dtype
            ).features
        local = None
        empty = torch.zeros(0, dtype=torch.long)
        radial_start = radial_count = triplet_start = triplet_count = empty
        if with_derivatives:
            starts, entry_counts = {}, {}
            for kind, entry_offset in zip(("radial", "triplet"), self._local_offsets):
                entry_offset = torch.from_numpy(entry_offset)
                starts[kind], entry_counts[kind] = entry_offset[:-1], entry_offset.diff()
            local = self._local(
                {"radial": slice(None), "triplet": slice(None)},
                lambda kind: torch.repeat_interleave(offsets[:-1], entry_counts[kind]),
                lambda kind: torch.repeat_interleave(n_atoms, entry_counts[kind]),
                dtype,
            )
            radial_start, radial_count = starts["radial"], entry_counts["radial"]
            triplet_start, triplet_count = starts["triplet"], entry_counts["triplet"]
        data = FeaturizedSet(
            features=features,
            species_index=species_index,
            atom_start=offsets[:-1].clone(),
            n_atoms=n_atoms,
            energies=self._labels(file["structures/energy"][:], "structures/energy").to(dtype),
            forces=self._labels(file["structures/forces"][:], "structures/forces").to(dtype),
            species_counts=counts,
            local=local,
            radial_start=radial_start,
            radial_count=radial_count,
            triplet_start=triplet_start,
            triplet_count=triplet_count,
            names=tuple(name or None for name in file["structures/name"].asstr()[:]),
            descriptor=params,
        )
        return data if device is None else to(data, device=device)

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the file (idempotent)."""
        self._file.close()

    def __enter__(self) -> StructureDatabase:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StructureDatabase({str(self.path)!r}, {len(self)} structures)"


def _structure(
    positions: np.ndarray,
    numbers: np.ndarray,
    forces: np.ndarray | None,
    cell: np.ndarray | None,
    pbc: np.ndarray,
    energy: float,
    name: str,
) -> Structure:
    """A :class:`Structure` from database rows (NaN energy and "" name mean unknown)."""
    return Structure(
        positions=positions,
        species=tuple(chemical_symbols[z] for z in numbers),
        energy=None if math.isnan(energy) else energy,
        forces=forces,
        cell=cell,
        pbc=tuple(bool(p) for p in pbc),
        name=name or None,
    )
