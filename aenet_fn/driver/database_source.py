"""A training split read from an HDF5 structure database batch by batch (data larger than
memory).

:class:`DatabaseSource` is a :class:`~aenet_fn.driver.loader.StructureSource` whose metadata
(energies, atom and species counts, force flags, names) comes from the database's columns in a
few reads, and whose batches read only their structures: the drawn entries, sorted, in one
slice per run of consecutive entries for each array (features, labels, local derivatives).
Persisted features and derivatives are read, not recomputed; what the file lacks is computed
from its structures. Every epoch draws exactly what the same split in memory would draw, so
the weights are the same (tested).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from aenet_fn.core.descriptor import ChebyshevParams
from aenet_fn.core.featurized import FeaturizedSet, featurize_structures, select_structures
from aenet_fn.driver.loader import StructureSource
from aenet_fn.io.database import SplitMetadata, StructureDatabase


class DatabaseSource(StructureSource):
    """The ``entries`` of the database at ``path`` as a lazily read split.

    Args:
        params: the descriptor (persisted features must have been computed with it).
        path: the HDF5 structure database.
        entries: database indices of the split's structures, in split order (None: all).
        with_derivatives: whether force-supervised batches need local derivatives (read where
            persisted, else computed from the structures; either way only for the structures
            whose forces a batch supervises).
        dtype: floating dtype of features and forces (energies are float64).
        cache_entries: featurized structures kept per process (see
            :class:`~aenet_fn.driver.loader.StructureSource`).

    The file is opened in each process that reads it (DataLoader workers open their own).
    """

    def __init__(
        self,
        params: ChebyshevParams,
        path: str | Path,
        entries: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        *,
        with_derivatives: bool,
        dtype: torch.dtype = torch.float64,
        cache_entries: int | None = 0,
    ) -> None:
        self.path = Path(path)
        self._handle: StructureDatabase | None = None
        self._pid: int | None = None
        total = len(self._database())
        chosen = np.arange(total) if entries is None else np.asarray(entries, dtype=np.int64)
        if chosen.ndim != 1 or chosen.size == 0:
            raise ValueError(f"DatabaseSource: {self.path}: no entries chosen")
        if chosen.min() < 0 or chosen.max() >= total:
            raise IndexError(f"{self.path}: entries outside 0..{total - 1}")
        self.entries = chosen
        super().__init__(  # no structure objects: entries are read from the file
            params,
            None,
            with_derivatives=with_derivatives,
            dtype=dtype,
            cache_entries=cache_entries,
        )

    def _metadata(self) -> SplitMetadata:
        """The entries' per-structure data, from the database's columns."""
        every = self._database().split_metadata(self.params)
        chosen = self.entries
        return SplitMetadata(
            energies=every.energies[chosen],
            n_atoms=every.n_atoms[chosen],
            species_counts=every.species_counts[chosen],
            has_forces=every.has_forces[chosen],
            names=tuple(every.names[i] for i in chosen),
        )

    def _database(self) -> StructureDatabase:
        """This process's open handle on the file (a forked worker never reuses its parent's:
        HDF5 handles are not shared across processes)."""
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = StructureDatabase(self.path), os.getpid()
        return self._handle

    def close(self) -> None:
        """Stop kept DataLoader workers and close the file (it reopens when read again)."""
        super().close()
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = None

    def __getstate__(self) -> dict:
        """Pickled (for DataLoader workers) without this process's loader and file handle."""
        return {**super().__getstate__(), "_handle": None}

    def featurized(self, indices: Sequence[int], with_derivatives: bool) -> FeaturizedSet:
        """The split's structures ``indices`` (in that order), read from the database."""
        wanted = self.entries[np.asarray(indices, dtype=np.int64)]
        unique, position = np.unique(wanted, return_inverse=True)  # wanted[k]: row position[k]
        database = self._database()
        if with_derivatives and not database.has_local_derivatives:  # computed from positions
            structures = [database.structure(int(i)) for i in unique]
            data = featurize_structures(
                self.params, structures, with_derivatives=True, dtype=self.dtype
            )
        else:
            data = database.featurized(
                self.params,
                with_derivatives=with_derivatives,
                dtype=self.dtype,
                entries=unique,
                force_labels=self.with_derivatives,
            )
        if np.array_equal(position, np.arange(position.size)):
            return data
        return select_structures(data, position.tolist())  # host indices (numpy)
