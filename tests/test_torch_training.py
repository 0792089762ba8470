"""The ænet-style facade: the guide's examples, model files, config validation."""

from __future__ import annotations

import doctest
import warnings

import numpy as np
import pytest
import torch

import aenet_fn as af
from aenet_fn.examples import TIO2_STRUCTURES
from aenet_fn.torch_featurize import ChebyshevDescriptor
from aenet_fn.torch_training import (
    SGD,
    Adam,
    Structure,
    TorchANNPotential,
    TorchCommitteePotential,
    TorchTrainingConfig,
)
from tests.conftest import REFERENCE_DATA

GUIDE = REFERENCE_DATA / "torch-training-guide.txt"
"""The ænet Python tools' user guide of PyTorch training (plain text; provenance:
tests/data/README.md)."""


def test_every_doctest_example_of_the_guide_runs():
    text = GUIDE.read_text(encoding="utf-8").replace("aenet.", "aenet_fn.")
    test = doctest.DocTestParser().get_doctest(text, {}, "guide", str(GUIDE), 0)
    assert len(test.examples) >= 30
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    result = runner.run(test, out=report.append)
    assert result.failed == 0, "".join(report)


def _tiny_structures():
    return [
        Structure(
            positions=np.array([[0.0, 0.0, 0.0], [0.9, 0.0, 0.0], [0.0, 0.9, 0.0]]),
            species=["H", "H", "H"],
            energy=0.0,
        ),
        Structure(
            positions=np.array([[0.1, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
            species=["H", "H", "H"],
            energy=0.5,
        ),
    ]


def test_the_guides_first_example_trains_and_reports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    descriptor = ChebyshevDescriptor(
        species=["H"],
        rad_order=1,
        rad_cutoff=2.0,
        ang_order=0,
        ang_cutoff=2.0,
        min_cutoff=0.1,
        device="cpu",
        dtype=torch.float64,
    )
    mlp = TorchANNPotential({"H": [(4, "tanh")]}, descriptor=descriptor)
    config = TorchTrainingConfig(
        iterations=1,
        method=Adam(mu=0.001, batchsize=1),
        testpercent=50,
        force_weight=0.0,
        atomic_energies={"H": 0.0},
        normalize_features=False,
        normalize_energy=False,
        memory_mode="cpu",
        device="cpu",
        checkpoint_dir=None,
        checkpoint_interval=0,
        max_checkpoints=None,
        save_best=False,
        use_scheduler=False,
    )
    results = mlp.train(structures=_tiny_structures(), config=config)
    last = results.errors[["RMSE_train", "RMSE_test"]].tail(1)
    assert last.shape == (1, 2) and np.isfinite(last.to_numpy()).all()
    assert "Training statistics:" in str(results)


@pytest.fixture(scope="module")
def trained():
    structures = af.read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf"))[:24])
    descriptor = ChebyshevDescriptor(["Ti", "O"], 6, 5.0, 3, 3.5, min_cutoff=0.5)
    potential = TorchANNPotential({"Ti": [(6, "tanh")], "O": [(6, "tanh")]}, descriptor)
    config = TorchTrainingConfig(
        iterations=3,
        method=Adam(mu=0.003, batchsize=8),
        testpercent=25,
        force_weight=0.2,
        atomic_energies={"Ti": -1604.604515075, "O": -432.503149303},
        seed=3,
        split_seed=1,
        checkpoint_dir=None,
        show_progress=False,
    )
    potential.train(structures=structures, config=config)
    return potential, structures


def test_predict_equals_the_core_model(trained):
    potential, structures = trained
    out = potential.predict(structures[:3], eval_forces=True)
    energies, forces = af.energy_and_forces(
        potential.model, af.collate(structures[:3], ["Ti", "O"])
    )
    np.testing.assert_allclose(out.total_energy, energies.numpy(), rtol=1e-12)
    np.testing.assert_allclose(np.concatenate(out.forces), forces.numpy(), rtol=1e-10, atol=1e-12)
    sums = [float(e.sum()) for e in out.atom_energies]
    np.testing.assert_allclose(sums, out.total_energy, rtol=1e-12)  # atomic energies in eV
    reference = [
        -1604.604515075 * s.species.count("Ti") - 432.503149303 * s.species.count("O")
        for s in structures[:3]
    ]
    np.testing.assert_allclose(
        out.cohesive_energy, np.array(out.total_energy) - reference, rtol=1e-12
    )


def test_saved_and_reloaded_model_predicts_the_same(trained, tmp_path):
    potential, structures = trained
    path = tmp_path / "model.pt"
    potential.save(path)
    loaded = TorchANNPotential.from_file(path)
    before = potential.predict(structures[:4], eval_forces=True)
    after = loaded.predict(structures[:4], eval_forces=True)
    assert before.total_energy == after.total_energy
    assert all(np.array_equal(a, b) for a, b in zip(before.forces, after.forces))
    assert loaded.metadata["descriptor_config"]["species"] == ["Ti", "O"]


def test_model_files_and_checkpoints_are_not_interchangeable(trained, tmp_path):
    potential, _ = trained
    path = tmp_path / "model.pt"
    potential.save(path)
    with pytest.raises(ValueError, match="not an aenet_fn-checkpoint file"):
        af.load_checkpoint(path)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not an aenet_fn-model file"):
        TorchANNPotential.from_file(tmp_path / "foreign.pt")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"iterations": -1}, ValueError, "iterations must be >= 0"),
        ({"testpercent": 101}, ValueError, r"testpercent must lie in \[0, 100\]"),
        ({"seed": 1.5}, ValueError, "seed must be an integer"),
        ({"split_seed": True}, ValueError, "split_seed must be an integer"),
        ({"force_weight": 2.0}, ValueError, r"force_weight must lie in \[0, 1\]"),
        ({"force_fraction": -0.5}, ValueError, r"force_fraction must lie in \[0, 1\]"),
        ({"force_sampling": "often"}, ValueError, "force_sampling must be one of"),
        ({"sampling_policy": "best"}, ValueError, "sampling_policy must be one of"),
        ({"force_min_structures_per_epoch": -1}, ValueError, "must be >= 0"),
        ({"memory_mode": "disk"}, ValueError, "memory_mode must be one of"),
        ({"memory_mode": "mixed"}, NotImplementedError, "mixed"),
        ({"cache_scope": "some"}, ValueError, "cache_scope must be one of"),
        ({"cache_feature_max_entries": -1}, ValueError, "must be >= 0"),
        ({"force_resample_num_epochs": -2}, ValueError, "must be >= 0"),
        ({"precision": "half"}, ValueError, "precision must be one of"),
        ({"num_workers": -1}, ValueError, "num_workers must be >= 0"),
        ({"prefetch_factor": 0}, ValueError, "prefetch_factor must be >= 1"),
        ({"force_resample_each_epoch": True}, ValueError, "force_resample_num_epochs"),
        ({"atomic_energies": {"H": float("nan")}}, ValueError, "must be a finite number"),
        ({"method": "adam"}, ValueError, "method must be Adam"),
        ({"E_scaling": 0.0}, ValueError, "E_scaling must be > 0"),
        ({"unknown_option": 1}, TypeError, "unknown options"),
        ({"max_checkpoints": 1.5}, ValueError, "max_checkpoints must be an integer"),
        ({"max_checkpoints": True}, ValueError, "max_checkpoints must be an integer"),
        ({"use_scheduler": "no"}, ValueError, "use_scheduler must be True or False, got 'no'"),
        ({"save_best": "yes"}, ValueError, "save_best must be True or False"),
        ({"show_progress": "False"}, ValueError, "show_progress must be True or False"),
        ({"normalize_energy": 1}, ValueError, "normalize_energy must be True or False"),
    ],
)
def test_config_validation(kwargs, error, message):
    with pytest.raises(error, match=message):
        TorchTrainingConfig(**kwargs)


@pytest.mark.parametrize(
    ("method", "kwargs", "message"),
    [
        (Adam, {"batchsize": 2.7}, "batchsize must be an integer, got 2.7"),
        (Adam, {"batchsize": True}, "batchsize must be an integer, got True"),
        (SGD, {"batchsize": 0}, "batchsize must be >= 1, got 0"),
    ],
)
def test_method_batchsize_must_be_a_positive_integer(method, kwargs, message):
    with pytest.raises(ValueError, match=message):
        method(**kwargs)
    changed = method()
    changed.batchsize = kwargs["batchsize"]  # changed after construction: the config checks
    with pytest.raises(ValueError, match=message):
        TorchTrainingConfig(method=changed)


def test_integral_values_are_stored_as_integers():
    config = TorchTrainingConfig(max_checkpoints=2.0, iterations=3.0, method=Adam(batchsize=4.0))
    assert (config.max_checkpoints, config.iterations, config.batch_size) == (2, 3, 4)
    assert all(type(v) is int for v in (config.max_checkpoints, config.iterations))
    assert TorchTrainingConfig(max_checkpoints=None).max_checkpoints is None
    # the reference's rule: None or <= 0 keeps every checkpoint
    assert TorchTrainingConfig(max_checkpoints=0).max_checkpoints is None
    assert TorchTrainingConfig(max_checkpoints=-1).max_checkpoints is None


def _tiny_potential(committee: bool = False):
    descriptor = ChebyshevDescriptor(["H"], 1, 2.0, 0, 2.0, min_cutoff=0.1)
    kind = TorchCommitteePotential if committee else TorchANNPotential
    return kind({"H": [(4, "tanh")]}, descriptor)


def test_max_checkpoints_rotates_the_checkpoints(tmp_path):
    config = TorchTrainingConfig(
        iterations=3,
        method=Adam(batchsize=1),
        atomic_energies={"H": 0.0},
        checkpoint_dir=str(tmp_path),
        max_checkpoints=2.0,
        show_progress=False,
        testpercent=0,
    )
    _tiny_potential().train(structures=_tiny_structures(), config=config)
    assert len(list(tmp_path.glob("checkpoint_epoch_*.pt"))) == 2


@pytest.mark.parametrize("committee", [False, True])
@pytest.mark.parametrize(
    ("energies", "message"),
    [
        ({"H": 0.0, "Xx": 1.0}, r"names \['Xx'\], which are not species of the descriptor"),
        ({"h": 0.0}, r"names \['h'\].*did you mean 'H' instead of 'h'\?"),
    ],
)
def test_atomic_energies_of_other_species_are_refused(committee, energies, message):
    config = TorchTrainingConfig(
        iterations=1, atomic_energies=energies, checkpoint_dir=None, show_progress=False
    )
    with pytest.raises(ValueError, match=message):
        _tiny_potential(committee).train(structures=_tiny_structures(), config=config)


def test_a_dataset_may_own_references_of_more_species():
    """References owned by a dataset (e.g. a database built for more elements) may name other
    species; the model takes those of its own species."""
    from aenet_fn.torch_training import StructureDataset

    potential = _tiny_potential()
    dataset = StructureDataset(
        _tiny_structures(), potential.descriptor, atomic_energies={"H": -0.5, "O": -1.0}
    )
    config = TorchTrainingConfig(
        iterations=1, testpercent=0, checkpoint_dir=None, show_progress=False
    )
    potential.train(train_dataset=dataset, config=config)
    assert potential.model.normalization.atomic_energies.tolist() == [-0.5]


def test_alpha_alias_and_batch_size():
    config = TorchTrainingConfig(alpha=0.3, method=Adam(batchsize=7))
    assert (config.force_weight, config.alpha, config.batch_size) == (0.3, 0.3, 7)
    assert TorchTrainingConfig().method.method_name == "adam"


def test_training_inputs_are_checked():
    descriptor = ChebyshevDescriptor(["H"], 1, 2.0, 0, 2.0, min_cutoff=0.1)
    potential = TorchANNPotential({"H": [(4, "tanh")]}, descriptor)
    quiet = TorchTrainingConfig(iterations=1, checkpoint_dir=None, show_progress=False)
    with pytest.raises(ValueError, match="needs structures="):
        potential.train(config=quiet)
    with pytest.raises(ValueError, match="no structures"):
        potential.train(structures=[], config=quiet)
    unlabelled = Structure(np.zeros((1, 3)), ["H"], name="nolabel")
    with pytest.raises(ValueError, match="'nolabel'"):
        potential.train(structures=[unlabelled], config=quiet)
    with pytest.raises(RuntimeError, match="not been trained"):
        potential.predict(_tiny_structures())
    with pytest.raises(ValueError, match="no network for species"):
        TorchANNPotential({"O": [(4, "tanh")]}, descriptor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"\['O'\] are not in the descriptor's species"):
            potential.train(
                structures=[Structure(np.zeros((1, 3)), ["O"], energy=1.0)], config=quiet
            )


def test_save_energies_writes_one_line_per_structure(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = sorted(TIO2_STRUCTURES.glob("*.xsf"))[:8]
    descriptor = ChebyshevDescriptor(["Ti", "O"], 4, 4.0, 2, 3.0, min_cutoff=0.5)
    potential = TorchANNPotential({"Ti": [(4, "tanh")], "O": [(4, "tanh")]}, descriptor)
    config = TorchTrainingConfig(
        iterations=1,
        testpercent=25,
        save_energies=True,
        checkpoint_dir="run",
        show_progress=False,
        atomic_energies={"Ti": -1604.604515075, "O": -432.503149303},
        split_seed=0,
    )
    results = potential.train(structures=[str(p) for p in paths], config=config)
    energies = results.energies
    assert len(energies.energies_train) == 6 and len(energies.energies_test) == 2
    written = set(energies.energies_train.iloc[:, -1]) | set(energies.energies_test.iloc[:, -1])
    assert written == {str(p) for p in paths}
    assert (tmp_path / "run" / "history.json").is_file() and (
        tmp_path / "run" / "history.csv"
    ).is_file()


@pytest.mark.parametrize("committee", [False, True])
def test_the_configs_device_receives_the_splits_and_the_trained_models_return(
    committee, monkeypatch, tmp_path
):
    """``device`` moves both featurized splits there once (the move is recorded, not made:
    this machine may have no accelerator; ``tests/test_cuda.py`` trains on one), the run's
    ``route`` reaches the core, and the trained models come back to the descriptor's device."""
    import aenet_fn.torch_training.committee as committee_module
    import aenet_fn.torch_training.sources as sources_module
    import aenet_fn.torch_training.trainer as trainer_module

    moves = []

    def recorded(tree, device=None, dtype=None):
        moves.append((type(tree).__name__, torch.device(device)))
        return tree

    monkeypatch.setattr(trainer_module, "to", recorded)
    monkeypatch.setattr(committee_module, "to", recorded)
    monkeypatch.setattr(sources_module, "to", recorded)
    config = TorchTrainingConfig(
        iterations=1,
        device="cuda:1",
        route="func",
        testpercent=50,
        atomic_energies={"H": 0.0},
        checkpoint_dir=None,
        show_progress=False,
    )
    potential = _tiny_potential(committee)
    if committee:
        from aenet_fn.torch_training import TorchCommitteeConfig

        output = TorchCommitteeConfig(num_members=2, output_dir=str(tmp_path))
        potential.train(structures=_tiny_structures(), config=config, committee_config=output)
    else:
        potential.train(structures=_tiny_structures(), config=config)
    cuda, cpu = torch.device("cuda:1"), torch.device("cpu")
    members = [("Model", cpu)] * (2 if committee else 1)
    assert moves == [("FeaturizedSet", cuda), ("FeaturizedSet", cuda), *members]
    assert config.to_train_config().route == "func"


def test_device_defaults_to_cuda_only_for_splits_in_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert TorchTrainingConfig().resolved_device() == torch.device("cuda")
    assert TorchTrainingConfig(num_workers=2).resolved_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert TorchTrainingConfig().resolved_device() == torch.device("cpu")
    with pytest.raises(ValueError, match=r"num_workers=2.*CPU only, not for device='cuda'"):
        TorchTrainingConfig(device="cuda", num_workers=2).validate()
    with pytest.raises(ValueError, match="route must be one of"):
        TorchTrainingConfig(route="fastest").validate()


@pytest.mark.parametrize("committee", [False, True])
def test_splits_beyond_the_memory_budget_recompute_derivatives_per_batch(
    committee, monkeypatch, tmp_path
):
    """Force training whose stored derivatives would not fit ``memory_budget_gib`` reads the
    splits lazily (derivatives recomputed per batch, memory bounded by the batch) and trains
    to the weights of the run that keeps them in memory."""
    import aenet_fn.torch_training.sources as sources_module

    structures = af.read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf"))[:10])
    descriptor = ChebyshevDescriptor(["Ti", "O"], 4, 4.0, 2, 3.0, min_cutoff=0.5)
    arch = {"Ti": [(4, "tanh")], "O": [(4, "tanh")]}
    lazy = []

    class Recorded(sources_module.StructureSource):
        def __init__(self, *args, **kwargs):
            lazy.append(kwargs["with_derivatives"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(sources_module, "StructureSource", Recorded)
    weights = {}
    for budget in (8.0, 0.0):
        config = TorchTrainingConfig(
            iterations=2,
            method=Adam(batchsize=4),
            force_weight=0.3,
            memory_budget_gib=budget,
            seed=1,
            split_seed=2,
            atomic_energies={"Ti": -1604.604515075, "O": -432.503149303},
            testpercent=20,
            checkpoint_dir=None,
            show_progress=False,
        )
        if committee:
            from aenet_fn.torch_training import TorchCommitteeConfig

            potential = TorchCommitteePotential(arch, descriptor)
            members = TorchCommitteeConfig(num_members=2, output_dir=str(tmp_path / str(budget)))
            potential.train(structures=structures, config=config, committee_config=members)
            weights[budget] = torch.stack([m.model.network.values for m in potential.members])
        else:
            potential = TorchANNPotential(arch, descriptor)
            potential.train(structures=structures, config=config)
            weights[budget] = potential.model.network.values
        assert lazy == ([True, True] if budget == 0.0 else [])
    torch.testing.assert_close(weights[0.0], weights[8.0], rtol=1e-10, atol=1e-13)


def test_the_set_size_estimate_is_close_to_the_featurized_set():
    from aenet_fn.core.featurized import energy_view, estimate_set
    from aenet_fn.core.records import tree_bytes

    structures = af.read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf")))
    params = af.ChebyshevParams(["Ti", "O"], 6, 5.0, 3, 3.5, min_cutoff=0.5)
    for forces in (False, True):
        estimate = estimate_set(params, structures, with_derivatives=forces)
        data = af.featurize_structures(params, structures, with_derivatives=forces)
        real = tree_bytes(data)
        assert 0.8 * real < estimate.total_bytes < 1.25 * real
        features = tree_bytes(energy_view(data))
        assert 0.8 * features < estimate.feature_bytes < 1.25 * features
        assert (estimate.n_structures, estimate.n_atoms) == (100, int(data.n_atoms.sum()))
        if forces:  # the sample's mean neighbours per atom against the whole set's
            whole = data.local.radial_centre.numel() / estimate.n_atoms
            assert 0.8 * whole < estimate.neighbours_per_atom < 1.25 * whole
        else:
            assert estimate.neighbours_per_atom == 0
    with_stress = estimate_set(params, structures, with_derivatives=False, with_stress=True)
    real = tree_bytes(
        af.featurize_structures(params, structures, with_derivatives=False, with_stress=True)
    )
    assert 0.8 * real < with_stress.total_bytes < 1.25 * real
    with pytest.raises(ValueError, match="memory_budget_gib must be a number >= 0"):
        TorchTrainingConfig(memory_budget_gib=-1).validate()


def test_the_facade_passes_decoupled_weight_decay_to_the_core():
    """``decoupled_weight_decay`` reaches the core's TrainConfig; a negative one is refused."""
    config = TorchTrainingConfig(decoupled_weight_decay=0.05, method=Adam(weight_decay=0.01))
    core = config.to_train_config()
    assert core.decoupled_weight_decay == 0.05 and core.optimizer.weight_decay == 0.01
    with pytest.raises(ValueError, match="decoupled_weight_decay must be a number >= 0"):
        TorchTrainingConfig(decoupled_weight_decay=-0.1).to_train_config()
