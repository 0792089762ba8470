"""Stress labels: on structures (``[3, 3]`` or Voigt, eV/Å³, ASE's sign), through ASE files
and HDF5 databases (older databases without them read as unknown)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT
from ase.io import write
from hypothesis import given
from hypothesis import strategies as st

import aenet_fn as af
from aenet_fn.examples import emt_alloys
from aenet_fn.io.ase_io import from_ase, to_ase
from aenet_fn.io.database import build_database, open_database

CELL = torch.eye(3, dtype=torch.float64) * 4.0
POSITIONS = torch.tensor([[0.0, 0.0, 0.0], [1.9, 0.1, 0.0]], dtype=torch.float64)
finite = st.floats(-1.0, 1.0, allow_nan=False)


@given(voigt=st.lists(finite, min_size=6, max_size=6))
def test_voigt_and_tensor_stresses_are_the_same_symmetric_tensor(voigt):
    xx, yy, zz, yz, xz, xy = voigt
    tensor = [[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]]
    from_voigt = af.Structure(POSITIONS, ("Cu", "Ni"), cell=CELL, stress=voigt)
    from_tensor = af.Structure(POSITIONS, ("Cu", "Ni"), cell=CELL, stress=tensor)
    assert torch.equal(from_voigt.stress, from_tensor.stress)
    assert torch.equal(from_voigt.stress, from_voigt.stress.T) and from_voigt.has_stress()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stress": [0.1] * 5}, r"stress must have shape \[3, 3\] or Voigt \[6\]"),
        ({"stress": [0.1, float("nan"), 0, 0, 0, 0]}, "stress contain NaN or inf"),
        ({"stress": [0.1] * 6, "pbc": (True, True, False)}, "periodic along x, y and z"),
    ],
)
def test_bad_stresses_are_refused_naming_the_structure(kwargs, message):
    with pytest.raises(ValueError, match=message):
        af.Structure(POSITIONS, ("Cu", "Ni"), cell=CELL, name="bad", **kwargs)


def test_stresses_pass_through_ase_files_and_databases(tmp_path):
    """EMT stresses survive extended XYZ and a database; a database written before stresses
    existed (no stress column) reads as structures without them."""
    labelled = []
    for structure in emt_alloys(4, seed=3):
        atoms = to_ase(structure)
        atoms.calc = EMT()
        atoms.get_potential_energy()
        labelled.append(from_ase(atoms))
    assert all(s.has_stress() for s in labelled)
    expected = torch.stack([s.stress for s in labelled])
    write(tmp_path / "emt.xyz", [to_ase(s) for s in labelled])
    read = af.read_structures(tmp_path / "emt.xyz")
    torch.testing.assert_close(torch.stack([s.stress for s in read]), expected, rtol=1e-12, atol=0)
    build_database(tmp_path / "emt.h5", [*read, af.Structure(POSITIONS, ("Cu", "Ni"), energy=1.0)])
    with open_database(tmp_path / "emt.h5") as database:
        stored = [database.structure(i) for i in range(5)]
        assert [s.has_stress() for s in database.structures()] == [True] * 4 + [False]
    torch.testing.assert_close(
        torch.stack([s.stress for s in stored[:4]]), expected, rtol=0, atol=0
    )
    assert stored[4].stress is None
    with h5py.File(tmp_path / "emt.h5", "a") as file:  # as databases were before stresses
        del file["structures/stress"]
    with open_database(tmp_path / "emt.h5") as database:
        assert not any(s.has_stress() for s in database.structures())
        assert np.isclose(database.structure(0).energy, read[0].energy)
