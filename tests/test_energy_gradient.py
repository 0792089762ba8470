"""The hand-derived energy-only gradient equals autodiff for every activation and dtype."""

from __future__ import annotations

import attrs
import pytest
import torch
from torch.utils._pytree import tree_leaves, tree_map

import aenet_fn as af
import aenet_fn.driver.seam as seam_module
import aenet_fn.driver.train as train_module
import aenet_fn.speedups.energy_gradient as energy_gradient_module
from aenet_fn.core.network import ACTIVATIONS
from aenet_fn.driver.step import batch_loss, func_gradient
from aenet_fn.examples import TIO2_STRUCTURES
from aenet_fn.speedups.energy_gradient import energy_plan, energy_table, plan_gradient

REFERENCES = {"Ti": -1604.604515075, "O": -432.503149303}


@pytest.fixture(scope="module")
def tio2_structures():
    return af.read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf"))[:20])


PARAMS = af.ChebyshevParams(["Ti", "O"], 6, 5.0, 3, 3.5, min_cutoff=0.5)
ARCH = {"Ti": [(6, "tanh"), (5, "tanh")], "O": [(6, "tanh"), (5, "tanh")]}


def _batch_gradient(model, batch, force_weight):
    """The hand-derived gradient ``[P]`` and per-atom errors ``[b]`` of one whole batch: one
    plan of its structures, in order."""
    draws = torch.arange(batch.n_structures)
    plan = energy_plan(energy_table(model, batch), model.network, draws, batch.n_structures)
    return plan_gradient(model.network, plan, 0, force_weight)


def _in_float64(tree):
    return tree_map(
        lambda t: t.to(torch.float64) if torch.is_tensor(t) and t.is_floating_point() else t, tree
    )


def _assert_gradient_of(model, batch, gradient, errors, force_weight):
    """``gradient`` and ``errors`` equal torch.func's of ``batch_loss``, evaluated in float64
    on the same (widened) numbers: float32 results are held to float32 round-off of the truth."""
    model64, batch64 = _in_float64(model), _in_float64(batch)
    values64 = model64.network.values
    expected, expected_found = func_gradient(
        lambda v: batch_loss(model64, v, batch64, force_weight, False), values64
    )
    expected_errors = expected_found.energy
    dtype = gradient.dtype
    tolerance = 1e-11 if dtype == torch.float64 else 2e-4
    scale = float(expected.abs().max())
    assert scale > 0
    torch.testing.assert_close(gradient.double(), expected, rtol=0, atol=tolerance * scale)
    # the errors are differences of total energies (~1e4 eV here): their round-off, per atom;
    # in float32 also a few units in the last place of the errors per atom themselves
    energy_round_off = 8 * torch.finfo(torch.float64).eps * float(batch64.energies.abs().max())
    tolerance = energy_round_off / float(batch.n_atoms.min()) + 1e-12
    if dtype == torch.float32:
        tolerance += 8 * torch.finfo(dtype).eps * float(expected_errors.abs().max())
    torch.testing.assert_close(errors.double(), expected_errors, rtol=0, atol=tolerance)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hand_gradient_equals_torch_func(tio2_structures, activation, dtype):
    arch = {
        "Ti": [(7, activation), (5, "tanh")],
        "O": [(6, activation), (4, activation), (3, "sigmoid")],
    }
    train = af.featurize_structures(PARAMS, tio2_structures, with_derivatives=False, dtype=dtype)
    model = af.init_model(PARAMS, arch, train, seed=2, atomic_energies=REFERENCES)
    batch = af.take_structures(train, torch.tensor([3, 0, 7, 7, 12, 19, 5]))
    gradient, errors = _batch_gradient(model, batch, 0.3)
    _assert_gradient_of(model, batch, gradient, errors, 0.3)
    assert gradient.dtype == dtype


@pytest.mark.parametrize("activation", ["tanh", "twist", "silu"])
@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_plan_of_consecutive_batches_with_stacked_species(tio2_structures, activation, batch_size):
    """Both species share one architecture (one batched product per layer, padded atoms; O,
    twice as frequent as Ti, in two blocks); every batch of the plan, the short last one
    included, equals its own mini-batch's loss."""
    arch = {s: [(6, activation), (4, "tanh")] for s in ("Ti", "O")}
    train = af.featurize_structures(PARAMS, tio2_structures, with_derivatives=False)
    model = af.init_model(PARAMS, arch, train, seed=5, atomic_energies=REFERENCES)
    order = torch.tensor([5, 5, 11, 0, 18, 2, 9, 12, 16, 6, 17, 3])  # 23-24 atoms each
    plan = energy_plan(energy_table(model, train), model.network, order, batch_size)
    assert plan.groups == ((0, 1, 1),) and sum(plan.sizes) == order.numel()
    for k, selection in enumerate(order.split(batch_size)):
        gradient, errors = plan_gradient(model.network, plan, k, 0.2)
        _assert_gradient_of(model, af.take_structures(train, selection), gradient, errors, 0.2)


@pytest.mark.parametrize("first", ["tanh", "silu"])
@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("own_orders", [False, True])
def test_committee_members_in_one_plan_equal_each_member_alone(
    tio2_structures, own_orders, mixed, first
):
    """Stacked member values: with one shared order (the first layer's products with the
    members as rows) or an order per member, every member's gradient and errors equal those of
    its own single-member plan; also where the species' architectures differ (one group per
    species: member weights that do not merge) and with a first activation whose derivative
    reads its pre-activation."""
    arch = {s: [(5, first), (4, "twist")] for s in ("Ti", "O")}
    if mixed:
        arch["O"] = [(3, "sigmoid")]
    train = af.featurize_structures(PARAMS, tio2_structures, with_derivatives=False)
    members = [
        af.init_model(PARAMS, arch, train, seed=s, atomic_energies=REFERENCES) for s in (1, 2, 3)
    ]
    stacked = attrs.evolve(
        members[0].network, values=torch.stack([m.network.values for m in members])
    )
    table = energy_table(members[0], train)
    generator = torch.Generator().manual_seed(4)
    orders = torch.stack([torch.randperm(20, generator=generator)[:11] for _ in members])
    draws = orders if own_orders else orders[0]
    plan = energy_plan(table, stacked, draws, 4)
    assert plan.n_orders == (3 if own_orders else 1)
    assert plan.groups == (((0,), (1,)) if mixed else ((0, 1, 1),))
    for k in range(len(plan.sizes)):
        gradients, errors = plan_gradient(stacked, plan, k, 0.1)
        for i, member in enumerate(members):
            alone = energy_plan(table, member.network, orders[i] if own_orders else draws, 4)
            expected_gradient, expected_errors = plan_gradient(member.network, alone, k, 0.1)
            torch.testing.assert_close(gradients[i], expected_gradient, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(errors[i], expected_errors, rtol=1e-12, atol=1e-14)


def _spread_molecule(species: list[str], seed: int) -> af.Structure:
    """Atoms on a jittered line, 1.2 Å apart (no overlaps)."""
    jitter = 0.2 * torch.rand(len(species), 3, generator=torch.Generator().manual_seed(seed))
    line = torch.arange(len(species), dtype=torch.float64)[:, None] * torch.tensor([1.2, 0, 0])
    return af.Structure(line + jitter.double(), species, energy=-3.0 * len(species))


@pytest.mark.parametrize(
    ("molecules", "groups"),
    [
        ([["O", "H", "H", "C"]], ((0, 1, 2),)),  # widest 2: three blocks of 2 columns
        ([["O", "C"] + ["H"] * 10], ((0, 1, 1, 2),)),  # H in two blocks of 5 columns
        ([["O"] * 300, ["H"] * 300], ((0,), (1,))),  # stacked: 300 padding columns per batch
    ],
)
def test_species_with_very_unequal_counts_are_balanced_or_not_padded_together(molecules, groups):
    """A frequent species is split into blocks about as wide as the others'; where the
    batches' compositions differ so much that stacking would pad many columns, each species
    has its own group. The gradient is autodiff's either way."""
    params = af.ChebyshevParams(["O", "H", "C"], 4, 4.0, 2, 3.0, min_cutoff=0.1)
    structures = [_spread_molecule(species, seed=len(species)) for species in molecules]
    train = af.featurize_structures(params, structures, with_derivatives=False)
    model = af.init_model(params, {s: [(3, "tanh")] for s in "OHC"}, train, seed=0)
    order = torch.arange(len(structures))
    plan = energy_plan(energy_table(model, train), model.network, order, 1)
    assert plan.groups == groups
    for k in range(len(structures)):
        gradient, errors = plan_gradient(model.network, plan, k, 0.0)
        batch = af.take_structures(train, order[k : k + 1])
        _assert_gradient_of(model, batch, gradient, errors, 0.0)


def test_a_table_for_a_batch_size_fixes_the_grouping_of_all_its_plans():
    """A table made for a batch size carries one grouping, decided on a fixed order of its
    structures, that every plan takes, here also one whose own batches would have been
    grouped otherwise (one species per batch: stacking pads half the columns); the gradient
    is autodiff's either way."""
    params = af.ChebyshevParams(["O", "H", "C"], 4, 4.0, 2, 3.0, min_cutoff=0.1)
    molecules = [["O"] * 300, ["H"] * 300]
    structures = [_spread_molecule(species, seed=len(species)) for species in molecules]
    train = af.featurize_structures(params, structures, with_derivatives=False)
    model = af.init_model(params, {s: [(3, "tanh")] for s in "OHC"}, train, seed=0)
    table = energy_table(model, train, batch_size=2)  # both molecules in one batch: stacked
    assert table.grouping == (((0, 1), (1, 1)),)
    order = torch.tensor([1, 0])
    assert energy_plan(energy_table(model, train), model.network, order, 1).groups == ((0,), (1,))
    plan = energy_plan(table, model.network, order, 1)
    assert plan.groups == ((0, 1),)
    for k in range(2):
        gradient, errors = plan_gradient(model.network, plan, k, 0.0)
        batch = af.take_structures(train, order[k : k + 1])
        _assert_gradient_of(model, batch, gradient, errors, 0.0)


@pytest.mark.parametrize(
    ("optimizer", "policy"),
    [
        (af.AdamConfig(lr=0.01, weight_decay=0.01), "uniform"),
        (af.AdamConfig(lr=0.01), "error_weighted"),
        (af.SGDConfig(lr=0.01, momentum=0.9), "energy_weighted"),
    ],
)
def test_energy_route_epochs_equal_train_step_epochs(
    tio2_structures, optimizer, policy, monkeypatch
):
    """Epochs on the energy-only route (plans, in-place updates of working copies) reach the
    weights, history and sampler scores of one train_step per assembled batch, and leave the
    state they started from untouched."""
    train = af.featurize_structures(PARAMS, tio2_structures, with_derivatives=False)
    model = af.init_model(PARAMS, ARCH, train, seed=2, atomic_energies=REFERENCES)
    config = af.TrainConfig(epochs=3, batch_size=6, optimizer=optimizer, sampling_policy=policy)
    start = af.init_train_state(model, train, config)
    before = start.model.network.values.clone()
    fast = af.fit(start, train, None, config)
    assert torch.equal(start.model.network.values, before)
    monkeypatch.setattr(seam_module, "energy_epoch_table", lambda *args, **kwargs: None)
    slow = af.fit(start, train, None, config)
    values = fast.model.network.values
    torch.testing.assert_close(values, slow.model.network.values, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(fast.sampler.scores, slow.sampler.scores, rtol=1e-9, atol=1e-12)
    for ours, theirs in zip(fast.history, slow.history):
        assert ours["RMSE_train"] == pytest.approx(theirs["RMSE_train"], rel=1e-10)
    for ours, theirs in zip(tree_leaves(fast.opt_state), tree_leaves(slow.opt_state)):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_batches_missing_a_species_entirely(batch_size):
    """Batches with no atom of a species (zero-width blocks), stacked or per-species groups:
    every batch's gradient equals autodiff's."""
    params = af.ChebyshevParams(["O", "H", "C"], 4, 4.0, 2, 3.0, min_cutoff=0.1)
    molecules = [["O"] * 3, ["H"] * 4, ["C", "O"], ["H", "H", "C"]]
    structures = [_spread_molecule(species, seed) for seed, species in enumerate(molecules)]
    train = af.featurize_structures(params, structures, with_derivatives=False)
    order = torch.tensor([3, 0, 1, 2])
    zero_widths = 0
    for arch in ({s: [(3, "tanh")] for s in "OHC"}, {"O": [(3, "tanh")], "H": [(2, "sigmoid")]}):
        arch = {"C": [(3, "tanh")], **arch}
        model = af.init_model(params, arch, train, seed=0)
        plan = energy_plan(energy_table(model, train), model.network, order, batch_size)
        zero_widths += sum(width == 0 for widths in plan.widths for width in widths)
        for k in range(len(plan.sizes)):
            gradient, errors = plan_gradient(model.network, plan, k, 0.1)
            batch = af.take_structures(train, order[k * batch_size : (k + 1) * batch_size])
            _assert_gradient_of(model, batch, gradient, errors, 0.1)
    assert zero_widths > 0


@pytest.mark.parametrize(
    ("policy", "batch_size"),
    [("uniform", 6), ("energy_weighted", 6), ("uniform", 5), ("uniform", 32)],
)
def test_epochs_drawn_ahead_equal_epochs_drawn_one_by_one(
    tio2_structures, policy, batch_size, monkeypatch
):
    """fit draws energy-only epochs ahead and lays several out in one plan (each epoch's short
    last batch ending in empty slots): the run equals, bit for bit, one that plans each epoch
    alone and one resumed in the middle of a plan (weights, moments, generator, history)."""
    train = af.featurize_structures(PARAMS, tio2_structures, with_derivatives=False)
    model = af.init_model(PARAMS, ARCH, train, seed=3, atomic_energies=REFERENCES)
    config = af.TrainConfig(epochs=7, batch_size=batch_size, sampling_policy=policy, seed=4)
    start = af.init_train_state(model, train, config)
    plans = []
    real_plan = seam_module.energy_plan

    def counted(*args, **kwargs):
        plans.append(args[2].numel())
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(seam_module, "energy_plan", counted)
    monkeypatch.setattr(energy_gradient_module, "energy_plan", counted)
    ahead = af.fit(start, train, None, config)
    slots = -(-20 // batch_size) * batch_size  # 20 draws, then empty slots
    assert plans == [7 * slots]
    part = af.fit(start, train, None, attrs.evolve(config, epochs=3))
    resumed = af.fit(part, train, None, attrs.evolve(config, epochs=4))
    monkeypatch.setattr(seam_module, "DRAW_AHEAD", 1)
    alone = af.fit(start, train, None, config)
    assert plans[-7:] == [20] * 7  # a plan per epoch
    for other in (resumed, alone):
        assert torch.equal(other.model.network.values, ahead.model.network.values)
        assert torch.equal(other.rng, ahead.rng)
        for ours, theirs in zip(tree_leaves(other.opt_state), tree_leaves(ahead.opt_state)):
            assert torch.equal(ours, theirs)
        assert [r["RMSE_train"] for r in other.history] == [r["RMSE_train"] for r in ahead.history]


def test_epochs_drawn_ahead_are_refused_for_another_state_or_error_weighted_sampling(
    tio2_structures,
):
    train = af.featurize_structures(PARAMS, tio2_structures[:8], with_derivatives=False)
    model = af.init_model(PARAMS, ARCH, train, seed=3, atomic_energies=REFERENCES)
    config = af.TrainConfig(epochs=2, batch_size=3)
    state = af.init_train_state(model, train, config)
    speedups = seam_module.prepare_speedups(state, train, None, config)
    first, second = seam_module.draw_energy_epochs(state, train, config, speedups, 2)
    with pytest.raises(ValueError, match="drawn ahead from another state"):
        train_module.run_epoch(state, train, config, speedups=attrs.evolve(speedups, drawn=second))
    elsewhere = seam_module.Speedups(table=speedups.table, drawn=first)
    with pytest.raises(ValueError, match="its table and workspace"):
        train_module.run_epoch(state, train, config, speedups=elsewhere)
    after, _ = train_module.run_epoch(
        state, train, config, speedups=attrs.evolve(speedups, drawn=first)
    )
    train_module.run_epoch(after, train, config, speedups=attrs.evolve(speedups, drawn=second))
    weighted = attrs.evolve(config, sampling_policy="error_weighted")
    with pytest.raises(ValueError, match="error_weighted"):
        seam_module.draw_energy_epochs(state, train, weighted, speedups, 2)


def test_a_workspace_kept_across_epochs_changes_nothing(tio2_structures):
    """Epochs sharing one EnergyWorkspace (as fit runs them) are bit for bit those with a new
    one each; the states they return do not alias its buffer."""
    train = af.featurize_structures(PARAMS, tio2_structures, with_derivatives=False)
    model = af.init_model(PARAMS, ARCH, train, seed=5, atomic_energies=REFERENCES)
    config = af.TrainConfig(epochs=1, batch_size=6, sampling_policy="error_weighted")
    state = af.init_train_state(model, train, config)
    speedups = seam_module.prepare_speedups(state, train, None, config)
    workspace, fresh_workspace = speedups.workspace, seam_module.Speedups(table=speedups.table)
    kept, fresh = state, state
    for _ in range(3):
        kept, _ = train_module.run_epoch(kept, train, config, speedups=speedups)
        fresh, _ = train_module.run_epoch(fresh, train, config, speedups=fresh_workspace)
        assert torch.equal(kept.model.network.values, fresh.model.network.values)
        assert torch.equal(kept.sampler.scores, fresh.sampler.scores)
    before = kept.model.network.values.clone()
    workspace.network.values.add_(1.0)
    assert torch.equal(kept.model.network.values, before)


@pytest.mark.parametrize("optimizer", [af.AdamConfig(lr=0.01), af.SGDConfig(lr=0.01, momentum=0.9)])
def test_energy_route_states_carry_no_inference_tensors(tio2_structures, optimizer):
    """The energy route's steps and updates run in inference mode; what its epochs return is
    ordinary tensors (the optimiser state too, made anew by the updates), so that force
    training (autograd) and committees can continue from it; the batch callback runs outside
    inference mode."""
    train = af.featurize_structures(PARAMS, tio2_structures[:6], with_derivatives=True)
    model = af.init_model(PARAMS, ARCH, train, seed=1, atomic_energies=REFERENCES)
    config = af.TrainConfig(
        epochs=2, batch_size=4, sampling_policy="error_weighted", optimizer=optimizer
    )
    modes = []
    state = af.fit(
        af.init_train_state(model, train, config),
        train,
        None,
        config,
        on_batch=lambda *_: modes.append(torch.is_inference_mode_enabled()),
    )
    assert modes == [False] * 4
    leaves = [leaf for leaf in tree_leaves(state) if isinstance(leaf, torch.Tensor)]
    assert leaves and not any(leaf.is_inference() for leaf in leaves)
    forces = attrs.evolve(config, force_weight=0.5, epochs=1)
    after = af.fit(state, train, None, forces)
    assert not torch.equal(after.model.network.values, state.model.network.values)
    # a custom loop's energy-only step
    batch = af.take_structures(train, torch.tensor([0, 2, 3]))
    stepped, found = af.train_step(state, batch, config)
    step_errors = found.energy
    assert not step_errors.is_inference()
    assert not any(leaf.is_inference() for leaf in tree_leaves(stepped.opt_state))
