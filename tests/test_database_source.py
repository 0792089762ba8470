"""Training from an HDF5 database read batch by batch: subsets read in runs equal the whole
set's rows, and the lazy split trains single models and committees (with and without
DataLoader workers) to exactly the weights of the same split in memory."""

from __future__ import annotations

import attrs
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._pytree import tree_leaves

import aenet_fn as af
from aenet_fn.core.featurized import select_structures
from aenet_fn.driver.committee import committee_fit, init_committee, member_seeds
from aenet_fn.driver.database_source import DatabaseSource
from aenet_fn.examples import ALLOY_SPECIES, emt_alloys
from aenet_fn.io.database import build_database, open_database
from aenet_fn.torch_featurize import ChebyshevDescriptor
from aenet_fn.torch_training import (
    HDF5StructureDataset,
    TorchCommitteeConfig,
    TorchCommitteePotential,
    TorchTrainingConfig,
)
from aenet_fn.torch_training.dataset import database_entries
from tests.conftest import scaled_examples

PARAMS = af.ChebyshevParams(ALLOY_SPECIES, 5, 4.5, 2, 4.0, min_cutoff=0.5)
ARCH = {s: [(6, "tanh")] for s in ALLOY_SPECIES}
SMALL_CELLS = ((1, 1, 2), (2, 1, 1), (2, 2, 1))
SPLIT = [5, 3, 30, 31, 32, 0, 1, 2, 17, 12, 9, 10, 11, 35, 34, 20, 21, 22, 23, 24]
"""A training split's database entries, in split order (runs and isolated entries)."""


@pytest.fixture(scope="module")
def structures():
    return emt_alloys(36, seed=1, repeats=SMALL_CELLS)


@pytest.fixture(scope="module", params=["persisted", "structures only"])
def database(request, structures, tmp_path_factory):
    """A database with persisted features and derivatives, or with structures only (batches
    then featurize what they read)."""
    persisted = request.param == "persisted"
    path = tmp_path_factory.mktemp("db") / "alloys.h5"
    build_database(
        path,
        structures,
        descriptor_params=PARAMS,
        persist_features=persisted,
        persist_force_derivatives=persisted,
        show_progress=False,
    )
    return path


def _same_sets(found: af.FeaturizedSet, expected: af.FeaturizedSet) -> None:
    for field in ("features", "species_index", "n_atoms", "energies", "forces", "atom_start"):
        assert torch.equal(getattr(found, field), getattr(expected, field)), field
    assert found.names == expected.names
    for field in ("radial_count", "triplet_count", "radial_start", "triplet_start"):
        assert torch.equal(getattr(found, field), getattr(expected, field)), field
    if expected.local is not None:
        for field in attrs.fields(type(expected.local)):
            assert torch.equal(
                getattr(found.local, field.name), getattr(expected.local, field.name)
            ), field.name


@pytest.fixture(scope="module")
def whole_sets(database):
    """The database's whole featurized set, with derivatives where it stores them."""
    with open_database(database) as db:
        kinds = (False, True) if db.has_local_derivatives else (False,)
        return {
            derivatives: db.featurized(PARAMS, with_derivatives=derivatives, dtype=torch.float64)
            for derivatives in kinds
        }


@settings(deadline=None, max_examples=30)
@given(st.lists(st.integers(0, 35), min_size=1, max_size=20, unique=True), st.booleans())
def test_entries_read_in_runs_equal_the_rows_of_the_whole_set(
    database, whole_sets, entries, derivatives
):
    entries = sorted(entries)
    derivatives = derivatives and True in whole_sets
    with open_database(database) as db:
        found = db.featurized(
            PARAMS, with_derivatives=derivatives, dtype=torch.float64, entries=entries
        )
    _same_sets(found, select_structures(whole_sets[derivatives], entries))


def test_entries_must_increase_within_the_database(database):
    with open_database(database) as db:
        for entries in ([3, 2], [1, 1], [0, 36], [-1, 2]):
            with pytest.raises(IndexError, match=str(database)):
                db.featurized(PARAMS, with_derivatives=False, dtype=torch.float64, entries=entries)


@pytest.fixture(scope="module")
def split_in_memory(structures):
    return af.featurize_structures(PARAMS, [structures[i] for i in SPLIT], with_derivatives=True)


@pytest.fixture(scope="module")
def source(database):
    with DatabaseSource(PARAMS, database, SPLIT, with_derivatives=True) as lazy:
        yield lazy


def test_the_source_draws_the_metadata_of_its_entries(source, split_in_memory):
    for field in ("energies", "n_atoms", "species_counts", "has_forces"):
        assert torch.equal(getattr(source, field), getattr(split_in_memory, field)), field
    assert source.names == split_in_memory.names


@settings(deadline=None, max_examples=scaled_examples(15))
@given(
    st.lists(st.integers(0, len(SPLIT) - 1), min_size=1, max_size=12),
    st.none() | st.lists(st.booleans(), min_size=len(SPLIT), max_size=len(SPLIT)),
)
def test_a_batch_of_the_source_is_the_batch_in_memory(source, split_in_memory, drawn, flags):
    """Repeated, unsorted structures, some of them force-supervised: the same batch as the
    set in memory gives, derivatives only of the supervised structures, in its order."""
    selection = torch.tensor(drawn)
    flags = None if flags is None else torch.tensor(flags)
    found = source.take(selection, flags)
    expected = af.take_structures(split_in_memory, selection, flags)
    for name in ("features", "energies", "forces", "structure_index", "species_index"):
        assert torch.equal(getattr(found, name), getattr(expected, name)), name
    assert torch.equal(found.force_atoms, expected.force_atoms)
    assert torch.equal(found.n_force_labelled, expected.n_force_labelled)
    assert (found.local is None) == (expected.local is None)
    for leaf, wanted in zip(tree_leaves(found.local), tree_leaves(expected.local), strict=True):
        torch.testing.assert_close(leaf, wanted, rtol=0, atol=1e-12)


def _both_splits(database, structures, workers: int):
    """The training split in memory and read from ``database``, and a short force training
    run's configuration with ``workers`` DataLoader workers."""
    memory = af.featurize_structures(PARAMS, [structures[i] for i in SPLIT], with_derivatives=True)
    source = DatabaseSource(PARAMS, database, SPLIT, with_derivatives=True)
    config = af.TrainConfig(
        epochs=2, batch_size=6, force_weight=0.3, route="func", num_workers=workers
    )
    return memory, source, config


@pytest.mark.parametrize("workers", [0, 2])
def test_training_from_the_database_gives_the_weights_of_training_in_memory(
    database, structures, workers
):
    memory, source, config = _both_splits(database, structures, workers)
    results = []
    for split in (memory, source):
        model = af.init_model(PARAMS, ARCH, split, seed=0)
        results.append(af.fit(af.init_train_state(model, split, config), split, None, config))
    source.close()
    assert torch.equal(results[0].model.network.values, results[1].model.network.values)
    assert results[0].history[-1]["RMSE_train"] == results[1].history[-1]["RMSE_train"]


@pytest.mark.parametrize(("shared", "workers"), [(True, 2), (False, 0), (False, 2)])
def test_a_committee_trains_from_the_database_as_from_memory(database, structures, shared, workers):
    """Members drawing their own batches read each step's batches in one stream (with workers:
    once, together); shared batches are read once for all members."""
    memory, source, config = _both_splits(database, structures, workers)
    trained = []
    for split in (memory, source):
        members = init_committee(
            PARAMS, ARCH, split, config, member_seeds(3, base_seed=2), shared_batches=shared
        )
        trained.append(committee_fit(members, split, None, config))
    source.close()
    for ours, theirs in zip(*trained, strict=True):
        assert torch.equal(ours.model.network.values, theirs.model.network.values)


@pytest.mark.filterwarnings("ignore:No atomic_energies")
def test_the_facade_committee_reads_a_database_dataset_lazily(database, tmp_path, monkeypatch):
    reads = []
    original = DatabaseSource.featurized

    def counted(self, indices, with_derivatives):
        reads.append(len(indices))
        return original(self, indices, with_derivatives)

    monkeypatch.setattr(DatabaseSource, "featurized", counted)
    dataset = HDF5StructureDataset(None, database, mode="load")
    assert database_entries(torch.utils.data.Subset(dataset, [4, 1])).entries == [4, 1]
    descriptor = ChebyshevDescriptor.from_params(PARAMS)
    committee = TorchCommitteePotential(ARCH, descriptor)
    config = TorchTrainingConfig(
        iterations=2,
        force_weight=0.2,
        testpercent=20,
        num_workers=1,
        checkpoint_dir=None,
        show_progress=False,
    )
    result = committee.train(
        dataset=dataset,
        config=config,
        committee_config=TorchCommitteeConfig(num_members=2, output_dir=tmp_path / "run"),
    )
    dataset.close()
    finals = [t.errors["RMSE_train"].iloc[-1] for t in result.trainouts]
    assert len(finals) == 2 and all(np.isfinite(finals))
    assert reads  # the statistics pass here (the workers' reads happen in their processes)
