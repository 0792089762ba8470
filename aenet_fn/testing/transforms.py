"""Symmetry operations on structures: each returns a new :class:`Structure` without labels.

Conventions: positions and lattice vectors are rows (Å), so a rotation ``R`` maps ``r → r R``;
forces then map ``F → F R`` and the stress ``σ → Rᵀ σ R``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from aenet_fn.core.structure import Structure


def _tensor(value, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(value, dtype=np.float64), dtype=like.dtype)


def _moved(
    structure: Structure,
    positions: torch.Tensor,
    what: str,
    cell: torch.Tensor | None = None,
    species: Sequence[str] | None = None,
) -> Structure:
    """``structure`` with new positions (and cell, species), no labels, renamed ``name+what``."""
    return Structure(
        positions,
        tuple(structure.species if species is None else species),
        cell=structure.cell if cell is None else cell,
        pbc=structure.pbc,
        name=f"{structure.name or 'structure'} {what}",
    )


def rotate(structure: Structure, rotation: np.ndarray) -> Structure:
    """Positions and cell rotated by the ``[3, 3]`` orthogonal ``rotation`` (``r → r R``)."""
    matrix = _tensor(rotation, structure.positions)
    if not torch.allclose(matrix @ matrix.T, torch.eye(3, dtype=matrix.dtype), atol=1e-10):
        raise ValueError("rotate: the matrix is not orthogonal")
    cell = None if structure.cell is None else structure.cell @ matrix
    return _moved(structure, structure.positions @ matrix, "rotated", cell=cell)


def translate(structure: Structure, shift: Sequence[float]) -> Structure:
    """Every atom moved by ``shift`` ``[3]`` (Å)."""
    return _moved(structure, structure.positions + _tensor(shift, structure.positions), "moved")


def permute(structure: Structure, order: Sequence[int]) -> Structure:
    """Atoms reordered: atom ``i`` of the result is atom ``order[i]`` of ``structure``."""
    index = torch.as_tensor(list(order), dtype=torch.long)
    if sorted(index.tolist()) != list(range(structure.n_atoms)):
        raise ValueError(f"permute: {list(order)} is not a permutation of the atoms")
    species = [structure.species[i] for i in index.tolist()]
    return _moved(structure, structure.positions[index], "permuted", species=species)


def shift_images(structure: Structure, shifts: np.ndarray) -> Structure:
    """Each atom replaced by one of its periodic images: atom ``i`` moved by
    ``shifts[i] @ cell`` (``shifts`` ``[n, 3]`` integers), along periodic axes only (entries
    along other axes are ignored). This is what re-wrapping atoms into the cell does."""
    if structure.cell is None:
        return structure
    steps = np.asarray(shifts, dtype=np.int64).reshape(structure.n_atoms, 3)
    steps = steps * np.array(structure.pbc, dtype=np.int64)
    moved = structure.positions + _tensor(steps, structure.positions) @ structure.cell
    return _moved(structure, moved, "re-wrapped")


def repeat(structure: Structure, repeats: Sequence[int]) -> Structure:
    """The supercell of ``repeats[k]`` copies along lattice vector ``k`` (only periodic axes may
    repeat); atoms ordered copy by copy, each copy in the original order."""
    counts = [int(r) for r in repeats]
    if len(counts) != 3 or min(counts) < 1:
        raise ValueError(f"repeat: three counts >= 1 are needed, got {list(repeats)}")
    if structure.cell is None or any(c > 1 and not p for c, p in zip(counts, structure.pbc)):
        raise ValueError(
            f"repeat: {counts} repeats a structure along an axis that is not periodic "
            f"(pbc {structure.pbc})"
        )
    grid = np.stack(np.meshgrid(*[np.arange(c) for c in counts], indexing="ij"), -1)
    offsets = _tensor(grid.reshape(-1, 3), structure.positions) @ structure.cell
    positions = (structure.positions[None] + offsets[:, None]).reshape(-1, 3)
    cell = structure.cell * _tensor(counts, structure.positions)[:, None]
    species = list(structure.species) * math.prod(counts)
    return _moved(structure, positions, f"×{counts}", cell=cell, species=species)


def strain(structure: Structure, strain_tensor: np.ndarray) -> Structure:
    """Homogeneous deformation ``r → r (1 + ε)``, ``cell → cell (1 + ε)`` by ``ε``
    ``[3, 3]``."""
    deformation = torch.eye(3, dtype=structure.positions.dtype) + _tensor(
        strain_tensor, structure.positions
    )
    cell = None if structure.cell is None else structure.cell @ deformation
    return _moved(structure, structure.positions @ deformation, "strained", cell=cell)
