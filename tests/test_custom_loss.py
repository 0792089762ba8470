"""Custom losses: ``loss(model, batch) -> (value, residuals)`` trained by ``train_step``,
``fit`` and committees on the ``torch.func`` route; the default loss is one of them."""

from __future__ import annotations

import pytest
import torch

import aenet_fn as af
from aenet_fn.core.network import weight_mask
from aenet_fn.core.optim import sgd_init
from aenet_fn.driver.committee import committee_fit, init_committee, member_seeds
from aenet_fn.driver.seam import prepare_speedups
from aenet_fn.driver.step import default_loss, member_step, residuals
from aenet_fn.examples import TIO2_STRUCTURES

E_ATOM = {"Ti": -1604.604515075, "O": -432.503149303}
PARAMS = af.ChebyshevParams(["Ti", "O"], 6, 5.0, 3, 3.5, min_cutoff=0.5)
ARCH = {"Ti": [(6, "tanh")], "O": [(6, "tanh")]}


@pytest.fixture(scope="module")
def data():
    structures = af.read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf"))[:24])
    train = af.featurize_structures(PARAMS, structures[:18], with_derivatives=True)
    test = af.featurize_structures(PARAMS, structures[18:], with_derivatives=True)
    model = af.init_model(PARAMS, ARCH, train, seed=2, atomic_energies=E_ATOM)
    return train, test, model


def penalised(config: af.TrainConfig, strength: float):
    """The default loss plus ``strength`` times the squared weights (not the biases)."""
    base = default_loss(config)

    def loss(model, batch):
        value, found = base(model, batch)
        weights = model.network.values * weight_mask(model.network)
        return value + strength * (weights * weights).sum(), found

    return loss


def test_the_default_loss_given_explicitly_trains_to_the_same_weights(data):
    train, test, model = data
    config = af.TrainConfig(epochs=3, batch_size=6, force_weight=0.3, route="func")
    state = af.init_train_state(model, train, config)
    plain = af.fit(state, train, test, config)
    given = af.fit(state, train, test, config, loss=default_loss(config))
    assert torch.equal(plain.model.network.values, given.model.network.values)
    for ours, theirs in zip(plain.history, given.history, strict=True):
        assert {k: v for k, v in ours.items() if k != "epoch_time"} == {
            k: v for k, v in theirs.items() if k != "epoch_time"
        }


def test_a_penalty_adds_its_gradient_to_the_step(data):
    """One SGD step of the penalised loss is the plain step minus ``lr · 2λ w`` on the weights;
    the residuals it returns are the plain loss's."""
    train, _, model = data
    config = af.TrainConfig(force_weight=0.3, optimizer=af.SGDConfig(lr=0.5))
    batch = af.take_structures(train, torch.arange(5), torch.ones(18, dtype=torch.bool))
    values = model.network.values
    state = sgd_init(values)
    plain, _, aux = member_step(model, values, state, 0.5, batch, config)
    stepped, _, penalised_aux = member_step(
        model, values, state, 0.5, batch, config, penalised(config, 0.01)
    )
    expected = plain - 0.5 * 2 * 0.01 * values * weight_mask(model.network)
    torch.testing.assert_close(stepped, expected, rtol=1e-12, atol=1e-14)
    for field in ("energy", "forces", "stress"):
        assert torch.equal(getattr(penalised_aux, field), getattr(aux, field))
        assert torch.equal(getattr(residuals(model, batch), field), getattr(aux, field))


def test_a_committee_trains_each_member_with_the_custom_loss(data):
    train = data[0]
    config = af.TrainConfig(epochs=2, batch_size=6, force_weight=0.2, route="func")
    loss = penalised(config, 1e-3)
    members = init_committee(
        PARAMS, ARCH, train, config, member_seeds(2, base_seed=4), atomic_energies=E_ATOM
    )
    together = committee_fit(members, train, None, config, loss=loss)
    for member, start in zip(together, members):
        alone = af.fit(start, train, None, config, loss=loss)
        torch.testing.assert_close(
            member.model.network.values, alone.model.network.values, rtol=1e-10, atol=1e-12
        )
        assert member.history[-1]["RMSE_train"] == pytest.approx(alone.history[-1]["RMSE_train"])


def test_a_custom_loss_refuses_the_fast_route(data):
    train, _, model = data
    config = af.TrainConfig(epochs=1, batch_size=6, force_weight=0.2, route="fast")
    state = af.init_train_state(model, train, config)
    speedups = prepare_speedups(state, train, None, config)
    assert speedups.jacobian is not None
    with pytest.raises(ValueError, match=r"custom loss trains on the torch\.func route"):
        af.fit(state, train, None, config, speedups=speedups, loss=default_loss(config))
    everything = torch.ones(18, dtype=torch.bool)
    batch = af.take_structures(train, torch.arange(4), everything, jacobian=speedups.jacobian)
    with pytest.raises(ValueError, match="without a stored Jacobian"):
        af.train_step(state, batch, config, default_loss(config))
    trained = af.fit(state, train, None, config, loss=default_loss(config))  # no speedups: fine
    assert trained.epoch == 1 and trained.history[0]["RMSE_force_train"] > 0


def test_trainable_hands_out_the_networks_and_the_normalisation_only_when_asked(data):
    """``trainable`` splits a model optax-``masked`` style: by default only the networks'
    parameters reach ``grad`` and the optimiser; with ``normalization`` the feature and energy
    scaling too (their gradient equals finite differences); ``rebuild`` puts them back."""
    from torch.func import grad

    from aenet_fn.core.optim import adam
    from aenet_fn.core.potential import trainable

    train, _, model = data
    batch = af.take_structures(train, torch.arange(6))

    def loss(parameters, rebuild):
        return residuals(rebuild(parameters), batch).energy.pow(2).mean()

    parameters, rebuild = trainable(model)
    assert set(parameters) == {"network"}
    assert torch.equal(rebuild(parameters).network.values, model.network.values)
    full, rebuild_full = trainable(model, normalization=True)
    assert set(full) == {"network", "feature_mean", "feature_std", "energy_shift", "energy_scaling"}
    gradient = grad(loss)(full, rebuild_full)
    step = torch.zeros_like(full["feature_mean"])
    step.view(-1)[3] = 1e-6
    up = loss({**full, "feature_mean": full["feature_mean"] + step}, rebuild_full)
    down = loss({**full, "feature_mean": full["feature_mean"] - step}, rebuild_full)
    numeric = float(up - down) / 2e-6
    assert float(gradient["feature_mean"].view(-1)[3]) == pytest.approx(numeric, rel=1e-5, abs=1e-9)
    optimizer = adam(af.AdamConfig(lr=1e-2))
    updated, _ = optimizer.update(gradient, optimizer.init(full), full)
    moved = rebuild_full(updated)
    assert not torch.equal(moved.normalization.feature_mean, model.normalization.feature_mean)
    assert torch.equal(
        moved.normalization.atomic_energies, model.normalization.atomic_energies
    )  # not handed out: frozen
