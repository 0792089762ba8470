"""The Chebyshev descriptor against the Fortran reference features and physics invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from aenet_fn import ChebyshevParams, Structure, build_graph, collate, featurize
from aenet_fn.core.descriptor import (
    chebyshev_polynomials,
    cutoff_function,
    typespin_vector,
    typespin_weights,
)
from aenet_fn.examples import TIO2_STRUCTURES
from aenet_fn.io import read_structures
from aenet_fn.testing import (
    lattice_shifts,
    permutations_of,
    rotations,
    structures,
    supercells,
    transforms,
    translations,
)
from tests.conftest import random_structure

FORTRAN_CASES = {
    "water": ("water.xyz", ["O", "H"], 10, 4.0, 3, 1.5),
    "lmnto": ("lmnto_structure001.xsf", ["Li", "Mo", "Ni", "Ti", "O"], 10, 4.0, 3, 1.5),
    "aucu": ("aucu.xsf", ["Au", "Cu"], 5, 3.5, 5, 3.5),
}


def _fortran_case(reference_data, name, dtype=torch.float64):
    filename, species, rad_order, rad_cutoff, ang_order, ang_cutoff = FORTRAN_CASES[name]
    folder = reference_data / "fortran-features"
    (structure,) = read_structures(folder / filename)
    params = ChebyshevParams(
        species=species,
        rad_order=rad_order,
        rad_cutoff=rad_cutoff,
        ang_order=ang_order,
        ang_cutoff=ang_cutoff,
        min_cutoff=0.55,
    )
    reference = np.loadtxt(folder / f"{name}_ref.csv", delimiter=",")
    return featurize(params, collate([structure], dtype=dtype)), reference


@pytest.mark.parametrize("name", sorted(FORTRAN_CASES))
def test_features_equal_fortran_in_float64(reference_data, name):
    features, reference = _fortran_case(reference_data, name)
    assert features.dtype == torch.float64
    assert features.shape == reference.shape
    np.testing.assert_allclose(features.numpy(), reference, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", sorted(FORTRAN_CASES))
def test_features_in_float32_are_close_to_fortran(reference_data, name):
    features, reference = _fortran_case(reference_data, name, dtype=torch.float32)
    assert features.dtype == torch.float32
    error = np.abs(features.double().numpy() - reference)
    assert error.max() <= 1e-4 * np.abs(reference).max()


def test_species_order_is_part_of_the_descriptor(reference_data):
    (structure,) = read_structures(reference_data / "fortran-features" / "aucu.xsf")
    reference = np.loadtxt(reference_data / "fortran-features" / "aucu_ref.csv", delimiter=",")
    swapped = ChebyshevParams(
        species=["Cu", "Au"], rad_order=5, rad_cutoff=3.5, ang_order=5, ang_cutoff=3.5
    )
    assert np.abs(featurize(swapped, collate([structure])).numpy() - reference).max() > 0.1


@pytest.mark.parametrize(
    ("n", "expected"),
    [(1, (0,)), (2, (-1, 1)), (3, (-1, 0, 1)), (4, (-2, -1, 1, 2)), (5, (-2, -1, 0, 1, 2))],
)
def test_typespin_weights(n, expected):
    assert typespin_weights(n) == expected


@pytest.mark.parametrize("n", range(1, 9))
def test_typespin_vector_is_the_weights_on_the_device(n):
    like = torch.zeros(1, dtype=torch.float32)
    vector = typespin_vector(n, like)
    assert vector.dtype == torch.float32 and vector.tolist() == list(typespin_weights(n))


def test_typespin_weights_six_species():
    assert typespin_weights(6) == (-3, -2, -1, 1, 2, 3)


@pytest.mark.parametrize(
    ("species", "rad", "ang", "expected"),
    [
        (["Ti", "O"], 10, 3, 30),
        (["Li", "Mo", "O"], 8, 2, 24),
        (["Ti", "O"], 20, 6, 56),
        (["Cu"], 5, 5, 12),
    ],
)
def test_feature_count(species, rad, ang, expected):
    params = ChebyshevParams(
        species=species, rad_order=rad, rad_cutoff=4.0, ang_order=ang, ang_cutoff=3.0
    )
    assert params.n_features == expected
    structure = random_structure(0, 4, species=tuple(species))
    assert featurize(params, collate([structure])).shape == (4, expected)


@given(x=st.floats(-1.0, 1.0), order=st.integers(0, 12))
def test_chebyshev_recurrence_equals_cosine_form(x, order):
    values = chebyshev_polynomials(torch.tensor(x, dtype=torch.float64), order)
    expected = np.cos(np.arange(order + 1) * np.arccos(x))
    np.testing.assert_allclose(values.numpy(), expected, atol=1e-12)


def test_cutoff_function_is_zero_at_and_beyond_the_cutoff():
    d = torch.tensor([0.0, 1.0, 2.0, 2.5], dtype=torch.float64)
    values = cutoff_function(d, 2.0)
    np.testing.assert_allclose(values.numpy(), [1.0, 0.5, 0.0, 0.0], atol=1e-15)


# ---------------------------------------------------------------- invariants (hypothesis)

PARAMS = ChebyshevParams(
    species=["Ti", "O"], rad_order=8, rad_cutoff=4.5, ang_order=4, ang_cutoff=3.5, min_cutoff=0.5
)


def _features(structure):
    return featurize(PARAMS, collate([structure], species=PARAMS.species))


drawn = structures(species=("Ti", "O"), max_atoms=6, min_distance=0.8)


@given(structure=drawn, rotation=rotations(improper=True))
def test_rotations_and_reflections_keep_the_features(structure, rotation):
    rotated = transforms.rotate(structure, rotation)
    torch.testing.assert_close(_features(rotated), _features(structure), rtol=0, atol=1e-10)


@given(structure=drawn, shift=translations())
def test_translation_invariance(structure, shift):
    moved = transforms.translate(structure, shift)
    torch.testing.assert_close(_features(moved), _features(structure), rtol=0, atol=1e-10)


@given(structure=drawn, data=st.data())
def test_permutation_permutes_rows(structure, data):
    order = data.draw(permutations_of(structure))
    permuted = transforms.permute(structure, order)
    torch.testing.assert_close(_features(permuted), _features(structure)[order], rtol=0, atol=1e-10)


@given(structure=drawn, data=st.data())
def test_choice_of_periodic_image_does_not_matter(structure, data):
    shifts = data.draw(lattice_shifts(structure.n_atoms, max_images=3))
    unwrapped = transforms.shift_images(structure, shifts)
    torch.testing.assert_close(_features(unwrapped), _features(structure), rtol=0, atol=1e-10)


@given(
    structure=structures(species=("Ti", "O"), max_atoms=4, periodicity=["bulk", "slab"]),
    data=st.data(),
)
def test_supercell_has_the_features_of_the_primitive_cell(structure, data):
    repeats = data.draw(supercells(structure.pbc))
    supercell = transforms.repeat(structure, repeats)
    expected = _features(structure).repeat(int(np.prod(repeats)), 1)
    torch.testing.assert_close(_features(supercell), expected, rtol=0, atol=1e-9)


def test_batch_features_equal_single_structure_features():
    structures = [random_structure(s, 3 + s, periodic=s % 2 == 0) for s in range(5)]
    together = featurize(PARAMS, collate(structures, species=PARAMS.species))
    alone = torch.cat([_features(s) for s in structures])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-12)


def test_isolated_atom_has_zero_features():
    atom = Structure([[0.0, 0.0, 0.0]], ["Ti"])
    assert bool((_features(atom) == 0).all())


def test_single_species_has_no_weighted_half():
    params = ChebyshevParams(
        species=["Cu"], rad_order=4, rad_cutoff=4.0, ang_order=2, ang_cutoff=3.0
    )
    structure = random_structure(3, 4, species=("Cu",))
    assert featurize(params, collate([structure])).shape == (4, 8)


# ---------------------------------------------------------------- bad input


def test_species_unknown_to_the_descriptor_is_named():
    structure = random_structure(1, 3, species=("Ti", "Cu"))
    with pytest.raises(ValueError, match=r"\['Cu'\] are not in the descriptor's species"):
        featurize(PARAMS, collate([structure]))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"rad_order": -1}, "rad_order must be an integer >= 0"),
        ({"ang_order": 2.5}, "ang_order must be an integer >= 0"),
        ({"rad_cutoff": 0.0}, "rad_cutoff must be a positive number"),
        ({"ang_cutoff": float("nan")}, "ang_cutoff must be a positive number"),
        ({"rad_cutoff": float("inf")}, "rad_cutoff must be finite"),
        ({"min_cutoff": -0.1}, "min_cutoff must be a number >= 0"),
        ({"min_cutoff": 3.5}, "min_cutoff 3.5 must be below both cutoffs"),
        ({"species": []}, "at least one element"),
        ({"species": ["Ti", "Ti"]}, "listed twice"),
        ({"species": ["Ti", "Xx"]}, "not a chemical element symbol"),
        ({"species": ["Ti", " "]}, "blank"),
        ({"species": "TiO"}, "not the string"),
    ],
)
def test_invalid_descriptor_parameters(changes, message):
    arguments = dict(species=["Ti", "O"], rad_order=4, rad_cutoff=4.0, ang_order=2, ang_cutoff=3.5)
    arguments.update(changes)
    with pytest.raises(ValueError, match=message):
        ChebyshevParams(**arguments)


def test_chunked_featurization_equals_one_pass(monkeypatch):
    import aenet_fn.core.descriptor as descriptor

    structures = [random_structure(s, 6, periodic=s % 2 == 0) for s in range(4)]
    batch = collate(structures, species=PARAMS.species)
    whole = featurize(PARAMS, batch)
    monkeypatch.setattr(descriptor, "_PAIRS_PER_CHUNK", 7)
    chunked = featurize(PARAMS, batch)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-13)


def test_triplets_beyond_the_limit_are_refused_with_their_numbers(monkeypatch):
    """The triplets of a graph are counted before they are made: a graph that would hold more
    than ``MAX_TRIPLETS`` is refused naming the count and the most crowded atom; at the limit
    it is built, with exactly that many."""
    import aenet_fn.core.descriptor as descriptor_module

    params = ChebyshevParams(["Ti", "O"], 4, 4.0, 2, 3.0, min_cutoff=0.5)
    batch = collate(read_structures(TIO2_STRUCTURES / "structure-001.xsf"))
    triplets = build_graph(params, batch).triplet_first.numel()
    assert triplets > 10
    monkeypatch.setattr(descriptor_module, "MAX_TRIPLETS", triplets)
    assert build_graph(params, batch).triplet_first.numel() == triplets
    monkeypatch.setattr(descriptor_module, "MAX_TRIPLETS", triplets - 1)
    with pytest.raises(ValueError, match=rf"{triplets} angular triplets, more than .*atom \d+ has"):
        build_graph(params, batch)
