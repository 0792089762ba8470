"""The ASE calculator: agreement with the potentials and the core, finite differences of the
energy (forces and stress, with ASE's EMT as the sign reference), NVE molecular dynamics,
committee uncertainties, loading from files, caching and bad input."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.emt import EMT
from ase.md.velocitydistribution import Stationary
from ase.md.verlet import VelocityVerlet

import aenet_fn as af
import aenet_fn.calculator as calculator_module
from aenet_fn.calculator import COMMITTEE_PROPERTIES, AenetCalculator, thermalize_momenta
from aenet_fn.driver.committee import committee_predict
from aenet_fn.examples import TIO2_POTENTIAL, TIO2_STRUCTURES
from aenet_fn.io.ase_io import from_ase, to_ase
from aenet_fn.torch_featurize import ChebyshevDescriptor
from aenet_fn.torch_training import (
    Adam,
    TorchANNPotential,
    TorchCommitteeConfig,
    TorchCommitteePotential,
    TorchTrainingConfig,
)

E_ATOM = {"Ti": -1604.604515075, "O": -432.503149303}
VOIGT_PAIRS = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


@pytest.fixture(scope="module")
def fortran_model() -> af.Model:
    """The smooth, physical Fortran TiO2 potential (float64)."""
    nn = TIO2_POTENTIAL
    return af.read_aenet_ascii([nn / "Ti.nn.ascii", nn / "O.nn.ascii"])


@pytest.fixture(scope="module")
def committee_run(tmp_path_factory):
    """A tiny three-member committee trained for two epochs on TiO2, written to disk; returns
    the committee, its training result and a few periodic TiO2 structures as ASE atoms."""
    structures = af.read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf"))[:8])
    descriptor = ChebyshevDescriptor(["Ti", "O"], 4, 4.0, 2, 3.0, min_cutoff=0.5)
    committee = TorchCommitteePotential({"Ti": [(5, "tanh")], "O": [(5, "tanh")]}, descriptor)
    config = TorchTrainingConfig(
        iterations=2,
        method=Adam(mu=0.01, batchsize=4),
        testpercent=0,
        split_seed=7,
        force_weight=0.0,
        atomic_energies=E_ATOM,
        checkpoint_dir=None,
        show_progress=False,
    )
    output = tmp_path_factory.mktemp("calculator") / "committee_run"
    result = committee.train(
        structures=structures,
        config=config,
        committee_config=TorchCommitteeConfig(num_members=3, base_seed=11, output_dir=output),
    )
    return committee, result, [to_ase(s) for s in structures[:2]]


def rutile(repeat: tuple[int, int, int] = (1, 1, 1)) -> Atoms:
    """Ideal rutile TiO2 (6 atoms per cell, a = 4.594 Å, c = 2.959 Å, u = 0.305)."""
    a, c, u = 4.594, 2.959, 0.305
    fractional = [
        [0, 0, 0],
        [0.5, 0.5, 0.5],
        [u, u, 0],
        [1 - u, 1 - u, 0],
        [0.5 + u, 0.5 - u, 0.5],
        [0.5 - u, 0.5 + u, 0.5],
    ]
    return Atoms("Ti2O4", scaled_positions=fractional, cell=[a, a, c], pbc=True).repeat(repeat)


def distorted(atoms: Atoms, seed: int) -> Atoms:
    """``atoms`` with a sheared cell and rattled positions, so that every force and stress
    component is nonzero."""
    atoms = atoms.copy()
    shear = np.eye(3) + np.array([[0.0, 0.02, -0.01], [0.01, 0.0, 0.015], [-0.02, 0.01, 0.0]])
    atoms.set_cell(atoms.cell.array @ shear, scale_atoms=True)
    atoms.rattle(0.05, seed=seed)
    return atoms


def strain_derivative(atoms: Atoms, h: float = 1e-4) -> np.ndarray:
    """``(1/V) ∂E/∂ε`` ``[6]`` (Voigt) by central differences of the attached calculator's
    energy under symmetric strains ``cell → cell (1 + ε)``, ``r → r (1 + ε)``."""
    cell, volume = atoms.cell.array.copy(), atoms.get_volume()
    derivative = []
    for i, j in VOIGT_PAIRS:
        energies = []
        for step in (h, -h):
            strain = np.eye(3)
            strain[i, j] += step / 2
            strain[j, i] += step / 2
            atoms.set_cell(cell @ strain, scale_atoms=True)
            energies.append(atoms.get_potential_energy())
            atoms.set_cell(cell, scale_atoms=True)
        derivative.append((energies[0] - energies[1]) / (2 * h) / volume)
    return np.array(derivative)


# --- agreement with the potentials and the core ---------------------------------------------


def test_single_potential_equals_its_predict_and_the_core(committee_run):
    committee, _, images = committee_run
    potential = committee.members[0]
    for atoms in images:
        atoms.calc = AenetCalculator(potential)
        out = potential.predict([atoms], eval_forces=True)
        np.testing.assert_allclose(atoms.get_potential_energy(), out.total_energy[0], rtol=1e-13)
        np.testing.assert_allclose(atoms.get_forces(), out.forces[0], rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(
            atoms.get_potential_energies(), out.atom_energies[0], rtol=1e-12, atol=1e-12
        )
        assert atoms.get_potential_energy(force_consistent=True) == atoms.get_potential_energy()
        core = af.energy_forces_stress(
            potential.model,
            af.collate([from_ase(atoms)], species=["Ti", "O"]),
            compute_stress=True,
        )
        np.testing.assert_allclose(atoms.get_forces(), core.forces.numpy(), rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(
            atoms.get_stress(voigt=False), core.stress[0].numpy(), rtol=1e-12, atol=1e-15
        )


def test_model_file_and_core_model_give_the_same_results(committee_run):
    committee, result, images = committee_run
    atoms = images[0]
    reference = AenetCalculator(committee.members[0])
    for source in (result.members[0].model_path, str(result.members[0].model_path)):
        calc = AenetCalculator(source)
        assert not calc.is_committee
        assert calc.get_potential_energy(atoms) == reference.get_potential_energy(atoms)
    calc = AenetCalculator(committee.members[0].model)
    np.testing.assert_array_equal(calc.get_forces(atoms), reference.get_forces(atoms))


def test_evaluation_runs_in_the_model_dtype(fortran_model):
    nn = TIO2_POTENTIAL
    single = af.read_aenet_ascii([nn / "Ti.nn.ascii", nn / "O.nn.ascii"], dtype=torch.float32)
    atoms = distorted(rutile(), seed=3)
    atoms.calc = AenetCalculator(single)
    assert atoms.calc.dtype == torch.float32
    batch = af.collate([from_ase(atoms)], species=single.descriptor.species, dtype=torch.float32)
    core = af.energy_forces_stress(single, batch)
    assert atoms.get_potential_energy() == float(core.energy[0])
    np.testing.assert_array_equal(atoms.get_forces(), core.forces.numpy())
    double = AenetCalculator(fortran_model)
    assert double.dtype == torch.float64
    np.testing.assert_allclose(
        atoms.get_potential_energy(), double.get_potential_energy(atoms), rtol=1e-6
    )


def test_the_calculator_moves_the_models_to_its_device(fortran_model):
    """``device`` moves the models (the meta device stands in for an accelerator); the models
    given stay where they were."""
    on_meta = AenetCalculator(fortran_model, device="meta")
    assert on_meta.device.type == "meta" and on_meta.dtype == torch.float64
    assert fortran_model.network.values.device.type == "cpu"
    with pytest.raises(ValueError, match="device must be a torch device"):
        AenetCalculator(fortran_model, device="abacus")


# --- derivatives of the energy --------------------------------------------------------------


def test_forces_are_central_differences_of_the_energy(fortran_model):
    atoms = distorted(rutile(), seed=1)
    atoms.calc = AenetCalculator(fortran_model)
    forces = atoms.get_forces()
    h, positions = 1e-4, atoms.positions.copy()
    numeric = np.zeros_like(forces)
    for index in np.ndindex(*positions.shape):
        energies = []
        for step in (h, -h):
            moved = positions.copy()
            moved[index] += step
            atoms.positions = moved
            energies.append(atoms.get_potential_energy())
        numeric[index] = -(energies[0] - energies[1]) / (2 * h)
    assert np.abs(forces).max() > 0.5  # a real test: the rattled forces are large
    np.testing.assert_allclose(forces, numeric, rtol=0, atol=1e-6)


@pytest.mark.parametrize("system", ["aenet TiO2", "EMT Cu"])
def test_stress_is_the_strain_derivative_of_the_energy(system, fortran_model):
    """The same finite-difference check for ASE's EMT (the reference convention) and ours."""
    if system == "EMT Cu":
        atoms = distorted(bulk("Cu", "fcc", a=3.55, cubic=True), seed=2)
        atoms.calc = EMT()
    else:
        atoms = distorted(rutile(), seed=2)
        atoms.calc = AenetCalculator(fortran_model)
    stress = atoms.get_stress()
    assert stress.shape == (6,) and np.abs(stress[3:]).min() > 1e-4
    np.testing.assert_allclose(stress, strain_derivative(atoms), rtol=0, atol=1e-7)


def test_stress_sign_matches_emt_for_compressed_and_stretched_cells(fortran_model):
    """Compressed cells push outwards (negative stress), stretched ones pull in (positive), for
    EMT copper and our TiO2 alike."""
    for factor, sign in ((0.95, -1.0), (1.08, 1.0)):
        copper = bulk("Cu", "fcc", a=3.59 * factor, cubic=True)
        copper.calc = EMT()
        titania = rutile()
        titania.set_cell(titania.cell.array * factor, scale_atoms=True)
        titania.calc = AenetCalculator(fortran_model)
        for atoms in (copper, titania):
            assert np.all(np.sign(atoms.get_stress()[:3]) == sign), (factor, atoms)


# --- molecular dynamics ---------------------------------------------------------------------

MD_STEPS = 200
MD_TOLERANCE = 2e-4  # eV/atom; measured ~2e-5 with the true forces, ~2e-3 with forces × 1.1


@pytest.mark.filterwarnings("ignore:Use thermalize_momenta:DeprecationWarning")
def test_nve_molecular_dynamics_conserves_the_total_energy(fortran_model):
    """Velocity Verlet, 0.5 fs steps, rutile TiO2 from 300 K Maxwell–Boltzmann velocities: the
    total energy stays within MD_TOLERANCE per atom of its start at every step."""
    atoms = rutile()
    atoms.calc = AenetCalculator(fortran_model)
    thermalize_momenta(atoms, 300, rng=np.random.default_rng(0))
    Stationary(atoms)
    start_positions = atoms.positions.copy()
    start_kinetic = atoms.get_kinetic_energy()
    totals = []
    dynamics = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    dynamics.attach(lambda: totals.append(atoms.get_total_energy()), interval=1)
    dynamics.run(MD_STEPS)
    deviation = np.abs(np.array(totals) - totals[0]).max() / len(atoms)
    assert deviation < MD_TOLERANCE, f"total energy moved by {deviation:.2e} eV/atom"
    # the run is not trivial: atoms moved and energy flowed between kinetic and potential
    assert np.abs(atoms.positions - start_positions).max() > 0.02
    assert abs(atoms.get_kinetic_energy() - start_kinetic) > 0.1 * start_kinetic


# --- committees -----------------------------------------------------------------------------


def test_committee_gives_member_means_and_spreads(committee_run):
    committee, _, images = committee_run
    calc = AenetCalculator(committee)
    assert calc.is_committee and set(COMMITTEE_PROPERTIES) <= set(calc.implemented_properties)
    models = [member.model for member in committee.members]
    for atoms in images:
        singles = [AenetCalculator(member) for member in committee.members]
        energies = np.array([s.get_potential_energy(atoms) for s in singles])
        forces = np.array([s.get_forces(atoms) for s in singles])
        stresses = np.array([s.get_stress(atoms) for s in singles])
        atomic = np.array([s.get_potential_energies(atoms) for s in singles])
        np.testing.assert_allclose(calc.get_potential_energy(atoms), energies.mean(), rtol=1e-13)
        np.testing.assert_allclose(calc.get_forces(atoms), forces.mean(0), atol=1e-12)
        np.testing.assert_allclose(calc.get_stress(atoms), stresses.mean(0), atol=1e-13)
        np.testing.assert_allclose(calc.get_potential_energies(atoms), atomic.mean(0), atol=1e-11)
        results = {name: calc.get_property(name, atoms) for name in COMMITTEE_PROPERTIES}
        assert results["energy_std"] > 1e-6  # the members really differ
        np.testing.assert_allclose(results["energy_std"], energies.std(), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(results["forces_std"], forces.std(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(results["stress_std"], stresses.std(0), rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(results["member_energies"], energies, rtol=1e-13)
        np.testing.assert_allclose(results["member_forces"], forces, atol=1e-12)
        np.testing.assert_allclose(results["member_stresses"], stresses, atol=1e-13)
        # the same numbers as the core committee prediction
        batch = af.collate([from_ase(atoms)], species=["Ti", "O"])
        prediction = committee_predict(models, batch)
        np.testing.assert_allclose(results["energy_std"], prediction.energy_std[0], rtol=1e-9)
        np.testing.assert_allclose(results["forces_std"], prediction.force_std, atol=1e-12)


def test_committee_loads_from_its_directory(committee_run):
    committee, result, images = committee_run
    atoms = images[1]
    loaded = AenetCalculator(result.output_dir)
    direct = AenetCalculator(committee)
    assert loaded.is_committee and len(loaded.models) == 3
    assert loaded.get_potential_energy(atoms) == direct.get_potential_energy(atoms)
    np.testing.assert_array_equal(
        loaded.get_property("forces_std", atoms), direct.get_property("forces_std", atoms)
    )


# --- caching and bad input ------------------------------------------------------------------


def test_results_are_reused_until_the_atoms_change(fortran_model, monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return af.energy_forces_stress(*args, **kwargs)

    monkeypatch.setattr(calculator_module, "energy_forces_stress", counting)
    atoms = rutile()
    atoms.calc = AenetCalculator(fortran_model)
    atoms.get_potential_energy()
    atoms.get_forces()
    atoms.get_stress()
    atoms.set_momenta(np.ones((len(atoms), 3)))  # momenta do not change the energy
    atoms.get_forces()
    assert len(calls) == 1
    atoms.positions[0, 0] += 0.01
    atoms.get_forces()
    assert len(calls) == 2


def test_bad_input_raises_clear_errors(fortran_model, committee_run, tmp_path):
    calc = AenetCalculator(fortran_model)
    with pytest.raises(ValueError, match=r"species \['Cu'\].*knows \['Ti', 'O'\]"):
        calc.get_potential_energy(bulk("Cu", "fcc", a=3.6))
    nan_atoms = rutile()
    nan_atoms.positions[2, 1] = np.nan
    with pytest.raises(ValueError, match="positions contain NaN"):
        calc.get_forces(nan_atoms)
    molecule = Atoms("TiO2", positions=[[0, 0, 0], [1.7, 0, 0], [-1.7, 0.3, 0]])
    assert np.isfinite(calc.get_forces(molecule)).all()
    with pytest.raises(PropertyNotImplementedError, match="periodic in all three"):
        calc.get_stress(molecule)
    with pytest.raises(ValueError, match="cell is singular"):
        calc.get_potential_energy(Atoms("TiO2", positions=molecule.positions, pbc=True))
    with pytest.raises(ValueError, match="not a committee directory"):
        AenetCalculator(tmp_path)
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match="neither an aenet_fn model file nor a committee"):
        AenetCalculator(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="no such model file"):
        AenetCalculator(tmp_path / "missing.pt")
    with pytest.raises(TypeError, match="not a dict"):
        AenetCalculator({"Ti": 1})
    committee, _, _ = committee_run
    untrained = TorchANNPotential(committee.arch, committee.descriptor)
    with pytest.raises(ValueError, match="has not been trained"):
        AenetCalculator(untrained)


def test_thermalize_momenta_uses_what_the_installed_ase_has(monkeypatch):
    """ASE ≥ 3.29's thermalize_momenta, or before it MaxwellBoltzmannDistribution: the same
    momenta from the same generator, at the requested temperature on average."""
    from ase.md import velocitydistribution

    atoms = bulk("Cu", cubic=True) * (4, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # the current form, where it exists
        thermalize_momenta(atoms, 500, rng=np.random.default_rng(3))
    assert atoms.get_temperature() == pytest.approx(500, rel=0.2)
    first = atoms.get_momenta()
    older_ase = SimpleNamespace(
        MaxwellBoltzmannDistribution=velocitydistribution.MaxwellBoltzmannDistribution
    )
    monkeypatch.setattr(calculator_module, "velocitydistribution", older_ase)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ASE ≥ 3.29 deprecates it
        thermalize_momenta(atoms, 500, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(atoms.get_momenta(), first)
