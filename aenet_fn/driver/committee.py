"""Committees (ensembles) trained together with ``torch.func.vmap`` on one device.

Members are independent models that share the descriptor, the normalisation and the training
split. Each keeps its own :class:`~aenet_fn.driver.state.TrainState` (seed, generator, sampler,
optimiser, scheduler, best model, history); for the optimisation steps their parameters and
optimiser states are stacked along a leading axis (:func:`committee_step`). Each member draws its
own batches; the batches are gathered from the one featurized set (features and local derivatives
computed once) and stacked with padding (:func:`~aenet_fn.core.minibatch.stack_batches`), which
changes no number. Members drawing the same batches (``shared_batches``) share each batch instead,
and its forces go through the batch's one assembled Jacobian, applied to all members in one product
per structure or component (:mod:`aenet_fn.speedups.force_jacobian`). Nothing couples the members
inside a step, so member ``i`` ends exactly where it would have trained alone with the same seed (up
to float round-off).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch
from torch.func import vmap
from torch.utils._pytree import tree_map

from aenet_fn.core.batch import Batch
from aenet_fn.core.descriptor import ChebyshevParams, build_graph
from aenet_fn.core.loss import Residuals, accumulate_errors, error_sums_init, metrics_from_sums
from aenet_fn.core.minibatch import MiniBatch, stack_batches
from aenet_fn.core.network import Architecture, NetworkParams
from aenet_fn.core.potential import Model, energy, energy_forces_stress, with_values
from aenet_fn.driver.distributed import World
from aenet_fn.driver.loader import Split, take_batch
from aenet_fn.driver.seam import (
    DrawnEpoch,
    Speedups,
    draw_member_energy_epochs,
    draws_ahead,
    energy_epoch_table,
    epochs_drawn_ahead,
    prepare_speedups,
)
from aenet_fn.driver.state import (
    TrainConfig,
    TrainState,
    check_same_data,
    data_fingerprint,
    init_model,
    init_train_state,
    optimizer_of,
    plan_epoch,
)
from aenet_fn.driver.step import (
    Loss,
    autograd_gradient,
    batch_residuals,
    config_loss,
    member_step,
)
from aenet_fn.driver.train import (
    TrainingDiverged,
    check_custom_loss,
    check_finite_epoch,
    end_of_epoch,
    epoch_batches,
    finish_epoch,
    member_epoch_batches,
)
from aenet_fn.speedups.energy_gradient import energy_gradients
from aenet_fn.speedups.force_jacobian import BatchJacobian, SetJacobian, StackedJacobians
from aenet_fn.speedups.fused_optim import update_members_in_place


def member_seeds(
    n_members: int, base_seed: int = 0, seeds: Sequence[int] | None = None
) -> list[int]:
    """Seeds of the members: ``base_seed + i``, or the explicit ``seeds`` (one per member,
    distinct)."""
    if n_members < 1:
        raise ValueError(f"a committee needs at least one member, got {n_members}")
    if seeds is None:
        return [base_seed + i for i in range(n_members)]
    seeds = [int(s) for s in seeds]
    if len(seeds) != n_members:
        raise ValueError(f"{len(seeds)} member seeds given for {n_members} members")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"member seeds must be distinct, got {seeds}")
    return seeds


def stack_members(networks: Sequence[NetworkParams]) -> NetworkParams:
    """One :class:`NetworkParams` whose ``values`` are the members' stacked, ``[M, P]``."""
    first = networks[0]
    for k, network in enumerate(networks[1:], start=1):
        if (network.sizes, network.activations, network.species) != (
            first.sizes,
            first.activations,
            first.species,
        ):
            raise ValueError(f"committee member {k} has a different network layout from member 0")
    return attrs.evolve(first, values=torch.stack([n.values for n in networks]))


def unstack_members(stacked: NetworkParams) -> list[NetworkParams]:
    """The members of :func:`stack_members`' result."""
    return [attrs.evolve(stacked, values=values) for values in stacked.values.unbind(0)]


def check_shared_parts(models: Sequence[Model]) -> None:
    """Members must share the descriptor and the normalisation; raises ``ValueError`` naming the
    first member that differs."""
    first = models[0]
    for k, model in enumerate(models[1:], start=1):
        if model.descriptor != first.descriptor:
            raise ValueError(f"committee member {k} has a different descriptor from member 0")
        norm, ref = model.normalization, first.normalization
        for field in attrs.fields(type(norm)):
            if not torch.equal(getattr(norm, field.name), getattr(ref, field.name)):
                raise ValueError(
                    f"committee member {k} has a different normalisation ({field.name}) "
                    "from member 0"
                )


def init_committee(
    descriptor: ChebyshevParams,
    arch: Architecture,
    train: Split,
    config: TrainConfig,
    seeds: Sequence[int],
    shared_batches: bool = False,
    **model_options: Any,
) -> tuple[TrainState, ...]:
    """One :class:`TrainState` per seed; the normalisation is shared. Network initialisation
    follows the member's seed. Shuffling, weighted sampling and force subsets follow the
    member's seed too, unless ``shared_batches``: then every member draws from ``config.seed``,
    all see the same batches, and each step's batch data is shared by the members instead of
    stacked (much faster with forces)."""
    return tuple(
        init_train_state(
            init_model(descriptor, arch, train, seed=seed, **model_options),
            train,
            config if shared_batches else attrs.evolve(config, seed=seed),
        )
        for seed in seeds
    )


def _stack(trees: Sequence[Any]) -> Any:
    return tree_map(lambda *leaves: torch.stack(leaves), *trees)


def _member(tree: Any, index: int) -> Any:
    return tree_map(lambda leaf: leaf[index], tree)


def committee_epoch(
    members: Sequence[TrainState],
    train: Split,
    config: TrainConfig,
    on_batch: Callable[[int, int], None] | None = None,
    speedups: Speedups | None = None,
    loss: Loss | None = None,
) -> tuple[tuple[TrainState, ...], list[dict[str, float]]]:
    """One epoch of every member, one optimisation step of all members per batch
    (:func:`committee_step`). ``speedups``: the CPU's fast route of the run
    (:func:`~aenet_fn.driver.seam.prepare_speedups` of the members): energy-only epochs stack the
    members' networks into the batched products of :mod:`aenet_fn.speedups.energy_gradient`,
    gathering from its table, with the buffers of its workspace (the members' stacked
    values), or take each member's epoch drawn ahead
    (:func:`~aenet_fn.driver.seam.draw_member_energy_epochs`); force batches take its stored
    Jacobian (shared batches: all members in one product of each matrix). Without it,
    energy-only epochs build their own table where one applies. ``loss``: a custom
    :data:`~aenet_fn.driver.step.Loss` of every member (the ``torch.func`` route). Returns the
    new states and each member's training metrics."""
    check_shared_parts([m.model for m in members])
    check_custom_loss(loss, speedups, World())
    if speedups is None:
        custom = loss is not None
        table = energy_epoch_table(members[0], train, config, World(), custom_loss=custom)
        speedups = Speedups(table=table)
    if speedups.drawn is None:
        planned = [plan_epoch(member, train, config) for member in members]
    else:
        drawn = zip(members, speedups.drawn, strict=True)
        planned = [epoch.take(member, speedups) for member, epoch in drawn]
    members = [state for state, _ in planned]
    orders = [order for _, order in planned]
    shared = all(torch.equal(orders[0], order) for order in orders) and all(
        torch.equal(members[0].sampler.force_subset, m.sampler.force_subset) for m in members
    )
    # the working values: stacked into the workspace's buffer where there is one
    workspace = speedups.workspace
    out = None if workspace is None else workspace.network.values
    values = torch.stack([m.model.network.values for m in members], out=out)
    opt_state = _stack([m.opt_state for m in members])
    lrs = torch.tensor([m.lr for m in members], dtype=values.dtype, device=values.device)
    if speedups.table is None:
        jacobian = speedups.jacobian
        steps = _batch_steps(
            members, orders, shared, values, opt_state, lrs, train, config, jacobian, loss
        )
    else:
        steps = _energy_steps(members, orders, shared, values, opt_state, lrs, speedups, config)
    sums = [error_sums_init() for _ in members]
    member_errors: list[list[torch.Tensor]] = [[] for _ in members]
    n_batches = math.ceil(orders[0].numel() / config.batch_size)
    for k, step in enumerate(steps):
        values, opt_state, errors, found, batch = step
        for i in range(len(members)):
            member_errors[i].append(errors[i].detach())
            if found is not None and batch.supervises_labels:
                sums[i] = _add_member_labels(sums[i], found, batch, i, shared)
        if on_batch is not None:
            on_batch(k + 1, n_batches)
    new_members = []
    for i, member in enumerate(members):
        sums[i] = accumulate_errors(sums[i], torch.cat(member_errors[i]))
        network = attrs.evolve(member.model.network, values=values[i].clone())
        member = attrs.evolve(
            member,
            model=attrs.evolve(member.model, network=network),
            opt_state=tree_map(lambda leaf: leaf.clone(), _member(opt_state, i)),
        )
        new_members.append(finish_epoch(member, orders[i], member_errors[i], config))
    return tuple(new_members), [metrics_from_sums(s) for s in sums]


def committee_step(
    model: Model,
    values: torch.Tensor,
    opt_state: Any,
    lrs: torch.Tensor,
    batch: MiniBatch,
    config: TrainConfig,
    stacked: bool = False,
    loss: Loss | None = None,
) -> tuple[torch.Tensor, Any, Residuals]:
    """One optimiser step of every member, from the stacked ``values`` ``[M, P]``,
    ``opt_state`` and learning rates ``lrs`` ``[M]``, on a ``batch`` shared by the members or
    (``stacked``) stacked along a leading member axis
    (:func:`~aenet_fn.core.minibatch.stack_batches`). It is
    :func:`~aenet_fn.driver.step.member_step` vmapped over the members (and their stacked batches).
    A batch with assembled Jacobians (the CPU's fast route,
    :func:`~aenet_fn.driver.seam.assembled_jacobian`) takes the members' losses from one
    :func:`~aenet_fn.driver.step.batch_loss` of the stacked values instead (the members a leading
    axis of every array, no ``vmap``) and their gradients from ``torch.autograd`` (members are
    independent, so the gradient of the summed losses is each member's own): the same numbers to
    round-off (tested). ``loss``: a custom :data:`~aenet_fn.driver.step.Loss` of every member
    (default :func:`~aenet_fn.driver.step.default_loss`; not with assembled Jacobians)."""
    if not isinstance(batch.local, (BatchJacobian, StackedJacobians)):
        batch_dims = (
            tree_map(lambda leaf: 0 if isinstance(leaf, torch.Tensor) else None, batch)
            if stacked
            else None
        )
        return vmap(
            lambda v, s, lr, b: member_step(model, v, s, lr, b, config, loss),
            in_dims=(0, 0, 0, batch_dims),
        )(values, opt_state, lrs, batch)

    if loss is not None:
        raise ValueError("a custom loss takes batches without a stored Jacobian (route='func')")

    def summed_loss(leaf: torch.Tensor) -> tuple[torch.Tensor, Any]:
        losses, aux = config_loss(model, leaf, batch, config, by_autograd=True)
        return losses.sum(), aux

    gradient, aux = autograd_gradient(summed_loss, values)
    new_values, new_state = values.clone(), tree_map(torch.clone, opt_state)
    optimizer = optimizer_of(config, model.network)
    new_state = update_members_in_place(optimizer, gradient, new_state, new_values, lrs)
    return new_values, new_state, aux


def _batch_steps(members, orders, shared, values, opt_state, lrs, train, config, jacobian, loss):
    """Steps of :func:`committee_step` on batches shared by the members or stacked: after
    each, the stacked values and optimiser states, the members' per-atom energy errors and
    (force differences, supervised atoms), or None for energy-only batches."""
    template = members[0].model

    def step(values, opt_state, lrs, batch):
        return committee_step(
            template, values, opt_state, lrs, batch, config, stacked=not shared, loss=loss
        )

    # members of one process: a committee spreads its members over ranks, not its batches;
    # members drawing the same batches share them instead of stacking them
    if shared:
        steps = (
            (b,) for b in epoch_batches(members[0], orders[0], train, config, World(), jacobian)
        )
    else:
        steps = member_epoch_batches(members, orders, train, config, jacobian)
    for batches in steps:
        batch = batches[0] if shared else stack_batches(batches)
        values, opt_state, found = step(values, opt_state, lrs, batch)
        yield values, opt_state, found.energy, found, batch


def _energy_steps(members, orders, shared, values, opt_state, lrs, speedups, config):
    """Energy-only steps of all members at once: plans of their orders (one shared order, or
    one per member) from the table of ``speedups``, or the members' epochs drawn ahead, and
    one stacked gradient per batch; ``values`` and ``opt_state`` (this epoch's stacked copies;
    ``values`` the buffer of the workspace where there is one) are updated in place."""
    optimizer = optimizer_of(config, members[0].model.network)
    workspace = speedups.workspace
    if speedups.drawn is not None:
        steps = speedups.drawn[0].gradients(config.batch_size)
    else:
        network = (
            attrs.evolve(members[0].model.network, values=values)
            if workspace is None
            else workspace.network
        )
        draws = orders[0] if shared else torch.stack(orders)
        table, batch_size, force_weight = speedups.table, config.batch_size, config.force_weight
        steps = energy_gradients(table, network, draws, batch_size, force_weight, workspace)
    for gradient, errors in steps:
        opt_state = update_members_in_place(optimizer, gradient, opt_state, values, lrs)
        yield values, opt_state, errors, None, None


def _add_member_labels(sums, found: Residuals, batch: MiniBatch, member: int, shared: bool):
    """``sums`` of member ``member`` with its force and stress residuals of a step added
    (``found`` and ``batch`` with a leading member axis where the batch is not ``shared``)."""

    def own(mask: torch.Tensor) -> torch.Tensor:
        return mask if shared else mask[member]

    stress_mask = None if batch.strain is None else own(batch.strain.supervised)
    return accumulate_errors(
        sums,
        found.energy.new_zeros(0),
        found.forces[member],
        own(batch.force_atoms),
        found.stress[member],
        stress_mask,
    )


def committee_evaluate(
    members: Sequence[TrainState],
    data: Split,
    with_forces: bool,
    batch_size: int = 256,
    jacobian: SetJacobian | None = None,
    with_stress: bool = False,
) -> list[dict[str, float]]:
    """Exact metrics of every member over ``data`` (see :func:`~aenet_fn.driver.step.evaluate`), the
    members evaluated together, their stacked values a leading axis of each batch's residuals
    (forces through assembled Jacobians with ``jacobian``,
    :func:`~aenet_fn.driver.seam.assembled_jacobian` of ``data``)."""
    template = members[0].model
    values = torch.stack([m.model.network.values for m in members])

    def residuals(values: torch.Tensor, batch: MiniBatch) -> Residuals:
        return batch_residuals(template, values, batch, by_autograd=True)  # members: leading axis

    sums = [error_sums_init() for _ in members]
    everything = data.has_forces if with_forces else None
    host = torch.arange(data.n_structures, device="cpu")  # batches are laid out on the host
    for selection in host.split(batch_size):
        batch = take_batch(data, selection, everything, jacobian, with_stress)
        with torch.no_grad():
            found = residuals(values, batch)
        sums = [
            accumulate_errors(_add_member_labels(s, found, batch, i, shared=True), found.energy[i])
            for i, s in enumerate(sums)
        ]
    return [metrics_from_sums(s) for s in sums]


def committee_fit(
    members: Sequence[TrainState],
    train: Split,
    test: Split | None,
    config: TrainConfig,
    callbacks: Sequence[Callable[[tuple[TrainState, ...]], None]] = (),
    on_batch: Callable[[int, int], None] | None = None,
    speedups: Speedups | None = None,
    loss: Loss | None = None,
) -> tuple[TrainState, ...]:
    """``config.epochs`` more epochs of every member together; after each epoch every member
    records its own history, best model and scheduler step (nothing is shared), then the
    callbacks get the tuple of member states. An epoch that makes a member's loss or weights
    non-finite stops the run with :class:`~aenet_fn.driver.train.TrainingDiverged` (carrying every
    member's state before that epoch) before the callbacks run. ``speedups``: the CPU's fast
    route for these members and splits (:func:`~aenet_fn.driver.seam.prepare_speedups` of the
    members; prepared here when not given). ``loss``: a custom
    :data:`~aenet_fn.driver.step.Loss` of every member, trained on the ``torch.func`` route."""
    check_custom_loss(loss, speedups, World())
    fingerprint = data_fingerprint(train, test, members[0].model.descriptor)
    for member in members:
        check_same_data(member, fingerprint, config)
    members = tuple(attrs.evolve(member, data_fingerprint=fingerprint) for member in members)
    if speedups is None:  # one per run: the members share the normalisation
        speedups = prepare_speedups(members, train, test, config, World(), loss is not None)

    def draw(left: int) -> list[tuple[DrawnEpoch, ...]]:  # from the members the loop reached
        return draw_member_energy_epochs(members, train, config, speedups, left)

    ahead = draws_ahead(speedups, train, config)
    for drawn, start in epochs_drawn_ahead(config.epochs, draw if ahead else None):
        epoch_speedups = attrs.evolve(speedups, drawn=drawn)
        before = members
        members, train_metrics = committee_epoch(
            members, train, config, on_batch, epoch_speedups, loss
        )
        for index, (old, new, metrics) in enumerate(zip(before, members, train_metrics)):
            try:
                check_finite_epoch(old, new, metrics, f"committee member {index}")
            except TrainingDiverged as error:
                raise TrainingDiverged(str(error), before) from None
        test_metrics: list[dict[str, float] | None] = (
            [None] * len(members)
            if test is None
            else committee_evaluate(
                members,
                test,
                config.uses_forces,
                jacobian=speedups.test_jacobian,
                with_stress=config.uses_stress,
            )
        )
        seconds = time.perf_counter() - start
        members = tuple(
            end_of_epoch(member, metrics, test, config, seconds)
            for member, metrics, test in zip(members, train_metrics, test_metrics)
        )
        for callback in callbacks:
            callback(members)
    return members


@attrs.frozen
class CommitteePrediction:
    """Committee prediction for a batch of ``B`` structures (``N`` atoms), ``M`` members.

    Attributes:
        member_energies: ``[M, B]`` (eV); energy_mean / energy_std ``[B]``.
        member_forces: ``[M, N, 3]`` (eV/Å) or None; force_mean / force_std ``[N, 3]`` or None.
        member_stresses: ``[M, B, 3, 3]`` (eV/Å³, NaN for structures not periodic along x, y
            and z) or None; stress_mean / stress_std ``[B, 3, 3]`` or None.
    """

    member_energies: torch.Tensor
    energy_mean: torch.Tensor
    energy_std: torch.Tensor
    member_forces: torch.Tensor | None
    force_mean: torch.Tensor | None
    force_std: torch.Tensor | None
    member_stresses: torch.Tensor | None = None
    stress_mean: torch.Tensor | None = None
    stress_std: torch.Tensor | None = None


def committee_predict(
    models: Sequence[Model],
    batch: Batch,
    *,
    eval_forces: bool = True,
    compute_stress: bool = False,
) -> CommitteePrediction:
    """Energies (and forces, and with ``compute_stress`` the stresses) of every member in one
    ``vmap``-ed pass: the graph is built once, the members' forces and stresses come from one
    vmapped ``torch.func`` gradient. Standard deviations are the population std over members
    (0 for a single member)."""
    check_shared_parts(models)
    template = models[0]
    stacked = stack_members([m.network for m in models]).values
    graph = build_graph(template.descriptor, batch)

    def derivatives(values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        model = with_values(template, values)
        result = energy_forces_stress(model, batch, graph, compute_stress=compute_stress)
        return result.energy, result.forces, *((result.stress,) if compute_stress else ())

    forces = force_mean = force_std = None
    stresses = stress_mean = stress_std = None
    if eval_forces or compute_stress:
        energies, forces, *stress = vmap(derivatives)(stacked)
        force_mean, force_std = forces.mean(0), forces.std(0, unbiased=False)
        if compute_stress:
            stresses = stress[0]
            stress_mean, stress_std = stresses.mean(0), stresses.std(0, unbiased=False)
    else:
        with torch.no_grad():
            energies = vmap(lambda values: energy(with_values(template, values), batch, graph))(
                stacked
            )
    return CommitteePrediction(
        member_energies=energies,
        energy_mean=energies.mean(0),
        energy_std=energies.std(0, unbiased=False),
        member_forces=forces,
        force_mean=force_mean,
        force_std=force_std,
        member_stresses=stresses,
        stress_mean=stress_mean,
        stress_std=stress_std,
    )
