"""The reference's sample dict of one structure, shared by the in-memory and HDF5 datasets."""

from __future__ import annotations

from typing import Any

import torch

from aenet_fn.core.structure import Structure
from aenet_fn.torch_featurize.chebyshev import ChebyshevDescriptor


def structure_sample(
    structure: Structure, descriptor: ChebyshevDescriptor, features: torch.Tensor, name: str
) -> dict[str, Any]:
    """The reference's sample dict of one structure: ``structure``, ``features`` ``[N, F]``,
    ``species``, ``species_indices`` (descriptor order), ``positions``, ``cell``, ``pbc``,
    ``energy``, ``forces``, ``has_forces``, ``n_atoms``, ``name``."""
    lookup = descriptor.species_to_idx
    return {
        "structure": structure,
        "features": features,
        "species": list(structure.species),
        "species_indices": torch.tensor([lookup[s] for s in structure.species]),
        "positions": structure.positions,
        "cell": structure.cell,
        "pbc": structure.pbc,
        "energy": structure.energy,
        "forces": structure.forces,
        "has_forces": structure.has_forces(),
        "n_atoms": structure.n_atoms,
        "name": name,
    }
