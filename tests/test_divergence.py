"""A run whose loss or weights become non-finite stops with a clear error and keeps its last
finite state and checkpoints; it never reports success with a NaN model."""

from __future__ import annotations

import math

import attrs
import pytest
import torch

import aenet_fn as af
from aenet_fn.driver.committee import committee_fit, init_committee
from aenet_fn.driver.train import TrainingDiverged
from aenet_fn.examples import TIO2_STRUCTURES

PARAMS = af.ChebyshevParams(["Ti", "O"], 4, 4.0, 2, 3.0, min_cutoff=0.5)
ARCH = {"Ti": [(4, "tanh")], "O": [(4, "tanh")]}
E_ATOM = {"Ti": -1604.604515075, "O": -432.503149303}
EXPLODING = af.SGDConfig(lr=1e300)
"""A learning rate that overflows the weights in the first step."""


@pytest.fixture(scope="module")
def train():
    structures = af.read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf"))[:6])
    return af.featurize_structures(PARAMS, structures, with_derivatives=True)


def _finite(state) -> bool:
    return bool(torch.isfinite(state.model.network.values).all())


@pytest.mark.parametrize("route", ["fast", "func"])
@pytest.mark.parametrize("force_weight", [0.0, 0.3])
def test_a_diverging_run_stops_and_keeps_its_finite_checkpoints(
    train, tmp_path, force_weight, route
):
    model = af.init_model(PARAMS, ARCH, train, seed=0, atomic_energies=E_ATOM)
    config = af.TrainConfig(epochs=2, batch_size=3, force_weight=force_weight, route=route)
    writer = af.CheckpointWriter(tmp_path, config, interval=1)
    good = af.fit(af.init_train_state(model, train, config), train, None, config, [writer])
    exploding = attrs.evolve(config, optimizer=EXPLODING)
    sgd_state = af.core.optim.sgd_init(good.model.network.values)
    resumed = attrs.evolve(good, opt_state=sgd_state, lr=EXPLODING.lr)
    with pytest.raises(TrainingDiverged, match="diverged in epoch 2: the training energy") as info:
        af.fit(resumed, train, None, exploding, [writer])
    kept = info.value.state
    assert kept.epoch == resumed.epoch == 2 and _finite(kept)
    assert torch.equal(kept.model.network.values, resumed.model.network.values)
    saved = sorted(tmp_path.glob("checkpoint_epoch_*.pt"))
    assert [path.name for path in saved] == ["checkpoint_epoch_0000.pt", "checkpoint_epoch_0001.pt"]
    for path in saved:
        state, _ = af.load_checkpoint(path)
        assert _finite(state) and all(math.isfinite(r["RMSE_train"]) for r in state.history)


def test_a_diverging_committee_member_stops_the_committee_by_name(train):
    config = af.TrainConfig(epochs=2, batch_size=3, optimizer=EXPLODING)
    members = init_committee(PARAMS, ARCH, train, config, [1, 2], atomic_energies=E_ATOM)
    with pytest.raises(TrainingDiverged, match="committee member 0 diverged in epoch 0") as info:
        committee_fit(members, train, None, config)
    kept = info.value.state
    assert len(kept) == 2 and all(_finite(m) and m.epoch == 0 for m in kept)
    for member, start in zip(kept, members, strict=True):
        assert torch.equal(member.model.network.values, start.model.network.values)


def test_non_finite_weights_are_caught_even_with_a_finite_loss(train):
    from aenet_fn.driver.train import check_finite_epoch

    model = af.init_model(PARAMS, ARCH, train, seed=0, atomic_energies=E_ATOM)
    state = af.init_train_state(model, train, af.TrainConfig())
    values = state.model.network.values.clone()
    values[3] = float("nan")
    broken = attrs.evolve(
        state, model=attrs.evolve(model, network=attrs.evolve(model.network, values=values))
    )
    check_finite_epoch(state, state, {"rmse_energy": 0.1})
    with pytest.raises(TrainingDiverged, match="the network weights became non-finite"):
        check_finite_epoch(state, broken, {"rmse_energy": 0.1})
