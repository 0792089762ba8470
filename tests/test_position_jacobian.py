"""Assembled position Jacobians: the dense Jacobian of the features, and training with them."""

from __future__ import annotations

import attrs
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import aenet_fn as af
from aenet_fn import ChebyshevParams, Structure, collate, featurize
from aenet_fn.featurized import featurize_structures, set_pair_blocks, take_structures
from aenet_fn.position_jacobian import PositionJacobian
from aenet_fn.train import force_blocks, init_model, init_train_state, run_epoch
from tests.conftest import batch_energies_and_forces, random_structure

TWO_SPECIES = ChebyshevParams(
    species=["Ti", "O"], rad_order=5, rad_cutoff=4.0, ang_order=2, ang_cutoff=3.0, min_cutoff=0.5
)
ONE_SPECIES = attrs.evolve(TWO_SPECIES, species=["Ti"])
WIDE_ANGULAR = attrs.evolve(TWO_SPECIES, rad_cutoff=2.5, ang_cutoff=4.0)
"""Pairs beyond the radial cutoff enter only through triplets: their mirror blocks may have no
entries and are added as zeros."""


def _structures(seed: int, species: tuple[str, ...]) -> list[Structure]:
    """A small periodic cell (its atoms see several images of each other), a molecule, and a
    molecule with an atom far from the others (no neighbours: no blocks)."""
    lonely = random_structure(seed + 2, 3, species=species, periodic=False)
    far = np.vstack([lonely.positions, lonely.positions[:1] + 40.0])
    return [
        random_structure(seed, 3, species=species),
        random_structure(seed + 1, 4, species=species, periodic=False),
        Structure(far, [*lonely.species, species[0]], name="far"),
    ]


@pytest.mark.parametrize(
    "params", [TWO_SPECIES, ONE_SPECIES, WIDE_ANGULAR], ids=["Ti-O", "Ti", "wide-angular"]
)
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10**5))
@example(seed=3)  # wide-angular: a mirror block without entries
def test_pair_blocks_are_the_dense_position_jacobian(params, seed):
    structures = _structures(seed, tuple(params.species))
    data = featurize_structures(params, structures, with_derivatives=True)
    blocks = set_pair_blocks(params, data)
    batch = collate(structures, species=params.species)  # the set's atom order

    def features_of(positions: torch.Tensor) -> torch.Tensor:
        return featurize(params, attrs.evolve(batch, positions=positions))

    expected = torch.func.jacrev(features_of)(batch.positions)  # [i, f, j, c]
    n, width = data.features.shape
    dense = torch.zeros(n, 3, n, width, dtype=torch.float64)  # [j, c, i, f]
    dense[blocks.row, :, blocks.col] = blocks.values.permute(1, 0, 2)
    torch.testing.assert_close(dense, expected.permute(2, 3, 0, 1), rtol=0, atol=1e-12)
    mirrored = torch.zeros(n, width, n, 3, dtype=torch.float64)  # [j, f, i, c]
    mirrored[blocks.row, :, blocks.col] = blocks.mirrored.permute(1, 0, 2)
    torch.testing.assert_close(mirrored, expected, rtol=0, atol=1e-12)
    assert bool((blocks.row[1:] >= blocks.row[:-1]).all())
    assert int(blocks.row_count[-1]) == 0  # the far atom
    assert torch.equal(blocks.row_start + blocks.row_count, torch.cumsum(blocks.row_count, 0))


@pytest.fixture(scope="module")
def tio2(shared_data):
    params = ChebyshevParams(
        species=["Ti", "O"],
        rad_order=6,
        rad_cutoff=5.0,
        ang_order=2,
        ang_cutoff=3.5,
        min_cutoff=0.5,
    )
    structures = af.read_structures(sorted((shared_data / "tio2").glob("*.xsf"))[:24])
    return params, featurize_structures(params, structures, with_derivatives=True), structures


@pytest.mark.parametrize("policy", ["uniform", "error_weighted"])
def test_epochs_with_assembled_jacobians_equal_epochs_with_entries(tio2, policy):
    """Weighted sampling draws structures twice; half the structures are force-supervised."""
    params, train, _ = tio2
    arch = {"Ti": [(6, "tanh"), (6, "tanh")], "O": [(6, "tanh")]}
    config = af.TrainConfig(
        epochs=1,
        batch_size=5,
        force_weight=0.5,
        force_fraction=0.5,
        sampling_policy=policy,
    )
    state = init_train_state(init_model(params, arch, train, seed=3), train, config)
    blocks = force_blocks(state.model, train, config)
    assert blocks is not None
    batch = take_structures(train, torch.arange(5), state.sampler.force_subset, blocks)
    assert isinstance(batch.local, PositionJacobian)
    with_entries, with_blocks = state, state
    for _ in range(3):
        with_entries, entries_metrics = run_epoch(with_entries, train, config)
        with_blocks, blocks_metrics = run_epoch(with_blocks, train, config, blocks=blocks)
        assert blocks_metrics == pytest.approx(entries_metrics, rel=1e-10)
    values = with_blocks.model.network.values
    assert not torch.equal(values, state.model.network.values)
    torch.testing.assert_close(values, with_entries.model.network.values, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        with_blocks.sampler.scores, with_entries.sampler.scores, rtol=0, atol=1e-12
    )


def test_float32_assembled_forces_are_close_to_float64(tio2):
    params, train, structures = tio2
    model = init_model(params, {"Ti": [(5, "tanh")], "O": [(5, "tanh")]}, train, seed=1)
    single = featurize_structures(params, structures, with_derivatives=True, dtype=torch.float32)
    model32 = torch.utils._pytree.tree_map(
        lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, model
    )
    everything = torch.ones(train.n_structures, dtype=torch.bool)

    def forces(data, model):
        blocks = set_pair_blocks(params, data)
        batch = take_structures(data, torch.tensor([4, 0, 7, 4]), everything, blocks)
        return batch_energies_and_forces(model, batch)[1]

    reference, approximate = forces(train, model), forces(single, model32)
    assert approximate.dtype == torch.float32
    error = float((approximate.double() - reference).abs().max())
    assert error < 1e-5 * float(reference.abs().max())


def test_force_blocks_only_where_they_apply(tio2, monkeypatch):
    params, train, _ = tio2
    model = init_model(params, {"Ti": [(4, "tanh")], "O": [(4, "tanh")]}, train, seed=0)
    forces = af.TrainConfig(force_weight=0.1)
    assert force_blocks(model, train, forces) is not None
    assert force_blocks(model, train, af.TrainConfig(force_weight=0.0)) is None
    assert force_blocks(model, train, attrs.evolve(forces, num_workers=1)) is None
    assert force_blocks(model, None, forces) is None
    energy_only = attrs.evolve(train, local=None)
    assert force_blocks(model, energy_only, forces) is None
    with pytest.raises(ValueError, match="no local derivatives"):
        set_pair_blocks(params, energy_only)
    monkeypatch.setattr(af.train, "_BLOCK_ELEMENTS", 1000)
    assert force_blocks(model, train, forces) is None


def test_pair_blocks_of_another_descriptor_or_set_are_refused(tio2):
    params, train, _ = tio2
    with pytest.raises(ValueError, match="not the descriptor that featurized it"):
        set_pair_blocks(attrs.evolve(params, rad_order=4), train)
    smaller = af.featurized.select_structures(train, [0, 1, 2])
    blocks = set_pair_blocks(params, smaller)
    everything = torch.ones(train.n_structures, dtype=torch.bool)
    with pytest.raises(ValueError, match="use set_pair_blocks of this set"):
        take_structures(train, torch.tensor([0, 1]), everything, blocks)
