"""The committee facade: the guide's example, output layout, reload, prediction, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import aenet_fn as af
from aenet_fn.examples import TIO2_STRUCTURES
from aenet_fn.mlip import normalize_ensemble_members
from aenet_fn.torch_featurize import ChebyshevDescriptor
from aenet_fn.torch_training import (
    Adam,
    TorchANNPotential,
    TorchCommitteeConfig,
    TorchCommitteePotential,
    TorchTrainingConfig,
)
from tests.conftest import facade_config

E_ATOM = {"Ti": -1604.604515075, "O": -432.503149303}


def _config(**options) -> TorchTrainingConfig:
    """The committees' quick training configuration (:func:`facade_config` with a smaller
    step, a 25 % split and force training)."""
    committee = {"method": Adam(mu=0.003, batchsize=4), "testpercent": 25, "split_seed": 7}
    committee["seed"] = None  # member seeds come from TorchCommitteeConfig
    return facade_config(**{**committee, "force_weight": 0.2, **options})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    structures = af.read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf"))[:16])
    descriptor = ChebyshevDescriptor(["Ti", "O"], 4, 4.0, 2, 3.0, min_cutoff=0.5)
    arch = {"Ti": [(5, "tanh")], "O": [(5, "tanh")]}
    config = _config(atomic_energies=E_ATOM)
    runs = {}
    for execution in ("vmap", "sequential"):
        committee = TorchCommitteePotential(arch, descriptor)
        output = tmp_path_factory.mktemp(execution) / "committee_run"
        result = committee.train(
            structures=structures,
            config=config,
            committee_config=TorchCommitteeConfig(
                num_members=3, base_seed=11, output_dir=output, execution=execution
            ),
        )
        runs[execution] = (committee, result)
    return structures, runs


def test_output_layout_and_result(setup):
    _, runs = setup
    _, result = runs["vmap"]
    assert [m.seed for m in result.members] == [11, 12, 13]
    for member in result.members:
        for name in ("model.pt", "history.json", "history.csv", "summary.json"):
            assert (member.member_dir / name).is_file()
    metadata = json.loads(result.metadata_path.read_text())
    assert metadata["committee_config"]["member_seeds"] == [11, 12, 13]
    assert len(result.to_dataframe()) == 3
    assert result.stats["final_RMSE_train"]["n"] == 3
    assert "Training statistics:" in str(result) and "completed members: 3" in str(result)
    assert all(len(t.errors) == 2 for t in result.trainouts)


def test_vmapped_members_equal_sequential_members(setup):
    _, runs = setup
    together, _ = runs["vmap"]
    alone, _ = runs["sequential"]
    for a, b in zip(together.members, alone.members):
        torch.testing.assert_close(
            a.model.network.values, b.model.network.values, rtol=0, atol=1e-12
        )


def test_reloaded_committee_predicts_the_members_mean_and_spread(setup):
    structures, runs = setup
    _, result = runs["vmap"]
    committee = TorchCommitteePotential.from_directory(result.output_dir)
    predictions = committee.predict(structures[:3], eval_forces=True)
    singles = [
        TorchANNPotential.from_file(m.model_path).predict(structures[:3], eval_forces=True)
        for m in result.members
    ]
    member_energies = np.array([s.total_energy for s in singles])
    np.testing.assert_allclose(predictions.energy_mean, member_energies.mean(0), rtol=1e-12)
    np.testing.assert_allclose(
        predictions.energy_std, member_energies.std(0), rtol=1e-9, atol=1e-12
    )
    forces = np.array([s.forces[0] for s in singles])
    np.testing.assert_allclose(predictions[0].forces_std, forces.std(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        predictions.member_outputs[1].total_energy, singles[1].total_energy, rtol=1e-12
    )
    top = predictions.top_uncertain(n=2)
    assert len(top) == 2 and top["energy_std"].iloc[0] >= top["energy_std"].iloc[1]
    reference = committee.predict(structures[:3], aggregation="reference", reference_member=2)
    np.testing.assert_allclose([r.energy for r in reference], member_energies[2], rtol=1e-12)


def test_missing_or_corrupt_member_files_are_named(setup, tmp_path):
    _, runs = setup
    _, result = runs["vmap"]
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(result.output_dir, broken)
    (broken / "member_001" / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match="member_001"):
        TorchCommitteePotential.from_directory(broken)
    (broken / "member_001" / "model.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="member_001"):
        TorchCommitteePotential.from_directory(broken)
    with pytest.raises(FileNotFoundError, match=r"committee_metadata\.json"):
        TorchCommitteePotential.from_directory(tmp_path / "nowhere")


def test_members_with_different_descriptors_are_refused(setup, tmp_path):
    structures, runs = setup
    _, result = runs["vmap"]
    other = TorchANNPotential(
        {"Ti": [(5, "tanh")], "O": [(5, "tanh")]},
        ChebyshevDescriptor(["Ti", "O"], 3, 4.0, 2, 3.0, min_cutoff=0.5),
    )
    other.train(
        structures=structures,
        config=TorchTrainingConfig(
            iterations=1, checkpoint_dir=None, show_progress=False, atomic_energies=E_ATOM
        ),
    )
    other.save(tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt"):
        TorchCommitteePotential.from_files([result.members[0].model_path, tmp_path / "other.pt"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_members": 0}, "num_members must be an integer >= 1"),
        ({"num_members": 2, "base_seed": "1"}, "base_seed must be an integer"),
        ({"num_members": 2, "member_seeds": [1]}, "1 member seeds given for 2 members"),
        ({"num_members": 2, "max_parallel": 0}, "max_parallel must be >= 1"),
        ({"num_members": 2, "devices": []}, "devices must not be an empty list"),
        ({"num_members": 2, "execution": "parallel"}, "execution must be one of"),
    ],
)
def test_committee_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TorchCommitteeConfig(**kwargs)


def test_dataset_predictions_equal_structure_predictions(setup):
    from torch.utils.data import Subset

    from aenet_fn.torch_training import StructureDataset

    structures, runs = setup
    committee, _ = runs["vmap"]
    dataset = StructureDataset(structures[:6], committee.descriptor)
    subset = Subset(Subset(dataset, [5, 1, 3, 0]), [2, 0])  # root indices 3 and 5
    direct = committee.predict([structures[3], structures[5]], eval_forces=True)
    for eval_forces in (False, True):
        by_dataset = committee.predict_dataset(subset, eval_forces=eval_forces)
        assert by_dataset.source_indices == [3, 5]
        np.testing.assert_allclose(by_dataset.energy_mean, direct.energy_mean, rtol=1e-12)
        np.testing.assert_allclose(by_dataset.energy_std, direct.energy_std, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(by_dataset[1].forces_std, direct[1].forces_std, atol=1e-12)
    assert by_dataset.to_dataframe()["source_index"].tolist() == [3, 5]


def test_committee_ascii_export_reproduces_every_member(setup, tmp_path):
    structures, runs = setup
    committee, _ = runs["vmap"]
    manifests = committee.to_aenet_ascii(tmp_path, prefix="committee", structures=structures)
    assert len(manifests) == 3 and set(manifests[0]) == {"Ti", "O"}
    assert normalize_ensemble_members(manifests) == manifests
    # paths become strings, every member takes the first member's order of atom types
    mixed = [{"O": Path(m["O"]), "Ti": Path(m["Ti"])} if i else m for i, m in enumerate(manifests)]
    normalized = normalize_ensemble_members(mixed)
    assert normalized == manifests and all(list(m) == list(manifests[0]) for m in normalized)
    assert all(isinstance(path, str) for m in normalized for path in m.values())
    assert manifests[1]["O"].endswith("member_001/committee.O.nn.ascii")
    batch = af.collate(structures[:4], species=["Ti", "O"])
    for manifest, member in zip(manifests, committee.members):
        model = af.read_aenet_ascii([manifest["Ti"], manifest["O"]])
        torch.testing.assert_close(
            af.energy(model, batch), af.energy(member.model, batch), rtol=1e-12, atol=1e-8
        )
    text = open(manifests[0]["Ti"]).read()
    assert str(len(structures)) in text  # the training-set section counts the structures
    with pytest.raises(ValueError, match="descriptor_stats cannot be written"):
        committee.members[0].to_aenet_ascii(tmp_path / "x", descriptor_stats={"mean": [0.0]})


def test_committee_trains_on_datasets_like_on_structures(setup, tmp_path):
    """train_dataset/test_dataset holding the structures path's own split train the same
    members; dataset= is split once for all members; the datasets own the references."""
    from aenet_fn.core.splits import split_structures
    from aenet_fn.torch_training import StructureDataset

    structures, runs = setup
    committee, _ = runs["vmap"]
    descriptor = committee.descriptor
    config = _config()  # the datasets own the atomic energies
    train_part, test_part = split_structures(structures, 25, 7)
    on_datasets = TorchCommitteePotential(committee.arch, descriptor)
    result = on_datasets.train(
        train_dataset=StructureDataset(train_part, descriptor, atomic_energies=E_ATOM),
        test_dataset=StructureDataset(test_part, descriptor, atomic_energies=E_ATOM),
        config=config,
        committee_config=TorchCommitteeConfig(
            num_members=3, base_seed=11, output_dir=tmp_path / "datasets"
        ),
    )
    assert [m.seed for m in result.members] == [11, 12, 13]
    for mine, reference in zip(on_datasets.members, committee.members):
        torch.testing.assert_close(
            mine.model.network.values, reference.model.network.values, rtol=0, atol=1e-12
        )
    whole = TorchCommitteePotential(committee.arch, descriptor)
    split_once = whole.train(
        dataset=StructureDataset(structures, descriptor, atomic_energies=E_ATOM),
        config=config,
        committee_config=TorchCommitteeConfig(num_members=2, output_dir=tmp_path / "whole"),
    )
    assert all(np.isfinite(t.errors["RMSE_test"]).all() for t in split_once.trainouts)
    with pytest.raises(ValueError, match="needs structures=, dataset= or train_dataset="):
        whole.train(config=config, committee_config=TorchCommitteeConfig(num_members=2))


def test_members_predicting_one_by_one_analysed_like_the_committee(setup, tmp_path):
    """PredictOutAnalyzer over the members' own predictions of files gives the committee's
    energy mean/spread and force uncertainty; to_structures reads the files again; the PDB
    carries each atom's uncertainty."""
    from ase.io import read

    from aenet_fn.io.predict import PredictOutAnalyzer

    _, runs = setup
    _, result = runs["vmap"]
    files = [str(p) for p in sorted(TIO2_STRUCTURES.glob("*.xsf"))[:3]]
    committee = TorchCommitteePotential.from_directory(result.output_dir)
    together = committee.predict(files, eval_forces=True)
    outputs = [
        TorchANNPotential.from_file(m.model_path).predict(files, eval_forces=True)
        for m in result.members
    ]
    analyzer = PredictOutAnalyzer(outputs)
    stats = analyzer.all_energy_stats(normalize=False)
    np.testing.assert_allclose(stats[:, 2], together.energy_mean, rtol=1e-12)
    np.testing.assert_allclose(stats[:, 3], together.energy_std, rtol=1e-9, atol=1e-12)
    members = np.array([out.total_energy for out in outputs])
    np.testing.assert_allclose(stats[:, 0], members.min(0), rtol=1e-12)
    per_atom = analyzer.energy_stats(1)
    assert per_atom[2] == pytest.approx(stats[1, 2] / outputs[0].num_atoms(1), rel=1e-12)
    np.testing.assert_allclose(
        analyzer.force_uncertainty(0), together[0].force_uncertainty, rtol=1e-9, atol=1e-12
    )
    magnitudes = np.linalg.norm(np.stack([out.forces[2] for out in outputs]), axis=-1)
    np.testing.assert_allclose(analyzer.force_stats(2)[:, 1], magnitudes.max(0), rtol=1e-12)
    again = outputs[0].to_structures()
    read_back = af.read_structures(files)
    assert [s.name for s in again] == [s.name for s in read_back]
    assert all(torch.equal(a.positions, b.positions) for a, b in zip(again, read_back))
    mean = analyzer.structure(0)
    assert mean.cell is not None and mean.energy == pytest.approx(stats[0, 2], rel=1e-12)
    pdb = tmp_path / "uncertainty.pdb"
    analyzer.write_pdb_with_force_uncertainty(0, pdb)
    atoms = read(pdb)
    np.testing.assert_allclose(
        atoms.get_array("bfactor"), analyzer.force_uncertainty(0), rtol=0, atol=0.006
    )
    assert [p.name for p in tmp_path.iterdir()] == ["uncertainty.pdb"]


def test_sequential_members_share_the_jacobians_of_the_splits(setup, tmp_path, monkeypatch):
    """Force training on the fast route builds each split's stored Jacobian once for all
    sequential members."""
    import aenet_fn.driver.seam as driver

    structures, runs = setup
    trained, _ = runs["sequential"]
    built = []
    real = driver.set_jacobian

    def counted(params, data):
        built.append(data.n_structures)
        return real(params, data)

    monkeypatch.setattr(driver, "set_jacobian", counted)
    committee = TorchCommitteePotential(trained.arch, trained.descriptor)
    committee.train(
        structures=structures,
        config=_config(atomic_energies=E_ATOM, route="fast"),
        committee_config=TorchCommitteeConfig(
            num_members=3, base_seed=11, output_dir=tmp_path / "run", execution="sequential"
        ),
    )
    assert sorted(built) == [4, 12]  # the test and the train split, once each
    for member, expected in zip(committee.members, trained.members):
        torch.testing.assert_close(member.model.network.values, expected.model.network.values)


def test_a_failing_sequential_member_keeps_the_others(setup, tmp_path, monkeypatch):
    """One member's training raises: the others are written and reload as a committee, the
    metadata records the failure, and train raises RuntimeError naming the member after
    writing everything (the reference's condition 91)."""
    import aenet_fn.torch_training.committee as facade

    structures, runs = setup
    trained, _ = runs["sequential"]
    real_fit = facade.fit

    def fit_failing_seed_12(state, train, test, config, **options):
        if config.seed == 12:
            raise FloatingPointError("loss became NaN at epoch 1")
        return real_fit(state, train, test, config, **options)

    monkeypatch.setattr(facade, "fit", fit_failing_seed_12)
    committee = TorchCommitteePotential(trained.arch, trained.descriptor)
    output = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"1 of 3 committee members failed \(member 1: "):
        committee.train(
            structures=structures,
            config=_config(atomic_energies=E_ATOM),
            committee_config=TorchCommitteeConfig(
                num_members=3, base_seed=11, output_dir=output, execution="sequential"
            ),
        )
    metadata = json.loads((output / "committee_metadata.json").read_text())
    assert [m["status"] for m in metadata["members"]] == ["completed", "failed", "completed"]
    assert metadata["failures"][0]["member_index"] == 1
    assert "loss became NaN" in metadata["failures"][0]["error"]
    assert not (output / "member_001" / "model.pt").exists()
    reloaded = TorchCommitteePotential.from_directory(output)
    assert len(reloaded.members) == 2
    alone = TorchANNPotential.from_file(output / "member_002" / "model.pt")
    torch.testing.assert_close(reloaded.members[1].model.network.values, alone.model.network.values)
    # the completed members are those of the run without a failure (same seeds, same split)
    expected = trained.members[2].model.network.values
    torch.testing.assert_close(reloaded.members[1].model.network.values, expected)
