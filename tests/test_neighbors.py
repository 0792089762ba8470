"""The neighbour list against ASE's, on random triclinic, thin, partially periodic, isolated
structures and atoms outside the cell."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.neighborlist import neighbor_list as ase_neighbor_list
from hypothesis import given
from hypothesis import strategies as st

from aenet_fn import batch_neighbor_list, collate, neighbor_list, pair_vectors
from aenet_fn.core import neighbors as neighbors_module
from tests.conftest import random_structure

BOUNDARY = 1e-9  # pairs this close to the cutoff are left out of set comparisons


def _entries(i, j, shifts, distances, cutoff):
    keep = np.asarray(distances) < cutoff - BOUNDARY
    return {
        (int(a), int(b), tuple(int(x) for x in s))
        for a, b, s, k in zip(i, j, np.asarray(shifts), keep)
        if k
    }


def _ase_entries(structure, cutoff):
    cell = np.zeros((3, 3)) if structure.cell is None else structure.cell.numpy()
    atoms = Atoms(
        structure.species, positions=structure.positions.numpy(), cell=cell, pbc=structure.pbc
    )
    i, j, shifts, d = ase_neighbor_list("ijSd", atoms, cutoff)
    return _entries(i, j, shifts, d, cutoff)


def _our_entries(structure, cutoff):
    found = neighbor_list(structure.positions, structure.cell, structure.pbc, cutoff)
    batch = collate([structure])
    d = pair_vectors(batch.positions, batch.cells, batch.structure_index, found).norm(dim=1)
    assert bool((d <= cutoff + 1e-12).all()), "an entry lies beyond the cutoff"
    return _entries(found.centers, found.neighbors, found.shifts, d, cutoff)


def _assert_same_as_ase(structure, cutoff):
    ours, theirs = _our_entries(structure, cutoff), _ase_entries(structure, cutoff)
    assert ours == theirs, (len(ours - theirs), len(theirs - ours))


@given(
    seed=st.integers(0, 10**6),
    n_atoms=st.integers(1, 8),
    cutoff=st.floats(1.0, 7.0),
    outside=st.sampled_from([0.0, 1.5]),
)
def test_triclinic_cells_match_ase(seed, n_atoms, cutoff, outside):
    _assert_same_as_ase(random_structure(seed, n_atoms, outside=outside), cutoff)


@given(
    seed=st.integers(0, 10**6),
    n_atoms=st.integers(1, 6),
    pbc=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    outside=st.sampled_from([0.0, 2.0]),
)
def test_partial_pbc_matches_ase(seed, n_atoms, pbc, outside):
    _assert_same_as_ase(random_structure(seed, n_atoms, pbc=pbc, outside=outside), 5.0)


@given(seed=st.integers(0, 10**6), thin_axis=st.integers(0, 2), width=st.floats(0.6, 2.0))
def test_cells_thinner_than_cutoff_match_ase(seed, thin_axis, width):
    structure = random_structure(seed, 3, min_distance=0.3)
    cell = structure.cell.clone()
    cell[thin_axis] *= width / float(cell[thin_axis].norm())
    frac = torch.linalg.solve(structure.cell.T, structure.positions.T).T
    thin = type(structure)(frac @ cell, structure.species, cell=cell)
    _assert_same_as_ase(thin, 5.5)


@given(seed=st.integers(0, 10**6), n_atoms=st.integers(1, 12), cutoff=st.floats(1.0, 6.0))
def test_isolated_molecules_match_ase(seed, n_atoms, cutoff):
    _assert_same_as_ase(random_structure(seed, n_atoms, periodic=False), cutoff)


@given(seed=st.integers(0, 10**6), n_atoms=st.integers(1, 8), far=st.floats(200.0, 5000.0))
def test_molecule_with_a_distant_atom_matches_ase(seed, n_atoms, far):
    """A stray atom far away makes the bin grid sparse: bins are then found by binary search."""
    molecule = random_structure(seed, n_atoms, periodic=False)
    positions = torch.cat([molecule.positions, torch.tensor([[far, -far / 3, far / 7]])])
    stray = type(molecule)(positions, [*molecule.species, molecule.species[0]])
    _assert_same_as_ase(stray, 4.0)


@given(seed=st.integers(0, 10**6), n_atoms=st.integers(1, 8), cutoff=st.floats(1.0, 6.0))
def test_binary_search_and_dense_bin_table_agree(seed, n_atoms, cutoff):
    structure = random_structure(seed, n_atoms, outside=1.0)
    dense = neighbor_list(structure.positions, structure.cell, None, cutoff)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(neighbors_module, "_DENSE_BINS_PER_POINT", 0)
        patch.setattr(neighbors_module, "_DENSE_BINS_MIN", 0)
        searched = neighbor_list(structure.positions, structure.cell, None, cutoff)
    for field in ("centers", "neighbors", "shifts"):
        assert torch.equal(getattr(dense, field), getattr(searched, field))


def test_atoms_spread_too_far_for_binning_are_reported():
    positions = torch.tensor([[0.0, 0.0, 0.0], [1e19, 1e19, 1e19]], dtype=torch.float64)
    with pytest.raises(ValueError, match="too large a region"):
        neighbor_list(positions, None, None, 3.0)


def test_self_images_are_neighbours():
    one_atom = random_structure(1, 1)
    found = neighbor_list(one_atom.positions, one_atom.cell, None, 8.0)
    assert len(found) > 0
    assert bool((found.centers == 0).all() and (found.neighbors == 0).all())
    assert bool(found.shifts.abs().sum(dim=1).gt(0).all()), "(i, i, 0) must be excluded"


def test_full_list_has_both_directions():
    structure = random_structure(7, 6)
    found = neighbor_list(structure.positions, structure.cell, None, 4.0)
    forward = {
        (int(i), int(j), tuple(s.tolist()))
        for i, j, s in zip(found.centers, found.neighbors, found.shifts)
    }
    backward = {(j, i, tuple(-x for x in s)) for i, j, s in forward}
    assert forward == backward


def test_batched_list_equals_lists_of_each_structure():
    structures = [
        random_structure(3, 5),
        random_structure(4, 2, periodic=False),
        random_structure(5, 7, pbc=(True, False, True), outside=1.0),
    ]
    batch = collate(structures)
    found = batch_neighbor_list(batch.positions, batch.cells, batch.pbc, batch.structure_index, 4.5)
    offset = 0
    for b, structure in enumerate(structures):
        mine = batch.structure_index[found.centers] == b
        together = {
            (int(i) - offset, int(j) - offset, tuple(s.tolist()))
            for i, j, s in zip(found.centers[mine], found.neighbors[mine], found.shifts[mine])
        }
        alone = neighbor_list(structure.positions, structure.cell, structure.pbc, 4.5)
        assert together == {
            (int(i), int(j), tuple(s.tolist()))
            for i, j, s in zip(alone.centers, alone.neighbors, alone.shifts)
        }
        offset += structure.n_atoms


def test_result_is_sorted_by_centre():
    structure = random_structure(11, 8)
    found = neighbor_list(structure.positions, structure.cell, None, 5.0)
    assert bool((found.centers[1:] >= found.centers[:-1]).all())


def test_overlapping_atoms_are_reported():
    positions = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match=r"atoms 1 and 2 .* overlap"):
        neighbor_list(positions, None, None, 3.0)


def test_overlap_with_a_periodic_image_is_reported():
    cell = torch.eye(3) * 4.0
    positions = torch.tensor([[0.0, 0.0, 0.0], [4.0, 0.0, 0.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="overlap"):
        neighbor_list(positions, cell, None, 3.0)


@pytest.mark.parametrize("cutoff", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_cutoff_is_rejected(cutoff):
    with pytest.raises(ValueError, match="cutoff"):
        neighbor_list(torch.zeros(2, 3) + torch.tensor([[0.0], [1.0]]), None, None, cutoff)


def test_nan_positions_are_rejected():
    with pytest.raises(ValueError, match="NaN"):
        neighbor_list(torch.tensor([[0.0, 0.0, float("nan")]]), None, None, 3.0)


def test_periodic_without_cell_is_rejected():
    with pytest.raises(ValueError, match="need a cell"):
        neighbor_list(torch.zeros(1, 3), None, (True, True, True), 3.0)


@given(seed=st.integers(0, 10_000), n_atoms=st.integers(2, 30), cutoff=st.floats(2.0, 6.0))
def test_a_search_split_for_its_candidates_finds_the_same_pairs(seed, n_atoms, cutoff):
    """Chunks of centres with too many candidate pairs are searched in halves, down to single
    atoms: the same neighbour list, entry for entry."""
    structure = random_structure(seed, n_atoms, periodic=seed % 2 == 0)
    batch = collate([structure])
    args = (batch.positions, batch.cells, batch.pbc, batch.structure_index, cutoff)
    whole = batch_neighbor_list(*args)
    limit, split = 1, None
    with pytest.MonkeyPatch.context() as patch:
        while split is None:  # the smallest power of two no single atom exceeds
            patch.setattr(neighbors_module, "_CANDIDATES_PER_CHUNK", limit)
            try:
                split = batch_neighbor_list(*args)
            except ValueError as error:
                assert "atoms in the bins around it" in str(error)
                limit *= 2
    for field in ("centers", "neighbors", "shifts"):
        assert torch.equal(getattr(split, field), getattr(whole, field))


def test_absurd_neighbour_counts_are_refused_with_their_numbers(monkeypatch):
    """More entries than ``MAX_PAIRS``, or one atom with more candidates than a search step
    holds, is refused before more is allocated, naming the counts; at the limit it passes."""
    structure = random_structure(3, 12, periodic=True)
    batch = collate([structure])
    args = (batch.positions, batch.cells, batch.pbc, batch.structure_index, 5.0)
    entries = len(batch_neighbor_list(*args))
    monkeypatch.setattr(neighbors_module, "MAX_PAIRS", entries)
    assert len(batch_neighbor_list(*args)) == entries
    monkeypatch.setattr(neighbors_module, "MAX_PAIRS", entries - 1)
    with pytest.raises(
        ValueError,
        match=rf"more than {entries - 1} neighbour entries .*\({entries} for the first 12 of 12",
    ):
        batch_neighbor_list(*args)
    monkeypatch.setattr(neighbors_module, "_CANDIDATES_PER_CHUNK", 1)
    with pytest.raises(ValueError, match=r"atom \d+ \(structure 0\) has \d+ atoms in the bins"):
        batch_neighbor_list(*args)
