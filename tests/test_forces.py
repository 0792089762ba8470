"""Forces and stress from the torch.func helper against finite differences, and vmap."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from aenet_fn import ChebyshevParams, build_graph, collate, features_from_graph
from aenet_fn.core.forces import value_and_forces
from aenet_fn.testing import check_forces, check_stress, structures
from tests.conftest import random_structure

PARAMS = ChebyshevParams(
    species=["Ti", "O"], rad_order=6, rad_cutoff=4.5, ang_order=3, ang_cutoff=3.5, min_cutoff=0.5
)


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


def _close(actual, expected, rtol):
    """``actual`` equals ``expected`` to ``rtol`` of its largest entry."""
    scale = float(expected.abs().max()) + 1e-8
    assert float((actual - expected).abs().max()) <= rtol * scale


def _potential(weights):
    """The energy function of :func:`_model` as a potential of one structure (energy, forces
    and, for cells periodic in all three directions, stress from ``value_and_forces``)."""

    def evaluate(structure):
        batch = collate([structure], species=PARAMS.species)
        periodic = all(structure.pbc)
        result = value_and_forces(
            _model(batch, weights),
            batch.positions,
            batch.cells,
            batch.structure_index,
            batch.pbc,
            compute_stress=periodic,
        )
        stress = result.stress[0] if periodic else None
        return {"energy": result.energy[0], "forces": result.forces, "stress": stress}

    return evaluate


@given(structure=structures(species=("Ti", "O"), max_atoms=5), seed=st.integers(0, 10**5))
def test_forces_and_stress_equal_central_finite_differences(structure, seed):
    potential = _potential(_weights(seed))
    check_forces(potential, structure)
    if all(structure.pbc):
        check_stress(potential, structure)


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
