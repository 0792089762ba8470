"""Preparing structures for training: label filters and the train/test split (spec §10.1).

Filtering happens before the split, as in the reference: ``max_energy`` acts on the referenced
energy per atom ``(E − Σ E_atom) / N`` (eV/atom) and ``max_forces`` on the largest absolute force
component (eV/Å). Both splits keep the original order of the structures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from aenet_fn.core.sampling import energy_filter_mask, force_filter_mask, split_indices
from aenet_fn.core.structure import Structure


def referenced_energies_per_atom(
    structures: Sequence[Structure], atomic_energies: Mapping[str, float] | None
) -> torch.Tensor:
    """``[B]`` ``(E − Σ_a E_atom(a)) / N`` (eV/atom); structures without energy raise."""
    reference = dict(atomic_energies or {})
    values = []
    for structure in structures:
        if structure.energy is None:
            raise ValueError(f"structure {structure.name!r} has no energy")
        offset = sum(reference.get(s, 0.0) for s in structure.species)
        values.append((structure.energy - offset) / structure.n_atoms)
    return torch.tensor(values, dtype=torch.float64)


def filter_structures(
    structures: Sequence[Structure],
    atomic_energies: Mapping[str, float] | None = None,
    max_energy: float | None = None,
    max_forces: float | None = None,
) -> tuple[list[Structure], list[Structure]]:
    """``(kept, removed)``: structures above ``max_energy`` (eV/atom, referenced) or with a force
    component above ``max_forces`` (eV/Å) are removed; None disables a filter."""
    structures = list(structures)
    if not structures:
        return [], []
    keep = torch.ones(len(structures), dtype=torch.bool)
    if max_energy is not None:
        per_atom = referenced_energies_per_atom(structures, atomic_energies)
        keep &= energy_filter_mask(per_atom, max_energy)
    if max_forces is not None:
        largest = torch.tensor(
            [float("nan") if s.forces is None else float(s.forces.abs().max()) for s in structures],
            dtype=torch.float64,
        )
        keep &= force_filter_mask(largest, max_forces)
    kept = [s for s, k in zip(structures, keep.tolist()) if k]
    removed = [s for s, k in zip(structures, keep.tolist()) if not k]
    return kept, removed


def split_structures(
    structures: Sequence[Structure], test_percent: float, split_seed: int | None
) -> tuple[list[Structure], list[Structure]]:
    """``(train, test)`` with ``floor(n · test_percent / 100)`` test structures drawn by a
    generator seeded with ``split_seed`` (None: fresh OS entropy); both in original order.
    Raises when the training split would be empty."""
    if not 0 <= test_percent < 100:
        raise ValueError(f"testpercent must lie in [0, 100), got {test_percent}")
    generator = torch.Generator()
    if split_seed is None:
        generator.seed()
    else:
        generator.manual_seed(split_seed)
    train_idx, test_idx = split_indices(len(structures), test_percent / 100, generator=generator)
    if train_idx.numel() == 0:
        raise ValueError(
            f"the training split is empty ({len(structures)} structures, "
            f"testpercent {test_percent})"
        )
    return [structures[i] for i in train_idx.tolist()], [structures[i] for i in test_idx.tolist()]
