"""The import paths users, the docs and the ænet tools' API name keep working whatever folder
the code lives in: the short public modules hand out the very objects of their homes."""

from __future__ import annotations

import importlib

import pytest

PUBLIC_NAMES = {
    "aenet_fn": ("fit", "TrainConfig", "Model", "read_aenet_ascii", "featurize_structures"),
    "aenet_fn.torch_training": ("TorchANNPotential", "TorchTrainingConfig", "Adam", "TrainOut"),
    "aenet_fn.torch_training.dataset": ("StructureDataset", "HDF5StructureDataset"),
    "aenet_fn.torch_featurize": ("ChebyshevDescriptor",),
    "aenet_fn.mlip": ("normalize_ensemble_members",),
    "aenet_fn.io.predict": ("PredictOut",),
    "aenet_fn.calculator": ("AenetCalculator",),
    "aenet_fn.committee": ("committee_fit", "committee_predict", "init_committee"),
    "aenet_fn.database": ("build_database", "open_database", "StructureDatabase"),
}
SHORT_PATHS = {
    "aenet_fn.committee": "aenet_fn.driver.committee",
    "aenet_fn.database": "aenet_fn.io.database",
}


@pytest.mark.parametrize("path", sorted(PUBLIC_NAMES))
def test_a_public_path_imports_and_has_its_names(path):
    module = importlib.import_module(path)
    missing = [name for name in PUBLIC_NAMES[path] if not hasattr(module, name)]
    assert not missing, f"{path} lacks {missing}"


@pytest.mark.parametrize("short", sorted(SHORT_PATHS))
def test_a_short_public_path_hands_out_its_homes_objects(short):
    module, home = importlib.import_module(short), importlib.import_module(SHORT_PATHS[short])
    assert sorted(module.__all__) == sorted(set(module.__all__))
    for name in module.__all__:
        assert getattr(module, name) is getattr(home, name), name
    public = getattr(home, "__all__", None) or [
        n for n, v in vars(home).items() if getattr(v, "__module__", None) == home.__name__
    ]
    public = {n for n in public if not n.startswith("_")}
    assert public <= set(module.__all__), sorted(public - set(module.__all__))
