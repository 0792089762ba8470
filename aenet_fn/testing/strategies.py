"""Hypothesis strategies for valid structures and symmetry operations.

Structures are built as in :mod:`aenet_fn.testing.construction`, so every draw is valid (no
draw is rejected) and shrinks towards small, regular structures: fewer atoms, atoms at their
sites' centres, cells closer to the unit shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from hypothesis import strategies as st

from aenet_fn.core.structure import Structure
from aenet_fn.testing.construction import (
    PERIODICITIES,
    as_pbc,
    assemble,
    cell_shape,
    rotation,
    site_grid,
)

_UNIT = st.floats(0.0, 1.0)


def rotations(improper: bool = False) -> st.SearchStrategy[np.ndarray]:
    """``[3, 3]`` rotation matrices, uniform over rotations; with ``improper`` also reflections
    (rotations times the inversion), half of the draws."""
    flips = st.booleans() if improper else st.just(False)
    return st.builds(
        lambda u, flip: rotation(u, improper=flip), st.tuples(_UNIT, _UNIT, _UNIT), flips
    )


def translations(max_shift: float = 20.0) -> st.SearchStrategy[np.ndarray]:
    """``[3]`` shifts (Å) with components in ``[-max_shift, max_shift]``."""
    component = st.floats(-max_shift, max_shift)
    return st.tuples(component, component, component).map(np.array)


def lattice_shifts(n_atoms: int, max_images: int = 2) -> st.SearchStrategy[np.ndarray]:
    """``[n_atoms, 3]`` integer image shifts in ``[-max_images, max_images]`` (for
    :func:`~aenet_fn.testing.transforms.shift_images`: re-wrapping atoms)."""
    shift = st.integers(-max_images, max_images)
    atom = st.tuples(shift, shift, shift)
    return st.lists(atom, min_size=n_atoms, max_size=n_atoms).map(
        lambda rows: np.array(rows, dtype=np.int64).reshape(n_atoms, 3)
    )


def supercells(
    pbc: Sequence[bool] = (True, True, True), max_repeat: int = 2
) -> st.SearchStrategy[tuple[int, int, int]]:
    """Repeat counts ``(n_a, n_b, n_c)`` in ``[1, max_repeat]`` along the periodic axes of
    ``pbc``, 1 along the others."""
    return st.tuples(*[st.integers(1, max_repeat if p else 1) for p in pbc])


def strains(max_strain: float = 0.03) -> st.SearchStrategy[np.ndarray]:
    """Symmetric ``[3, 3]`` strain tensors with entries in ``[-max_strain, max_strain]``."""
    entry = st.floats(-max_strain, max_strain)
    return st.tuples(*[entry] * 6).map(
        lambda e: np.array([[e[0], e[5], e[4]], [e[5], e[1], e[3]], [e[4], e[3], e[2]]])
    )


@st.composite
def structures(
    draw: st.DrawFn,
    species: Sequence[str] = ("Ti", "O"),
    min_atoms: int = 1,
    max_atoms: int = 8,
    periodicity: str | Sequence[bool] | Sequence[str | Sequence[bool]] = tuple(PERIODICITIES),
    min_distance: float = 1.0,
    max_tilt: float = 0.6,
    max_aspect: float = 1.6,
) -> Structure:
    """Structures of ``min_atoms``–``max_atoms`` atoms of ``species`` at least ``min_distance``
    Å apart, periodic images included.

    Args:
        species: the chemical symbols atoms are drawn from.
        min_atoms, max_atoms: bounds on the number of atoms.
        periodicity: a name (``"bulk"``, ``"slab"``, ``"wire"``, ``"molecule"``), three
            booleans, or a sequence of those to draw from (default: all four names). Periodic
            structures have a triclinic cell; molecules and clusters have none.
        min_distance: the smallest distance between two atoms (Å), guaranteed.
        max_tilt: the largest tilt factor of the cell (0: orthogonal before the rotation).
        max_aspect: the largest ratio of two cell lengths.
    """
    if isinstance(periodicity, str) or (
        len(periodicity) == 3 and all(isinstance(p, bool) for p in periodicity)
    ):
        choices = [periodicity]
    else:
        choices = list(periodicity)
    pbc = as_pbc(draw(st.sampled_from(choices)))
    n_atoms = draw(st.integers(min_atoms, max_atoms))
    lengths = draw(st.tuples(*[st.floats(1.0, max_aspect)] * 3))
    tilts = draw(st.tuples(*[st.floats(-max_tilt, max_tilt)] * 3))
    shape = cell_shape(lengths, tilts, draw(rotations()))
    grid = site_grid(shape, n_atoms, min_distance, fill=draw(st.floats(0.25, 1.0)))
    sites = draw(st.randoms(use_true_random=False)).sample(range(grid.n_sites), n_atoms)
    offset = st.floats(-0.5, 0.5)
    offsets = draw(st.lists(st.tuples(offset, offset, offset), min_size=n_atoms, max_size=n_atoms))
    symbols = draw(st.lists(st.sampled_from(list(species)), min_size=n_atoms, max_size=n_atoms))
    return assemble(grid.positions(sites, np.array(offsets)), symbols, grid.cell, pbc, "drawn")


def permutations_of(structure: Structure) -> st.SearchStrategy[list[int]]:
    """Orders of the atoms of ``structure`` (for
    :func:`~aenet_fn.testing.transforms.permute`)."""
    return st.permutations(range(structure.n_atoms))
