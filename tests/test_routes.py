"""The two training routes: the ``torch.func`` route, which runs everywhere, and the CPU's
speed-ups (``TrainConfig.route``) train to the same weights, and the route is recorded."""

from __future__ import annotations

import attrs
import pytest
import torch

import aenet_fn as af
from aenet_fn.driver.committee import committee_fit, init_committee, member_seeds
from aenet_fn.driver.state import takes_fast_route
from aenet_fn.examples import TIO2_STRUCTURES

PARAMS = af.ChebyshevParams(
    species=["Ti", "O"], rad_order=8, rad_cutoff=5.0, ang_order=3, ang_cutoff=3.5, min_cutoff=0.5
)
ARCH = {"Ti": [(8, "tanh"), (8, "tanh")], "O": [(8, "tanh")]}
E_ATOM = {"Ti": -1604.604515075, "O": -432.503149303}
SAME = {"rtol": 1e-10, "atol": 1e-14}
"""CPU float64: the routes differ by round-off only (the order of sums)."""


@pytest.fixture(scope="module")
def data():
    structures = af.read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf"))[:32])
    train = af.featurize_structures(PARAMS, structures[:26], with_derivatives=True)
    test = af.featurize_structures(PARAMS, structures[26:], with_derivatives=True)
    model = af.init_model(PARAMS, ARCH, train, seed=1, atomic_energies=E_ATOM)
    return train, test, model


def _config(route: str, force_weight: float, policy: str) -> af.TrainConfig:
    return af.TrainConfig(
        epochs=3,
        batch_size=8,
        force_weight=force_weight,
        force_fraction=0.5,
        force_resample_num_epochs=1,
        sampling_policy=policy,
        use_scheduler=True,
        optimizer=af.AdamConfig(lr=3e-3),
        route=route,
    )


CASES = [(0.0, "uniform"), (0.0, "error_weighted"), (0.3, "energy_weighted"), (0.3, "uniform")]


def _assert_same_runs(fast: af.TrainState, func: af.TrainState) -> None:
    torch.testing.assert_close(func.model.network.values, fast.model.network.values, **SAME)
    torch.testing.assert_close(func.sampler.scores, fast.sampler.scores, **SAME)
    assert torch.equal(func.sampler.force_subset, fast.sampler.force_subset)
    for a, b in zip(func.history, fast.history, strict=True):
        for key in ("RMSE_train", "RMSE_test", "RMSE_force_train", "learning_rate"):
            assert a[key] == pytest.approx(b[key], rel=1e-10, nan_ok=True)


@pytest.mark.parametrize(("force_weight", "policy"), CASES)
def test_both_routes_train_one_model_to_the_same_weights(data, force_weight, policy):
    train, test, model = data
    states = {}
    for route in ("fast", "func"):
        config = _config(route, force_weight, policy)
        states[route] = af.fit(af.init_train_state(model, train, config), train, test, config)
    assert not torch.equal(states["func"].model.network.values, model.network.values)
    _assert_same_runs(states["fast"], states["func"])


@pytest.mark.parametrize("shared", [False, True], ids=["own batches", "shared batches"])
@pytest.mark.parametrize(("force_weight", "policy"), CASES[::2])
def test_both_routes_train_a_committee_to_the_same_weights(data, force_weight, policy, shared):
    train, test, _ = data
    runs = {}
    for route in ("fast", "func"):
        config = _config(route, force_weight, policy)
        members = init_committee(
            PARAMS,
            ARCH,
            train,
            config,
            member_seeds(3, base_seed=4),
            shared_batches=shared,
            atomic_energies=E_ATOM,
        )
        runs[route] = committee_fit(members, train, test, config)
    for fast, func in zip(runs["fast"], runs["func"], strict=True):
        _assert_same_runs(fast, func)


def test_auto_takes_the_speed_ups_on_the_cpu_only():
    cpu = torch.zeros(3, dtype=torch.float64)
    meta = cpu.to("meta")
    assert takes_fast_route(af.TrainConfig(), cpu)
    assert not takes_fast_route(af.TrainConfig(), meta)
    assert not takes_fast_route(af.TrainConfig(route="func"), cpu)
    assert takes_fast_route(af.TrainConfig(route="fast"), cpu)
    with pytest.raises(ValueError, match="route='fast' runs on the CPU only, not on meta"):
        takes_fast_route(af.TrainConfig(route="fast"), meta)


def test_bad_route_options_are_refused():
    with pytest.raises(ValueError, match="route must be one of"):
        af.TrainConfig(route="fastest")
    for bad in (-1.0, float("nan"), "8", True):
        with pytest.raises(ValueError, match="jacobian_memory_gib must be a number >= 0"):
            af.TrainConfig(jacobian_memory_gib=bad)


def test_the_route_is_recorded_in_the_checkpoint(data, tmp_path):
    train, _, model = data
    config = attrs.evolve(_config("func", 0.0, "uniform"), epochs=1)
    state = af.fit(af.init_train_state(model, train, config), train, None, config)
    path = af.save_checkpoint(tmp_path / "run.pt", state, config)
    _, loaded = af.load_checkpoint(path)
    assert loaded.route == "func" and loaded == config
