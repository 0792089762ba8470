"""Structure validation, collate, and pytree registration of the records."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree

from aenet_fn import Batch, ChebyshevParams, Structure, collate
from tests.conftest import random_structure

WATER = np.array([[0.0, 0.0, 0.12], [0.0, 0.76, -0.47], [0.0, -0.76, -0.47]])


def test_defaults_follow_the_cell():
    isolated = Structure(WATER, ["O", "H", "H"])
    periodic = Structure(WATER, ["O", "H", "H"], cell=np.eye(3) * 5)
    assert isolated.pbc == (False, False, False) and isolated.cell is None
    assert periodic.pbc == (True, True, True) and periodic.is_periodic()
    assert periodic.positions.dtype == torch.float64 and periodic.n_atoms == 3
    assert not periodic.has_forces()


def test_inputs_are_copied_not_shared():
    positions = WATER.copy()
    structure = Structure(positions, ["O", "H", "H"])
    positions[0, 0] = 99.0
    assert float(structure.positions[0, 0]) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"positions": np.zeros((3, 2))}, r"positions must have shape \[n_atoms, 3\]"),
        ({"positions": np.zeros(3)}, r"positions must have shape \[n_atoms, 3\]"),
        ({"positions": np.zeros((0, 3)), "species": []}, "has no atoms"),
        ({"positions": [[0, 0, math.nan], [1, 1, 1], [2, 2, 2]]}, "positions contain NaN"),
        ({"positions": [[0, 0, math.inf], [1, 1, 1], [2, 2, 2]]}, "positions contain NaN or inf"),
        ({"positions": [["a", 0, 0], [1, 1, 1], [2, 2, 2]]}, "positions is not numeric"),
        ({"species": ["O", "H"]}, "2 species for 3 positions"),
        ({"species": ["O", "H", "Qq"]}, r"species\[2\] = 'Qq' is not a chemical element"),
        ({"species": ["O", "", "H"]}, r"species\[1\] = '' is blank"),
        ({"species": ["O", None, "H"]}, "blank or not a string"),
        ({"species": "OHH"}, "not the string"),
        ({"cell": np.ones((3, 3))}, "cell is singular"),
        ({"cell": np.eye(2)}, r"cell must have shape \[3, 3\]"),
        ({"cell": np.full((3, 3), math.nan)}, "cell contain NaN"),
        ({"forces": np.zeros((2, 3))}, r"forces have shape \(2, 3\)"),
        ({"forces": np.full((3, 3), math.nan)}, "forces contain NaN"),
        ({"energy": math.nan}, "energy is nan"),
        ({"energy": "low"}, "energy 'low' is not a number"),
        ({"pbc": (True, True, True)}, "need a cell"),
        ({"pbc": (True, False)}, "pbc must be three booleans"),
    ],
)
def test_bad_structures_are_rejected_with_a_clear_message(kwargs, message):
    arguments = {"positions": WATER, "species": ["O", "H", "H"], "name": "water"}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message) as error:
        Structure(**arguments)
    assert "water" in str(error.value)


def test_collate_flattens_structures():
    a = random_structure(1, 3)
    b = Structure(WATER, ["O", "H", "H"], energy=-14.2, forces=np.ones((3, 3)), name="w")
    batch = collate([a, b], dtype=torch.float32)
    assert batch.positions.shape == (6, 3) and batch.positions.dtype == torch.float32
    assert batch.structure_index.tolist() == [0, 0, 0, 1, 1, 1]
    assert batch.n_atoms.tolist() == [3, 3]
    assert batch.species == tuple(dict.fromkeys([*a.species, "O", "H"]))
    assert [batch.species[i] for i in batch.species_index.tolist()] == [
        *a.species,
        "O",
        "H",
        "H",
    ]
    assert batch.has_energy.tolist() == [False, True]
    assert batch.has_forces.tolist() == [False] * 3 + [True] * 3
    assert batch.pbc.tolist() == [[True] * 3, [False] * 3]
    assert bool((batch.cells[1] == 0).all())
    torch.testing.assert_close(batch.cells[0], a.cell.float())
    assert batch.names == ("random-1", "w")


def test_collate_respects_a_given_species_order():
    batch = collate([Structure(WATER, ["O", "H", "H"])], species=["H", "O"])
    assert batch.species == ("H", "O")
    assert batch.species_index.tolist() == [1, 0, 0]


def test_collate_rejects_species_outside_the_given_list():
    with pytest.raises(ValueError, match=r"contains species \['H'\] not in the species list"):
        collate([Structure(WATER, ["O", "H", "H"], name="w")], species=["O"])


def test_collate_rejects_empty_input_and_foreign_items():
    with pytest.raises(ValueError, match="no structures"):
        collate([])
    with pytest.raises(TypeError, match="item 0 is a dict"):
        collate([{"positions": WATER}])


def test_batch_is_a_pytree_whose_leaves_are_its_tensors():
    batch = collate([random_structure(2, 4), random_structure(3, 2)])
    leaves, spec = pytree.tree_flatten(batch)
    assert all(isinstance(leaf, torch.Tensor) for leaf in leaves)
    assert len(leaves) == 8
    doubled = pytree.tree_unflatten(
        [leaf * 2 if leaf.is_floating_point() else leaf for leaf in leaves], spec
    )
    assert isinstance(doubled, Batch) and doubled.species == batch.species
    torch.testing.assert_close(doubled.positions, batch.positions * 2)


def test_structure_and_params_are_pytrees():
    structure = random_structure(4, 2)
    leaves, _ = pytree.tree_flatten(structure)
    assert any(leaf is structure.positions for leaf in leaves)
    params = ChebyshevParams(
        species=["Ti"], rad_order=2, rad_cutoff=3.0, ang_order=1, ang_cutoff=3.0
    )
    assert pytree.tree_flatten(params)[0] == []


def test_vmap_maps_over_batch_tensors():
    batch = collate([random_structure(5, 3)])
    stacked = pytree.tree_map(lambda t: torch.stack([t, t]), batch)
    out = torch.func.vmap(lambda b: b.positions.sum(dim=0))(stacked)
    torch.testing.assert_close(out[0], batch.positions.sum(dim=0))


def test_records_are_frozen():
    structure = random_structure(6, 2)
    with pytest.raises(AttributeError):
        structure.energy = 1.0


def test_formula_counts_species_in_order_of_appearance():
    structure = Structure(np.zeros((4, 3)) + np.arange(4)[:, None], ["O", "Ti", "O", "Cu"])
    assert structure.formula == "O2TiCu"
    assert "O2TiCu" in repr(structure)
