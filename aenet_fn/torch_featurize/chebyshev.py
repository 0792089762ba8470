"""``ChebyshevDescriptor``: a thin, stateful shell over :class:`~aenet_fn.ChebyshevParams` and
:func:`~aenet_fn.featurize` with the names of the ænet Python tools."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from aenet_fn.core.batch import collate
from aenet_fn.core.descriptor import ChebyshevParams, featurize
from aenet_fn.core.structure import Structure


def as_device(name: str, value: Any) -> torch.device:
    """``value`` as a ``torch.device``; ``ValueError`` naming ``name`` when it is not one."""
    try:
        return torch.device(value)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"{name} must be a torch device such as 'cpu' or 'cuda:0', got {value!r}"
        ) from error


class ChebyshevDescriptor:
    """The Chebyshev (AUC) descriptor: ``species`` order defines the typespin weights.

    Args:
        species: element symbols; rad_order/rad_cutoff (Å), ang_order/ang_cutoff (Å),
            min_cutoff (Å): see :class:`~aenet_fn.ChebyshevParams`.
        device: where features are computed ("cpu", "cuda", ...).
        dtype: floating dtype of the features (float64 default).
    """

    def __init__(
        self,
        species: Sequence[str],
        rad_order: int,
        rad_cutoff: float,
        ang_order: int,
        ang_cutoff: float,
        min_cutoff: float = 0.55,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.params = ChebyshevParams(
            species=species,
            rad_order=rad_order,
            rad_cutoff=rad_cutoff,
            ang_order=ang_order,
            ang_cutoff=ang_cutoff,
            min_cutoff=min_cutoff,
        )
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.device = as_device("ChebyshevDescriptor: device", device)
        self.dtype = dtype

    @classmethod
    def from_params(
        cls, params: ChebyshevParams, device: str | torch.device = "cpu", dtype: Any = torch.float64
    ) -> ChebyshevDescriptor:
        """Wrap core parameters."""
        return cls(
            params.species,
            params.rad_order,
            params.rad_cutoff,
            params.ang_order,
            params.ang_cutoff,
            params.min_cutoff,
            device,
            dtype,
        )

    species = property(lambda self: list(self.params.species), doc="Species, in order.")
    n_species = property(lambda self: len(self.params.species), doc="Number of species.")
    multi = property(lambda self: self.params.multi, doc="More than one species.")
    n_features = property(lambda self: self.params.n_features, doc="Features per atom.")
    rad_order = property(lambda self: self.params.rad_order)
    rad_cutoff = property(lambda self: self.params.rad_cutoff)
    ang_order = property(lambda self: self.params.ang_order)
    ang_cutoff = property(lambda self: self.params.ang_cutoff)
    min_cutoff = property(lambda self: self.params.min_cutoff)

    @property
    def species_to_idx(self) -> dict[str, int]:
        """Index of each species."""
        return {s: i for i, s in enumerate(self.params.species)}

    @property
    def typespin(self) -> torch.Tensor:
        """Typespin weight of each species (in the descriptor dtype)."""
        return torch.tensor(self.params.typespin, dtype=self.dtype)

    def get_n_features(self) -> int:
        """Features per atom."""
        return self.params.n_features

    def forward_from_positions(
        self,
        positions: Any,
        species: Sequence[str],
        cell: Any = None,
        pbc: Any = None,
    ) -> torch.Tensor:
        """Features ``[N, F]`` of one structure: positions ``[N, 3]`` (Å), symbols, optional
        cell (rows = lattice vectors, Å) and periodic flags. Differentiable in ``positions``
        when it is a tensor that requires grad."""
        structure = Structure(positions, list(species), cell=cell, pbc=pbc)
        batch = collate(
            [structure], species=self.params.species, dtype=self.dtype, device=self.device
        )
        if isinstance(positions, torch.Tensor) and positions.requires_grad:
            batch = _with_positions(batch, positions.to(dtype=self.dtype, device=self.device))
        return featurize(self.params, batch)

    def featurize(self, structure: Structure) -> torch.Tensor:
        """Features ``[N, F]`` of a :class:`~aenet_fn.Structure`."""
        batch = collate(
            [structure], species=self.params.species, dtype=self.dtype, device=self.device
        )
        return featurize(self.params, batch)

    def __repr__(self) -> str:
        p = self.params
        return (
            f"ChebyshevDescriptor(species={list(p.species)}, rad_order={p.rad_order}, "
            f"rad_cutoff={p.rad_cutoff}, ang_order={p.ang_order}, ang_cutoff={p.ang_cutoff}, "
            f"min_cutoff={p.min_cutoff}, device={str(self.device)!r}, dtype={self.dtype})"
        )


def _with_positions(batch, positions):
    import attrs

    return attrs.evolve(batch, positions=positions)
