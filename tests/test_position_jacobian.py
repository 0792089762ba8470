"""Assembled position Jacobians: the dense Jacobian of the features, and training with them."""

from __future__ import annotations

import math

import attrs
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import aenet_fn as af
import aenet_fn.driver.seam as seam
from aenet_fn import ChebyshevParams, Structure, collate, featurize
from aenet_fn.core.featurized import featurize_structures
from aenet_fn.core.minibatch import take_structures
from aenet_fn.core.records import tree_bytes
from aenet_fn.driver.seam import (
    JACOBIAN_MIN_EPOCHS,
    Speedups,
    assembled_jacobian,
    prepare_speedups,
    stored_jacobian_bytes,
)
from aenet_fn.driver.state import init_model, init_train_state
from aenet_fn.driver.train import run_epoch
from aenet_fn.examples import TIO2_STRUCTURES
from aenet_fn.speedups.force_jacobian import BatchJacobian, SetJacobian, set_jacobian
from tests.conftest import batch_energies_and_forces, random_structure, scaled_examples

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


STORAGE = {"pairs": 0.0, "mixed": 1.0, "dense": math.inf}
"""``dense_up_to`` of each way to store a set's Jacobian: every structure as pair blocks, the
structures with a block for each pair of atoms dense (the others sparse), every one dense."""


def _stored_jacobian(jacobian: SetJacobian, data) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense ``[j, c, i, f]`` Jacobian of the set from both parts of ``jacobian``, and the
    ``[j, f, i, c]`` transposed map of its pair blocks' mirrors (zero for dense structures)."""
    n, width = data.features.shape
    dense = torch.zeros(n, 3, n, width, dtype=torch.float64)
    pairs = jacobian.pairs
    dense[pairs.row, :, pairs.col] = pairs.values.permute(1, 0, 2)
    mirrored = torch.zeros(n, width, n, 3, dtype=torch.float64)
    mirrored[pairs.row, :, pairs.col] = pairs.mirrored.permute(1, 0, 2)
    stored = jacobian.structures
    for s, (offset, count) in enumerate(zip(stored.offset.tolist(), stored.n_atoms.tolist())):
        if offset >= 0:
            atoms = slice(int(data.atom_start[s]), int(data.atom_start[s]) + count)
            matrix = stored.values[offset : offset + 3 * width * count * count]
            dense[atoms, :, atoms] = matrix.view(count, 3, count, width)
    return dense, mirrored


@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize(
    "params", [TWO_SPECIES, ONE_SPECIES, WIDE_ANGULAR], ids=["Ti-O", "Ti", "wide-angular"]
)
@settings(max_examples=scaled_examples(10), deadline=None)
@given(seed=st.integers(0, 10**5))
@example(seed=3)  # wide-angular: a mirror block without entries
@example(seed=23)  # wide-angular: the far structure's three atoms have no neighbours at all
def test_set_jacobian_is_the_dense_position_jacobian(params, storage, seed):
    structures = _structures(seed, tuple(params.species))
    data = featurize_structures(params, structures, with_derivatives=True)
    jacobian = set_jacobian(params, data, dense_up_to=STORAGE[storage])
    batch = collate(structures, species=params.species)  # the set's atom order

    def features_of(positions: torch.Tensor) -> torch.Tensor:
        return featurize(params, attrs.evolve(batch, positions=positions))

    expected = torch.func.jacrev(features_of)(batch.positions)  # [i, f, j, c]
    dense, mirrored = _stored_jacobian(jacobian, data)
    torch.testing.assert_close(dense, expected.permute(2, 3, 0, 1), rtol=0, atol=1e-12)
    # each structure stored one way: dense when it has at least n²/dense_up_to blocks
    blocks = torch.bincount(
        data.structure_index[set_jacobian(params, data, 0.0).pairs.row], minlength=3
    )
    is_dense = jacobian.structures.offset >= 0
    rule = (data.n_atoms**2 <= STORAGE[storage] * blocks) & (blocks > 0)
    assert torch.equal(is_dense, rule)
    # the far atom has no block: the structure never has a whole square of them, and it is
    # dense only when every structure with blocks is (a structure without any block has a zero
    # Jacobian and nothing to store)
    assert bool(is_dense[2]) == (storage == "dense" and bool(blocks[2] > 0))
    sparse_atoms = ~is_dense[data.structure_index]
    assert bool((sparse_atoms[jacobian.pairs.row]).all())
    pair_part = expected * sparse_atoms[:, None, None, None]
    torch.testing.assert_close(mirrored, pair_part, rtol=0, atol=1e-12)
    pairs = jacobian.pairs
    assert bool((pairs.row[1:] >= pairs.row[:-1]).all())
    assert int(pairs.row_count[-1]) == 0  # the far atom
    assert torch.equal(pairs.row_start + pairs.row_count, torch.cumsum(pairs.row_count, 0))


@pytest.fixture(scope="module")
def tio2():
    params = ChebyshevParams(
        species=["Ti", "O"],
        rad_order=6,
        rad_cutoff=5.0,
        ang_order=2,
        ang_cutoff=3.5,
        min_cutoff=0.5,
    )
    structures = af.read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf"))[:24])
    return params, featurize_structures(params, structures, with_derivatives=True), structures


@pytest.mark.parametrize(
    ("policy", "storage"),
    [
        ("uniform", "pairs"),
        ("error_weighted", "pairs"),
        ("uniform", "mixed"),
        ("error_weighted", "dense"),
    ],
)
def test_epochs_with_assembled_jacobians_equal_epochs_with_entries(tio2, policy, storage):
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
    assert assembled_jacobian(state.model, train, config) is not None
    jacobian = set_jacobian(params, train, STORAGE[storage])
    stored_dense = (jacobian.structures.offset >= 0).tolist()
    assert any(stored_dense) == (storage != "pairs") and all(stored_dense) == (storage == "dense")
    batch = take_structures(train, torch.arange(5), state.sampler.force_subset, jacobian)
    assert isinstance(batch.local, BatchJacobian)
    with_entries, with_jacobian = state, state
    for _ in range(3):
        with_entries, entries_metrics = run_epoch(with_entries, train, config)
        with_jacobian, jacobian_metrics = run_epoch(
            with_jacobian, train, config, speedups=Speedups(jacobian=jacobian)
        )
        assert jacobian_metrics == pytest.approx(entries_metrics, rel=1e-10)
    values = with_jacobian.model.network.values
    assert not torch.equal(values, state.model.network.values)
    torch.testing.assert_close(values, with_entries.model.network.values, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        with_jacobian.sampler.scores, with_entries.sampler.scores, rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("storage", ["pairs", "dense"])
def test_float32_assembled_forces_are_close_to_float64(tio2, storage):
    params, train, structures = tio2
    model = init_model(params, {"Ti": [(5, "tanh")], "O": [(5, "tanh")]}, train, seed=1)
    single = featurize_structures(params, structures, with_derivatives=True, dtype=torch.float32)
    model32 = torch.utils._pytree.tree_map(
        lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, model
    )
    everything = torch.ones(train.n_structures, dtype=torch.bool)

    def forces(data, model):
        jacobian = set_jacobian(params, data, STORAGE[storage])
        batch = take_structures(data, torch.tensor([4, 0, 7, 4]), everything, jacobian)
        return batch_energies_and_forces(model, batch)[1]

    reference, approximate = forces(train, model), forces(single, model32)
    assert approximate.dtype == torch.float32
    error = float((approximate.double() - reference).abs().max())
    assert error < 1e-5 * float(reference.abs().max())


def test_force_blocks_only_where_they_apply(tio2, monkeypatch):
    params, train, _ = tio2
    model = init_model(params, {"Ti": [(4, "tanh")], "O": [(4, "tanh")]}, train, seed=0)
    forces = af.TrainConfig(force_weight=0.1)
    assert assembled_jacobian(model, train, forces) is not None
    assert assembled_jacobian(model, train, af.TrainConfig(force_weight=0.0)) is None
    assert assembled_jacobian(model, train, attrs.evolve(forces, num_workers=1)) is None
    assert assembled_jacobian(model, None, forces) is None
    energy_only = attrs.evolve(train, local=None)
    assert assembled_jacobian(model, energy_only, forces) is None
    with pytest.raises(ValueError, match="no local derivatives"):
        set_jacobian(params, energy_only)
    assert assembled_jacobian(model, train, attrs.evolve(forces, route="func")) is None
    # "auto" weighs a short run against the set-up of a large Jacobian; "fast" always builds
    assert assembled_jacobian(model, train, forces, 1) is not None  # small: always
    monkeypatch.setattr(seam, "QUICK_JACOBIAN_BYTES", stored_jacobian_bytes(train) - 1)
    assert assembled_jacobian(model, train, forces, JACOBIAN_MIN_EPOCHS) is not None
    assert assembled_jacobian(model, train, forces, JACOBIAN_MIN_EPOCHS - 1) is None
    assert assembled_jacobian(model, train, attrs.evolve(forces, route="fast"), 1) is not None
    state = af.init_train_state(model, train, forces)
    for epochs, built in ((2, False), (JACOBIAN_MIN_EPOCHS, True)):
        short = attrs.evolve(forces, epochs=epochs)
        assert (prepare_speedups(state, train, None, short).jacobian is not None) == built


def test_the_jacobian_memory_budget_bounds_what_is_stored(tio2):
    """:func:`stored_jacobian_bytes` bounds the memory of the Jacobian the fast route stores
    (and is not far above it); a budget below the bound trains on the ``torch.func``
    route."""
    params, train, _ = tio2
    model = init_model(params, {"Ti": [(4, "tanh")], "O": [(4, "tanh")]}, train, seed=0)
    config = af.TrainConfig(force_weight=0.1, jacobian_memory_gib=math.inf)
    jacobian = assembled_jacobian(model, train, config)
    stored = tree_bytes(jacobian)
    bound = stored_jacobian_bytes(train)
    assert stored <= bound <= 2.5 * stored
    budget = attrs.evolve(config, jacobian_memory_gib=bound / 2**30)
    assert assembled_jacobian(model, train, budget) is not None
    smaller = attrs.evolve(config, jacobian_memory_gib=0.99 * bound / 2**30)
    assert assembled_jacobian(model, train, smaller) is None


def test_jacobian_of_another_descriptor_or_set_is_refused(tio2):
    params, train, _ = tio2
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError, match="dense_up_to must be a number ≥ 0"):
            set_jacobian(params, train, bad)
    with pytest.raises(ValueError, match="not the descriptor that featurized it"):
        set_jacobian(attrs.evolve(params, rad_order=4), train)
    smaller = af.core.featurized.select_structures(train, [0, 1, 2])
    jacobian = set_jacobian(params, smaller)
    everything = torch.ones(train.n_structures, dtype=torch.bool)
    with pytest.raises(ValueError, match="use set_jacobian of this set"):
        take_structures(train, torch.tensor([0, 1]), everything, jacobian)
