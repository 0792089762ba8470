"""Batches from lazy structure sources and DataLoader workers equal in-memory batches."""

from __future__ import annotations

import gc
import multiprocessing

import attrs
import pytest
import torch

import aenet_fn as af
from aenet_fn.core.normalization import FeatureMoments, fit_normalization
from aenet_fn.driver.loader import StructureSource, batch_stream, take_batch
from aenet_fn.examples import TIO2_STRUCTURES

PARAMS = af.ChebyshevParams(["Ti", "O"], 6, 5.0, 3, 3.5, min_cutoff=0.5)
ARCH = {"Ti": [(5, "tanh")], "O": [(5, "tanh")]}
REFERENCES = {"Ti": -1604.604515075, "O": -432.503149303}


@pytest.fixture(scope="module")
def splits():
    structures = af.read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf"))[:14])
    in_memory = af.featurize_structures(PARAMS, structures, with_derivatives=True)
    with StructureSource(PARAMS, structures, with_derivatives=True) as lazy:
        yield structures, in_memory, lazy  # closed after the module: its workers stop


def test_lazy_batches_equal_in_memory_batches(splits):
    _, in_memory, lazy = splits
    selection = torch.tensor([5, 2, 5, 11, 0])
    mask = torch.zeros(in_memory.n_structures, dtype=torch.bool)
    mask[[2, 11]] = True
    expected, got = take_batch(in_memory, selection, mask), take_batch(lazy, selection, mask)
    for field in attrs.fields(type(expected)):
        if field.name in ("atom_index", "local"):
            continue
        a, b = getattr(expected, field.name), getattr(got, field.name)
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b, field.name
    for field in attrs.fields(type(expected.local)):
        a, b = getattr(expected.local, field.name), getattr(got.local, field.name)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14, msg=field.name)
    assert torch.equal(lazy.has_forces, in_memory.has_forces)
    assert torch.equal(lazy.species_counts, in_memory.species_counts)


def test_normalization_from_moments_equals_normalization_from_features(splits):
    _, in_memory, lazy = splits
    reference = torch.tensor([-1604.604515075, -432.503149303], dtype=torch.float64)
    args = (in_memory.energies, in_memory.species_counts, reference)
    direct = fit_normalization(in_memory.features, *args)
    streamed = fit_normalization(lazy.feature_moments(chunk=4), *args)
    for field in attrs.fields(type(direct)):
        a, b = getattr(direct, field.name), getattr(streamed, field.name)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=field.name)
    halves = FeatureMoments.of(in_memory.features[:30]).merge(
        FeatureMoments.of(in_memory.features[30:])
    )
    assert halves.count == in_memory.features.shape[0]
    torch.testing.assert_close(halves.maximum, in_memory.features.max(dim=0).values)


@pytest.mark.parametrize("policy", ["uniform", "error_weighted"])
def test_training_from_a_lazy_source_equals_training_in_memory(splits, policy):
    _, in_memory, lazy = splits
    model = af.init_model(PARAMS, ARCH, in_memory, seed=1, atomic_energies=REFERENCES)
    config = af.TrainConfig(
        epochs=2, batch_size=4, force_weight=0.2, force_fraction=0.5, sampling_policy=policy
    )
    memory_run = af.fit(af.init_train_state(model, in_memory, config), in_memory, None, config)
    lazy_run = af.fit(af.init_train_state(model, lazy, config), lazy, None, config)
    torch.testing.assert_close(
        lazy_run.model.network.values, memory_run.model.network.values, rtol=0, atol=1e-12
    )
    assert torch.equal(lazy_run.sampler.force_subset, memory_run.sampler.force_subset)


def test_worker_processes_give_the_same_batches_and_training(splits):
    _, _, lazy = splits
    selections = [torch.tensor([0, 3]), torch.tensor([7, 7, 1]), torch.tensor([13])]
    mask = torch.ones(lazy.n_structures, dtype=torch.bool)
    here = list(batch_stream(lazy, selections, mask))
    workers = list(batch_stream(lazy, selections, mask, num_workers=2))
    assert len(here) == len(workers) == 3
    for a, b in zip(here, workers):
        assert torch.equal(a.features, b.features) and torch.equal(a.local.radial, b.local.radial)
    model = af.init_model(PARAMS, ARCH, lazy, seed=0, atomic_energies=REFERENCES)
    runs = []
    for num_workers in (0, 2):
        config = af.TrainConfig(epochs=1, batch_size=5, force_weight=0.1, num_workers=num_workers)
        runs.append(af.fit(af.init_train_state(model, lazy, config), lazy, lazy, config))
    assert torch.equal(runs[0].model.network.values, runs[1].model.network.values)
    assert runs[0].history[0]["RMSE_test"] == runs[1].history[0]["RMSE_test"]


def test_bad_sources_and_options_are_refused():
    with pytest.raises(ValueError, match="StructureSource: no structures"):
        StructureSource(PARAMS, [], with_derivatives=False)
    copper = af.Structure([[0.0, 0, 0]], ["Cu"], energy=-3.0)
    with pytest.raises(ValueError, match=r"\['Cu'\]"):
        StructureSource(PARAMS, [copper], with_derivatives=False)
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0"):
        af.TrainConfig(num_workers=-1)
    with pytest.raises(ValueError, match="prefetch_factor must be an integer >= 1"):
        af.TrainConfig(prefetch_factor=0)


def test_the_facade_trains_with_workers_like_without(splits):
    from aenet_fn.torch_featurize import ChebyshevDescriptor
    from aenet_fn.torch_training import Adam, TorchANNPotential, TorchTrainingConfig

    structures, _, _ = splits
    descriptor = ChebyshevDescriptor(["Ti", "O"], 6, 5.0, 3, 3.5, min_cutoff=0.5)
    weights = []
    for workers in (0, 2):
        potential = TorchANNPotential(ARCH, descriptor=descriptor)
        config = TorchTrainingConfig(
            iterations=2,
            method=Adam(mu=0.003, batchsize=4),
            testpercent=20,
            force_weight=0.2,
            atomic_energies=REFERENCES,
            seed=5,
            split_seed=3,
            num_workers=workers,
            checkpoint_dir=None,
            show_progress=False,
        )
        gc.disable()  # the workers must stop when training ends, not at a later collection
        try:
            potential.train(structures=structures, config=config)
            assert multiprocessing.active_children() == []
        finally:
            gc.enable()
        weights.append(potential.model.network.values)
    # lazy splits fit the feature statistics from streamed moments: equal to round-off
    torch.testing.assert_close(weights[1], weights[0], rtol=0, atol=1e-10)


def test_closing_a_source_stops_its_persistent_workers(splits):
    structures, in_memory, _ = splits
    config = af.TrainConfig(epochs=2, batch_size=4, num_workers=2, persistent_workers=True)
    model = af.init_model(PARAMS, ARCH, in_memory, seed=0, atomic_energies=REFERENCES)
    gc.disable()
    try:
        with StructureSource(PARAMS, structures, with_derivatives=False) as source:
            af.fit(af.init_train_state(model, source, config), source, None, config)
            assert multiprocessing.active_children()  # kept between epochs
        assert multiprocessing.active_children() == []
    finally:
        gc.enable()


def test_runtime_caches_are_bounded_and_change_nothing(splits):
    from aenet_fn.driver.cache import LRUCache, lru_evictions

    assert lru_evictions(["a", "b", "c"], 2) == ["a"]
    assert lru_evictions(["a", "b"], None) == [] and lru_evictions(["a"], 0) == ["a"]
    structures, in_memory, _ = splits
    cached = StructureSource(PARAMS, structures, with_derivatives=True, cache_entries=4)
    mask = torch.ones(in_memory.n_structures, dtype=torch.bool)
    for selection in (torch.tensor([1, 2, 3]), torch.tensor([3, 9, 1, 1]), torch.tensor([12])):
        expected, got = take_batch(in_memory, selection, mask), take_batch(cached, selection, mask)
        assert torch.equal(expected.features, got.features)
        torch.testing.assert_close(got.local.radial, expected.local.radial, rtol=0, atol=1e-14)
        assert torch.equal(got.local.triplet_first, expected.local.triplet_first)
        assert len(cached._cache) <= 4
    assert cached._cache.get((12, True)) is not None and cached._cache.get((2, True)) is None
    with pytest.raises(ValueError, match="cache capacity"):
        LRUCache(-1)


def test_persistent_cached_workers_train_like_one_process(splits):
    _, _, lazy = splits
    structures = splits[0]
    model = af.init_model(PARAMS, ARCH, lazy, seed=3, atomic_energies=REFERENCES)
    plain = af.TrainConfig(epochs=3, batch_size=4, force_weight=0.2)
    expected = af.fit(af.init_train_state(model, lazy, plain), lazy, None, plain)
    source = StructureSource(PARAMS, structures, with_derivatives=True, cache_entries=None)
    workers = attrs.evolve(plain, num_workers=2, persistent_workers=True)
    got = af.fit(af.init_train_state(model, source, workers), source, None, workers)
    torch.testing.assert_close(
        got.model.network.values, expected.model.network.values, rtol=0, atol=1e-12
    )
    assert source._loader is not None  # the same workers served all three epochs
    source.close()


class _Unreadable:
    """Structures whose item ``bad`` cannot be read (a corrupt entry of a lazy database)."""

    def __init__(self, structures, bad):
        self.structures, self.bad, self.reads = structures, bad, 0

    def __len__(self):
        return len(self.structures)

    def __getitem__(self, index):
        self.reads += 1
        if index == self.bad and self.reads > len(self.structures):  # after the metadata pass
            raise ValueError(f"entry {index}: unreadable")
        return self.structures[index]


def test_a_worker_that_raises_stops_training_with_its_error(splits):
    structures, _, _ = splits
    model = af.init_model(
        PARAMS, ARCH, af.featurize_structures(PARAMS, structures, with_derivatives=False), seed=0
    )
    for persistent in (False, True):
        source = StructureSource(PARAMS, _Unreadable(structures, 6), with_derivatives=False)
        config = af.TrainConfig(
            epochs=1, batch_size=4, num_workers=2, persistent_workers=persistent
        )
        gc.disable()  # the workers stop with the error, not at a later collection
        try:
            with pytest.raises(ValueError, match="entry 6: unreadable"):
                af.fit(af.init_train_state(model, source, config), source, None, config)
            assert multiprocessing.active_children() == []
        finally:
            gc.enable()


def test_cache_scope_selects_the_cached_splits(splits):
    from aenet_fn.torch_featurize import ChebyshevDescriptor
    from aenet_fn.torch_training import TorchTrainingConfig
    from aenet_fn.torch_training.sources import TrainingSources

    structures, _, _ = splits
    descriptor = ChebyshevDescriptor(["Ti", "O"], 6, 5.0, 3, 3.5, min_cutoff=0.5)
    sources = TrainingSources(descriptor)
    for scope, expected in (("all", (7, 7)), ("train", (7, 0)), ("val", (0, 7))):
        config = TorchTrainingConfig(
            num_workers=1, cache_features=True, cache_feature_max_entries=7, cache_scope=scope
        )
        train = sources._split(structures, config, torch.float64, False, "train")
        test = sources._split(structures, config, torch.float64, False, "val")
        assert (train._cache.capacity, test._cache.capacity) == expected
