"""The training driver on the TiO2 reference data: learning, gradients, resume, checkpoints."""

from __future__ import annotations

import math
import time

import attrs
import pytest
import torch

import aenet_fn as af
from aenet_fn.core.network import weight_mask
from aenet_fn.driver.checkpoint import checkpoints_to_delete, newest_checkpoint
from aenet_fn.driver.seam import epochs_drawn_ahead
from aenet_fn.driver.step import autograd_gradient, batch_loss, func_gradient, member_step
from aenet_fn.driver.train import end_of_epoch
from aenet_fn.examples import TIO2_STRUCTURES

E_ATOM = {"Ti": -1604.604515075, "O": -432.503149303}
PARAMS = af.ChebyshevParams(
    species=["Ti", "O"], rad_order=10, rad_cutoff=6.0, ang_order=3, ang_cutoff=3.5, min_cutoff=0.5
)
ARCH = {"Ti": [(10, "tanh"), (10, "tanh")], "O": [(10, "tanh"), (10, "tanh")]}


@pytest.fixture(scope="module")
def tio2():
    structures = af.read_structures(TIO2_STRUCTURES)
    train_idx, test_idx = af.split_indices(
        len(structures), 0.1, generator=torch.Generator().manual_seed(7)
    )
    train = af.featurize_structures(
        PARAMS, [structures[i] for i in train_idx], with_derivatives=True
    )
    test = af.featurize_structures(PARAMS, [structures[i] for i in test_idx], with_derivatives=True)
    model = af.init_model(PARAMS, ARCH, train, seed=1, atomic_energies=E_ATOM)
    return train, test, model


def _run(tio2, config, epochs=None):
    train, test, model = tio2
    config = attrs.evolve(config, epochs=epochs) if epochs is not None else config
    state = af.init_train_state(model, train, config)
    return af.fit(state, train, test, config)


def test_energy_training_reduces_train_and_test_errors(tio2):
    config = af.TrainConfig(epochs=25, batch_size=16, optimizer=af.AdamConfig(lr=3e-3), seed=3)
    history = _run(tio2, config).history
    first, last = history[0], history[-1]
    assert last["RMSE_train"] < 0.25 * first["RMSE_train"] and last["RMSE_train"] < 0.3
    assert last["RMSE_test"] < 0.4 * first["RMSE_test"] and last["RMSE_test"] < 0.6
    assert math.isnan(last["RMSE_force_train"])


def test_force_training_reduces_force_errors(tio2):
    config = af.TrainConfig(
        epochs=15, batch_size=16, force_weight=0.5, optimizer=af.AdamConfig(lr=3e-3), seed=3
    )
    history = _run(tio2, config).history
    assert history[-1]["RMSE_force_train"] < 0.85 * history[0]["RMSE_force_train"]
    assert history[-1]["RMSE_force_test"] < history[0]["RMSE_force_test"]
    assert history[-1]["RMSE_train"] < 0.5 * history[0]["RMSE_train"]


def test_loss_gradient_equals_finite_differences(tio2):
    train, _, model = tio2
    selection = torch.arange(6)
    batch = af.take_structures(train, selection, torch.ones(train.n_structures, dtype=torch.bool))
    values = model.network.values
    config = af.TrainConfig(force_weight=0.3, optimizer=af.SGDConfig(lr=1.0))
    new_values, _, _ = member_step(
        model, values, af.core.optim.sgd_init(values), 1.0, batch, config
    )
    gradient = values - new_values  # SGD, lr 1, no momentum: the gradient itself
    generator = torch.Generator().manual_seed(0)
    for index in torch.randint(0, values.numel(), (8,), generator=generator).tolist():
        step = torch.zeros_like(values)
        step[index] = 1e-6
        up = batch_loss(model, values + step, batch, 0.3, False)[0]
        down = batch_loss(model, values - step, batch, 0.3, False)[0]
        expected = float(up - down) / 2e-6
        assert float(gradient[index]) == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_decoupled_weight_decay_shrinks_the_weights_and_spares_the_biases(tio2):
    """A step with ``decoupled_weight_decay`` is the plain step minus ``lr·λ·w`` on the
    weights only; both routes train to the same weights with it."""
    train, _, model = tio2
    batch = af.take_structures(
        train, torch.arange(6), torch.ones(train.n_structures, dtype=torch.bool)
    )
    values = model.network.values
    plain = af.TrainConfig(force_weight=0.3, optimizer=af.SGDConfig(lr=0.5))
    decayed = attrs.evolve(plain, decoupled_weight_decay=0.2)
    state = af.core.optim.sgd_init(values)
    without, _, _ = member_step(model, values, state, 0.5, batch, plain)
    with_decay, _, _ = member_step(model, values, state, 0.5, batch, decayed)
    weights = weight_mask(model.network)
    expected = without - 0.5 * 0.2 * values * weights
    torch.testing.assert_close(with_decay, expected, rtol=1e-13, atol=1e-15)
    assert torch.equal(with_decay[~weights], without[~weights])
    config = af.TrainConfig(epochs=2, batch_size=8, force_weight=0.2, decoupled_weight_decay=0.1)
    fast, func = (
        af.fit(af.init_train_state(model, train, c), train, None, c).model.network.values
        for c in (attrs.evolve(config, route="fast"), attrs.evolve(config, route="func"))
    )
    torch.testing.assert_close(fast, func, rtol=1e-10, atol=1e-12)
    undecayed = attrs.evolve(config, decoupled_weight_decay=0.0)
    plain_run = af.fit(af.init_train_state(model, train, undecayed), train, None, undecayed)
    assert not torch.equal(plain_run.model.network.values, fast)


@pytest.mark.parametrize("route", ["fast", "func"])
@pytest.mark.parametrize("policy", ["uniform", "energy_weighted", "error_weighted"])
def test_resume_equals_the_uninterrupted_run_bit_for_bit(tio2, tmp_path, policy, route):
    train, test, model = tio2
    config = af.TrainConfig(
        route=route,
        epochs=4,
        batch_size=16,
        force_weight=0.2,
        force_fraction=0.4,
        force_resample_num_epochs=1,
        sampling_policy=policy,
        use_scheduler=True,
        seed=5,
    )
    straight = _run(tio2, config)
    writer = af.CheckpointWriter(tmp_path, config, interval=1)
    half = af.fit(
        af.init_train_state(model, train, config),
        train,
        test,
        attrs.evolve(config, epochs=2),
        [writer],
    )
    assert half.epoch == 2
    resumed_state, resumed_config = af.load_checkpoint(tmp_path / "checkpoint_epoch_0001.pt")
    resumed = af.fit(resumed_state, train, test, attrs.evolve(resumed_config, epochs=2))
    assert resumed.epoch == straight.epoch == 4
    assert torch.equal(resumed.model.network.values, straight.model.network.values)
    assert torch.equal(resumed.sampler.scores, straight.sampler.scores)
    assert torch.equal(resumed.sampler.force_subset, straight.sampler.force_subset)
    for a, b in zip(resumed.history, straight.history):
        assert {k: v for k, v in a.items() if k != "epoch_time"} == pytest.approx(
            {k: v for k, v in b.items() if k != "epoch_time"}, nan_ok=True, rel=0, abs=0
        )


def test_seed_makes_runs_reproducible_and_distinct(tio2):
    config = af.TrainConfig(epochs=2, batch_size=16, seed=11)
    a, b = _run(tio2, config), _run(tio2, config)
    c = _run(tio2, attrs.evolve(config, seed=12))
    assert torch.equal(a.model.network.values, b.model.network.values)
    assert not torch.equal(a.model.network.values, c.model.network.values)


def test_a_crash_mid_write_leaves_the_previous_checkpoint_loadable(tio2, tmp_path, monkeypatch):
    config = af.TrainConfig(epochs=1, batch_size=32)
    state = _run(tio2, config)
    path = tmp_path / "checkpoint_epoch_0000.pt"
    af.save_checkpoint(path, state, config)

    def broken_save(payload, stream):
        stream.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        af.save_checkpoint(path, attrs.evolve(state, epoch=99), config)
    monkeypatch.undo()
    loaded, _ = af.load_checkpoint(path)
    assert loaded.epoch == state.epoch
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_rotation_keeps_the_newest_and_best_model_is_written(tio2, tmp_path):
    config = af.TrainConfig(epochs=5, batch_size=32, seed=2)
    train, test, model = tio2
    writer = af.CheckpointWriter(tmp_path, config, interval=2, max_checkpoints=1)
    state = af.fit(af.init_train_state(model, train, config), train, test, config, [writer])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best_model.pt", "checkpoint_epoch_0003.pt"]
    best, _ = af.load_checkpoint(tmp_path / "best_model.pt")
    assert best.epoch == state.best_epoch + 1


def test_rotation_rule_is_pure():
    names = [
        "checkpoint_epoch_0010.pt",
        "best_model.pt",
        "checkpoint_epoch_0002.pt",
        "checkpoint_epoch_0007.pt",
    ]
    assert checkpoints_to_delete(names, 2) == ["checkpoint_epoch_0002.pt"]
    assert checkpoints_to_delete(names, None) == []
    assert checkpoints_to_delete(names, 5) == []


def test_the_newest_checkpoint_is_the_latest_epoch_by_number(tmp_path):
    """Past epoch 9999 the names grow a digit: ordering by text would resume an older one."""
    for name in ("checkpoint_epoch_9999.pt", "checkpoint_epoch_10000.pt", "best_model.pt"):
        (tmp_path / name).write_bytes(b"")
    assert newest_checkpoint(tmp_path) == tmp_path / "checkpoint_epoch_10000.pt"
    assert checkpoints_to_delete([p.name for p in tmp_path.iterdir()], 1) == [
        "checkpoint_epoch_9999.pt"
    ]
    assert newest_checkpoint(tmp_path / "missing") is None and newest_checkpoint(None) is None


def test_loading_refuses_foreign_and_corrupt_files(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="not an aenet_fn-checkpoint file"):
        af.load_checkpoint(foreign)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"corrupt\.pt: not a readable"):
        af.load_checkpoint(corrupt)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        af.load_checkpoint(tmp_path / "missing.pt")


def test_plateau_scheduler_and_best_model_follow_the_monitor(tio2):
    _, _, model = tio2
    train = tio2[0]
    config = af.TrainConfig(use_scheduler=True, scheduler=af.PlateauConfig(patience=1, factor=0.5))
    state = af.init_train_state(model, train, config)
    metrics = {"rmse_energy": 1.0, "mae_energy": 1.0, "rmse_forces": float("nan")}
    for value in (1.0, 0.5, 0.6, 0.7, 0.8):
        state = end_of_epoch(state, metrics, {**metrics, "rmse_energy": value}, config, 0.0)
    assert state.best_epoch == 1 and state.best_monitor == 0.5
    assert state.lr == pytest.approx(config.optimizer.lr * 0.5)  # 0.6, 0.7: two bad epochs
    assert [row["learning_rate"] for row in state.history][:3] == [config.optimizer.lr] * 3


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"epochs": -1}, "epochs must be an integer >= 0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"force_weight": 1.5}, r"force_weight must lie in \[0, 1\]"),
        ({"force_weight": -0.1}, r"force_weight must lie in \[0, 1\]"),
        ({"sampling_policy": "best"}, "sampling_policy must be one of"),
        ({"force_sampling": "sometimes"}, "force_sampling must be one of"),
        ({"force_fraction": -0.1}, r"force_fraction must lie in \[0, 1\]"),
        ({"force_fraction": 1.5}, r"force_fraction must lie in \[0, 1\]"),
    ],
)
def test_bad_config_is_rejected(changes, message):
    with pytest.raises(ValueError, match=message):
        af.TrainConfig(**changes)


def test_bad_training_inputs_are_rejected(tio2):
    train, _, _ = tio2
    with pytest.raises(ValueError, match=r"no network for species \['O'\]"):
        af.init_model(PARAMS, {"Ti": ARCH["Ti"]}, train)
    with pytest.raises(ValueError, match=r"test fraction must lie in \[0, 1\)"):
        af.split_indices(10, 1.0, generator=torch.Generator())
    with pytest.raises(ValueError, match="no structures"):
        af.featurize_structures(PARAMS, [], with_derivatives=False)
    copper = af.Structure([[0.0, 0, 0]], ["Cu"], energy=-3.0)
    with pytest.raises(ValueError, match=r"\['Cu'\] are not in the descriptor's species"):
        af.featurize_structures(PARAMS, [copper], with_derivatives=False)
    unlabelled = af.featurize_structures(
        PARAMS, [af.Structure([[0.0, 0, 0], [1.5, 0, 0]], ["Ti", "O"])], with_derivatives=False
    )
    with pytest.raises(ValueError, match="needs a finite energy"):
        af.init_model(PARAMS, ARCH, unlabelled)


@pytest.mark.parametrize("assembled", [False, True], ids=["entries", "assembled-jacobian"])
@pytest.mark.parametrize("force_weight", [0.0, 0.4])
def test_autograd_and_torch_func_gradients_agree(tio2, force_weight, assembled):
    """The loss gradient by torch.func and by autograd, with ∂E/∂G by either."""
    train, _, model = tio2
    jacobian = af.set_jacobian(model.descriptor, train) if assembled else None
    everything = torch.ones(train.n_structures, dtype=torch.bool)
    batch = af.take_structures(train, torch.arange(5, 12), everything, jacobian)

    def loss(values, by_autograd=False):
        return batch_loss(model, values, batch, force_weight, False, by_autograd=by_autograd)

    values = model.network.values
    by_func, aux_func = func_gradient(loss, values)
    by_autograd, aux_autograd = autograd_gradient(loss, values)
    all_autograd, aux_all = autograd_gradient(lambda v: loss(v, by_autograd=True), values)
    torch.testing.assert_close(by_autograd, by_func, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(all_autograd, by_func, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(aux_autograd.energy, aux_func.energy, rtol=0, atol=0)
    torch.testing.assert_close(aux_all.forces, aux_func.forces, rtol=0, atol=1e-14)


def test_float32_training_runs_and_learns():
    structures = af.read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf"))[:30])
    train = af.featurize_structures(PARAMS, structures, with_derivatives=True, dtype=torch.float32)
    model = af.init_model(PARAMS, ARCH, train, seed=0, atomic_energies=E_ATOM)
    assert model.network.values.dtype == torch.float32
    config = af.TrainConfig(
        epochs=8, batch_size=8, force_weight=0.2, optimizer=af.AdamConfig(lr=3e-3)
    )
    state = af.fit(af.init_train_state(model, train, config), train, None, config)
    assert state.model.network.values.dtype == torch.float32
    assert state.history[-1]["RMSE_train"] < 0.5 * state.history[0]["RMSE_train"]


def test_progress_bar_shows_epochs_and_metrics(tio2):
    from aenet_fn.driver.progress import EpochProgress

    train, test, model = tio2
    config = af.TrainConfig(epochs=2, batch_size=32)
    bar = EpochProgress(config.epochs, show_batches=True)
    af.fit(af.init_train_state(model, train, config), train, test, config, [bar], bar.on_batch)
    assert bar.bar.n == 2 and "E_test" in bar.bar.postfix
    assert bar.batch_bar.n == bar.batch_bar.total == 3
    bar.close()


def test_zero_force_fraction_supervises_only_the_minimum(tio2):
    train, _, model = tio2
    config = af.TrainConfig(
        force_weight=0.5, force_fraction=0.0, force_min_structures_per_epoch=None
    )
    assert not af.init_train_state(model, train, config).sampler.force_subset.any()
    at_least = af.TrainConfig(
        force_weight=0.5, force_fraction=0.0, force_min_structures_per_epoch=3
    )
    assert int(af.init_train_state(model, train, at_least).sampler.force_subset.sum()) == 3


def test_epochs_drawn_ahead_start_their_clock_before_the_draw():
    """Each epoch comes with its start time; the first epoch of each draw starts before that
    draw (its time includes laying out the epochs drawn with it), the others after it."""
    draws: list[tuple[int, float]] = []

    def draw(left: int) -> list[int]:
        draws.append((left, time.perf_counter()))
        return list(range(min(3, left)))

    epochs = list(epochs_drawn_ahead(7, draw))
    assert [drawn for drawn, _ in epochs] == [0, 1, 2, 0, 1, 2, 0]
    assert [left for left, _ in draws] == [7, 4, 1]
    starts, drawn_at = [start for _, start in epochs], [at for _, at in draws]
    assert starts == sorted(starts)
    for first, at in zip((0, 3, 6), drawn_at):
        assert starts[first] <= at
    assert all(starts[e] >= drawn_at[e // 3] for e in (1, 2, 4, 5))
    assert [drawn for drawn, _ in epochs_drawn_ahead(2, None)] == [None, None]
