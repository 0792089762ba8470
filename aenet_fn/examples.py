"""Example data: Cu/Ni/Au alloys labelled with ASE's EMT calculator, and the TiO2 files that
ship with the package.

No downloads: :func:`emt_alloys` generates random fcc alloy cells, strained and rattled with a
seeded generator, and computes their total energies (eV) and forces (eV/Å) with
``ase.calculators.emt.EMT``. :data:`TIO2_STRUCTURES` and :data:`TIO2_POTENTIAL` are folders
installed with the package (their provenance: ``example_data/README.md``)::

    import aenet_fn as af
    from aenet_fn.examples import TIO2_POTENTIAL, TIO2_STRUCTURES

    structures = af.read_structures(TIO2_STRUCTURES)
    model = af.read_aenet_ascii(TIO2_POTENTIAL)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ase.build import bulk
from ase.calculators.emt import EMT

from aenet_fn.core.structure import Structure
from aenet_fn.io.ase_io import from_ase

ALLOY_SPECIES = ("Cu", "Ni", "Au")

EXAMPLE_DATA: Path = Path(__file__).parent / "example_data"
"""The folder of the example files installed with the package (its ``README.md`` states where
each file comes from)."""

TIO2_STRUCTURES: Path = EXAMPLE_DATA / "tio2"
"""A folder of 100 periodic TiO2 structures (``structure-001.xsf`` … ``structure-100.xsf``,
6–47 atoms each, 2105 in all) with DFT total energies (eV) and forces (eV/Å), from N. Artrith
and A. Urban, Comput. Mater. Sci. 114 (2016) 135–150. Atomic reference energies:
Ti −1604.604515075 eV, O −432.503149303 eV."""

TIO2_POTENTIAL: Path = EXAMPLE_DATA / "nn-tio2"
"""A folder with a trained ænet TiO2 potential in the Fortran ``.nn.ascii`` format
(``Ti.nn.ascii``, ``O.nn.ascii``: species [Ti, O], radial order 20 / 6.5 Å, angular order 6 /
5.0 Å, min cutoff 0.35 Å, networks 56-5-5-1 tanh); read it with ``read_aenet_ascii``."""


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
