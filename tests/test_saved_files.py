"""Files written by earlier versions keep loading (``tests/data/saved/``, see its README)."""

from __future__ import annotations

import json

import attrs
import numpy as np
import pytest
import torch

import aenet_fn as af
from aenet_fn.examples import TIO2_STRUCTURES

PARAMS = af.ChebyshevParams(
    species=["Ti", "O"], rad_order=4, rad_cutoff=4.0, ang_order=2, ang_cutoff=3.0, min_cutoff=0.5
)
ARCH = {"Ti": [(4, "tanh")], "O": [(4, "tanh")]}
E_ATOM = {"Ti": -1604.604515075, "O": -432.503149303}


def test_a_checkpoint_from_before_routes_resumes_as_the_run_it_came_from(reference_data):
    """Written by commit 36429d7 after 2 of the epochs of the run below: it loads (the route
    it did not record is ``"auto"``), holds that run's state, and resumes to its end."""
    state, config = af.load_checkpoint(reference_data / "saved" / "checkpoint-36429d7.pt")
    assert config.route == "auto" and state.epoch == 2
    structures = af.read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf"))[:6])
    train = af.featurize_structures(PARAMS, structures, with_derivatives=True)
    model = af.init_model(PARAMS, ARCH, train, seed=1, atomic_energies=E_ATOM)
    straight_config = attrs.evolve(config, epochs=3)
    straight = af.fit(
        af.init_train_state(model, train, straight_config), train, None, straight_config
    )
    resumed = af.fit(state, train, None, attrs.evolve(config, epochs=1))
    assert resumed.epoch == straight.epoch == 3
    values = resumed.model.network.values
    torch.testing.assert_close(values, straight.model.network.values, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(resumed.sampler.scores, straight.sampler.scores, rtol=1e-12, atol=0)


SAVED_BY = "90a819d"
"""The commit that wrote the model file and committee fixtures (module-path record names)."""


def _expected(reference_data) -> dict:
    return json.loads((reference_data / "saved" / f"predictions-{SAVED_BY}.json").read_text())


def _probe(expected: dict) -> list[str]:
    return [str(TIO2_STRUCTURES / name) for name in expected["structures"]]


def test_a_model_file_from_an_earlier_version_predicts_what_it_did(reference_data):
    from aenet_fn.torch_training import TorchANNPotential

    expected = _expected(reference_data)
    potential = TorchANNPotential.from_file(reference_data / "saved" / f"model-{SAVED_BY}.pt")
    predicted = potential.predict(_probe(expected), eval_forces=True)
    np.testing.assert_allclose(predicted.total_energy, expected["model"]["energies"], rtol=1e-12)
    for forces, wanted in zip(predicted.forces, expected["model"]["forces"], strict=True):
        np.testing.assert_allclose(forces, np.array(wanted), rtol=1e-9, atol=1e-12)


def test_a_committee_from_an_earlier_version_predicts_what_it_did(reference_data):
    from aenet_fn.torch_training import TorchCommitteePotential

    expected = _expected(reference_data)
    folder = reference_data / "saved" / f"committee-{SAVED_BY}"
    committee = TorchCommitteePotential.from_directory(folder)
    assert len(committee.members) == 2
    together = committee.predict(_probe(expected), eval_forces=True)
    wanted = expected["committee"]
    np.testing.assert_allclose(together.energy_mean, wanted["energy_mean"], rtol=1e-12)
    np.testing.assert_allclose(together.energy_std, wanted["energy_std"], rtol=1e-9, atol=1e-12)


def test_records_are_saved_under_names_that_do_not_follow_their_modules():
    """New files name records ``aenet_fn.<class>``; every module-path name of the files
    written before stands for a registered record, so those files keep loading after moves."""
    from aenet_fn.core.records import RECORD_TYPES
    from aenet_fn.core.serialization import MODULE_PATH_NAMES, from_tree, to_tree

    config = af.TrainConfig(route="func", optimizer=af.SGDConfig(lr=0.1, momentum=0.5))
    tree = to_tree(config)
    assert tree["__record__"] == "aenet_fn.TrainConfig"
    assert tree["fields"]["optimizer"]["__record__"] == "aenet_fn.SGDConfig"
    assert from_tree(tree) == config
    assert set(MODULE_PATH_NAMES.values()) <= set(RECORD_TYPES)
    old = {**tree, "__record__": "aenet_fn.train.TrainConfig"}
    assert from_tree(old) == config


def test_a_checkpoint_knows_its_data_and_refuses_other_structures(tmp_path):
    """The state records a fingerprint of its splits and descriptor when it is fitted;
    resuming on other structures (even as many, with one energy changed) is refused unless
    ``allow_other_data``; the same splits resume."""
    structures = af.read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf"))[:8])
    train = af.featurize_structures(PARAMS, structures[:6], with_derivatives=False)
    test = af.featurize_structures(PARAMS, structures[6:], with_derivatives=False)
    model = af.init_model(PARAMS, ARCH, train, seed=1, atomic_energies=E_ATOM)
    config = af.TrainConfig(epochs=1, batch_size=3)
    assert af.init_train_state(model, train, config).data_fingerprint == ""
    writer = af.CheckpointWriter(tmp_path, config, interval=1)
    af.fit(af.init_train_state(model, train, config), train, test, config, [writer])
    state, _ = af.load_checkpoint(tmp_path / "checkpoint_epoch_0000.pt")
    assert len(state.data_fingerprint) == 64
    assert af.fit(state, train, test, config).epoch == 2
    shifted = attrs.evolve(train, energies=train.energies + torch.arange(6) * 1e-9)
    others = [
        (shifted, test),
        (train, None),
        (train, af.featurize_structures(PARAMS, structures[5:7], with_derivatives=False)),
    ]
    for other_train, other_test in others:
        with pytest.raises(ValueError, match="trained on other structures"):
            af.fit(state, other_train, other_test, config)
    allowed = attrs.evolve(config, allow_other_data=True)
    moved_on = af.fit(state, shifted, test, allowed)
    assert moved_on.data_fingerprint not in ("", state.data_fingerprint)


def test_the_facade_refuses_to_resume_on_other_structures(tmp_path):
    from aenet_fn.torch_featurize import ChebyshevDescriptor
    from aenet_fn.torch_training import Adam, TorchANNPotential, TorchTrainingConfig

    paths = [str(p) for p in sorted(TIO2_STRUCTURES.glob("*.xsf"))[:8]]
    descriptor = ChebyshevDescriptor.from_params(PARAMS)

    def config(**changes):
        return TorchTrainingConfig(
            iterations=1,
            method=Adam(batchsize=3),
            testpercent=25,
            seed=1,
            split_seed=2,
            atomic_energies=E_ATOM,
            checkpoint_dir=str(tmp_path),
            show_progress=False,
            **changes,
        )

    TorchANNPotential(ARCH, descriptor).train(structures=paths[:6], config=config())
    checkpoint = tmp_path / "checkpoint_epoch_0000.pt"
    again = TorchANNPotential(ARCH, descriptor)
    again.train(structures=paths[:6], config=config(), resume_from=checkpoint)
    assert len(again.history) == 2
    with pytest.raises(ValueError, match="trained on other structures"):
        TorchANNPotential(ARCH, descriptor).train(
            structures=paths[2:], config=config(), resume_from=checkpoint
        )
    other = TorchANNPotential(ARCH, descriptor)
    other.train(structures=paths[2:], config=config(allow_other_data=True), resume_from=checkpoint)
    assert len(other.history) == 2


@pytest.mark.parametrize("part", ["optimizer state", "sampler scores", "best model's parameters"])
def test_a_checkpoint_holding_a_non_finite_number_is_refused_by_name(tmp_path, part):
    structures = af.read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf"))[:6])
    train = af.featurize_structures(PARAMS, structures, with_derivatives=False)
    model = af.init_model(PARAMS, ARCH, train, seed=1, atomic_energies=E_ATOM)
    config = af.TrainConfig(epochs=1, batch_size=3)
    state = af.fit(af.init_train_state(model, train, config), train, None, config)
    values = state.model.network.values.clone()
    if part == "optimizer state":
        moment = state.opt_state.mu.clone()
        moment[2] = float("nan")
        state = attrs.evolve(state, opt_state=attrs.evolve(state.opt_state, mu=moment))
    elif part == "sampler scores":
        scores = state.sampler.scores.clone()
        scores[0] = float("inf")
        state = attrs.evolve(state, sampler=attrs.evolve(state.sampler, scores=scores))
    else:
        values[0] = float("nan")
        state = attrs.evolve(state, best_values=values)
    path = af.save_checkpoint(tmp_path / "damaged.pt", state, config)
    with pytest.raises(ValueError, match=f"damaged.pt: the checkpoint's {part} are not all finite"):
        af.load_checkpoint(path)
