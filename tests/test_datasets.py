"""Datasets of the ænet-style facade: StructureDataset, CachedStructureDataset, splits, training
from datasets (data-source priority, atomic-energy ownership) and predict_dataset."""

from __future__ import annotations

import warnings

import attrs
import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, Subset

import aenet_fn as af
import aenet_fn.torch_training.dataset as dataset_module
from aenet_fn.core.featurized import featurize_structures
from aenet_fn.core.splits import split_structures
from aenet_fn.examples import TIO2_STRUCTURES
from aenet_fn.torch_featurize import ChebyshevDescriptor
from aenet_fn.torch_training import Structure, TorchANNPotential
from aenet_fn.torch_training import convert_to_structures as facade_convert
from aenet_fn.torch_training.dataset import (
    CachedStructureDataset,
    StructureDataset,
    StructureSubset,
    convert_to_structures,
    train_test_split,
    train_test_split_dataset,
)
from tests.conftest import assert_same_featurized, facade_config

REFERENCES = {"Ti": -1604.604515075, "O": -432.503149303}
ARCH = {"Ti": [(4, "tanh")], "O": [(4, "tanh")]}


@pytest.fixture(scope="module")
def structures():
    paths = [TIO2_STRUCTURES / f"structure-00{i}.xsf" for i in range(1, 10)]
    return af.read_structures(paths)


@pytest.fixture(scope="module")
def descriptor():
    return ChebyshevDescriptor(["Ti", "O"], 4, 4.0, 2, 3.0, min_cutoff=0.5)


@pytest.fixture(scope="module")
def trained(structures, descriptor):
    dataset = StructureDataset(structures, descriptor, atomic_energies=REFERENCES)
    potential = TorchANNPotential(ARCH, descriptor)
    potential.train(dataset=dataset, config=facade_config())
    return potential, dataset


def test_the_dataset_interface(structures, descriptor):
    dataset = StructureDataset(structures, descriptor, atomic_energies=REFERENCES)
    assert len(dataset) == 9 and dataset.structures == list(structures)
    assert dataset.atomic_energies == REFERENCES
    assert dataset.get_structure(-1) is structures[-1]
    assert dataset.get_structure_identifier(0) == structures[0].name
    sample = dataset[2]
    assert sample["structure"] is structures[2]
    assert sample["features"].shape == (structures[2].n_atoms, descriptor.n_features)
    torch.testing.assert_close(sample["features"], descriptor.featurize(structures[2]))
    assert sample["species_indices"].tolist() == [
        descriptor.species_to_idx[s] for s in structures[2].species
    ]
    assert sample["energy"] == structures[2].energy and sample["has_forces"]
    assert dataset.get_force_indices() == list(range(9))
    assert dataset.get_statistics()["total_atoms"] == sum(s.n_atoms for s in structures)
    with pytest.raises(IndexError):
        dataset[9]
    assert convert_to_structures is facade_convert  # one function, exported by both modules
    unnamed = StructureDataset([attrs.evolve(structures[0], name=None)], descriptor)
    assert unnamed.get_structure_identifier(0) == "structure_000000"


def test_featurized_sets_are_cached_per_view(structures, descriptor):
    dataset = StructureDataset(structures[:4], descriptor)
    energy_only = dataset.featurized(False)
    assert energy_only is dataset.featurized(False, torch.float64)
    assert energy_only.local is None
    single = dataset.featurized(False, torch.float32)
    assert single.features.dtype == torch.float32 and single is not energy_only
    assert_same_featurized(
        energy_only, featurize_structures(descriptor.params, structures[:4], with_derivatives=False)
    )
    # the sample features come from the cached set once there is one
    torch.testing.assert_close(dataset[1]["features"], descriptor.featurize(structures[1]))


def test_filters_warn_with_the_number_removed(structures, descriptor):
    per_atom = [(s.energy - sum(REFERENCES[x] for x in s.species)) / s.n_atoms for s in structures]
    threshold = float(np.median(per_atom))
    expected = [s for s, e in zip(structures, per_atom) if e <= threshold]
    with pytest.warns(UserWarning, match=rf"{9 - len(expected)} of 9 structures removed"):
        dataset = StructureDataset(
            structures, descriptor, max_energy=threshold, atomic_energies=REFERENCES
        )
    assert dataset.structures == expected
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        StructureDataset(structures, descriptor, max_forces=1e6)


def test_subsets_behave_like_datasets(structures, descriptor):
    dataset = StructureDataset(structures, descriptor, atomic_energies=REFERENCES)
    train, test = train_test_split(dataset, test_fraction=0.3, seed=1)
    assert isinstance(train, StructureSubset) and isinstance(train, Subset)
    assert train.dataset is dataset and len(test) == 2 and len(train) == 7
    assert sorted(train.indices + test.indices) == list(range(9))
    assert train.indices == sorted(train.indices) and test.indices == sorted(test.indices)
    # the draw is the one split_seed makes for structures= input
    reference_train, reference_test = split_structures(structures, 30, 1)
    assert train.structures == reference_train and test.structures == reference_test
    assert train.atomic_energies == REFERENCES and train.descriptor is descriptor
    assert train.get_structure(0) is structures[train.indices[0]]
    assert train[1]["structure"] is structures[train.indices[1]]
    assert train.get_structure_identifier(0) == structures[train.indices[0]].name
    # featurized slices the parent's cached set: equal to featurizing the subset directly
    assert_same_featurized(
        test.featurized(True),
        featurize_structures(descriptor.params, test.structures, with_derivatives=True),
    )
    assert test.featurized(True) is test.featurized(True, torch.float64)
    nested = StructureSubset(train, [2, 0])
    assert nested.structures == [train.get_structure(2), train.get_structure(0)]
    assert nested.atomic_energies == REFERENCES
    assert_same_featurized(
        nested.featurized(False),
        featurize_structures(descriptor.params, nested.structures, with_derivatives=False),
    )
    shuffled_train, shuffled_test = train_test_split_dataset(dataset, 0.3, seed=1)
    assert sorted(shuffled_train.indices) == train.indices
    assert sorted(shuffled_test.indices) == test.indices
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_split(dataset, 1.0)


def test_training_from_a_dataset_equals_training_from_structures(structures, descriptor):
    direct = TorchANNPotential(ARCH, descriptor)
    direct.train(structures=structures, config=facade_config(atomic_energies=REFERENCES))
    dataset = StructureDataset(structures, descriptor, atomic_energies=REFERENCES)
    from_dataset = TorchANNPotential(ARCH, descriptor)
    out = from_dataset.train(dataset=dataset, config=facade_config())
    _same_metrics(from_dataset.history, direct.history)
    assert np.isfinite(out.errors[["RMSE_train", "RMSE_test"]].to_numpy()).all()
    # explicit splits: testpercent is ignored; the same split gives the same run
    train, test = train_test_split(dataset, 0.3, seed=1)
    explicit = TorchANNPotential(ARCH, descriptor)
    explicit.train(train_dataset=train, test_dataset=test, config=facade_config(testpercent=90))
    _same_metrics(explicit.history, direct.history)
    # dataset + test_dataset: the dataset is not split
    whole = TorchANNPotential(ARCH, descriptor)
    whole.train(dataset=train, test_dataset=test, config=facade_config(testpercent=50))
    _same_metrics(whole.history, direct.history)
    # a torch Subset of a dataset works too
    plain = TorchANNPotential(ARCH, descriptor)
    plain.train(
        train_dataset=Subset(dataset, train.indices),
        test_dataset=Subset(dataset, test.indices),
        config=facade_config(),
    )
    _same_metrics(plain.history, direct.history)


def _same_metrics(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k != "epoch_time"} == pytest.approx(
            {k: v for k, v in y.items() if k != "epoch_time"}, nan_ok=True
        )


def test_cached_dataset_featurizes_once(structures, descriptor, monkeypatch):
    calls = []
    original = dataset_module.featurize_structures

    def counting(*args, **kwargs):
        calls.append(kwargs["with_derivatives"])
        return original(*args, **kwargs)

    monkeypatch.setattr(dataset_module, "featurize_structures", counting)
    dataset = CachedStructureDataset(structures, descriptor, atomic_energies=REFERENCES)
    assert calls == [False]
    assert len(dataset) == 9 and dataset[0]["structure"] is structures[0]
    potential = TorchANNPotential(ARCH, descriptor)
    for _ in range(2):
        out = potential.train(dataset=dataset, config=facade_config())
    assert calls == [False]  # splits and repeated runs reuse the eager features
    assert np.isfinite(out.errors["RMSE_train"].to_numpy()).all()
    potential.predict_dataset(dataset)
    assert calls == [False]
    potential.train(dataset=dataset, config=facade_config(force_weight=0.5, iterations=1))
    potential.train(dataset=dataset, config=facade_config(force_weight=0.5, iterations=1))
    assert calls == [False, True]  # force training: derivatives once, then cached
    assert np.isfinite(potential.history[-1]["RMSE_force_train"])


def test_predict_dataset_equals_predict(trained, structures):
    potential, dataset = trained
    by_dataset = potential.predict_dataset(dataset)
    direct = potential.predict(structures)
    np.testing.assert_allclose(by_dataset.total_energy, direct.total_energy, rtol=1e-13)
    np.testing.assert_allclose(by_dataset.cohesive_energy, direct.cohesive_energy, atol=1e-9)
    for a, b in zip(by_dataset.atom_energies, direct.atom_energies):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    assert by_dataset.structure_paths == direct.structure_paths
    assert all(np.array_equal(a, b) for a, b in zip(by_dataset.coords, direct.coords))
    _, test = train_test_split_dataset(dataset, 0.5, seed=3)
    subset = potential.predict_dataset(test, config=None)
    np.testing.assert_allclose(
        subset.total_energy, [direct.total_energy[i] for i in test.indices], rtol=1e-13
    )
    with_forces = potential.predict_dataset(test, eval_forces=True)
    reference = potential.predict(test.structures, eval_forces=True)
    for a, b in zip(with_forces.forces, reference.forces):
        np.testing.assert_array_equal(a, b)


class _FeaturesOnly(Dataset):
    """A foreign dataset whose samples carry features but no structure."""

    def __init__(self, dataset: StructureDataset, with_positions: bool) -> None:
        self.samples = [dataset[i] for i in range(len(dataset))]
        self.with_positions = with_positions

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = dict(self.samples[index])
        del sample["structure"]
        if not self.with_positions:
            sample["positions"] = None
        return sample


def test_predict_dataset_from_samples_and_its_errors(trained, structures):
    potential, dataset = trained
    foreign = _FeaturesOnly(dataset, with_positions=True)
    out = potential.predict_dataset(foreign)
    np.testing.assert_allclose(
        out.total_energy, potential.predict(structures).total_energy, rtol=1e-13
    )
    with pytest.raises(ValueError, match="exposing its structures"):
        potential.predict_dataset(foreign, eval_forces=True)
    with pytest.raises(ValueError, match="coordinates"):
        potential.predict_dataset(_FeaturesOnly(dataset, with_positions=False))
    with pytest.raises(ValueError, match="empty"):
        potential.predict_dataset(StructureDataset([], dataset.descriptor))


def test_dataset_errors(structures, descriptor):
    potential = TorchANNPotential(ARCH, descriptor)
    with pytest.raises(ValueError, match="needs structures=, dataset= or train_dataset="):
        potential.train(config=facade_config())
    stray = Structure(np.zeros((1, 3)), ["Zr"], energy=1.0, name="stray")
    for cls in (StructureDataset, CachedStructureDataset):
        with pytest.raises(ValueError, match=r"\['Zr'\].*'stray'"):
            cls([*structures[:2], stray], descriptor)
    empty = StructureDataset([], descriptor)
    assert len(empty) == 0
    with pytest.raises(ValueError, match="training dataset is empty"):
        potential.train(dataset=empty, config=facade_config(atomic_energies=None))
    with pytest.warns(UserWarning, match="9 of 9 structures removed"):
        filtered = CachedStructureDataset(structures, descriptor, max_forces=1e-9)
    with pytest.raises(ValueError, match="training dataset is empty"):
        potential.train(train_dataset=filtered, config=facade_config())
    other = ChebyshevDescriptor(["Ti", "O"], 3, 4.0, 2, 3.0, min_cutoff=0.5)
    with pytest.raises(ValueError, match="differs from the potential's"):
        potential.train(dataset=StructureDataset(structures, other), config=facade_config())


def test_atomic_energy_ownership(structures, descriptor):
    potential = TorchANNPotential(ARCH, descriptor)
    owned = StructureDataset(structures, descriptor, atomic_energies=REFERENCES)
    conflicting = {"Ti": -1600.0, "O": -430.0}
    with pytest.raises(ValueError, match="conflict with the dataset's atomic_energies"):
        potential.train(dataset=owned, config=facade_config(atomic_energies=conflicting))
    with warnings.catch_warnings():  # matching values are allowed, silently
        warnings.simplefilter("error")
        potential.train(dataset=owned, config=facade_config(atomic_energies=dict(REFERENCES)))
    assert potential.model.normalization.atomic_energies.tolist() == [
        REFERENCES["Ti"],
        REFERENCES["O"],
    ]
    other = StructureDataset(structures[:3], descriptor, atomic_energies=conflicting)
    with pytest.raises(ValueError, match="conflicting atomic_energies"):
        potential.train(train_dataset=owned, test_dataset=other, config=facade_config())
    bare = StructureDataset(structures, descriptor)
    with pytest.warns(UserWarning) as record:
        potential.train(dataset=bare, config=facade_config(atomic_energies=REFERENCES))
    messages = [str(w.message) for w in record]
    assert any("atomic_energies is ignored" in m for m in messages)
    assert any("No atomic_energies provided" in m for m in messages)
    assert potential.model.normalization.atomic_energies.tolist() == [0.0, 0.0]
    # a test dataset without references takes the training dataset's
    potential.train(
        train_dataset=owned,
        test_dataset=StructureDataset(structures[:2], descriptor),
        config=facade_config(),
    )
    with pytest.warns(UserWarning, match="max_energy / max_forces are ignored"):
        potential.train(dataset=owned, config=facade_config(max_energy=10.0))


def test_the_reference_import_paths_of_the_datasets_work():
    """As in the ænet tools, the dataset module also exports the HDF5 dataset."""
    from aenet_fn.torch_training import HDF5StructureDataset as exported
    from aenet_fn.torch_training.dataset import HDF5StructureDataset

    assert HDF5StructureDataset is exported


def test_stress_training_featurizes_a_dataset_once(monkeypatch):
    """A dataset's stress data is cached like its features: two stress runs and a split of
    the dataset featurize its structures once."""
    from aenet_fn.examples import emt_alloys

    calls = []
    original = dataset_module.featurize_structures

    def counting(*args, **kwargs):
        calls.append(kwargs.get("with_stress", False))
        return original(*args, **kwargs)

    structures = emt_alloys(12, seed=2)
    descriptor = ChebyshevDescriptor(["Cu", "Ni", "Au"], 4, 4.0, 2, 3.0, min_cutoff=0.5)
    dataset = StructureDataset(structures, descriptor)
    monkeypatch.setattr(dataset_module, "featurize_structures", counting)
    potential = TorchANNPotential({s: [(4, "tanh")] for s in ["Cu", "Ni", "Au"]}, descriptor)
    config = facade_config(stress_weight=0.3, iterations=1, atomic_energies=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no atomic energies
        for _ in range(2):
            potential.train(dataset=dataset, config=config)
    assert calls == [True]
    assert np.isfinite(potential.history[-1]["RMSE_stress_train"])
