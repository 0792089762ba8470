"""Committees trained together by vmap: each member equals the member trained alone."""

from __future__ import annotations

import math

import attrs
import pytest
import torch

import aenet_fn as af
import aenet_fn.driver.seam as seam_module
from aenet_fn.core.minibatch import stack_batches
from aenet_fn.driver.committee import (
    check_shared_parts,
    committee_evaluate,
    committee_fit,
    committee_predict,
    committee_step,
    init_committee,
    member_seeds,
    stack_members,
    unstack_members,
)
from aenet_fn.driver.seam import assembled_jacobian
from aenet_fn.driver.step import batch_loss, member_step
from aenet_fn.examples import TIO2_STRUCTURES
from aenet_fn.speedups.force_jacobian import StackedJacobians, set_jacobian

PARAMS = af.ChebyshevParams(
    species=["Ti", "O"], rad_order=8, rad_cutoff=5.0, ang_order=3, ang_cutoff=3.5, min_cutoff=0.5
)
ARCH = {"Ti": [(8, "tanh"), (8, "tanh")], "O": [(8, "tanh")]}
E_ATOM = {"Ti": -1604.604515075, "O": -432.503149303}


@pytest.fixture(scope="module")
def data():
    structures = af.read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf"))[:40])
    train = af.featurize_structures(PARAMS, structures[:30], with_derivatives=True)
    test = af.featurize_structures(PARAMS, structures[30:], with_derivatives=True)
    return structures, train, test


@pytest.mark.parametrize(
    ("policy", "shared"),
    [
        ("uniform", False),
        ("error_weighted", False),
        ("energy_weighted", False),
        ("uniform", True),
        ("error_weighted", True),
    ],
)
@pytest.mark.parametrize("route", ["fast", "func"])
def test_each_member_equals_the_member_trained_alone(data, policy, shared, route):
    """Per-member batches (stacked, derivative entries) or shared batches (fast route:
    assembled Jacobians, the members as columns of one product; ``torch.func`` route: vmapped
    over the members)."""
    _, train, test = data
    config = af.TrainConfig(
        route=route,
        epochs=3,
        batch_size=8,
        force_weight=0.3,
        force_fraction=0.5,
        force_resample_num_epochs=1,
        force_scale_unbiased=True,
        sampling_policy=policy,
        use_scheduler=True,
    )
    seeds = member_seeds(3, base_seed=20)
    members = committee_fit(
        init_committee(
            PARAMS, ARCH, train, config, seeds, shared_batches=shared, atomic_energies=E_ATOM
        ),
        train,
        test,
        config,
    )
    for seed, member in zip(seeds, members):
        model = af.init_model(PARAMS, ARCH, train, seed=seed, atomic_energies=E_ATOM)
        alone_config = config if shared else attrs.evolve(config, seed=seed)
        alone = af.fit(af.init_train_state(model, train, alone_config), train, test, alone_config)
        torch.testing.assert_close(
            member.model.network.values, alone.model.network.values, rtol=0, atol=1e-12
        )
        torch.testing.assert_close(member.sampler.scores, alone.sampler.scores, rtol=0, atol=1e-12)
        assert torch.equal(member.sampler.force_subset, alone.sampler.force_subset)
        for a, b in zip(member.history, alone.history):
            for key in (
                "RMSE_train",
                "RMSE_test",
                "RMSE_force_train",
                "RMSE_force_test",
                "learning_rate",
            ):
                assert a[key] == pytest.approx(b[key], rel=1e-9, nan_ok=True)
    assert not torch.equal(members[0].model.network.values, members[1].model.network.values)


@pytest.mark.parametrize(
    ("policy", "shared"), [("uniform", True), ("uniform", False), ("energy_weighted", False)]
)
def test_energy_committee_epochs_drawn_ahead_equal_epochs_planned_alone(
    data, policy, shared, monkeypatch
):
    """Energy-only committees draw their epochs ahead as fit does (one plan of several epochs:
    one order shared by the members, or one per member): bit for bit the run that plans
    every epoch alone, and each member the member trained alone by fit."""
    _, train, _ = data
    config = af.TrainConfig(epochs=5, batch_size=8, sampling_policy=policy, use_scheduler=True)
    seeds = member_seeds(3, base_seed=7)
    members = init_committee(
        PARAMS, ARCH, train, config, seeds, shared_batches=shared, atomic_energies=E_ATOM
    )
    plans = []
    real_plan = seam_module.energy_plan

    def counted(*args, **kwargs):
        plans.append(tuple(args[2].shape))
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(seam_module, "energy_plan", counted)
    ahead = committee_fit(members, train, None, config)
    assert plans == [(5 * 32,) if shared else (3, 5 * 32)]  # 30 draws, 2 empty slots each
    monkeypatch.setattr(seam_module, "DRAW_AHEAD", 1)
    alone = committee_fit(members, train, None, config)
    for ours, theirs, seed in zip(ahead, alone, seeds):
        assert torch.equal(ours.model.network.values, theirs.model.network.values)
        assert torch.equal(ours.rng, theirs.rng)
        assert [r["RMSE_train"] for r in ours.history] == [r["RMSE_train"] for r in theirs.history]
        model = af.init_model(PARAMS, ARCH, train, seed=seed, atomic_energies=E_ATOM)
        alone_config = config if shared else attrs.evolve(config, seed=seed)
        single = af.fit(af.init_train_state(model, train, alone_config), train, None, alone_config)
        torch.testing.assert_close(
            ours.model.network.values, single.model.network.values, rtol=0, atol=1e-12
        )


@pytest.mark.parametrize("storage", [None, 0.0, math.inf], ids=["entries", "pairs", "dense"])
def test_padding_of_stacked_batches_changes_nothing(data, storage):
    _, train, _ = data
    model = af.init_model(PARAMS, ARCH, train, seed=1, atomic_energies=E_ATOM)
    forces = torch.ones(train.n_structures, dtype=torch.bool)
    assembled = storage is not None
    jacobian = set_jacobian(PARAMS, train, storage) if assembled else None
    batches = [
        af.take_structures(train, torch.tensor([0, 5, 9]), forces, jacobian),
        af.take_structures(train, torch.tensor([3, 3, 20]), None, jacobian),
        af.take_structures(train, torch.tensor([11, 1, 28]), forces, jacobian),
    ]
    stacked = stack_batches(batches)
    assert isinstance(stacked.local, StackedJacobians) == assembled
    values = model.network.values

    def loss_of(v, batch):
        return batch_loss(model, v, batch, 0.4, True)[0]

    if assembled:  # per-member Jacobians: the members are a leading axis, no vmap
        members = values.expand(len(batches), -1).clone().requires_grad_(True)
        together = batch_loss(model, members, stacked, 0.4, True)
        (gradients,) = torch.autograd.grad(together[0].sum(), members)
        together = torch.utils._pytree.tree_map(torch.Tensor.detach, together)
    else:
        together = torch.func.vmap(
            lambda batch: batch_loss(model, values, batch, 0.4, True), in_dims=(0,)
        )(stacked)
        gradients = torch.func.vmap(torch.func.grad(loss_of), in_dims=(None, 0))(values, stacked)
    for k, batch in enumerate(batches):
        expected = torch.func.grad(loss_of)(values, batch)
        torch.testing.assert_close(gradients[k], expected, rtol=1e-12, atol=1e-13)
        loss, found = batch_loss(model, values, batch, 0.4, True)
        errors, differences = found.energy, found.forces
        torch.testing.assert_close(together[0][k], loss, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(together[1].energy[k], errors, rtol=1e-14, atol=1e-14)
        n = batch.features.shape[0]
        kept = stacked.atom_index[k] >= 0
        assert int(kept.sum()) == n
        by_atom = dict(zip(batch.atom_index.tolist(), differences))
        for position in torch.nonzero(kept).flatten().tolist():
            atom = int(stacked.atom_index[k, position])
            torch.testing.assert_close(
                together[1].forces[k, position], by_atom[atom], rtol=1e-12, atol=1e-12
            )


def test_committee_prediction_is_the_members_in_one_pass(data):
    structures, train, _ = data
    models = [af.init_model(PARAMS, ARCH, train, seed=s, atomic_energies=E_ATOM) for s in range(3)]
    batch = af.collate(structures[:4], species=PARAMS.species)
    prediction = committee_predict(models, batch)
    energies, forces = zip(*(af.energy_and_forces(m, batch) for m in models))
    energies, forces = torch.stack(energies), torch.stack(forces)
    torch.testing.assert_close(prediction.member_energies, energies, rtol=1e-13, atol=1e-9)
    torch.testing.assert_close(prediction.member_forces, forces, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(prediction.energy_std, energies.std(0, unbiased=False))
    torch.testing.assert_close(prediction.force_mean, forces.mean(0))
    energy_only = committee_predict(models, batch, eval_forces=False)
    assert energy_only.member_forces is None and energy_only.member_stresses is None
    torch.testing.assert_close(energy_only.energy_mean, prediction.energy_mean)
    with_stress = committee_predict(models, batch, compute_stress=True)
    stresses = torch.stack(
        [af.energy_forces_stress(m, batch, compute_stress=True).stress for m in models]
    )
    torch.testing.assert_close(with_stress.member_stresses, stresses, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(with_stress.stress_std, stresses.std(0, unbiased=False))
    torch.testing.assert_close(with_stress.stress_mean, stresses.mean(0))


@pytest.mark.parametrize("assembled", [False, True], ids=["entries", "assembled-jacobian"])
def test_vmapped_evaluation_equals_per_member_evaluation(data, assembled):
    _, train, test = data
    config = af.TrainConfig(epochs=1, batch_size=8, force_weight=0.2)
    members = init_committee(PARAMS, ARCH, train, config, [1, 2], atomic_energies=E_ATOM)
    jacobian = assembled_jacobian(members[0].model, test, config) if assembled else None
    assert (jacobian is not None) == assembled
    together = committee_evaluate(members, test, with_forces=True, jacobian=jacobian)
    for member, metrics in zip(members, together):
        assert metrics == pytest.approx(
            af.evaluate(member.model, test, with_forces=True), rel=1e-10
        )


@pytest.mark.parametrize("kind", ["energies", "entries", "pairs", "dense"])
def test_batch_loss_of_stacked_members_is_each_members_loss(data, kind):
    """``batch_loss`` with values ``[M, P]`` (members as a leading axis, no vmap)."""
    _, train, _ = data
    members = [af.init_model(PARAMS, ARCH, train, seed=s, atomic_energies=E_ATOM) for s in (1, 2)]
    forces = None if kind == "energies" else torch.ones(train.n_structures, dtype=torch.bool)
    storage = {"pairs": 0.0, "dense": math.inf}.get(kind)
    jacobian = None if storage is None else set_jacobian(PARAMS, train, storage)
    batch = af.take_structures(train, torch.tensor([4, 0, 13, 4, 21]), forces, jacobian)
    stacked = torch.stack([m.network.values for m in members])
    losses, found = batch_loss(members[0], stacked, batch, 0.3, True)
    errors, differences = found.energy, found.forces
    assert losses.shape == (2,) and differences.shape[0] == 2
    for k, member in enumerate(members):
        loss, own = batch_loss(member, member.network.values, batch, 0.3, True)
        own_errors, own_differences = own.energy, own.forces
        torch.testing.assert_close(losses[k], loss, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(errors[k], own_errors, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(differences[k], own_differences, rtol=1e-12, atol=1e-13)


def test_committee_step_on_a_shared_batch_equals_vmapped_member_step(data):
    """Gradients by autograd through the vmapped losses equal vmapped ``torch.func.grad``."""
    _, train, _ = data
    config = af.TrainConfig(epochs=1, batch_size=8, force_weight=0.4, force_scale_unbiased=True)
    members = init_committee(PARAMS, ARCH, train, config, [3, 4, 5], atomic_energies=E_ATOM)
    forces = torch.ones(train.n_structures, dtype=torch.bool)
    jacobian = assembled_jacobian(members[0].model, train, config)
    batch = af.take_structures(train, torch.tensor([0, 5, 9, 5]), forces, jacobian)
    values = torch.stack([m.model.network.values for m in members])
    opt_state = torch.utils._pytree.tree_map(
        lambda *leaves: torch.stack(leaves), *[m.opt_state for m in members]
    )
    lrs = torch.tensor([m.lr for m in members], dtype=values.dtype)
    template = members[0].model
    got = committee_step(template, values, opt_state, lrs, batch, config)
    expected = torch.func.vmap(lambda v, s, lr: member_step(template, v, s, lr, batch, config))(
        values, opt_state, lrs
    )
    assert not torch.equal(got[0], values)
    for a, b in zip(
        torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expected)
    ):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_stack_and_unstack_members(data):
    _, train, _ = data
    networks = [af.init_model(PARAMS, ARCH, train, seed=s).network for s in range(2)]
    stacked = stack_members(networks)
    assert stacked.values.shape == (2, networks[0].values.shape[0])
    assert all(torch.equal(a.values, b.values) for a, b in zip(unstack_members(stacked), networks))
    other = af.init_model(PARAMS, {"Ti": [(4, "tanh")], "O": [(4, "tanh")]}, train).network
    with pytest.raises(ValueError, match="member 1 has a different network layout"):
        stack_members([networks[0], other])


def test_members_must_share_descriptor_and_normalisation(data):
    _, train, _ = data
    model = af.init_model(PARAMS, ARCH, train, seed=0)
    other_descriptor = attrs.evolve(PARAMS, rad_cutoff=4.5)
    with pytest.raises(ValueError, match="member 1 has a different descriptor"):
        check_shared_parts([model, attrs.evolve(model, descriptor=other_descriptor)])
    shifted = attrs.evolve(model.normalization, energy_shift=model.normalization.energy_shift + 1)
    with pytest.raises(ValueError, match="different normalisation"):
        check_shared_parts([model, attrs.evolve(model, normalization=shifted)])


def test_member_seeds():
    assert member_seeds(3, base_seed=5) == [5, 6, 7]
    assert member_seeds(2, seeds=[9, 4]) == [9, 4]
    with pytest.raises(ValueError, match="at least one member"):
        member_seeds(0)
    with pytest.raises(ValueError, match="2 member seeds given for 3 members"):
        member_seeds(3, seeds=[1, 2])
    with pytest.raises(ValueError, match="distinct"):
        member_seeds(2, seeds=[1, 1])
