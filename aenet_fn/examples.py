"""The built-in example data set: Cu/Ni/Au alloys labelled with ASE's EMT calculator.

No downloads: random fcc alloy cells are generated, strained and rattled with a seeded generator,
and their total energies (eV) and forces (eV/Å) computed with ``ase.calculators.emt.EMT``.
"""

from __future__ import annotations

import numpy as np
from ase.build import bulk
from ase.calculators.emt import EMT

from aenet_fn.io.ase_io import from_ase
from aenet_fn.structure import Structure

ALLOY_SPECIES = ("Cu", "Ni", "Au")


def emt_alloys(
    n_structures: int = 60,
    seed: int = 0,
    repeats: tuple[tuple[int, int, int], ...] = ((2, 2, 2), (2, 2, 3), (2, 3, 3), (3, 3, 3)),
    rattle: float = 0.12,
) -> list[Structure]:
    """Random Cu/Ni/Au fcc alloy cells (8–108 atoms with the default repeats, 4 atoms per
    conventional cell times the repeat) with EMT energies and forces.

    Each structure draws a repeat, a composition, a lattice constant between the elements'
    (±3 %), a small random strain and a Gaussian rattle of ``rattle`` Å.
    """
    if n_structures < 1:
        raise ValueError(f"emt_alloys: n_structures must be >= 1, got {n_structures}")
    rng = np.random.default_rng(seed)
    structures = []
    for index in range(n_structures):
        repeat = repeats[rng.integers(len(repeats))]
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(repeat)
        atoms.set_chemical_symbols(list(rng.choice(ALLOY_SPECIES, size=len(atoms))))
        lattice = {"Cu": 3.61, "Ni": 3.52, "Au": 4.08}
        a = np.mean([lattice[s] for s in atoms.get_chemical_symbols()]) * rng.uniform(0.97, 1.03)
        strain = np.eye(3) + rng.uniform(-0.02, 0.02, (3, 3))
        atoms.set_cell(atoms.cell.array / 3.6 * a @ strain, scale_atoms=True)
        atoms.positions += rng.normal(0.0, rattle, atoms.positions.shape)
        atoms.calc = EMT()
        atoms.get_potential_energy()
        structures.append(from_ase(atoms, name=f"emt-alloy-{index:04d}"))
    return structures
