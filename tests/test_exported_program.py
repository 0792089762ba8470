"""A trained potential as a ``torch.export`` program: the neighbour-list descriptor it runs
(moments instead of triplets) against the core's, and the saved program, loaded by plain torch
in a process that cannot import aenet_fn, against ``energy_forces_stress``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from fractions import Fraction

import numpy as np
import pytest
import torch
from ase.neighborlist import neighbor_list as ase_neighbor_list
from hypothesis import given, settings
from hypothesis import strategies as st

import aenet_fn as af
from aenet_fn.cli import main
from aenet_fn.core.descriptor import build_graph, features_from_graph
from aenet_fn.core.pair_descriptor import (
    addition_harmonics,
    chebyshev_in_legendre,
    harmonic_degrees,
    pair_features,
)
from aenet_fn.examples import TIO2_POTENTIAL, TIO2_STRUCTURES
from aenet_fn.io import to_ase
from aenet_fn.io.program import METADATA_FILE, PROGRAM_FORMAT
from aenet_fn.testing import structures
from aenet_fn.torch_training import TorchANNPotential
from tests.conftest import random_structure

LOADER = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class NoAenetFn(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "aenet_fn":
                raise ImportError("the exported program must not need aenet_fn")

    sys.meta_path.insert(0, NoAenetFn())
    import torch

    extra = {"aenet_fn.json": ""}
    program = torch.export.load(sys.argv[1], extra_files=extra).module()
    cases = torch.load(sys.argv[2])
    torch.save([program(*case) for case in cases], sys.argv[3])
    print(extra["aenet_fn.json"])
    """
)


def _species_index(structure: af.Structure, species: tuple[str, ...]) -> torch.Tensor:
    return torch.tensor([species.index(s) for s in structure.species])


def _program_inputs(structure: af.Structure, species, cutoff: float, dtype=torch.float64):
    """The program's inputs for ``structure``, its neighbour list from ASE (not aenet_fn)."""
    atoms = to_ase(structure)
    first, second, shifts = ase_neighbor_list("ijS", atoms, cutoff)
    cell = structure.cell if structure.cell is not None else torch.zeros(3, 3)
    return (
        torch.as_tensor(structure.positions, dtype=dtype),
        torch.as_tensor(cell, dtype=dtype),
        _species_index(structure, species),
        torch.as_tensor(first, dtype=torch.long),
        torch.as_tensor(second, dtype=torch.long),
        torch.as_tensor(shifts, dtype=torch.long),
    )


def _run_elsewhere(program_path, cases, tmp_path):
    """The program's outputs for ``cases``, computed by a fresh Python that refuses to import
    aenet_fn; and the metadata it read."""
    inputs, outputs = tmp_path / "cases.pt", tmp_path / "outputs.pt"
    torch.save(cases, inputs)
    done = subprocess.run(
        [sys.executable, "-c", LOADER, str(program_path), str(inputs), str(outputs)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(outputs), json.loads(done.stdout)


def _reference(model: af.Model, structure: af.Structure):
    batch = af.collate([structure], species=model.descriptor.species)
    return af.energy_forces_stress(model, batch, compute_stress=True)


@pytest.fixture(scope="module")
def tio2():
    model = af.read_aenet_ascii(TIO2_POTENTIAL)
    structures = af.read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf"))[:2])
    molecule = random_structure(3, 5, periodic=False)
    lone = af.Structure(
        positions=np.zeros((1, 3)), species=["O"], cell=np.eye(3) * 3.1, pbc=(True,) * 3
    )
    return model, [*structures, molecule, lone]


def test_chebyshev_polynomials_in_the_legendre_basis():
    x = np.linspace(-1, 1, 41)
    for n, row in enumerate(chebyshev_in_legendre(7)):
        assert all(isinstance(b, Fraction) for b in row)
        expected = np.polynomial.chebyshev.chebval(x, [0] * n + [1])
        np.testing.assert_allclose(
            np.polynomial.legendre.legval(x, [float(b) for b in row]), expected, atol=1e-13
        )


@given(st.integers(0, 2**32 - 1), st.integers(0, 7))
def test_the_harmonics_obey_the_addition_theorem(seed, order):
    """``Σ_{columns of degree l} h(u) h(v) = P_l(u·v)`` for random unit vectors."""
    vectors = torch.randn(
        2, 16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )
    u, v = (w / w.norm(dim=1, keepdim=True) for w in vectors)
    products = addition_harmonics(u, order) * addition_harmonics(v, order)
    degrees = torch.tensor(harmonic_degrees(order))
    for degree in range(order + 1):
        expected = np.polynomial.legendre.legval((u * v).sum(1).numpy(), [0] * degree + [1])
        found = products[:, degrees == degree].sum(1).numpy()
        np.testing.assert_allclose(found, expected, atol=1e-13)


def _both_forms(params: af.ChebyshevParams, structure: af.Structure, margin: float):
    """``structure``'s positions and its features as functions of them, by the triplet form
    and by the moment form (a neighbour list ``margin`` Å beyond the cutoff)."""
    batch = af.collate([structure], species=params.species)
    graph = build_graph(params, batch)
    cell = batch.cells[0]
    pairs = af.neighbor_list(batch.positions, cell, batch.pbc[0], params.cutoff + margin)

    def triplet_form(positions):
        return features_from_graph(params, positions, batch.cells, batch.structure_index, graph)

    def moment_form(positions):
        return pair_features(params, positions, cell, graph.species, pairs)

    return batch.positions, triplet_form, moment_form


descriptors = st.builds(
    af.ChebyshevParams,
    species=st.sampled_from([("Ti", "O"), ("O",), ("Ti", "O", "H")]),
    rad_order=st.integers(0, 8),
    rad_cutoff=st.floats(2.0, 4.5),
    ang_order=st.integers(0, 7),
    ang_cutoff=st.floats(2.0, 4.5),
    min_cutoff=st.floats(0.0, 0.9),
)


@settings(deadline=None, max_examples=40)
@given(descriptors, st.data(), st.floats(0.0, 2.0))
def test_neighbour_list_features_equal_the_triplet_features(params, data, margin):
    """The moment form gives the core's features and position derivatives on any structure,
    from a neighbour list of any radius beyond the cutoff."""
    structure = data.draw(structures(species=params.species, max_atoms=6))
    positions, triplet_form, moment_form = _both_forms(params, structure, margin)
    expected, found = triplet_form(positions), moment_form(positions)
    scale = max(float(expected.abs().max()), 1.0)
    torch.testing.assert_close(found, expected, rtol=0, atol=1e-12 * scale)
    jacobians = [torch.func.jacrev(f)(positions) for f in (triplet_form, moment_form)]
    scale = max(float(jacobians[0].abs().max()), 1.0)
    torch.testing.assert_close(jacobians[1], jacobians[0], rtol=0, atol=1e-12 * scale)


def test_collinear_triplets_keep_their_exact_position_derivatives(tio2):
    """Rutile's symmetric sites have neighbours exactly opposite (``cos θ`` rounds just past −1):
    the triplet form once clamped the cosine there and lost those triplets' derivatives
    (8e-8 against derivatives of order 1); the moment form has no cosine to clamp."""
    model, (_, rutile, *_) = tio2
    params = model.descriptor
    positions, triplet_form, moment_form = _both_forms(params, rutile, 0.0)
    cotangents = torch.randn(4, positions.shape[0], params.n_features, dtype=torch.float64)

    for cotangent in cotangents:  # vector-Jacobian products: gradients of random feature sums
        found, expected = (
            torch.func.grad(lambda p, f=form, w=cotangent: (f(p) * w).sum())(positions)
            for form in (moment_form, triplet_form)
        )
        torch.testing.assert_close(found, expected, rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def tio2_program(tio2, tmp_path_factory):
    model = tio2[0]
    potential = TorchANNPotential.from_aenet_ascii(TIO2_POTENTIAL)
    path = tmp_path_factory.mktemp("program") / "tio2.pt2"
    assert potential.save_program(path) == path
    return model, path


def test_the_exported_program_runs_without_aenet_fn_and_gives_the_same_numbers(
    tio2, tio2_program, tmp_path
):
    """Plain torch runs the saved program on structures of 23, 46, 5 (a molecule) and 1
    atoms (dynamic sizes) with ASE's neighbour lists: energies, forces and stresses equal
    ``energy_forces_stress`` to 1e-10 in float64."""
    model, path = tio2_program
    species = model.descriptor.species
    structures = tio2[1]
    cases = [_program_inputs(s, species, model.descriptor.cutoff + 0.3) for s in structures]
    outputs, metadata = _run_elsewhere(path, cases, tmp_path)
    assert metadata["format"] == PROGRAM_FORMAT
    assert metadata["species"] == list(species)
    assert metadata["cutoff"] == model.descriptor.cutoff
    assert metadata["dtype"] == "float64"
    for structure, (energy, forces, stress) in zip(structures, outputs, strict=True):
        expected = _reference(model, structure)
        assert energy.dtype == torch.float64 and energy.shape == ()
        torch.testing.assert_close(energy, expected.energy[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(forces, expected.forces, rtol=0, atol=1e-10)
        if structure.cell is None:
            assert torch.isnan(stress).all()
        else:
            torch.testing.assert_close(stress, expected.stress[0], rtol=0, atol=1e-12)


def test_the_exported_program_is_equivariant(tio2_program):
    """Rotating a structure rotates the program's forces and stress and keeps its energy."""
    model, path = tio2_program
    program = torch.export.load(path).module()
    structure = af.read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf"))[0])[0]
    species = model.descriptor.species
    inputs = _program_inputs(structure, species, model.descriptor.cutoff)
    rotation = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]
    turned = (inputs[0] @ rotation.T, inputs[1] @ rotation.T, *inputs[2:])
    (e0, f0, s0), (e1, f1, s1) = program(*inputs), program(*turned)
    torch.testing.assert_close(e1, e0, rtol=1e-13, atol=0)
    torch.testing.assert_close(f1, f0 @ rotation.T, rtol=0, atol=1e-10)
    torch.testing.assert_close(s1, rotation @ s0 @ rotation.T, rtol=0, atol=1e-12)


def test_the_cli_exports_a_float32_program_with_float64_energies(tio2, tmp_path):
    model, structures = tio2
    model_file = tmp_path / "model.pt"
    TorchANNPotential.from_aenet_ascii(TIO2_POTENTIAL).save(model_file)
    target = tmp_path / "tio2-f32.pt2"
    assert main(["export-program", str(model_file), str(target), "--dtype", "float32"]) == 0
    assert main(["export-program", str(model_file), str(target)]) == 1  # exists
    extra = {METADATA_FILE: ""}
    program = torch.export.load(target, extra_files=extra).module()
    assert json.loads(extra[METADATA_FILE])["dtype"] == "float32"
    structure = structures[1]
    energy, forces, stress = program(
        *_program_inputs(
            structure, model.descriptor.species, model.descriptor.cutoff, torch.float32
        )
    )
    # the core in float32 (float64 sums and reference energies): the same dtype policy
    single = af.to(model, dtype=torch.float32)
    batch = af.to(af.collate([structure], species=model.descriptor.species), dtype=torch.float32)
    expected = af.energy_forces_stress(single, batch, compute_stress=True)
    assert energy.dtype == torch.float64 and forces.dtype == torch.float32
    assert abs(float(energy - expected.energy[0])) / len(structure.species) < 1e-6
    torch.testing.assert_close(forces, expected.forces, rtol=0, atol=2e-5)
    torch.testing.assert_close(stress, expected.stress[0], rtol=0, atol=1e-6)
