"""The dtype policy: float32 features and networks, float64 energies; ``aenet_fn.to``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import aenet_fn as af
from aenet_fn.calculator import AenetCalculator
from aenet_fn.examples import TIO2_STRUCTURES
from aenet_fn.io.ase_io import to_ase

PARAMS = af.ChebyshevParams(["Ti", "O"], 6, 5.0, 3, 3.5, min_cutoff=0.5)
REFERENCES = {"Ti": -1604.604515075, "O": -432.503149303}


@pytest.fixture(scope="module")
def models():
    """A float64 model on 12 TiO2 structures, the same model in float32, and the largest
    TiO2 structure (47 atoms, about −39 450 eV)."""
    structures = af.read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf")))
    largest = max(structures, key=lambda s: s.n_atoms)
    train = af.featurize_structures(PARAMS, structures[:12], with_derivatives=False)
    arch = {"Ti": [(6, "tanh")], "O": [(6, "tanh")]}
    model = af.init_model(PARAMS, arch, train, seed=3, atomic_energies=REFERENCES)
    return model, af.to(model, dtype=torch.float32), largest


def test_to_casts_floating_tensors_and_keeps_energies_in_float64(models):
    model, single, _ = models
    assert single.network.values.dtype == torch.float32
    assert single.normalization.feature_mean.dtype == torch.float32
    norm = single.normalization
    for energy in (norm.atomic_energies, norm.energy_shift, norm.energy_scaling):
        assert energy.dtype == torch.float64
    torch.testing.assert_close(norm.atomic_energies, model.normalization.atomic_energies)
    data = af.featurize_structures(PARAMS, [models[2]], with_derivatives=True)
    moved = af.to(data, device="meta", dtype=torch.float32)
    assert moved.features.device.type == "meta" and moved.features.dtype == torch.float32
    assert moved.species_index.dtype == torch.long and moved.energies.dtype == torch.float64
    assert moved.local.radial_centre.dtype == torch.long
    assert moved.local.radial.device.type == "meta"
    assert moved.names == data.names and moved.descriptor == data.descriptor
    again = af.to(single, dtype=torch.float64)
    torch.testing.assert_close(again.network.values, model.network.values, rtol=1e-7, atol=0)


def test_float32_models_sum_float64_atomic_energies(models):
    model, single, largest = models
    batch = af.collate([largest], species=PARAMS.species, dtype=torch.float32)
    atomic = af.atomic_energies(single, batch)
    energy = af.energy(single, batch)
    assert atomic.dtype == energy.dtype == torch.float64
    # the total is the float64 sum of atomic energies referenced in float64 (a float32 sum
    # of ~39 000 eV would round to 4e-3 eV steps)
    torch.testing.assert_close(energy, atomic.sum().reshape(1), rtol=0, atol=1e-9)
    exact = af.energy(model, af.collate([largest], species=PARAMS.species))
    assert float((energy - exact).abs()) < 2e-3  # the float32 features' and networks' error


def test_a_float32_calculator_resolves_small_energy_changes(models):
    """Moving one atom by 1e-4 Å changes the energy by −F·δ: a float32 total of −39 450 eV
    would hide it (its steps are 4e-3 eV)."""
    _, single, largest = models
    atoms = to_ase(largest)
    atoms.calc = AenetCalculator(single)
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    moved = atoms.copy()
    moved.calc = AenetCalculator(single)
    step = np.zeros_like(forces)
    step[5] = 1e-4 * forces[5] / np.linalg.norm(forces[5])
    moved.positions += step
    expected = -float((forces * step).sum())
    assert abs(expected) > 1e-5
    assert moved.get_potential_energy() - energy == pytest.approx(expected, rel=0.05)


def test_to_leaves_a_training_states_generator_on_the_host(models):
    model, _, largest = models
    data = af.featurize_structures(PARAMS, [largest], with_derivatives=False)
    state = af.init_train_state(model, data, af.TrainConfig())
    moved = af.to(state, device="meta")
    assert moved.model.network.values.device.type == "meta"
    assert moved.sampler.scores.device.type == "meta"
    assert torch.equal(moved.rng, state.rng)  # the CPU generator's state, still readable
