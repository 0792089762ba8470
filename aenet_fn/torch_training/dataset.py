"""Datasets of the ænet Python tools: ``StructureDataset``, ``CachedStructureDataset`` and splits.

A dataset owns filtered :class:`~aenet_fn.Structure` records, a descriptor and (optionally) the
atomic reference energies its structures were filtered with. Besides the torch-style sample
interface (``len``, ``dataset[i]``) each dataset hands the functional core a
:class:`~aenet_fn.core.featurized.FeaturizedSet` of its structures
(:meth:`StructureDataset.featurized`), computed once per ``(with_derivatives, dtype)`` and cached,
so that training the same dataset again, or on splits of it, never featurizes a structure twice.
Splits (:func:`train_test_split`, :func:`train_test_split_dataset`) are :class:`StructureSubset`\\ s
that slice the parent's cached set.

Differences from the reference, on purpose: unknown species raise ``ValueError`` naming them (the
reference's ``KeyError``); the train/test draw is the one of ``TorchTrainingConfig.split_seed``
for ``structures=`` input (a ``torch`` generator), so a dataset and the same structures split
identically; ``CachedStructureDataset`` can also be trained with forces (the derivatives are
computed on first use and cached).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from aenet_fn.core.featurized import (
    FeaturizedSet,
    energy_view,
    featurize_structures,
    select_structures,
)
from aenet_fn.core.splits import filter_structures
from aenet_fn.core.structure import Structure
from aenet_fn.io.ase_io import convert_to_structures
from aenet_fn.torch_featurize.chebyshev import ChebyshevDescriptor
from aenet_fn.torch_training.hdf5_dataset import HDF5StructureDataset
from aenet_fn.torch_training.samples import structure_sample

__all__ = [
    "CachedStructureDataset",
    "HDF5StructureDataset",
    "StructureDataset",
    "StructureSubset",
    "convert_to_structures",
    "select_structures",
    "train_test_split",
    "train_test_split_dataset",
]


def _check_species(structures: Sequence[Structure], descriptor: ChebyshevDescriptor) -> None:
    known = set(descriptor.species)
    unknown: dict[str, str | None] = {}
    for structure in structures:
        for symbol in set(structure.species) - known:
            unknown.setdefault(symbol, structure.name)
    if unknown:
        first = next(iter(unknown.values()))
        raise ValueError(
            f"species {sorted(unknown)} are not in the descriptor's species "
            f"{list(descriptor.species)} (first seen in structure {first!r})"
        )


def _plain_energies(atomic_energies: Mapping[str, float] | None) -> dict[str, float] | None:
    if atomic_energies is None:
        return None
    return {str(k): float(v) for k, v in dict(atomic_energies).items()}


def _position(index: int, length: int) -> int:
    """``index`` as a non-negative position (negative indices count from the end)."""
    index = int(index)
    position = index + length if index < 0 else index
    if not 0 <= position < length:
        raise IndexError(f"index {index} out of range for a dataset of {length} structures")
    return position


class StructureDataset(Dataset):
    """Structures with features computed on the fly (torch map-style dataset).

    Args:
        structures: :class:`~aenet_fn.Structure` records, ASE Atoms or file paths (see
            :func:`convert_to_structures`).
        descriptor: the :class:`~aenet_fn.torch_featurize.ChebyshevDescriptor`.
        max_energy: drop structures whose referenced energy per atom exceeds it (eV/atom).
        max_forces: drop structures with a force component above it (eV/Å).
        atomic_energies: atomic reference energies (eV) owned by the dataset; the trainer uses
            them for the training targets.
        seed: accepted for compatibility; unused.

    A ``UserWarning`` says how many structures the filters removed. A species unknown to the
    descriptor raises ``ValueError``.
    """

    def __init__(
        self,
        structures: Any,
        descriptor: ChebyshevDescriptor,
        max_energy: float | None = None,
        max_forces: float | None = None,
        atomic_energies: Mapping[str, float] | None = None,
        seed: int | None = None,
    ) -> None:
        if not isinstance(descriptor, ChebyshevDescriptor):
            raise TypeError(
                f"descriptor must be a ChebyshevDescriptor, got {type(descriptor).__name__}"
            )
        given = convert_to_structures(structures if structures is not None else [])
        _check_species(given, descriptor)
        self.descriptor = descriptor
        self.max_energy = max_energy
        self.max_forces = max_forces
        self.atomic_energies = _plain_energies(atomic_energies)
        self.seed = seed
        kept, removed = filter_structures(given, self.atomic_energies, max_energy, max_forces)
        if removed:
            warnings.warn(
                f"{type(self).__name__}: {len(removed)} of {len(given)} structures removed by "
                f"max_energy={max_energy} / max_forces={max_forces}",
                UserWarning,
                stacklevel=2,
            )
        self.structures: list[Structure] = kept
        self._featurized: dict[tuple[bool, torch.dtype, bool], FeaturizedSet] = {}

    def __len__(self) -> int:
        return len(self.structures)

    def get_structure(self, index: int) -> Structure:
        """The :class:`~aenet_fn.Structure` at ``index``."""
        return self.structures[_position(index, len(self))]

    def get_structure_identifier(self, index: int) -> str:
        """The structure's name, else ``structure_{index:06d}``."""
        return self.get_structure(index).name or f"structure_{_position(index, len(self)):06d}"

    @property
    def force_structures(self) -> list[Structure]:
        """Structures with force labels."""
        return [s for s in self.structures if s.has_forces()]

    @property
    def energy_only_structures(self) -> list[Structure]:
        """Structures without force labels."""
        return [s for s in self.structures if not s.has_forces()]

    def get_force_indices(self) -> list[int]:
        """Indices of the structures with force labels."""
        return [i for i, s in enumerate(self.structures) if s.has_forces()]

    def get_statistics(self) -> dict[str, Any]:
        """Counts of structures, force labels, atoms and species."""
        n_atoms = [s.n_atoms for s in self.structures]
        n_force = len(self.get_force_indices())
        return {
            "n_total": len(self),
            "n_force": n_force,
            "n_energy_only": len(self) - n_force,
            "n_force_selected": n_force,
            "total_atoms": sum(n_atoms),
            "avg_atoms": sum(n_atoms) / len(n_atoms) if n_atoms else 0.0,
            "species": sorted({x for s in self.structures for x in s.species}),
        }

    def _features_of(self, position: int) -> torch.Tensor:
        """``[N, F]`` features of one structure (descriptor dtype): from a cached set when one
        exists, else computed."""
        dtype = self.descriptor.dtype
        cached = next((self._featurized[k] for k in self._featurized if k[1] == dtype), None)
        if cached is not None:
            start = int(cached.atom_start[position])
            return cached.features[start : start + int(cached.n_atoms[position])]
        return self.descriptor.featurize(self.structures[position])

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Sample dict: ``structure``, ``features`` ``[N, F]``, ``species``,
        ``species_indices`` (descriptor order), ``positions``, ``cell``, ``pbc``, ``energy``,
        ``forces``, ``has_forces``, ``n_atoms``, ``name``."""
        position = _position(index, len(self))
        structure = self.structures[position]
        return structure_sample(
            structure,
            self.descriptor,
            self._features_of(position),
            structure.name or f"struct_{position}",
        )

    def featurized(
        self,
        with_derivatives: bool = False,
        dtype: torch.dtype | None = None,
        with_stress: bool = False,
    ) -> FeaturizedSet:
        """The core :class:`~aenet_fn.core.featurized.FeaturizedSet` of all structures (dtype
        default: the descriptor's; ``with_stress``: with stress data), computed once per
        ``(with_derivatives, dtype, with_stress)``. An energy-only view is taken from a cached
        set with derivatives when there is one."""
        dtype = self.descriptor.dtype if dtype is None else dtype
        key = (bool(with_derivatives), dtype, bool(with_stress))
        if key not in self._featurized:
            if not self.structures:
                raise ValueError(f"{type(self).__name__} is empty: there is nothing to featurize")
            full = self._featurized.get((True, dtype, bool(with_stress)))
            if not with_derivatives and full is not None:
                self._featurized[key] = energy_view(full)
            else:
                self._featurized[key] = featurize_structures(
                    self.descriptor.params,
                    self.structures,
                    with_derivatives=bool(with_derivatives),
                    dtype=dtype,
                    with_stress=bool(with_stress),
                )
        return self._featurized[key]

    def warmup_caches(self, show_progress: bool = True) -> None:
        """Compute the energy-only features now (cached for training and prediction)."""
        if self.structures:
            self.featurized(False)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} structures, species={self.descriptor.species})"


class CachedStructureDataset(StructureDataset):
    """A :class:`StructureDataset` whose energy-only features are computed eagerly at
    construction (same arguments; ``show_progress`` is accepted and unused). Force training
    computes the local derivatives on first use and caches them too."""

    def __init__(
        self,
        structures: Any,
        descriptor: ChebyshevDescriptor,
        max_energy: float | None = None,
        max_forces: float | None = None,
        atomic_energies: Mapping[str, float] | None = None,
        seed: int | None = None,
        show_progress: bool = True,
    ) -> None:
        super().__init__(structures, descriptor, max_energy, max_forces, atomic_energies, seed)
        self.warmup_caches(show_progress)


class StructureSubset(Subset):
    """The structures ``indices`` of ``dataset``, with the dataset interface.

    ``featurized`` slices the parent's cached set (so the parent featurizes everything once);
    ``atomic_energies`` and ``descriptor`` are the root dataset's.
    """

    def __init__(self, dataset: Any, indices: Sequence[int]) -> None:
        length = len(dataset)
        super().__init__(dataset, [_position(i, length) for i in indices])
        self._featurized: dict[tuple[bool, torch.dtype, bool], FeaturizedSet] = {}

    @property
    def atomic_energies(self) -> dict[str, float] | None:
        """The root dataset's atomic reference energies."""
        return owned_atomic_energies(self.dataset)

    @property
    def descriptor(self) -> ChebyshevDescriptor | None:
        """The root dataset's descriptor."""
        return dataset_descriptor(self.dataset)

    @property
    def structures(self) -> list[Structure]:
        """The subset's structures, in subset order."""
        return [self.get_structure(i) for i in range(len(self))]

    def get_structure(self, index: int) -> Structure:
        """The :class:`~aenet_fn.Structure` at subset position ``index``."""
        return self.dataset.get_structure(self.indices[_position(index, len(self))])

    def get_structure_identifier(self, index: int) -> str:
        """The parent's identifier of the structure at ``index``."""
        parent_index = self.indices[_position(index, len(self))]
        if hasattr(self.dataset, "get_structure_identifier"):
            return self.dataset.get_structure_identifier(parent_index)
        return self.get_structure(index).name or f"structure_{parent_index:06d}"

    def get_force_indices(self) -> list[int]:
        """Subset positions of the structures with force labels."""
        return [i for i in range(len(self)) if self.get_structure(i).has_forces()]

    def featurized(
        self,
        with_derivatives: bool = False,
        dtype: torch.dtype | None = None,
        with_stress: bool = False,
    ) -> FeaturizedSet:
        """The subset's :class:`~aenet_fn.core.featurized.FeaturizedSet`, sliced from the
        parent's."""
        descriptor = self.descriptor
        if dtype is None:
            dtype = torch.float64 if descriptor is None else descriptor.dtype
        key = (bool(with_derivatives), dtype, bool(with_stress))
        if key not in self._featurized:
            if not self.indices:
                raise ValueError("the subset is empty: there is nothing to featurize")
            if hasattr(self.dataset, "featurized"):
                parent = self.dataset.featurized(with_derivatives, dtype, with_stress)
                self._featurized[key] = select_structures(parent, self.indices)
            elif descriptor is not None:
                self._featurized[key] = featurize_structures(
                    descriptor.params,
                    self.structures,
                    with_derivatives=with_derivatives,
                    dtype=dtype,
                    with_stress=with_stress,
                )
            else:
                raise TypeError("the subset's dataset has neither featurized() nor a descriptor")
        return self._featurized[key]

    def __repr__(self) -> str:
        return f"StructureSubset({len(self)} of {len(self.dataset)} structures)"


def _draw(n: int, test_fraction: float, seed: int | None) -> tuple[list[int], list[int]]:
    """``(train, test)`` positions in drawn order: a permutation of ``range(n)`` by a torch
    generator seeded with ``seed`` (None: fresh entropy) whose first ``floor(n · f)`` entries are
    the test split (the draw of :func:`aenet_fn.core.splits.split_structures`)."""
    if isinstance(test_fraction, bool) or not 0.0 <= float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1), got {test_fraction!r}")
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    order = torch.randperm(n, generator=generator).tolist()
    n_test = int(n * float(test_fraction))
    return order[n_test:], order[:n_test]


def train_test_split(
    dataset: Any, test_fraction: float = 0.1, seed: int | None = None
) -> tuple[StructureSubset, StructureSubset]:
    """Random ``(train, test)`` :class:`StructureSubset`\\ s of ``dataset`` with
    ``floor(n · test_fraction)`` test structures; both keep the original order. The same seed
    splits as ``TorchTrainingConfig.split_seed`` does for ``structures=`` input."""
    train, test = _draw(len(dataset), test_fraction, seed)
    return StructureSubset(dataset, sorted(train)), StructureSubset(dataset, sorted(test))


def train_test_split_dataset(
    dataset: Any, test_fraction: float = 0.1, seed: int | None = None
) -> tuple[StructureSubset, StructureSubset]:
    """The draw of :func:`train_test_split`, each subset in the drawn (shuffled) order."""
    train, test = _draw(len(dataset), test_fraction, seed)
    return StructureSubset(dataset, train), StructureSubset(dataset, test)


# ---------------------------------------------------------------------------------------------
# Helpers for the trainer: any dataset (ours, torch Subsets of it, or a foreign one exposing
# structures) to structures, features and owned atomic energies.


def _layers(dataset: Any):
    """``dataset`` and the datasets it wraps (``.dataset`` chains)."""
    seen = 0
    while dataset is not None and seen < 64:
        yield dataset
        dataset = getattr(dataset, "dataset", None)
        seen += 1


def owned_atomic_energies(dataset: Any) -> dict[str, float] | None:
    """The atomic energies owned by ``dataset`` or the first layer below it that has the
    attribute (through Subset or wrapper layers), else None."""
    for layer in _layers(dataset):
        if isinstance(layer, StructureSubset):
            continue
        if hasattr(layer, "atomic_energies"):
            return _plain_energies(layer.atomic_energies)
    return None


def dataset_descriptor(dataset: Any) -> ChebyshevDescriptor | None:
    """The descriptor of ``dataset`` or of the dataset it wraps, else None."""
    for layer in _layers(dataset):
        if isinstance(layer, StructureSubset):
            continue
        descriptor = getattr(layer, "descriptor", None)
        if descriptor is not None:
            return descriptor
    return None


def structures_of(dataset: Any) -> list[Structure] | None:
    """The structures of ``dataset`` in dataset order (``get_structure``, a torch ``Subset`` of
    a dataset that has them, or ``.structures``), else None."""
    if hasattr(dataset, "get_structure"):
        return [dataset.get_structure(i) for i in range(len(dataset))]
    if isinstance(dataset, Subset):
        parent = structures_of(dataset.dataset)
        return None if parent is None else [parent[i] for i in dataset.indices]
    structures = getattr(dataset, "structures", None)
    return None if structures is None else list(structures)


class LazyStructures:
    """The structures of a dataset read one at a time on access (``len``, ``[i]``): what a
    lazy :class:`~aenet_fn.driver.loader.StructureSource` needs of an HDF5 database or a subset."""

    def __init__(self, dataset: Any) -> None:
        if not (hasattr(dataset, "get_structure") or isinstance(dataset, Subset)):
            raise TypeError(f"a {type(dataset).__name__} cannot be read structure by structure")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Structure:
        if isinstance(self.dataset, Subset):
            return LazyStructures(self.dataset.dataset)[self.dataset.indices[index]]
        return self.dataset.get_structure(index)


@dataclass(frozen=True)
class DatabaseEntries:
    """The entries ``entries`` (database indices, in dataset order) of the HDF5 database at
    ``path`` that a dataset stands for."""

    path: Path
    entries: list[int]


def database_entries(dataset: Any) -> DatabaseEntries | None:
    """Where an HDF5 database dataset (or a torch ``Subset`` of one, nested or not) reads its
    structures from, else None."""
    if isinstance(dataset, Subset):
        parent = database_entries(dataset.dataset)
        if parent is None:
            return None
        return DatabaseEntries(parent.path, [parent.entries[i] for i in dataset.indices])
    if not isinstance(dataset, HDF5StructureDataset):
        return None
    return DatabaseEntries(dataset.database_file, list(range(len(dataset))))


def check_descriptor(dataset: Any, descriptor: ChebyshevDescriptor) -> None:
    """Raise ``ValueError`` when ``dataset`` (or the dataset it wraps) was built with a
    descriptor whose parameters differ from ``descriptor``'s."""
    own = dataset_descriptor(dataset)
    if own is not None and own.params != descriptor.params:
        raise ValueError(
            f"the dataset's descriptor {own!r} differs from the potential's {descriptor!r}"
        )


def featurized_of(
    dataset: Any,
    descriptor: ChebyshevDescriptor,
    with_derivatives: bool,
    dtype: torch.dtype,
    with_stress: bool = False,
) -> FeaturizedSet:
    """The :class:`~aenet_fn.core.featurized.FeaturizedSet` of ``dataset`` for a model over
    ``descriptor``: the dataset's cached one when it has ``featurized`` (its descriptor must
    match), a slice of the parent's for a torch ``Subset``, else computed from its structures
    (``with_stress``: with stress labels and the features' strain derivatives)."""
    check_descriptor(dataset, descriptor)
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    if hasattr(dataset, "featurized"):
        return dataset.featurized(with_derivatives, dtype, with_stress)
    if isinstance(dataset, Subset) and (
        hasattr(dataset.dataset, "featurized") or isinstance(dataset.dataset, Subset)
    ):
        parent = featurized_of(dataset.dataset, descriptor, with_derivatives, dtype, with_stress)
        return select_structures(parent, dataset.indices)
    structures = structures_of(dataset)
    if structures is None:
        raise TypeError(
            f"cannot featurize a {type(dataset).__name__}: it exposes neither featurized(), "
            "get_structure() nor structures"
        )
    _check_species(structures, descriptor)
    return featurize_structures(
        descriptor.params,
        structures,
        with_derivatives=with_derivatives,
        dtype=dtype,
        with_stress=with_stress,
    )
