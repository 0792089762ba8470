"""Where a facade training run's data come from: structures, datasets or HDF5 databases,
filtered, split and featurized (in memory, or read lazily), with the atomic references in force.

:class:`TrainingSources` resolves the data sources of :meth:`TorchANNPotential.train` and
:meth:`TorchCommitteePotential.train` (in their priority order) into a :class:`TrainingData`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from aenet_fn.core.descriptor import ChebyshevParams
from aenet_fn.core.featurized import FeaturizedSet, SetEstimate, estimate_set, featurize_structures
from aenet_fn.core.network import network_size
from aenet_fn.core.normalization import check_reference_keys
from aenet_fn.core.records import to
from aenet_fn.core.splits import filter_structures, split_structures
from aenet_fn.driver.database_source import DatabaseSource
from aenet_fn.driver.loader import StructureSequence, StructureSource
from aenet_fn.io.ase_io import convert_to_structures
from aenet_fn.torch_featurize.chebyshev import ChebyshevDescriptor
from aenet_fn.torch_training.config import TorchTrainingConfig
from aenet_fn.torch_training.dataset import (
    DatabaseEntries,
    LazyStructures,
    check_descriptor,
    database_entries,
    featurized_of,
    owned_atomic_energies,
    train_test_split,
)


def check_reference_species(
    atomic_energies: Mapping[str, float] | None,
    species: Sequence[str],
    what: str,
    allow_unknown: bool = False,
) -> None:
    """Raise ``ValueError`` when ``atomic_energies`` is given (non-empty) but names a symbol that
    is not one of the descriptor's ``species`` (a misspelt key would be ignored; permitted with
    ``allow_unknown``, for a dataset's references) or lacks some of them (a missing reference
    would silently count as 0 eV)."""
    if atomic_energies:
        if not allow_unknown:
            check_reference_keys(atomic_energies, species, what)
        missing = [s for s in species if s not in atomic_energies]
        if missing:
            raise ValueError(
                f"{what} has no reference energy for species {missing} (descriptor species "
                f"{list(species)}); give every species, 0.0 for total-energy targets"
            )


def training_dtype(config: TorchTrainingConfig, descriptor_dtype: torch.dtype) -> torch.dtype:
    """The dtype a run trains in: ``config.precision``, or the descriptor's ("auto")."""
    return {"float32": torch.float32, "float64": torch.float64}.get(
        config.precision, descriptor_dtype
    )


class TrainingSources:
    """The data sources of a training run over ``descriptor``, resolved into
    :class:`TrainingData` by :meth:`training_data`."""

    def __init__(self, descriptor: ChebyshevDescriptor) -> None:
        self.descriptor = descriptor

    def training_data(
        self,
        sources: tuple[Any, Any, Any, Any],
        config: TorchTrainingConfig,
        dtype: torch.dtype,
        with_forces: bool,
        caller: str,
    ) -> TrainingData:
        """The splits from ``(structures, dataset, train_dataset, test_dataset)``, in the
        priority order of :meth:`train`."""
        structures, dataset, train_dataset, test_dataset = sources
        if train_dataset is not None or dataset is not None:
            data = self._data_from_datasets(
                dataset, train_dataset, test_dataset, config, dtype, with_forces
            )
        elif structures is not None:
            data = self._data_from_structures(structures, config, dtype, with_forces)
        else:
            raise ValueError(f"{caller} needs structures=, dataset= or train_dataset=")
        return data.on(config.resolved_device())

    def _data_from_structures(
        self, structures: Any, config: TorchTrainingConfig, dtype: torch.dtype, with_forces: bool
    ) -> TrainingData:
        """Source (c): convert, filter and split ``structures``, then featurize both splits."""
        structures = convert_to_structures(structures)
        if not structures:
            raise ValueError("train(): no structures given")
        missing = [s.name for s in structures if s.energy is None]
        if missing:
            raise ValueError(f"structures without an energy cannot be trained on: {missing[:5]}")
        if not config.atomic_energies:
            warnings.warn("No atomic_energies provided: training on total energies", stacklevel=3)
        kept, _ = filter_structures(
            structures, config.atomic_energies, config.max_energy, config.max_forces
        )
        if not kept:
            raise ValueError("every structure was removed by max_energy / max_forces")
        train_structures, test_structures = split_structures(
            kept, config.testpercent, config.split_seed
        )
        train = self._split(train_structures, config, dtype, with_forces, "train")
        test = (
            self._split(test_structures, config, dtype, with_forces, "val")
            if test_structures
            else None
        )
        return TrainingData(train, test, config.atomic_energies, train_structures, test_structures)

    def _split(
        self,
        structures: StructureSequence,
        config: TorchTrainingConfig,
        dtype: torch.dtype,
        with_forces: bool,
        role: str,
        database: DatabaseEntries | None = None,
    ) -> FeaturizedSet | StructureSource:
        """A split featurized once and kept in memory or a lazy source whose batches are read
        and featurized when drawn: with ``num_workers > 0`` by the DataLoader workers, and in
        this process for force training whose derivatives would not fit
        ``memory_budget_gib``; the entries of an HDF5 ``database`` are read from it in runs
        (:class:`~aenet_fn.driver.database_source.DatabaseSource`); each keeps
        :meth:`~TorchTrainingConfig.runtime_cache_entries` of them when ``cache_scope``
        covers the split's ``role`` (``"train"`` or ``"val"``; memory bounded by the batches
        and the caches)."""
        params = self.descriptor.params
        with_stress = config.stress_weight > 0
        lazy = config.num_workers > 0 or _beyond_budget(
            params, structures, config, dtype, with_forces
        )
        if lazy and with_stress:
            raise ValueError(
                "stress training keeps its splits in memory: set num_workers = 0 (and a "
                "memory_budget_gib the force derivatives fit)"
            )
        if lazy:
            cache = config.runtime_cache_entries() if config.cache_scope in ("all", role) else 0
            options = {"with_derivatives": with_forces, "dtype": dtype, "cache_entries": cache}
            if database is not None:
                return DatabaseSource(params, database.path, database.entries, **options)
            return StructureSource(params, structures, **options)
        return featurize_structures(
            params, structures, with_derivatives=with_forces, dtype=dtype, with_stress=with_stress
        )

    def _data_from_datasets(
        self,
        dataset: Any,
        train_dataset: Any,
        test_dataset: Any,
        config: TorchTrainingConfig,
        dtype: torch.dtype,
        with_forces: bool,
    ) -> TrainingData:
        """Sources (a) and (b): pick or split the datasets, resolve the atomic references they
        own and take their (cached) featurized sets."""
        if train_dataset is not None:
            if dataset is not None:
                warnings.warn(
                    "train(): dataset= is ignored because train_dataset= is given", stacklevel=3
                )
            train_source, test_source = train_dataset, test_dataset
        elif test_dataset is None and config.testpercent > 0:
            train_source, test_source = train_test_split(
                dataset, config.testpercent / 100, config.split_seed
            )
        else:
            train_source, test_source = dataset, test_dataset
        if config.max_energy is not None or config.max_forces is not None:
            warnings.warn(
                "TorchTrainingConfig.max_energy / max_forces are ignored for prebuilt datasets: "
                "filter when constructing the dataset instead",
                UserWarning,
                stacklevel=3,
            )
        if len(train_source) == 0:
            raise ValueError(
                "the training dataset is empty (no structures, or all removed by its filters)"
            )
        if test_source is not None and len(test_source) == 0:
            test_source = None
        for source in (train_source, test_source):
            if source is not None:
                check_descriptor(source, self.descriptor)
        references = self._dataset_references(train_source, test_source, config)

        def split_of(source: Any, role: str) -> FeaturizedSet | StructureSource:
            database = database_entries(source)
            if config.num_workers > 0 or (
                database is not None
                and _beyond_budget(
                    self.descriptor.params, LazyStructures(source), config, dtype, with_forces
                )
            ):
                return self._split(
                    LazyStructures(source), config, dtype, with_forces, role, database
                )
            with_stress = config.stress_weight > 0
            return featurized_of(source, self.descriptor, with_forces, dtype, with_stress)

        train = split_of(train_source, "train")
        test = None if test_source is None else split_of(test_source, "val")
        for label, data in (("training", train), ("test", test)):
            if data is not None and not bool(torch.isfinite(data.energies).all()):
                names = [n for n, e in zip(data.names, data.energies.tolist()) if e != e]
                raise ValueError(
                    f"{label} structures without an energy cannot be trained on: {names[:5]}"
                )
        return TrainingData(train, test, references, train_source, test_source)

    def _dataset_references(
        self, train_source: Any, test_source: Any, config: TorchTrainingConfig
    ) -> dict[str, float] | None:
        """Atomic references owned by the datasets (spec §1.2 step 4): train and test must
        agree, and so must ``config.atomic_energies`` when both give them; config values with
        a dataset that owns none are ignored with a warning."""
        species = self.descriptor.species

        def per_species(values: Mapping[str, float]) -> list[float]:
            return [float(values.get(s, 0.0)) for s in species]

        owned_train = owned_atomic_energies(train_source)
        owned_test = None if test_source is None else owned_atomic_energies(test_source)
        if (
            owned_train is not None
            and owned_test is not None
            and per_species(owned_train) != per_species(owned_test)
        ):
            raise ValueError(
                "the training and test datasets have conflicting atomic_energies: "
                f"{owned_train} vs {owned_test}"
            )
        owned = owned_train if owned_train is not None else owned_test
        check_reference_species(owned, species, "the dataset's atomic_energies", allow_unknown=True)
        if config.atomic_energies:
            if owned is None:
                warnings.warn(
                    "TorchTrainingConfig.atomic_energies is ignored: the prebuilt dataset owns "
                    "no atomic_energies (give them to the dataset instead)",
                    UserWarning,
                    stacklevel=4,
                )
            elif per_species(owned) != per_species(config.atomic_energies):
                raise ValueError(
                    f"config.atomic_energies {dict(config.atomic_energies)} conflict with the "
                    f"dataset's atomic_energies {owned}"
                )
        if not owned:
            warnings.warn("No atomic_energies provided: training on total energies", stacklevel=4)
            return owned
        return {s: value for s, value in owned.items() if s in species}  # the model's species


def _beyond_budget(
    params: ChebyshevParams,
    structures: StructureSequence,
    config: TorchTrainingConfig,
    dtype: torch.dtype,
    with_forces: bool,
) -> bool:
    """Whether force training on the CPU should recompute a split's derivatives per batch:
    kept in memory, they would exceed ``config.memory_budget_gib`` (an estimate)."""
    if not with_forces or config.resolved_device().type != "cpu":
        return False  # (nothing to estimate)
    estimate = estimate_set(params, structures, with_derivatives=True, dtype=dtype)
    return not _within_budget(estimate.total_bytes, config)


def _within_budget(total_bytes: int, config: TorchTrainingConfig) -> bool:
    """Whether a split of ``total_bytes`` with force derivatives stays in memory: always off
    the CPU, within ``memory_budget_gib`` on it."""
    cpu = config.resolved_device().type == "cpu"
    return not cpu or total_bytes <= config.memory_budget_gib * 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """What a training run holds in memory, estimated before it starts
    (:func:`estimate_training_memory`).

    Attributes:
        data: the estimate of the structures' featurized set (sizes, neighbours per atom).
        derivatives_kept: force training keeps the local derivatives in memory (within
            ``memory_budget_gib``); False: recomputed per batch, or energy-only training.
        network_bytes: parameters, gradients and optimiser moments of every member.
    """

    data: SetEstimate
    derivatives_kept: bool
    network_bytes: int

    @property
    def held_bytes(self) -> int:
        """Bytes held for the whole run: the features, the derivatives where they are kept,
        the networks."""
        data = self.data.total_bytes if self.derivatives_kept else self.data.feature_bytes
        return data + self.network_bytes


def estimate_training_memory(
    descriptor: ChebyshevDescriptor,
    arch: Mapping[str, Sequence[tuple[int, str]]],
    structures: StructureSequence,
    config: TorchTrainingConfig,
    members: int = 1,
) -> MemoryEstimate:
    """The memory a run of ``config`` would hold for ``structures`` (all splits) and
    ``members`` networks of ``arch``, from a sample of the structures."""
    params = descriptor.params
    dtype = training_dtype(config, descriptor.dtype)
    with_forces, with_stress = config.force_weight > 0, config.stress_weight > 0
    data = estimate_set(
        params, structures, with_derivatives=with_forces, dtype=dtype, with_stress=with_stress
    )
    # the rule of TrainingSources._split: workers read lazily, else in memory within budget
    kept = with_forces and config.num_workers == 0 and _within_budget(data.total_bytes, config)
    size = network_size(arch, params.species, params.n_features)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return MemoryEstimate(data, kept, 4 * size * members * itemsize)  # values, grads, 2 moments


@dataclass
class TrainingData:
    """The featurized splits of one training run, the atomic references in force and where the
    splits came from (structure lists or datasets, for ``save_energies``)."""

    train: FeaturizedSet | StructureSource
    test: FeaturizedSet | StructureSource | None
    atomic_energies: Mapping[str, float] | None
    train_source: Any
    test_source: Any

    def on(self, device: torch.device) -> TrainingData:
        """These splits on ``device`` (computed on the CPU, moved once; lazy splits stay
        on the CPU)."""
        if device.type == "cpu":
            return self
        return replace(self, train=to(self.train, device), test=to(self.test, device))

    def close(self) -> None:
        """Stop the DataLoader workers of lazy splits (:meth:`StructureSource.close`)."""
        for split in (self.train, self.test):
            if isinstance(split, StructureSource):
                split.close()
