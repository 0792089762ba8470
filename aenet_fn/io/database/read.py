"""Reading a database: :class:`StructureDatabase` checks a file when it opens it (schema,
offsets, index ranges) and reads structures, labels, features and local derivatives."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import h5py
import numpy as np
import torch
from ase.data import atomic_numbers, chemical_symbols

from aenet_fn.core.descriptor import ChebyshevParams
from aenet_fn.core.featurized import FeaturizedSet, featurize_structures
from aenet_fn.core.local_derivatives import ATOM_INDEX_FIELDS, LocalDerivatives
from aenet_fn.core.records import to
from aenet_fn.core.structure import Structure
from aenet_fn.io.database.schema import (
    BASE_COLUMNS,
    FORMAT,
    OFFSET_ROWS,
    SCHEMA_VERSION,
    STRESS_COLUMNS,
    TEXT,
    DatabaseError,
    EntryMetadata,
    PathLike,
    derivative_columns,
    descriptor_fingerprint,
    descriptor_from_json,
    descriptor_json,
    entry_identifier,
    feature_columns,
    missing_file,
    plain_atomic_energies,
)


@attrs.frozen(eq=False)
class SplitMetadata:
    """Per-entry data of a whole database: ``energies`` ``[B]`` (eV, NaN unknown),
    ``n_atoms`` ``[B]``, ``species_counts`` ``[B, M]``, ``has_forces`` ``[B]``, ``names``."""

    energies: torch.Tensor
    n_atoms: torch.Tensor
    species_counts: torch.Tensor
    has_forces: torch.Tensor
    names: tuple[str | None, ...]


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
            raise missing_file(self.path)
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
        columns = dict(BASE_COLUMNS)
        if "structures/stress" in file:
            columns.update(STRESS_COLUMNS)
        group_attrs = {}
        for name, build in (
            ("features", lambda a: feature_columns(int(a["n_features"]))),
            (
                "local_derivatives",
                lambda a: derivative_columns(int(a["n_radial"]), int(a["n_angular"])),
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
            offsets = {p: file[p][:] for p in OFFSET_ROWS if p in columns}
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
            n_rows[OFFSET_ROWS[path_]] = int(values[-1])
        for path_, column in columns.items():
            dataset = file[path_]
            expected = (n_rows[column.rows], *column.shape)
            if column.dtype is TEXT:
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
        self._kept_columns: dict[str, np.ndarray] = {}
        self._maps: dict[str, np.ndarray | None] = {}
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
            stress=file["structures/stress"][i] if "structures/stress" in file else None,
        )

    def structures(self) -> list[Structure]:
        """All structures, in order (each array read once)."""
        file = self._file
        columns = {
            k: file[f"structures/{k}"][:]
            for k in ("positions", "numbers", "forces", "cell", "has_cell", "pbc", "energy")
        }
        names = file["structures/name"].asstr()[:]
        stresses = file["structures/stress"][:] if "structures/stress" in file else None
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
                stress=None if stresses is None else stresses[i],
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
            "radial": [(int(radial_offset[i]), int(radial_offset[i + 1]))],
            "triplet": [(int(triplet_offset[i]), int(triplet_offset[i + 1]))],
        }
        size = int(self._atom_offset[i + 1] - self._atom_offset[i])
        return self._local(ranges, None, lambda kind: size, dtype)

    def _local(
        self,
        ranges: dict[str, list[tuple[int, int]]],
        atom_shift: Callable | None,
        atom_count: Callable,
        dtype: torch.dtype,
    ) -> LocalDerivatives:
        """Read the derivative rows ``ranges`` (``(first, end)`` runs by entry kind), values
        cast to ``dtype``; ``atom_shift(kind)`` gives the per-entry offset that makes atom
        indices global (None: keep them structure-local), ``atom_count(kind)`` the atoms of
        each entry's structure: an index outside its own structure, or a non-finite value, is
        refused naming the field and entry."""
        values = {}
        counts = {kind: atom_count(kind) for kind in ranges}  # once per kind, not per field
        shifts = {kind: atom_shift(kind) for kind in ranges} if atom_shift is not None else None
        for field in attrs.fields(LocalDerivatives):
            kind = "radial" if field.name.startswith("radial") else "triplet"
            data = torch.from_numpy(self._read(f"local_derivatives/{field.name}", ranges[kind]))
            if field.name in ATOM_INDEX_FIELDS:
                data = data.to(torch.long)
                outside = (data < 0) | (data >= counts[kind])
                if bool(outside.any()):
                    row = int(torch.nonzero(outside)[0, 0])
                    raise self._fail(
                        f"local_derivatives/{field.name} row {_file_row(ranges[kind], row)} "
                        f"indexes atom {int(data[outside][0])}, outside its own structure"
                    )
                if shifts is not None:
                    data = data + shifts[kind]
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

    def split_metadata(self, params: ChebyshevParams) -> SplitMetadata:
        """What a sampler needs of every entry, read column by column (no structure is
        built): energies, atom counts, species counts in ``params.species`` order, force
        flags and names (the columns are kept for the batches' reads)."""
        offsets = self._atom_offset
        n_atoms = np.diff(offsets)
        species_index = self._species_index(self._kept("structures/numbers"), params)
        n_species, total = len(params.species), len(self)
        owner = np.repeat(np.arange(total), n_atoms)
        counts = np.bincount(owner * n_species + species_index, minlength=total * n_species)
        energies = self._labels(self._kept("structures/energy"), "structures/energy")
        return SplitMetadata(
            energies=energies.to(torch.float64),
            n_atoms=torch.from_numpy(n_atoms),
            species_counts=torch.from_numpy(counts.reshape(total, n_species)),
            has_forces=torch.from_numpy(self._has_forces.astype(bool)),
            names=tuple(name or None for name in self._kept("structures/name", text=True)),
        )

    def _species_index(self, numbers: np.ndarray, params: ChebyshevParams) -> np.ndarray:
        """Index in ``params.species`` of each atomic number; refused naming unknown species."""
        lookup = np.full(len(chemical_symbols), -1, dtype=np.int64)
        lookup[[atomic_numbers[s] for s in params.species]] = np.arange(len(params.species))
        species_index = lookup[numbers]
        if (species_index < 0).any():
            unknown = sorted({chemical_symbols[z] for z in numbers[species_index < 0]})
            raise self._fail(
                f"species {unknown} are not in the descriptor's species {list(params.species)}"
            )
        return species_index

    def featurized(
        self,
        params: ChebyshevParams,
        *,
        with_derivatives: bool,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        entries: Sequence[int] | np.ndarray | None = None,
        force_labels: bool = True,
    ) -> FeaturizedSet:
        """The :class:`~aenet_fn.core.featurized.FeaturizedSet` of the ``entries`` (increasing
        indices; None: all): labels from the database, features persisted (cast to ``dtype``)
        or else computed in ``dtype``, and with ``with_derivatives`` the persisted local
        derivatives (which must exist); read on the CPU and moved to ``device`` once (default:
        stays on the CPU). Each array is read in one slice per run of consecutive entries; the
        small per-entry and per-atom columns (atomic numbers, energies, names) are read once and
        kept. ``force_labels=False`` skips reading the force labels (they are NaN, unknown: for
        energy-only batches)."""
        if len(self) == 0:
            raise self._fail("the database is empty")
        if with_derivatives:
            self._require("local_derivatives", params)
        if self.has_features:
            self._require("features", params)
        runs = self._runs(entries)
        offsets = self._atom_offset
        atom_runs = [(int(offsets[a]), int(offsets[b])) for a, b in runs]
        n_atoms = torch.from_numpy(_take_runs(np.diff(offsets), runs))
        n_structures = int(n_atoms.shape[0])
        starts = torch.cumsum(n_atoms, 0) - n_atoms
        numbers = _take_runs(self._kept("structures/numbers"), atom_runs)
        species_index = torch.from_numpy(self._species_index(numbers, params))
        structure_index = torch.repeat_interleave(torch.arange(n_structures), n_atoms)
        n_species = len(params.species)
        counts = torch.bincount(
            structure_index * n_species + species_index, minlength=n_structures * n_species
        ).reshape(n_structures, n_species)
        if self.has_features:
            features = torch.from_numpy(self._read("features/values", atom_runs))
            features = self._finite(features, "features").to(dtype)
        else:
            chosen = [self.structure(i) for a, b in runs for i in range(a, b)]
            features = featurize_structures(
                params, chosen, with_derivatives=False, dtype=dtype
            ).features
        local = None
        empty = torch.zeros(0, dtype=torch.long)
        radial_start = radial_count = triplet_start = triplet_count = empty
        if with_derivatives:
            ranges, entry_counts = {}, {}
            for kind, entry_offset in zip(("radial", "triplet"), self._local_offsets):
                ranges[kind] = [(int(entry_offset[a]), int(entry_offset[b])) for a, b in runs]
                entry_counts[kind] = torch.from_numpy(_take_runs(np.diff(entry_offset), runs))
            local = self._local(
                ranges,
                lambda kind: torch.repeat_interleave(starts, entry_counts[kind]),
                lambda kind: torch.repeat_interleave(n_atoms, entry_counts[kind]),
                dtype,
            )
            radial_count, triplet_count = entry_counts["radial"], entry_counts["triplet"]
            radial_start = torch.cumsum(radial_count, 0) - radial_count
            triplet_start = torch.cumsum(triplet_count, 0) - triplet_count
        names = _take_runs(self._kept("structures/name", text=True), runs)
        energies = _take_runs(self._kept("structures/energy"), runs)
        if force_labels:
            forces = self._read("structures/forces", atom_runs)
        else:
            forces = np.full((int(n_atoms.sum()), 3), np.nan)
        data = FeaturizedSet(
            features=features,
            species_index=species_index,
            atom_start=starts,
            n_atoms=n_atoms,
            energies=self._labels(energies, "structures/energy").to(dtype),
            forces=self._labels(forces, "structures/forces").to(dtype),
            species_counts=counts,
            local=local,
            radial_start=radial_start,
            radial_count=radial_count,
            triplet_start=triplet_start,
            triplet_count=triplet_count,
            names=tuple(name or None for name in names),
            descriptor=params,
        )
        return data if device is None else to(data, device=device)

    def _runs(self, entries: Sequence[int] | np.ndarray | None) -> list[tuple[int, int]]:
        """``[(first, end)]`` runs of consecutive entries covering ``entries`` (increasing)."""
        if entries is None:
            return [(0, len(self))]
        chosen = np.asarray(entries, dtype=np.int64).reshape(-1)
        if chosen.size == 0:
            raise self._fail("no entries chosen")
        if (np.diff(chosen) <= 0).any() or chosen[0] < 0 or chosen[-1] >= len(self):
            raise IndexError(
                f"{self.path}: entries must increase within 0..{len(self) - 1}, got {chosen}"
            )
        breaks = np.nonzero(np.diff(chosen) > 1)[0] + 1
        firsts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [chosen.size]])
        return [(int(chosen[f]), int(chosen[e - 1]) + 1) for f, e in zip(firsts, ends)]

    def _read(self, path: str, runs: list[tuple[int, int]]) -> np.ndarray:
        """Rows ``runs`` (``(first, end)`` pairs) of the dataset ``path``, one slice each: from
        its memory map where it is stored contiguous (:meth:`_mapped`), else through HDF5."""
        mapped = self._mapped(path)
        source = self._file[path] if mapped is None else mapped
        parts = [source[first:end] for first, end in runs]
        if len(parts) > 1:
            return np.concatenate(parts)
        return parts[0] if mapped is None else np.array(parts[0])

    def _mapped(self, path: str) -> np.ndarray | None:
        """A read-only memory map of the dataset ``path`` when the file stores it contiguous
        and uncompressed (databases built by this version), else None."""
        if path not in self._maps:
            dataset = self._file[path]
            offset = dataset.id.get_offset() if dataset.chunks is None else None
            plain = dataset.compression is None and dataset.dtype.kind in "fiub"
            self._maps[path] = (
                np.memmap(
                    self.path, dtype=dataset.dtype, mode="r", offset=offset, shape=dataset.shape
                )
                if offset is not None and plain and dataset.size
                else None
            )
        return self._maps[path]

    def _kept(self, path: str, text: bool = False) -> np.ndarray:
        """The whole (small) column ``path``, read on first use and kept."""
        if path not in self._kept_columns:
            dataset = self._file[path]
            self._kept_columns[path] = (dataset.asstr() if text else dataset)[:]
        return self._kept_columns[path]

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the file (idempotent)."""
        self._maps.clear()
        self._file.close()

    def __enter__(self) -> StructureDatabase:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StructureDatabase({str(self.path)!r}, {len(self)} structures)"


def _take_runs(values: np.ndarray, runs: list[tuple[int, int]]) -> np.ndarray:
    """Rows ``runs`` (``(first, end)`` pairs) of an array in memory, concatenated into a new
    array (never a view of the kept columns)."""
    return np.concatenate([values[first:end] for first, end in runs])


def _file_row(runs: list[tuple[int, int]], row: int) -> int:
    """The file row of row ``row`` of the concatenated ``runs``."""
    for first, end in runs:
        if row < end - first:
            return first + row
        row -= end - first
    raise IndexError(row)


def _structure(
    positions: np.ndarray,
    numbers: np.ndarray,
    forces: np.ndarray | None,
    cell: np.ndarray | None,
    pbc: np.ndarray,
    energy: float,
    name: str,
    stress: np.ndarray | None,
) -> Structure:
    """A :class:`Structure` from database rows (NaN energy or stress and "" name mean
    unknown)."""
    return Structure(
        positions=positions,
        species=tuple(chemical_symbols[z] for z in numbers),
        energy=None if math.isnan(energy) else energy,
        forces=forces,
        cell=cell,
        pbc=tuple(bool(p) for p in pbc),
        name=name or None,
        stress=None if stress is None or np.isnan(stress).all() else stress,
    )
