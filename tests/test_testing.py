"""aenet_fn.testing: its strategies draw valid structures, its checks pass ASE's EMT and fail
deliberately broken calculators at the right check, and CI runs the same examples every time."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT
from ase.neighborlist import neighbor_list
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from aenet_fn import Structure
from aenet_fn.examples import TIO2_STRUCTURES
from aenet_fn.io import read_structures
from aenet_fn.io.ase_io import to_ase
from aenet_fn.testing import (
    PERIODICITIES,
    Evaluation,
    as_evaluator,
    check_energy_conservation,
    check_extensivity,
    check_forces,
    check_permutation_invariance,
    check_rewrapping_invariance,
    check_rotation_invariance,
    check_stress,
    check_translation_invariance,
    lattice_shifts,
    permutations_of,
    random_structure,
    rotations,
    strains,
    structures,
    supercells,
    transforms,
    translations,
)
from aenet_fn.testing.construction import plane_widths, rotation
from aenet_fn.torch_featurize import ChebyshevDescriptor
from aenet_fn.torch_training import TorchANNPotential, TorchCommitteePotential
from tests.conftest import facade_config
from tests.markdown_examples import ROOT

METALS = ("Cu", "Ni", "Au")
"""Species ASE's EMT knows."""


def _clear_of_emt_jumps(structure, margin: float = 1e-3) -> bool:
    """Whether no pair of atoms lies within ``margin`` Å of ASE's EMT neighbour-list radius.
    EMT's energy jumps there (its cutoff function is 1e-4, not 0, at that radius), so finite
    differences across it are not derivatives: exploring with 2000 examples found a strained
    Cu3 cell with a pair at 5.8768 Å, where the checks rightly reported EMT's stress as no
    strain derivative. The derivative checks of EMT stay clear of it."""
    calculator = EMT()
    atoms = to_ase(structure)
    atoms.calc = calculator
    atoms.get_potential_energy()
    distances = neighbor_list("d", atoms, calculator.rc_list + 2 * margin, self_interaction=False)
    return not bool((np.abs(distances - calculator.rc_list) < margin).any())


def _smallest_distance(structure) -> float:
    """The smallest distance between two atoms, periodic images included (ASE's search)."""
    atoms = to_ase(structure)
    distances = neighbor_list("d", atoms, 10.0, self_interaction=False)
    return float(distances.min()) if len(distances) else np.inf


@pytest.mark.parametrize("periodicity", sorted(PERIODICITIES))
@settings(suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), min_distance=st.floats(0.7, 2.5))
def test_drawn_structures_keep_their_minimum_distance(periodicity, data, min_distance):
    structure = data.draw(
        structures(species=METALS, max_atoms=10, periodicity=periodicity, min_distance=min_distance)
    )
    assert structure.pbc == PERIODICITIES[periodicity]
    assert 1 <= structure.n_atoms <= 10
    assert set(structure.species) <= set(METALS)
    assert _smallest_distance(structure) >= min_distance * (1 - 1e-12)
    if any(structure.pbc):  # a periodic axis is at least as wide as the minimum distance
        widths = plane_widths(structure.cell.numpy())
        assert (widths[list(structure.pbc)] >= min_distance * (1 - 1e-12)).all()


def test_deterministic_structures_keep_their_minimum_distance():
    for seed in range(20):
        for periodicity in PERIODICITIES:
            structure = random_structure(seed, 1 + seed % 9, periodicity=periodicity)
            assert _smallest_distance(structure) >= 1.0 * (1 - 1e-12)
    again = random_structure(7, 5)
    assert torch.equal(again.positions, random_structure(7, 5).positions)


# ---------------------------------------------------------------- EMT passes every check

emt_structures = structures(species=METALS, max_atoms=6, min_distance=2.0)


@given(structure=emt_structures, rotation=rotations(improper=True), shift=translations())
def test_emt_is_invariant_under_rotations_and_translations(structure, rotation, shift):
    check_rotation_invariance(EMT(), structure, rotation)
    check_translation_invariance(EMT(), structure, shift)


@given(data=st.data(), structure=emt_structures)
def test_emt_is_invariant_under_permutations_and_rewrapping(data, structure):
    check_permutation_invariance(EMT(), structure, data.draw(permutations_of(structure)))
    check_rewrapping_invariance(EMT(), structure, data.draw(lattice_shifts(structure.n_atoms)))


@given(data=st.data(), structure=structures(species=METALS, max_atoms=4, periodicity="bulk"))
def test_emt_is_extensive(data, structure):
    check_extensivity(EMT(), structure, data.draw(supercells(structure.pbc)))


@given(structure=emt_structures)
def test_emt_forces_and_stress_are_derivatives(structure):
    assume(_clear_of_emt_jumps(structure))
    check_forces(EMT(), structure)
    if all(structure.pbc):
        check_stress(EMT(), structure)


@given(
    structure=structures(species=METALS, max_atoms=4, periodicity="bulk", min_distance=2.0),
    strain=strains(),
)
def test_strained_cells_keep_their_stress_a_derivative(structure, strain):
    assert np.allclose(strain, strain.T) and np.abs(strain).max() <= 0.03
    strained = transforms.strain(structure, strain)
    volume = abs(np.linalg.det(structure.cell.numpy()))
    expected = volume * np.linalg.det(np.eye(3) + strain)
    assert abs(np.linalg.det(strained.cell.numpy())) == pytest.approx(expected, rel=1e-12)
    assume(_clear_of_emt_jumps(strained))
    check_stress(EMT(), strained)


def test_the_emt_filter_rejects_the_cell_exploration_found():
    """The strained Cu3 cell found by exploration (a pair at EMT's neighbour-list radius) is
    kept out of EMT's derivative checks; the same cell squeezed by 1 % is not."""
    positions = [[-1.4214, 4.7801, -2.5042], [-0.9150, 9.1267, -3.8329], [-1.0412, 5.4548, -7.6659]]
    cell = [[-12.2509, 0.0, 0.0], [1.0006, 10.2212, 0.0], [1.0006, 3.8659, -10.2212]]
    found = Structure(np.array(positions), ("Cu",) * 3, cell=np.array(cell))
    strain = np.array(
        [[0.0, -0.00613827, 0.01953125], [-0.00613827, -0.03, 0.0], [0.01953125, 0.0, 0.02066498]]
    )
    strained = transforms.strain(found, strain)
    assert not _clear_of_emt_jumps(strained)
    assert _clear_of_emt_jumps(transforms.strain(strained, -0.01 * np.eye(3)))


def test_emt_conserves_energy():
    structure = random_structure(1, 8, species=METALS, min_distance=2.2)
    check_energy_conservation(EMT(), structure, steps=40)


# ---------------------------------------------------------------- broken calculators fail


class Broken(EMT):
    """EMT with one deliberate fault (``fault``: what to change in the results)."""

    def __init__(self, fault: str, strength: float = 0.01):
        super().__init__()
        self.fault, self.strength = fault, strength

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):
        super().calculate(atoms, properties, system_changes)
        results, positions, c = self.results, self.atoms.positions, self.strength
        if self.fault == "scaled forces":
            results["forces"] = results["forces"] * (1 + c)
        elif self.fault == "absolute position":  # consistent forces: E + c Σ x
            results["energy"] += c * positions[:, 0].sum()
            results["forces"] = results["forces"] - [c, 0.0, 0.0]
        elif self.fault == "direction":  # translation-invariant, not rotation-invariant
            spread = positions[:, 0] - positions[:, 0].mean()
            results["energy"] += c * (spread**2).sum()
            results["forces"] = results["forces"] - np.outer(2 * c * spread, [1.0, 0.0, 0.0])
        elif self.fault == "first atom":  # E + c |r_0 - r_1|: depends on the order
            r = positions[0] - positions[1]
            results["energy"] += c * np.linalg.norm(r)
            forces = results["forces"].copy()
            forces[0] -= c * r / np.linalg.norm(r)
            forces[1] += c * r / np.linalg.norm(r)
            results["forces"] = forces
        elif self.fault == "not extensive":
            results["energy"] += c * len(atoms) ** 2
        elif self.fault == "scaled stress":
            results["stress"] = results["stress"] * (1 + c)
        elif self.fault == "pushed":  # a force no energy belongs to
            results["forces"] = results["forces"] + [c, 0.0, 0.0]


BULK = random_structure(5, 6, species=METALS, min_distance=2.2)


@pytest.mark.parametrize(
    ("fault", "failing", "passing"),
    [
        ("scaled forces", check_forces, check_rotation_invariance),
        ("absolute position", check_translation_invariance, check_forces),
        ("absolute position", check_rewrapping_invariance, check_permutation_invariance),
        ("direction", check_rotation_invariance, check_translation_invariance),
        ("direction", check_rotation_invariance, check_forces),
        ("first atom", check_permutation_invariance, check_forces),
        ("first atom", check_permutation_invariance, check_rotation_invariance),
        ("not extensive", check_extensivity, check_forces),
        ("scaled stress", check_stress, check_forces),
        ("pushed", check_energy_conservation, check_translation_invariance),
    ],
)
def test_a_broken_calculator_fails_the_right_check(fault, failing, passing):
    calculator = Broken(fault, strength=0.2 if fault == "pushed" else 0.01)
    arguments = {
        check_rotation_invariance: (rotation((0.3, 0.6, 0.2), improper=True),),
        check_translation_invariance: ([1.5, -2.0, 0.7],),
        check_permutation_invariance: (list(range(BULK.n_atoms))[::-1],),
        check_rewrapping_invariance: (np.arange(3 * BULK.n_atoms).reshape(-1, 3) % 3 - 1,),
        check_extensivity: ((2, 1, 1),),
    }
    passing(calculator, BULK, *arguments.get(passing, ()))
    with pytest.raises(AssertionError, match="fails for random-5") as failure:
        failing(calculator, BULK, *arguments.get(failing, ()))
    assert "expected" in str(failure.value) or "moved by" in str(failure.value)


def test_the_message_names_the_worst_atom_and_component():
    structure = random_structure(2, 4, species=METALS, min_distance=2.2)

    def energy_and_forces(s):  # EMT with one wrong force component: atom 2, z
        atoms = to_ase(s)
        atoms.calc = EMT()
        forces = atoms.get_forces()
        forces[2, 2] += 0.5
        return {"energy": atoms.get_potential_energy(), "forces": forces}

    expected = rf"forces at atom 2 \({structure.species[2]}\), z: got"
    with pytest.raises(AssertionError, match=expected):
        check_forces(energy_and_forces, structure)


def test_checks_refuse_a_potential_without_the_quantity():
    structure = random_structure(2, 3, species=METALS, min_distance=2.2)
    with pytest.raises(ValueError, match="gives no forces"):
        check_forces(lambda s: 0.0, structure)
    molecule = random_structure(2, 3, species=METALS, periodicity="molecule", min_distance=2.2)
    with pytest.raises(ValueError, match="gives no stress"):
        check_stress(EMT(), molecule)
    with pytest.raises(TypeError, match="a potential must be"):
        check_forces(42, structure)


# ---------------------------------------------------------------- aenet_fn's facade potentials


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two briefly trained TiO2 potentials: the first, a committee of both, and its file."""
    data = read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf"))[:6])
    descriptor = ChebyshevDescriptor(["Ti", "O"], 4, 4.0, 2, 3.0, min_cutoff=0.5)
    folder = tmp_path_factory.mktemp("potentials")
    potentials = []
    for seed in (1, 2):
        potential = TorchANNPotential({"Ti": [(5, "tanh")], "O": [(5, "tanh")]}, descriptor)
        potential.train(structures=data, config=facade_config(seed=seed))
        potential.save(folder / f"member-{seed}.pt")
        potentials.append(potential)
    committee = TorchCommitteePotential.from_files(sorted(folder.glob("*.pt")))
    return {"potential": potentials[0], "committee": committee, "file": folder / "member-1.pt"}


@pytest.mark.parametrize("kind", ["potential", "committee", "file"])
def test_facade_potentials_pass_the_checks(trained, kind):
    structure = random_structure(4, 5, species=("Ti", "O"), min_distance=1.5)
    potential = trained[kind]
    check_rotation_invariance(potential, structure, rotation((0.1, 0.7, 0.4), improper=True))
    check_forces(potential, structure)
    check_stress(potential, structure)


def test_a_committee_is_checked_on_its_mean(trained):
    """The committee's forces are the members' mean: a member's own forces fail against it."""
    structure = random_structure(4, 5, species=("Ti", "O"), min_distance=1.5)
    committee, member = as_evaluator(trained["committee"]), as_evaluator(trained["potential"])

    def mixed(s):  # the committee's energy with the first member's forces
        return Evaluation(committee(s).energy, member(s).forces)

    with pytest.raises(AssertionError, match="forces at atom"):
        check_forces(mixed, structure)


# ---------------------------------------------------------------- CI runs the same examples


_RECORD_EXAMPLES = """
import hashlib

import tests.conftest  # loads the profile as a test run does
from hypothesis import given, settings

from aenet_fn.testing import structures

for run in range(2):
    seen = []

    @settings(max_examples=15)
    @given(structures(max_atoms=4))
    def record(structure):
        seen.append(structure.positions.numpy().tobytes())

    record()
    print(len(set(seen)), hashlib.sha256(b"".join(seen)).hexdigest())
"""


def _examples_of_a_fresh_process(on_ci: bool) -> list[str]:
    """The number and digest of the examples of two runs of one test in one fresh process,
    with the tests' settings."""
    environment = {k: v for k, v in os.environ.items() if k not in ("CI", "HYPOTHESIS_PROFILE")}
    if on_ci:
        environment["CI"] = "true"
    environment["PYTHONPATH"] = str(ROOT)
    run = subprocess.run(
        [sys.executable, "-c", _RECORD_EXAMPLES],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    )
    return run.stdout.strip().splitlines()


@pytest.mark.slow
def test_ci_runs_draw_the_same_examples_every_time():
    first, second = (_examples_of_a_fresh_process(on_ci=True) for _ in range(2))
    assert first[0] == first[1] == second[0] == second[1] and int(first[0].split()[0]) > 5
    # elsewhere every run draws new examples: what CI=true prevents
    elsewhere = _examples_of_a_fresh_process(on_ci=False)
    assert elsewhere[0] != elsewhere[1]


def test_the_checks_need_no_hypothesis_and_the_strategies_say_how_to_get_it():
    """Without hypothesis installed (simulated), the checks import and the strategies raise an
    ImportError naming the extra to install."""
    script = (
        "import sys\n"
        "sys.modules['hypothesis'] = None\n"
        "import aenet_fn.testing as t\n"
        "assert callable(t.check_forces) and callable(t.random_structure)\n"
        "try:\n"
        "    t.structures\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert "pip install 'aenet_fn[testing]'" in run.stdout
