"""Where the training loop's mini-batches come from: in memory, or prepared lazily in workers.

The driver needs two things of a training split: per-structure metadata for the sampler
(energies, atom and species counts, which structures carry forces) and, for each drawn
selection, a :class:`~aenet_fn.core.minibatch.MiniBatch`. Two kinds of split provide both:

* :class:`~aenet_fn.core.featurized.FeaturizedSet`: every feature (and derivative) in memory,
  batches sliced out of it (:func:`~aenet_fn.core.minibatch.take_structures`);
* :class:`StructureSource`: only the structures (a list, or a lazy sequence such as an HDF5
  database), each batch featurized when it is drawn; memory stays bounded by the batch, not by
  the data set.

:func:`batch_stream` turns an epoch's selections into batches, in this process or in
``torch.utils.data.DataLoader`` worker processes (``num_workers > 0``) that read and featurize
ahead of the training step. The batches are the same either way, so results do not depend on
the number of workers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, Union

import torch
from torch.utils.data import DataLoader, Dataset

from aenet_fn.core.batch import inverse_permutation
from aenet_fn.core.descriptor import ChebyshevParams, species_lookup
from aenet_fn.core.featurized import (
    FeaturizedSet,
    concatenate,
    featurize_structures,
    select_structures,
    with_empty_derivatives,
)
from aenet_fn.core.minibatch import MiniBatch, take_structures
from aenet_fn.core.normalization import ENERGY_DTYPE, FeatureMoments
from aenet_fn.core.structure import Structure
from aenet_fn.driver.cache import LRUCache
from aenet_fn.io.database import SplitMetadata
from aenet_fn.speedups.force_jacobian import SetJacobian


class StructureSequence(Protocol):
    """Random access to structures: ``len(s)`` and ``s[i] -> Structure``."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Structure: ...


class StructureSource:
    """A training or test split featurized batch by batch, when drawn.

    Args:
        params: the descriptor.
        structures: the structures (a list, or any lazy :class:`StructureSequence`); read once
            here for the metadata, then again for each batch that draws them.
        with_derivatives: whether force-supervised batches need local derivatives.
        dtype: floating dtype of features and forces (energies are float64).
        cache_entries: featurized structures kept per process (DataLoader workers each keep
            their own) in a least-recently-used cache; 0 (default) keeps none, None all.

    Attributes (as :class:`~aenet_fn.core.featurized.FeaturizedSet`): ``energies`` ``[B]`` (eV),
    ``n_atoms`` ``[B]``, ``species_counts`` ``[B, M]``, ``has_forces`` ``[B]``, ``names``.
    """

    def __init__(
        self,
        params: ChebyshevParams,
        structures: StructureSequence,
        *,
        with_derivatives: bool,
        dtype: torch.dtype = torch.float64,
        cache_entries: int | None = 0,
    ) -> None:
        self.params, self.structures = params, structures
        self.with_derivatives, self.dtype = with_derivatives, dtype
        labels = self._metadata()
        self.energies, self.n_atoms = labels.energies, labels.n_atoms
        self.species_counts, self.has_forces = labels.species_counts, labels.has_forces
        self.names = labels.names
        self._cache: LRUCache = LRUCache(cache_entries)
        self._loader: tuple[int, DataLoader, _Plan] | None = None

    def _metadata(self) -> SplitMetadata:
        """The split's per-structure data, read from every structure once."""
        structures, params = self.structures, self.params
        if len(structures) == 0:
            raise ValueError("StructureSource: no structures")
        energies, n_atoms, has_forces, names = [], [], [], []
        counts = torch.zeros(len(structures), len(params.species), dtype=torch.long)
        for k in range(len(structures)):
            structure = structures[k]
            lookup = species_lookup(params, structure.species)
            counts[k] = torch.bincount(lookup, minlength=len(params.species))
            energies.append(float("nan") if structure.energy is None else structure.energy)
            n_atoms.append(structure.n_atoms)
            has_forces.append(
                structure.forces is not None and bool(torch.isfinite(structure.forces).all())
            )
            names.append(structure.name)
        return SplitMetadata(
            energies=torch.tensor(energies, dtype=ENERGY_DTYPE),
            n_atoms=torch.tensor(n_atoms),
            species_counts=counts,
            has_forces=torch.tensor(has_forces),
            names=tuple(names),
        )

    def close(self) -> None:
        """Stop the DataLoader workers kept for this source (``persistent_workers``) now. The
        source and its loader refer to each other, so without this they stop only at the next
        full garbage collection, which then waits for them. The source stays usable."""
        self._loader = None

    def __enter__(self) -> StructureSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict:
        """Pickled (for DataLoader workers) without this process's loader."""
        return {**self.__dict__, "_loader": None}

    @property
    def n_structures(self) -> int:
        """Number of structures ``B``."""
        return len(self.names)

    @property
    def device(self) -> torch.device:
        """Device of the metadata and of the batches this source builds: the CPU."""
        return self.energies.device

    def featurized(self, indices: Sequence[int], with_derivatives: bool) -> FeaturizedSet:
        """The structures ``indices`` featurized (in that order)."""
        chosen = [self.structures[int(i)] for i in indices]
        return featurize_structures(
            self.params, chosen, with_derivatives=with_derivatives, dtype=self.dtype
        )

    def take(self, selection: torch.Tensor, force_selected: torch.Tensor | None) -> MiniBatch:
        """The mini-batch of ``selection`` ``[b]`` (repeats allowed), as
        :func:`~aenet_fn.core.minibatch.take_structures` would cut it from the whole featurized
        split; only the drawn structures are featurized, and local derivatives only for those
        whose forces the batch supervises."""
        unique, inverse = torch.unique(selection, return_inverse=True)
        if force_selected is None:
            return take_structures(self._cached(unique.tolist(), False), inverse)
        mask = force_selected[unique]
        derivatives = mask & self.has_forces[unique]
        if not self.with_derivatives:
            derivatives = torch.zeros_like(derivatives)
        order = torch.argsort((~derivatives).to(torch.uint8), stable=True)  # derivatives first
        n_derivatives = int(derivatives.sum())  # host tensors: the loader, not the step
        ordered = unique[order]
        parts = [
            self._cached(part.tolist(), with_local)
            for part, with_local in (
                (ordered[:n_derivatives], True),
                (ordered[n_derivatives:], False),
            )
            if part.numel()
        ]
        if len(parts) == 2:
            parts[1] = with_empty_derivatives(parts[1], parts[0].local)
        data = parts[0] if len(parts) == 1 else concatenate(parts)
        return take_structures(data, inverse_permutation(order)[inverse], mask[order])

    def _cached(self, indices: list[int], derivatives: bool) -> FeaturizedSet:
        """:meth:`featurized` of ``indices`` through the cache: only the structures not cached
        are featurized (together), then kept one by one."""
        if self._cache.capacity == 0:
            return self.featurized(indices, derivatives)
        pieces = {i: self._cache.get((i, derivatives)) for i in indices}
        missing = [i for i, piece in pieces.items() if piece is None]
        if missing:
            fresh = self.featurized(missing, derivatives)
            for k, i in enumerate(missing):
                pieces[i] = select_structures(fresh, [k])
                self._cache.put((i, derivatives), pieces[i])
        return concatenate([pieces[i] for i in indices])

    def feature_moments(self, chunk: int = 256) -> FeatureMoments:
        """Pooled feature moments of every atom, featurized ``chunk`` structures at a time."""
        moments = None
        for first in range(0, self.n_structures, chunk):
            indices = range(first, min(first + chunk, self.n_structures))
            part = FeatureMoments.of(self.featurized(indices, False).features)
            moments = part if moments is None else moments.merge(part)
        return moments


Split = Union[FeaturizedSet, StructureSource]


def check_split(data: Split, descriptor: ChebyshevParams, caller: str) -> None:
    """Refuse a split whose features another descriptor makes or made: other recorded
    parameters (a source's, or those a featurized set records), or another number of features
    or species than ``descriptor``."""
    if not isinstance(data, (FeaturizedSet, StructureSource)):
        raise TypeError(
            f"{caller}: expected a FeaturizedSet or StructureSource, got {type(data).__name__}"
        )
    recorded = data.params if isinstance(data, StructureSource) else data.descriptor
    if recorded is not None and recorded != descriptor:
        raise ValueError(
            f"{caller}: the set was featurized with {recorded}, "
            f"not with the model's descriptor {descriptor}"
        )
    n_species = data.species_counts.shape[1]
    n_features = descriptor.n_features if recorded is not None else data.features.shape[1]
    if (n_features, n_species) != (descriptor.n_features, len(descriptor.species)):
        raise ValueError(
            f"{caller}: the set has {n_features} features per atom and {n_species} species; "
            f"the descriptor makes {descriptor.n_features} features for "
            f"{len(descriptor.species)} species {list(descriptor.species)}"
        )


def take_batch(
    data: Split,
    selection: torch.Tensor,
    force_selected: torch.Tensor | None,
    jacobian: SetJacobian | None = None,
    with_stress: bool = False,
) -> MiniBatch:
    """The mini-batch of structures ``selection`` ``[b]`` of ``data``; ``force_selected``
    ``[B]`` marks the force-supervised structures (None: energies only). ``jacobian``: the
    :class:`~aenet_fn.speedups.force_jacobian.SetJacobian` of a featurized ``data``, to give the
    batch an assembled Jacobian (see :func:`~aenet_fn.core.minibatch.take_structures`).
    ``with_stress``: the batch supervises stresses (a featurized set with stress data)."""
    if isinstance(data, StructureSource):
        if with_stress:
            raise ValueError("stress training reads featurized sets in memory, not lazy sources")
        return data.take(selection, force_selected)
    return take_structures(data, selection, force_selected, jacobian, with_stress)


def normalization_features(data: Split) -> torch.Tensor | FeatureMoments:
    """What :func:`~aenet_fn.core.normalization.fit_normalization` needs of a training split: the
    features in memory, or moments gathered batch by batch."""
    return data.feature_moments() if isinstance(data, StructureSource) else data.features


class _Plan:
    """A DataLoader sampler whose items (one epoch's ``(selection, force_selected)`` pairs) are
    replaced before each epoch, so that persistent workers serve every epoch."""

    def __init__(self) -> None:
        self.items: list = []

    def __iter__(self) -> Iterator:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


BatchItem = tuple[torch.Tensor, Union[torch.Tensor, None]]
"""What a batch is built from: a selection ``[b]`` and the force-selected flags (or None)."""


class _Batches(Dataset):
    """Map-style dataset whose items are ``(selection, force_selected)`` pairs → batches, or
    tuples of them (one per committee member) → tuples of batches."""

    def __init__(self, data: Split) -> None:
        self.data = data

    def __getitem__(self, item: BatchItem | tuple[BatchItem, ...]) -> MiniBatch | tuple:
        if isinstance(item[0], torch.Tensor):
            return take_batch(self.data, *item)
        return tuple(take_batch(self.data, *member) for member in item)


def _unchanged(batch: MiniBatch) -> MiniBatch:
    return batch


def batch_stream(
    data: Split,
    selections: Sequence[torch.Tensor],
    force_selected: torch.Tensor | None,
    *,
    num_workers: int = 0,
    prefetch_factor: int = 2,
    persistent_workers: bool = False,
    jacobian: SetJacobian | None = None,
    with_stress: bool = False,
) -> Iterator[MiniBatch]:
    """The mini-batches of ``selections`` in order: built here when ``num_workers == 0``
    (with ``jacobian``: see :func:`take_batch`), otherwise ``prefetch_factor`` batches ahead per
    worker in ``num_workers`` DataLoader processes (each worker reads, featurizes and builds
    graphs itself; ``jacobian`` is not used there). With ``persistent_workers`` a
    :class:`StructureSource` keeps its workers (and their caches) from one epoch to the next."""
    items = [(selection, force_selected) for selection in selections]
    if num_workers == 0:
        return (take_batch(data, *item, jacobian, with_stress) for item in items)
    return _loaded(data, items, num_workers, prefetch_factor, persistent_workers, with_stress)


def member_batch_stream(
    data: Split,
    selections: Sequence[Sequence[torch.Tensor]],
    force_selected: Sequence[torch.Tensor | None],
    *,
    num_workers: int = 0,
    prefetch_factor: int = 2,
    persistent_workers: bool = False,
    jacobian: SetJacobian | None = None,
    with_stress: bool = False,
) -> Iterator[tuple[MiniBatch, ...]]:
    """Committee members' own batches, one tuple per step: member ``m``'s ``selections[m][k]``
    with its ``force_selected[m]``; one stream for all members, so DataLoader workers (as in
    :func:`batch_stream`) read each step's batches once, together."""
    items = [
        tuple(zip(step, force_selected, strict=True)) for step in zip(*selections, strict=True)
    ]
    if num_workers == 0:
        return (
            tuple(take_batch(data, *member, jacobian, with_stress) for member in item)
            for item in items
        )
    return _loaded(data, items, num_workers, prefetch_factor, persistent_workers, with_stress)


def _loaded(data, items, num_workers, prefetch_factor, persistent_workers, with_stress):
    """The batches of ``items`` built in ``num_workers`` DataLoader processes (see
    :func:`batch_stream`)."""
    if with_stress:
        raise ValueError("stress training reads featurized sets in memory (num_workers = 0)")
    keep = persistent_workers and isinstance(data, StructureSource)
    if keep and data._loader is not None and data._loader[0] == num_workers:
        _, loader, plan = data._loader
    else:
        plan = _Plan()
        loader = DataLoader(
            _Batches(data),
            sampler=plan,
            batch_size=None,
            collate_fn=_unchanged,
            num_workers=num_workers,
            prefetch_factor=prefetch_factor,
            persistent_workers=keep,
        )
        if keep:
            data._loader = (num_workers, loader, plan)
    plan.items = items
    return _worker_batches(data, iter(loader), keep)


def _worker_batches(data: Split, iterator: Iterator[MiniBatch], kept: bool) -> Iterator[MiniBatch]:
    """The batches of a DataLoader ``iterator``. Its workers stop as soon as the stream fails,
    or is left before its end unless ``kept`` for the next epoch: torch would leave them to the
    garbage collector (an error's traceback refers to the iterator)."""
    try:
        yield from iterator
    except GeneratorExit:
        if not kept:
            _stop_workers(iterator)
        raise
    except BaseException:
        if kept:
            data.close()  # its workers are gone: the next epoch starts new ones
        _stop_workers(iterator)
        raise


def _stop_workers(iterator: Iterator[MiniBatch]) -> None:
    """Stop a DataLoader iterator's worker processes now (torch's own clean-up)."""
    stop = getattr(iterator, "_shutdown_workers", None)
    if stop is not None:
        stop()
