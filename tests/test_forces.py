"""Forces and stress from the torch.func helper against finite differences, and vmap."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from aenet_fn import ChebyshevParams, build_graph, collate, features_from_graph
from aenet_fn.forces import strained, value_and_forces
from tests.conftest import random_structure

PARAMS = ChebyshevParams(
    species=["Ti", "O"], rad_order=6, rad_cutoff=4.5, ang_order=3, ang_cutoff=3.5, min_cutoff=0.5
)
STEP = 1e-5


def _model(batch, weights):
    """A smooth non-linear per-atom energy over the features: E_b = Σ_i tanh(G_i · w)."""
    graph = build_graph(PARAMS, batch)

    def energy(positions, cells):
        features = features_from_graph(PARAMS, positions, cells, batch.structure_index, graph)
        atomic = torch.tanh(features @ weights)
        return atomic.new_zeros(batch.n_structures).index_add(0, batch.structure_index, atomic)

    return energy


def _weights(seed, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(PARAMS.n_features, generator=generator, dtype=torch.float64) * 0.2
    return weights.to(dtype)


def _batch(seed, periodic):
    structures = [random_structure(seed + k, 3 + k, periodic=periodic) for k in range(2)]
    return collate(structures, species=PARAMS.species)


def _close(actual, expected, rtol=1e-6, energies=None):
    """``actual`` equals ``expected`` to ``rtol`` of its largest entry; with the ``energies``
    whose sum's central differences ``expected`` holds, also to their round-off (100 ulp of
    the sum over the step), which dominates where the derivatives are tiny."""
    scale = float(expected.abs().max()) + 1e-8
    round_off = 0.0
    if energies is not None:
        ulp = torch.finfo(energies.dtype).eps * float(energies.abs().sum())
        round_off = 100 * ulp / STEP
    assert float((actual - expected).abs().max()) <= rtol * scale + round_off


@given(seed=st.integers(0, 10**5), periodic=st.booleans())
def test_forces_equal_central_finite_differences(seed, periodic):
    batch = _batch(seed, periodic)
    energy = _model(batch, _weights(seed))
    result = value_and_forces(energy, batch.positions, batch.cells, batch.structure_index)
    expected = torch.zeros_like(batch.positions)
    for atom in range(batch.positions.shape[0]):
        for axis in range(3):
            step = torch.zeros_like(batch.positions)
            step[atom, axis] = STEP
            up = energy(batch.positions + step, batch.cells).sum()
            down = energy(batch.positions - step, batch.cells).sum()
            expected[atom, axis] = -(up - down) / (2 * STEP)
    torch.testing.assert_close(result.energy, energy(batch.positions, batch.cells))
    _close(result.forces, expected, energies=result.energy)


@given(seed=st.integers(0, 10**5))
def test_stress_equals_finite_difference_strain_derivative(seed):
    batch = _batch(seed, periodic=True)
    energy = _model(batch, _weights(seed))
    result = value_and_forces(
        energy, batch.positions, batch.cells, batch.structure_index, batch.pbc, compute_stress=True
    )
    zero = torch.zeros_like(batch.cells)
    derivative = torch.zeros_like(batch.cells)
    for a in range(3):
        for b in range(3):
            step = zero.clone()
            step[:, a, b] = STEP
            up = energy(*strained(batch.positions, batch.cells, batch.structure_index, step))
            down = energy(*strained(batch.positions, batch.cells, batch.structure_index, -step))
            derivative[:, a, b] = (up - down) / (2 * STEP)
    volume = torch.linalg.det(batch.cells).abs()[:, None, None]
    expected = 0.5 * (derivative + derivative.transpose(1, 2)) / volume
    _close(result.stress, expected)


def test_stress_is_nan_for_isolated_structures():
    batch = _batch(3, periodic=False)
    result = value_and_forces(
        _model(batch, _weights(0)),
        batch.positions,
        batch.cells,
        batch.structure_index,
        batch.pbc,
        compute_stress=True,
    )
    assert bool(result.stress.isnan().all())
    assert bool(result.forces.isfinite().all())


def test_forces_sum_to_zero_by_translation_invariance():
    batch = _batch(5, periodic=True)
    result = value_and_forces(
        _model(batch, _weights(1)), batch.positions, batch.cells, batch.structure_index
    )
    totals = torch.zeros(batch.n_structures, 3, dtype=torch.float64).index_add(
        0, batch.structure_index, result.forces
    )
    assert float(totals.abs().max()) < 1e-10


def test_composes_with_vmap_over_stacked_parameters():
    batch = _batch(9, periodic=True)
    stacked = torch.stack([_weights(s) for s in range(4)])

    def forces_of(weights):
        energy = _model(batch, weights)
        out = value_and_forces(energy, batch.positions, batch.cells, batch.structure_index)
        return out.energy, out.forces

    energies, forces = torch.func.vmap(forces_of)(stacked)
    for member, weights in enumerate(stacked):
        energy_alone, forces_alone = forces_of(weights)
        torch.testing.assert_close(energies[member], energy_alone, rtol=0, atol=1e-12)
        torch.testing.assert_close(forces[member], forces_alone, rtol=0, atol=1e-12)


def test_float32_forces_are_close_to_float64():
    batch64 = _batch(2, periodic=True)
    batch32 = batch64.to(dtype=torch.float32)
    forces = {}
    for name, batch in (("64", batch64), ("32", batch32)):
        energy = _model(batch, _weights(4, dtype=batch.positions.dtype))
        forces[name] = value_and_forces(
            energy, batch.positions, batch.cells, batch.structure_index
        ).forces
    assert forces["32"].dtype == torch.float32
    _close(forces["32"].double(), forces["64"], rtol=1e-4)


def test_stress_needs_pbc():
    batch = _batch(1, periodic=True)
    with pytest.raises(ValueError, match="pbc is needed"):
        value_and_forces(
            _model(batch, _weights(0)),
            batch.positions,
            batch.cells,
            batch.structure_index,
            compute_stress=True,
        )
