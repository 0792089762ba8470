"""``HDF5StructureDataset``: a lazily read structure database (:mod:`aenet_fn.io.database`) with
the dataset interface of :mod:`aenet_fn.torch_training.dataset`.

Structures are read one entry at a time and kept in a bounded least-recently-used cache
(:func:`lru_evictions` decides what goes). Each process opens its own read-only h5py handle on
first use; pickling drops it (``DataLoader`` workers open their own) and :meth:`close` or leaving
a ``with`` block closes it. For training, :meth:`HDF5StructureDataset.featurized` gives the core
:class:`~aenet_fn.core.featurized.FeaturizedSet` from persisted features and local derivatives when
the database has them for this descriptor, and featurizes the structures otherwise.

Differences from the reference, on purpose: entries are typed arrays, never pickles (reference
databases are recognised and refused); ``build_workers > 1`` uses processes, not threads; the
output identifier gets ``#frame=N`` only for sources with several frames, so that it equals the
name :func:`aenet_fn.read_structures` gives; a descriptor or atomic energies given at load that
contradict the file raise ``ValueError``; persisted values are float64 and cast to the requested
dtype.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from aenet_fn.core.featurized import FeaturizedSet, energy_view, featurize_structures
from aenet_fn.core.local_derivatives import LocalDerivatives
from aenet_fn.core.structure import Structure
from aenet_fn.driver.cache import lru_evictions
from aenet_fn.io import database
from aenet_fn.torch_featurize.chebyshev import ChebyshevDescriptor
from aenet_fn.torch_training.samples import structure_sample

__all__ = ["HDF5StructureDataset"]

_MODES = ("auto", "build", "load")


class HDF5StructureDataset(Dataset):
    """Structures in an HDF5 database, read lazily (torch map-style dataset).

    Args:
        descriptor: the :class:`~aenet_fn.torch_featurize.ChebyshevDescriptor`; may be None
            when loading a database that stores one (it is recovered, float64 on CPU).
        database_file: the database path.
        sources: what :meth:`build_database` reads: paths (every frame; directories stand for
            their ``*.xsf`` files), Structure records or ASE Atoms.
        mode: "auto" opens ``database_file`` if it exists (else waits for
            :meth:`build_database`), "build" waits for :meth:`build_database`, "load" opens it
            and raises ``FileNotFoundError`` when it is missing.
        max_energy: build-time filter on the referenced energy per atom (eV/atom).
        atomic_energies: atomic reference energies (eV) owned by the dataset (filter and
            training targets). Both are stored in the file and restored on load.
        seed: accepted for compatibility; unused.
        in_memory_cache_size: structures kept in the per-process LRU cache (0: none).
        compression: "gzip" (alias "zlib"), "lzf" or None; ``compression_level`` 0-9.
    """

    def __init__(
        self,
        descriptor: ChebyshevDescriptor | None,
        database_file: str | os.PathLike[str],
        sources: Any = None,
        mode: str = "auto",
        *,
        max_energy: float | None = None,
        atomic_energies: Mapping[str, float] | None = None,
        seed: int | None = None,
        in_memory_cache_size: int = 2048,
        compression: str | None = "gzip",
        compression_level: int = 5,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {list(_MODES)}, got {mode!r}")
        if descriptor is not None and not isinstance(descriptor, ChebyshevDescriptor):
            raise TypeError(
                f"descriptor must be a ChebyshevDescriptor or None, got {type(descriptor).__name__}"
            )
        size = in_memory_cache_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"in_memory_cache_size must be an integer >= 0, got {size!r}")
        self.descriptor = descriptor
        self.database_file = Path(database_file)
        self.sources = sources
        self.mode = mode
        self.max_energy = None if max_energy is None else float(max_energy)
        self.atomic_energies = database.plain_atomic_energies(atomic_energies)
        self.seed = seed
        self.in_memory_cache_size = size
        self.compression = compression
        self.compression_level = compression_level
        database.compression_filters(compression, compression_level)  # fail now, not at build
        self._reset()
        # whether the dataset refers to a database file (else it waits for build_database)
        self._ready = mode == "load" or (mode == "auto" and self.database_file.exists())
        if self._ready:
            self._database()

    def _reset(self) -> None:
        """Forget the per-process state: handle, structure cache, featurized sets."""
        self._handle: database.StructureDatabase | None = None
        self._pid: int | None = None
        self._cache: OrderedDict[int, Structure] = OrderedDict()
        self._featurized: dict[tuple[bool, torch.dtype, bool], FeaturizedSet] = {}

    # -- the file ------------------------------------------------------------------------------

    def _database(self) -> database.StructureDatabase:
        """This process's open handle (opened, and checked against the dataset, on first use;
        a forked copy never reuses its parent's)."""
        if self._handle is not None and self._pid == os.getpid():
            return self._handle
        self._reset()
        handle = database.open_database(self.database_file)
        try:
            self._adopt(handle)
        except BaseException:
            handle.close()
            raise
        self._handle, self._pid = handle, os.getpid()
        return handle

    def _adopt(self, handle: database.StructureDatabase) -> None:
        """Recover the descriptor and the energy filter from the file; refuse contradictions."""
        path = self.database_file
        stored = handle.descriptor_params
        if stored is not None:
            if self.descriptor is None:
                self.descriptor = ChebyshevDescriptor.from_params(stored)
            elif self.descriptor.params != stored:
                raise ValueError(
                    f"{path}: the database was built with descriptor "
                    f"{ChebyshevDescriptor.from_params(stored)!r}, not {self.descriptor!r}"
                )
        for name, value in (
            ("max_energy", handle.max_energy),
            ("atomic_energies", handle.atomic_energies),
        ):
            given = getattr(self, name)
            if value is None:
                continue
            if given is not None and given != value:
                raise ValueError(f"{path}: the database was built with {name}={value}, not {given}")
            setattr(self, name, value)

    def _require_descriptor(self) -> ChebyshevDescriptor:
        if self.descriptor is None:
            raise RuntimeError(
                f"{self.database_file}: this requires a descriptor (none given, none stored)"
            )
        return self.descriptor

    def build_database(
        self,
        show_progress: bool = True,
        *,
        build_workers: int = 0,
        persist_descriptor: bool = False,
        persist_features: bool = False,
        persist_force_derivatives: bool = False,
    ) -> None:
        """Build the database from ``sources`` (replacing the file atomically; on failure an
        existing file is kept), filtered by the dataset's ``max_energy`` and
        ``atomic_energies``, then open it. Persisting features (raw, ``[N, F]``) or local
        derivatives (structures with forces) implies persisting the descriptor. A
        ``UserWarning`` says how many structures the filter removed."""
        persist = persist_descriptor or persist_features or persist_force_derivatives
        params = self._require_descriptor().params if persist else None
        if self.sources is None:
            raise ValueError("build_database: the dataset was created without sources")
        self.close()
        summary = database.build_database(
            self.database_file,
            self.sources,
            descriptor_params=params,
            persist_features=persist_features,
            persist_force_derivatives=persist_force_derivatives,
            max_energy=self.max_energy,
            atomic_energies=self.atomic_energies,
            build_workers=build_workers,
            show_progress=show_progress,
            compression=self.compression,
            compression_level=self.compression_level,
        )
        if summary.n_removed:
            warnings.warn(
                f"{type(self).__name__}: {summary.n_removed} of "
                f"{summary.n_removed + summary.n_structures} structures removed by "
                f"max_energy={self.max_energy}",
                UserWarning,
                stacklevel=2,
            )
        self._ready = True
        self._database()

    def close(self) -> None:
        """Close this process's handle and drop the caches (the file is reopened on next
        use)."""
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._reset()

    def __enter__(self) -> HDF5StructureDataset:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without the handle and the caches (each process opens its own)."""
        state = dict(self.__dict__)
        state.update(_handle=None, _pid=None, _cache=OrderedDict(), _featurized={})
        return state

    # -- the dataset protocol ------------------------------------------------------------------

    def __len__(self) -> int:
        """Entries in the database (0 before it is built)."""
        return len(self._database()) if self._ready else 0

    def _position(self, index: int) -> int:
        length = len(self)
        position = int(index) + length if int(index) < 0 else int(index)
        if not 0 <= position < length:
            raise IndexError(f"index {index} out of range for a dataset of {length} structures")
        return position

    def get_structure(self, index: int) -> Structure:
        """The :class:`~aenet_fn.Structure` at ``index`` (read from the file, then cached)."""
        position = self._position(index)
        cache = self._cache
        if position in cache:
            cache.move_to_end(position)
            return cache[position]
        structure = self._database().structure(position)
        if self.in_memory_cache_size > 0:
            cache[position] = structure
            for key in lru_evictions(cache.keys(), self.in_memory_cache_size):
                del cache[key]
        return structure

    def get_entry_metadata(self, index: int) -> dict[str, Any]:
        """``source_id``, ``frame_idx``, ``source_kind``, ``display_name``, ``name``,
        ``has_forces``, ``n_atoms`` and ``energy`` (eV, None if unknown) of entry ``index``."""
        meta = self._database().metadata(self._position(index))
        return {
            "source_id": meta.source_id,
            "frame_idx": meta.frame,
            "source_kind": meta.source_kind,
            "display_name": meta.display_name,
            "name": meta.name,
            "has_forces": meta.has_forces,
            "n_atoms": meta.n_atoms,
            "energy": meta.energy,
        }

    def get_structure_identifier(self, index: int) -> str:
        """``display_name`` (else ``source_id``, the name, ``structure_{index:06d}``), with
        ``#frame=N`` for sources holding several frames."""
        return self._database().identifier(self._position(index))

    def get_force_indices(self) -> list[int]:
        """Indices of the entries with force labels."""
        if len(self) == 0:
            return []
        return self._database().has_forces.nonzero()[0].tolist()

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Sample dict (keys of :class:`~aenet_fn.torch_training.StructureDataset` samples):
        ``structure``, ``features`` ``[N, F]`` (persisted if present, else computed),
        ``species``, ``species_indices``, ``positions``, ``cell``, ``pbc``, ``energy``,
        ``forces``, ``has_forces``, ``n_atoms``, ``name``."""
        position = self._position(index)
        descriptor = self._require_descriptor()
        structure = self.get_structure(position)
        features = self.load_persisted_features(position)
        if features is None:
            features = descriptor.featurize(structure)
        return structure_sample(
            structure,
            descriptor,
            features,
            structure.name or self.get_structure_identifier(position),
        )

    # -- persisted descriptor data -------------------------------------------------------------

    def has_persisted_descriptor(self) -> bool:
        """Whether the file stores a descriptor."""
        return self._ready and self._database().descriptor_params is not None

    def has_persisted_features(self) -> bool:
        """Whether the file stores raw features."""
        return self._ready and self._database().has_features

    def has_persisted_force_derivatives(self) -> bool:
        """Whether the file stores local derivatives (of the structures with forces)."""
        return self._ready and self._database().has_local_derivatives

    def load_persisted_features(self, index: int) -> torch.Tensor | None:
        """``[n_atoms, F]`` persisted raw features of entry ``index`` in the descriptor dtype,
        or None when the file has none. Another descriptor's features raise ``ValueError``."""
        position = self._position(index)
        if not self.has_persisted_features():
            return None
        descriptor = self._require_descriptor()
        return self._database().features(position, descriptor.params, descriptor.dtype)

    def load_persisted_force_derivatives(self, index: int) -> LocalDerivatives | None:
        """Persisted local derivatives of entry ``index`` (atom indices within the structure,
        values in the descriptor dtype), or None when the file has none or the entry has no
        forces."""
        position = self._position(index)
        if not self.has_persisted_force_derivatives():
            return None
        descriptor = self._require_descriptor()
        return self._database().local_derivatives(position, descriptor.params, descriptor.dtype)

    def featurized(
        self,
        with_derivatives: bool = False,
        dtype: torch.dtype | None = None,
        with_stress: bool = False,
    ) -> FeaturizedSet:
        """The core :class:`~aenet_fn.core.featurized.FeaturizedSet` of all entries (dtype default:
        the descriptor's), once per ``(with_derivatives, dtype, with_stress)``: persisted
        features and derivatives when the file has them, else (and always for stress data,
        whose strain derivatives are not persisted) computed from the structures."""
        descriptor = self._require_descriptor()
        dtype = descriptor.dtype if dtype is None else dtype
        key = (bool(with_derivatives), dtype, bool(with_stress))
        if key not in self._featurized:
            if len(self) == 0:
                raise ValueError(f"{type(self).__name__} is empty: there is nothing to featurize")
            handle = self._database()
            full = self._featurized.get((True, dtype, bool(with_stress)))
            if not with_derivatives and full is not None:
                self._featurized[key] = energy_view(full)
            elif with_stress or (with_derivatives and not handle.has_local_derivatives):
                self._featurized[key] = featurize_structures(
                    descriptor.params,
                    handle.structures(),
                    with_derivatives=bool(with_derivatives),
                    dtype=dtype,
                    with_stress=bool(with_stress),
                )
            else:
                self._featurized[key] = handle.featurized(
                    descriptor.params, with_derivatives=bool(with_derivatives), dtype=dtype
                )
        return self._featurized[key]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.database_file)!r}, {len(self)} structures)"
