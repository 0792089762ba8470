"""Bad input to the functional core's training API gets a clear error, and nothing the user had
is lost: configurations, models, splits and states that do not belong together, checkpoints."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import attrs
import pytest
import torch

import aenet_fn as af
from aenet_fn.core.featurized import concatenate, select_structures
from aenet_fn.examples import TIO2_STRUCTURES

PARAMS = af.ChebyshevParams(
    species=["Ti", "O"], rad_order=4, rad_cutoff=4.0, ang_order=2, ang_cutoff=3.0, min_cutoff=0.5
)
ARCH = {"Ti": [(4, "tanh")], "O": [(4, "tanh")]}
E_ATOM = {"Ti": -1604.604515075, "O": -432.503149303}
CONFIG = af.TrainConfig(epochs=1, batch_size=4)


@pytest.fixture(scope="module")
def structures():
    return af.read_structures(TIO2_STRUCTURES)[:6]


@pytest.fixture(scope="module")
def train(structures):
    return af.featurize_structures(PARAMS, structures, with_derivatives=False)


@pytest.fixture(scope="module")
def model(train):
    return af.init_model(PARAMS, ARCH, train, atomic_energies=E_ATOM)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"force_weight": "0.1"}, r"force_weight must lie in \[0, 1\], got '0.1'"),
        ({"force_weight": None}, "force_weight must lie in"),
        ({"force_fraction": True}, "force_fraction must lie in"),
        ({"force_resample_num_epochs": "2"}, "force_resample_num_epochs must be an integer"),
        ({"force_resample_num_epochs": 1.5}, "force_resample_num_epochs must be an integer"),
        ({"force_min_structures_per_epoch": 2.7}, "force_min_structures_per_epoch must be an"),
        ({"force_min_structures_per_epoch": -5}, "force_min_structures_per_epoch must be an"),
        ({"seed": "abc"}, "seed must be an integer"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"epochs": True}, "epochs must be an integer"),
        ({"batch_size": True}, "batch_size must be an integer"),
        ({"use_scheduler": "no"}, "use_scheduler must be True or False"),
        ({"persistent_workers": "no"}, "persistent_workers must be True or False"),
        ({"force_scale_unbiased": "False"}, "force_scale_unbiased must be True or False"),
        ({"scheduler": {"factor": 0.5}}, "scheduler must be a PlateauConfig"),
    ],
)
def test_config_values_of_the_wrong_type_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        af.TrainConfig(**changes)


def test_sgd_momentum_of_one_or_more_is_refused():
    with pytest.raises(ValueError, match="momentum must satisfy 0 <= momentum < 1"):
        af.SGDConfig(momentum=5.0)
    assert af.SGDConfig(momentum=0.9).momentum == 0.9


@pytest.mark.parametrize(
    "atomic_energies",
    [{"Ti": -1604.6, "o": -432.5}, {"Ti": -1604.6, "O": -432.5, "Xx": 0.0}],
)
def test_atomic_energies_of_unknown_species_are_refused(train, atomic_energies):
    with pytest.raises(ValueError, match="not species of the descriptor"):
        af.init_model(PARAMS, ARCH, train, atomic_energies=atomic_energies)


@pytest.mark.parametrize(
    "overrides",
    [
        {"energy_shift": math.nan, "energy_scaling": 1.0},
        {"energy_shift": math.inf, "energy_scaling": 1.0},
        {"energy_shift": 0.0, "energy_scaling": math.inf},
        {"atomic_energies": {"Ti": math.inf, "O": -432.5}},
        {"atomic_energies": {"Ti": True, "O": -432.5}},
    ],
)
def test_non_finite_normalisation_values_are_refused(train, overrides):
    with pytest.raises(ValueError, match="finite"):
        af.init_model(PARAMS, ARCH, train, **overrides)


@pytest.mark.parametrize(
    "other",
    [
        attrs.evolve(PARAMS, species=("O", "Ti")),  # same sizes, another species order
        attrs.evolve(PARAMS, ang_cutoff=2.0),  # same sizes, another cutoff
        attrs.evolve(PARAMS, rad_order=6),  # another number of features
    ],
)
def test_a_set_featurized_with_another_descriptor_is_refused(structures, train, model, other):
    other_set = af.featurize_structures(other, structures, with_derivatives=False)
    with pytest.raises(ValueError, match="featurized with"):
        af.init_model(PARAMS, ARCH, other_set, atomic_energies=E_ATOM)
    with pytest.raises(ValueError, match="featurized with"):
        af.init_train_state(model, other_set, CONFIG)
    with pytest.raises(ValueError, match="featurized with"):
        af.evaluate(model, other_set, with_forces=False)
    state = af.init_train_state(model, train, CONFIG)
    with pytest.raises(ValueError, match="fit: test split: the set was featurized with"):
        af.fit(state, train, other_set, CONFIG)
    with pytest.raises(ValueError, match="different descriptors"):
        concatenate([train, other_set])


def test_sets_keep_their_descriptor_through_selection_and_concatenation(train):
    part = select_structures(train, [0, 2])
    assert part.descriptor == PARAMS
    assert concatenate([part, train]).descriptor == PARAMS


def test_a_set_without_a_recorded_descriptor_is_checked_by_its_sizes(train, model):
    unrecorded = attrs.evolve(train, descriptor=None)
    unrecorded_metrics = af.evaluate(model, unrecorded, with_forces=False)
    assert unrecorded_metrics["rmse_energy"] == af.evaluate(model, train, False)["rmse_energy"]
    fewer = attrs.evolve(unrecorded, features=unrecorded.features[:, :10])
    with pytest.raises(ValueError, match="10 features per atom"):
        af.evaluate(model, fewer, with_forces=False)


def test_something_else_than_a_split_is_refused(structures, model):
    with pytest.raises(TypeError, match="expected a FeaturizedSet or StructureSource, got list"):
        af.init_model(PARAMS, ARCH, structures)
    with pytest.raises(TypeError, match="got list"):
        af.evaluate(model, structures, with_forces=False)


def test_a_state_that_does_not_fit_the_run_is_refused(structures, train, model):
    state = af.init_train_state(model, train, CONFIG)
    fewer = af.featurize_structures(PARAMS, structures[:3], with_derivatives=False)
    with pytest.raises(ValueError, match="training split of 6 structures; this one has 3"):
        af.fit(state, fewer, None, CONFIG)
    with pytest.raises(ValueError, match="AdamState; the config's optimizer SGDConfig"):
        af.fit(state, train, None, attrs.evolve(CONFIG, optimizer=af.SGDConfig()))
    with pytest.raises(ValueError, match="samples 'uniform'; the config asks for 'error_weighted'"):
        af.fit(state, train, None, attrs.evolve(CONFIG, sampling_policy="error_weighted"))


def test_missing_labels_are_refused(structures, model):
    no_forces = [attrs.evolve(s, forces=None) for s in structures]
    with_derivatives = af.featurize_structures(PARAMS, no_forces, with_derivatives=True)
    forces = attrs.evolve(CONFIG, force_weight=0.5)
    with pytest.raises(ValueError, match="no structure has forces"):
        af.init_train_state(model, with_derivatives, forces)
    with pytest.raises(ValueError, match="no structure has forces"):
        af.evaluate(model, with_derivatives, with_forces=True)
    no_energy = af.featurize_structures(
        PARAMS, [attrs.evolve(s, energy=None) for s in structures], with_derivatives=False
    )
    with pytest.raises(ValueError, match="structures without an energy"):
        af.evaluate(model, no_energy, with_forces=False)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_evaluate_refuses_a_bad_batch_size(train, model, batch_size):
    with pytest.raises(ValueError, match="evaluate: batch_size must be an integer >= 1"):
        af.evaluate(model, train, with_forces=False, batch_size=batch_size)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_save_checkpoint_refuses_other_records_and_keeps_the_file(tmp_path, train, model):
    state = af.init_train_state(model, train, CONFIG)
    path = af.save_checkpoint(tmp_path / "good.pt", state, CONFIG)
    before = _digest(path)
    for bad_state, bad_config in [("not a state", CONFIG), (state, None), (model, CONFIG)]:
        with pytest.raises(TypeError, match=r"save_checkpoint: (state|config): expected a Train"):
            af.save_checkpoint(path, bad_state, bad_config)
    with pytest.raises(TypeError, match="expected a TrainState, got TrainConfig"):
        af.save_checkpoint(path, CONFIG, state)
    assert _digest(path) == before
    assert af.load_checkpoint(path)[0].epoch == state.epoch


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda values: values[:10].clone(),  # too few parameters
        lambda values: torch.full_like(values, math.nan),
    ],
)
def test_load_checkpoint_refuses_a_model_that_is_not_whole_and_finite(
    tmp_path, train, model, corrupt
):
    values = model.network.values
    broken = attrs.evolve(model, network=attrs.evolve(model.network, values=corrupt(values)))
    state = af.init_train_state(model, train, CONFIG)
    path = af.save_checkpoint(tmp_path / "broken.pt", attrs.evolve(state, model=broken), CONFIG)
    with pytest.raises(ValueError, match=r"broken\.pt: the (networks need|model's network)"):
        af.load_checkpoint(path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"interval": 1.5}, "checkpoint interval must be an integer >= 0"),
        ({"max_checkpoints": 0}, "max_checkpoints must be an integer >= 1 or None"),
        ({"max_checkpoints": 1.5}, "max_checkpoints must be an integer >= 1 or None"),
    ],
)
def test_checkpoint_writer_refuses_bad_options(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        af.CheckpointWriter(tmp_path, CONFIG, **options)
    with pytest.raises(TypeError, match="CheckpointWriter: config: expected a TrainConfig"):
        af.CheckpointWriter(tmp_path, {"epochs": 1})


def test_a_saved_potential_with_broken_weights_is_refused(tmp_path, structures):
    from aenet_fn.torch_featurize import ChebyshevDescriptor
    from aenet_fn.torch_training import TorchANNPotential, TorchTrainingConfig

    descriptor = ChebyshevDescriptor(["Ti", "O"], 4, 4.0, 2, 3.0, min_cutoff=0.5)
    potential = TorchANNPotential(ARCH, descriptor)
    config = TorchTrainingConfig(
        iterations=1,
        testpercent=0,
        show_progress=False,
        atomic_energies=E_ATOM,
        checkpoint_dir=str(tmp_path / "checkpoints"),
    )
    potential.train(structures=structures, config=config)
    potential.save(tmp_path / "model.pt")
    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    network = payload["model"]["fields"]["network"]["fields"]
    network["values"] = torch.full_like(network["values"], math.nan)
    torch.save(payload, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"nan\.pt: the model's network parameters"):
        TorchANNPotential.from_file(tmp_path / "nan.pt")
    network["values"] = network["values"][:10]
    torch.save(payload, tmp_path / "short.pt")
    with pytest.raises(ValueError, match=r"short\.pt: the networks need \d+ parameters"):
        TorchANNPotential.from_file(tmp_path / "short.pt")


@pytest.mark.parametrize("width", [0.05, 0.01])
def test_a_cell_far_too_small_for_the_cutoff_is_refused_before_allocating(width):
    tiny = af.Structure(positions=[[0.0, 0.0, 0.0]], species=("Ti",), cell=torch.eye(3) * width)
    with pytest.raises(ValueError, match=r"too small for the cutoff 4\.0 Å"):
        af.featurize(PARAMS, af.collate([tiny], species=PARAMS.species))
    # a small but physical cell (one atom, 2 Å) is searched as before
    small = af.Structure(positions=[[0.0, 0.0, 0.0]], species=("Ti",), cell=torch.eye(3) * 2.0)
    assert torch.isfinite(af.featurize(PARAMS, af.collate([small], species=PARAMS.species))).all()


def test_neighbor_list_refuses_non_finite_cells_and_mixed_dtypes(structures):
    first = structures[0]
    with pytest.raises(ValueError, match="cells contain NaN or inf"):
        af.neighbor_list(first.positions, first.cell * math.nan, None, cutoff=3.0)
    batch = af.collate([first], species=PARAMS.species)
    mixed = attrs.evolve(batch, positions=batch.positions.float())
    with pytest.raises(ValueError, match=r"cells are torch\.float64 but positions torch\.float32"):
        af.featurize(PARAMS, mixed)
