"""Many structures flattened into one set of tensors.

A :class:`Batch` concatenates the atoms of ``B`` structures (``N`` atoms in all) so that every
function downstream works on flat tensors with an index saying which structure an atom belongs to.
:func:`collate` builds one from :class:`~aenet_fn.core.structure.Structure` records; it is pure.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

from aenet_fn.core.records import dynamic_fields, pytree_record, static_field
from aenet_fn.core.structure import Structure, check_float_dtype, check_species_symbols


@pytree_record
@attrs.frozen(eq=False)
class Batch:
    """Flat concatenation of ``B`` structures with ``N`` atoms in all.

    Attributes:
        positions: ``[N, 3]`` Cartesian coordinates (Å).
        species_index: ``[N]`` int64 index of each atom's symbol in :attr:`species`.
        structure_index: ``[N]`` int64 index of each atom's structure, non-decreasing.
        cells: ``[B, 3, 3]`` lattice vectors as rows (Å); zeros for isolated structures.
        pbc: ``[B, 3]`` bool periodic flags.
        n_atoms: ``[B]`` int64 atom counts.
        energies: ``[B]`` total energies (eV); NaN where unknown.
        forces: ``[N, 3]`` forces (eV/Å); NaN where unknown.
        species: the symbols that ``species_index`` refers to.
        names: one name (or None) per structure.
    """

    positions: torch.Tensor
    species_index: torch.Tensor
    structure_index: torch.Tensor
    cells: torch.Tensor
    pbc: torch.Tensor
    n_atoms: torch.Tensor
    energies: torch.Tensor
    forces: torch.Tensor
    species: tuple[str, ...] = static_field()
    names: tuple[str | None, ...] = static_field()

    @property
    def n_structures(self) -> int:
        """Number of structures ``B``."""
        return int(self.n_atoms.shape[0])

    @property
    def has_energy(self) -> torch.Tensor:
        """``[B]`` bool: structures whose energy is known."""
        return torch.isfinite(self.energies)

    @property
    def has_forces(self) -> torch.Tensor:
        """``[N]`` bool: atoms whose force is known."""
        return torch.isfinite(self.forces).all(dim=1)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Batch:
        """Move to a device and/or cast the floating tensors to ``dtype``."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return attrs.evolve(self, **{f: move(getattr(self, f)) for f in _TENSOR_FIELDS})


_TENSOR_FIELDS = dynamic_fields(Batch)


def species_order(structures: Sequence[Structure]) -> tuple[str, ...]:
    """The symbols of ``structures`` in order of first appearance."""
    seen: dict[str, None] = {}
    for structure in structures:
        seen.update(dict.fromkeys(structure.species))
    return tuple(seen)


def collate(
    structures: Sequence[Structure],
    species: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Batch:
    """Flatten ``structures`` into a :class:`Batch`.

    Args:
        structures: one or more :class:`Structure` records.
        species: symbol order for ``species_index``; by default the order of first appearance.
            A structure containing a symbol not in ``species`` raises ``ValueError``.
        dtype: floating dtype of positions, cells, energies and forces: ``torch.float32`` or
            ``torch.float64`` (anything else raises, see :func:`check_float_dtype`).
        device: where the tensors live.
    """
    check_float_dtype(dtype, "collate")
    structures = list(structures)
    if not structures:
        raise ValueError("collate: no structures given")
    for index, structure in enumerate(structures):
        if not isinstance(structure, Structure):
            raise TypeError(
                f"collate: item {index} is a {type(structure).__name__}, not a Structure"
            )
    order = (
        species_order(structures) if species is None else check_species_symbols(species, "collate")
    )
    lookup = {symbol: i for i, symbol in enumerate(order)}
    species_index = []
    for structure in structures:
        unknown = sorted(set(structure.species) - lookup.keys())
        if unknown:
            raise ValueError(
                f"collate: structure {structure.name!r} contains species {unknown} "
                f"not in the species list {list(order)}"
            )
        species_index.extend(lookup[s] for s in structure.species)
    counts = torch.tensor([s.n_atoms for s in structures], dtype=torch.int64)
    nan_forces = [torch.full((s.n_atoms, 3), float("nan"), dtype=torch.float64) for s in structures]
    zeros = torch.zeros(3, 3, dtype=torch.float64)
    batch = Batch(
        positions=torch.cat([s.positions for s in structures]),
        species_index=torch.tensor(species_index, dtype=torch.int64),
        structure_index=torch.repeat_interleave(torch.arange(len(structures)), counts),
        cells=torch.stack([zeros if s.cell is None else s.cell for s in structures]),
        pbc=torch.tensor([s.pbc for s in structures], dtype=torch.bool),
        n_atoms=counts,
        energies=torch.tensor(
            [float("nan") if s.energy is None else s.energy for s in structures],
            dtype=torch.float64,
        ),
        forces=torch.cat(
            [nan if s.forces is None else s.forces for s, nan in zip(structures, nan_forces)]
        ),
        species=order,
        names=tuple(s.name for s in structures),
    )
    return batch.to(device=device, dtype=dtype)


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """``[n]`` position of each element in ``order`` (a permutation of ``0..n-1``):
    ``order[inverse_permutation(order)] == arange(n)``; on ``order``'s device."""
    return torch.empty_like(order).scatter_(
        0, order, torch.arange(order.shape[0], device=order.device)
    )


def ranges(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Concatenation of ``arange(start, start + count)`` for each pair (int64)."""
    offsets = torch.repeat_interleave(starts - (torch.cumsum(counts, 0) - counts), counts)
    return torch.arange(int(counts.sum()), device=starts.device) + offsets
