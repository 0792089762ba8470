"""The training driver: a :class:`TrainState` threaded through epochs by pure steps.

``train_step(state, batch, config) -> (state, errors)`` is one optimiser step on one mini-batch;
:func:`run_epoch` draws the epoch's batches from the sampler and folds ``train_step`` over them;
:func:`fit` loops over epochs and calls back for progress and checkpoints. All randomness comes
from the generator state stored in the :class:`TrainState`, so a run resumed from a checkpoint
continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import torch
from torch.utils._pytree import tree_map

from aenet_fn.core.loss import (
    ErrorSums,
    Residuals,
    accumulate_errors,
    error_sums_init,
    metrics_from_sums,
)
from aenet_fn.core.minibatch import MiniBatch
from aenet_fn.core.optim import (
    plateau_step,
)
from aenet_fn.core.sampling import (
    error_scores_update,
)
from aenet_fn.driver.distributed import (
    World,
    current_world,
    gather_parts,
    reduce_error_sums,
    shares,
)
from aenet_fn.driver.loader import (
    Split,
    batch_stream,
    check_split,
    member_batch_stream,
)
from aenet_fn.driver.seam import (
    DrawnEpoch,
    Speedups,
    draw_energy_epochs,
    draws_ahead,
    energy_epoch_table,
    epochs_drawn_ahead,
    prepare_speedups,
)
from aenet_fn.driver.state import (
    TrainConfig,
    TrainState,
    check_labels,
    check_resumable,
    check_same_data,
    data_fingerprint,
    optimizer_of,
    plan_epoch,
)
from aenet_fn.driver.step import (
    EVALUATE_BATCH,
    Loss,
    accumulate_residuals,
    data_parallel_step,
    monitored_value,
    split_metrics,
    train_step,
)
from aenet_fn.speedups.energy_gradient import (
    EnergyWorkspace,
    energy_gradients,
)
from aenet_fn.speedups.force_jacobian import SetJacobian
from aenet_fn.speedups.fused_optim import update_in_place


def epoch_batches(
    state: TrainState,
    order: torch.Tensor,
    train: Split,
    config: TrainConfig,
    world: World | None = None,
    jacobian: SetJacobian | None = None,
) -> Iterator[MiniBatch]:
    """The mini-batches of ``order`` (``batch_size`` structures each, last one partial), built
    lazily (in DataLoader workers when ``config.num_workers > 0``) so that only a few batches'
    derivative data are in memory at a time; with ``jacobian`` (:func:`assembled_jacobian` of
    ``train``) their forces go through assembled Jacobians. In a data-parallel run, this
    process's share of each batch."""
    world = current_world() if world is None else world
    force_mask = state.sampler.force_subset if config.uses_forces else None
    selections = [shares(s, world)[world.rank] for s in order.split(config.batch_size)]
    return batch_stream(train, selections, force_mask, **_stream_options(config, jacobian))


def _stream_options(config: TrainConfig, jacobian: SetJacobian | None) -> dict[str, Any]:
    """How ``config`` has batches built (workers, prefetching, Jacobians, stresses)."""
    return {
        "num_workers": config.num_workers,
        "prefetch_factor": config.prefetch_factor,
        "persistent_workers": config.persistent_workers,
        "jacobian": jacobian,
        "with_stress": config.uses_stress,
    }


def member_epoch_batches(
    members: Sequence[TrainState],
    orders: Sequence[torch.Tensor],
    train: Split,
    config: TrainConfig,
    jacobian: SetJacobian | None = None,
) -> Iterator[tuple[MiniBatch, ...]]:
    """Committee members' own mini-batches of their ``orders``, one tuple per step, from one
    stream (:func:`~aenet_fn.driver.loader.member_batch_stream`: with DataLoader workers, each
    step's batches are read once, together). Members of one process (no data parallelism)."""
    masks = [m.sampler.force_subset if config.uses_forces else None for m in members]
    selections = [list(order.split(config.batch_size)) for order in orders]
    return member_batch_stream(train, selections, masks, **_stream_options(config, jacobian))


def finish_epoch(
    state: TrainState, order: torch.Tensor, errors: Sequence[torch.Tensor], config: TrainConfig
) -> TrainState:
    """Update the error-weighted scores from the epoch's per-draw errors ``|ΔE|/N`` (the
    order, drawn on the host, copied to the scores' device once)."""
    if config.sampling_policy != "error_weighted":
        return state
    drawn = order.to(state.sampler.scores.device)
    scores = error_scores_update(state.sampler.scores, drawn, torch.cat(errors).abs())
    return attrs.evolve(state, sampler=attrs.evolve(state.sampler, scores=scores))


StepReport = Callable[..., None]
"""Called after each step with this process's per-atom energy errors, those of the whole
batch, and (batch steps) the step's :class:`~aenet_fn.core.loss.Residuals` and its batch."""


def _ordinary(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, or an ordinary copy of it where it is an inference tensor."""
    return tensor.clone() if tensor.is_inference() else tensor


def _energy_epoch(
    state: TrainState,
    order: torch.Tensor,
    speedups: Speedups,
    config: TrainConfig,
    on_step: StepReport,
) -> TrainState:
    """The steps of an energy-only epoch from :class:`EnergyPlan` s of many batches each
    (the table of ``speedups``, or its epoch drawn ahead), on working copies of the
    parameters (in its workspace, kept from epoch to epoch, or a new one) and optimiser state,
    updated in place; returns the state after the last step (the same numbers as
    :func:`train_step` on each batch)."""
    optimizer = optimizer_of(config, state.model.network)
    workspace = speedups.workspace
    kept = workspace is not None
    if kept:
        workspace.network.values.copy_(state.model.network.values)
    else:
        values = state.model.network.values.clone(memory_format=torch.contiguous_format)
        workspace = EnergyWorkspace(attrs.evolve(state.model.network, values=values))
    network = workspace.network
    opt_state = tree_map(torch.clone, state.opt_state)
    if speedups.drawn is None:
        steps = energy_gradients(
            speedups.table, network, order, config.batch_size, config.force_weight, workspace
        )
    else:  # its batches of the plan of several epochs (in the region below)
        steps = speedups.drawn.gradients(config.batch_size)
    with torch.inference_mode():  # the in-place updates too: ordinary tensors stay ordinary
        for gradient, errors in steps:
            opt_state = update_in_place(optimizer, gradient, opt_state, network.values, state.lr)
            on_step(errors, errors, None)
    opt_state = tree_map(_ordinary, opt_state)  # what updates made anew (SGD's momentum)
    if kept:  # the workspace's buffer serves the next epoch: the state gets its own copy
        network = attrs.evolve(network, values=network.values.clone())
    model = attrs.evolve(state.model, network=network)
    return attrs.evolve(state, model=model, opt_state=opt_state)


def _batch_epoch(
    state: TrainState,
    order: torch.Tensor,
    train: Split,
    config: TrainConfig,
    world: World,
    on_step: StepReport,
    jacobian: SetJacobian | None,
    loss: Loss | None,
) -> TrainState:
    """The steps of an epoch over assembled mini-batches (:func:`train_step` of ``loss``, or
    :func:`data_parallel_step` under ``torch.distributed``; with ``jacobian``, the training
    split's stored Jacobian); returns the state after the last step."""
    batches = epoch_batches(state, order, train, config, world, jacobian)
    for selection, batch in zip(order.split(config.batch_size), batches):
        if world.size == 1:
            state, found = train_step(state, batch, config, loss)
            drawn = found.energy.detach()
        else:
            state, found = data_parallel_step(state, batch, config, world)
            sizes = [part.numel() for part in shares(selection, world)]
            drawn = gather_parts(found.energy.detach(), sizes, world)
        on_step(found.energy, drawn, found, batch)
    return state


def check_custom_loss(loss: Loss | None, speedups: Speedups | None, world: World) -> None:
    """Refuse a custom ``loss`` where it cannot train: with the fast route's ``speedups``
    (they compute the default loss) or over several processes."""
    if loss is None:
        return
    if speedups is not None and speedups.applied:
        raise ValueError("a custom loss trains on the torch.func route: pass no speedups")
    if world.size > 1:
        raise ValueError("a custom loss trains in one process (torch.distributed is running)")


def run_epoch(
    state: TrainState,
    train: Split,
    config: TrainConfig,
    on_batch: Callable[[int, int], None] | None = None,
    world: World | None = None,
    speedups: Speedups | None = None,
    loss: Loss | None = None,
) -> tuple[TrainState, dict[str, float]]:
    """One epoch over the training split: sampler order, optional force re-draw, a
    :func:`train_step` per batch (:func:`data_parallel_step` under ``torch.distributed``),
    error-score update. Returns the new state and the epoch's training metrics (global
    RMSE/MAE over every draw, measured before each step). ``world``: the processes sharing
    each batch (default: the current process group). ``loss``: a custom
    :data:`~aenet_fn.driver.step.Loss` (default :func:`~aenet_fn.driver.step.default_loss`);
    it trains in one process, on the ``torch.func`` route.

    ``speedups``: the run's CPU fast route (:func:`prepare_speedups`, which :func:`fit` calls
    once per run), the same steps faster: energy-only epochs lay out the batches of many steps
    at once from its table (:mod:`aenet_fn.speedups.energy_gradient`), or take this epoch drawn
    ahead from this ``state``; force batches go through its stored Jacobian. Without it, energy-only
    epochs build their own table where one applies; force batches take the ``torch.func``
    route."""
    world = current_world() if world is None else world
    check_custom_loss(loss, speedups, world)
    if speedups is None:
        table = energy_epoch_table(state, train, config, world, custom_loss=loss is not None)
        speedups = Speedups(table=table)
    if speedups.drawn is None:
        state, order = plan_epoch(state, train, config)
    else:
        state, order = speedups.drawn.take(state, speedups)
    n_batches = math.ceil(order.numel() / config.batch_size)
    sums: ErrorSums = error_sums_init()
    own_errors: list[torch.Tensor] = []
    drawn_errors: list[torch.Tensor] = []

    def on_step(
        errors: torch.Tensor,
        drawn: torch.Tensor,
        found: Residuals | None = None,
        batch: MiniBatch | None = None,
    ) -> None:
        nonlocal sums
        own_errors.append(errors.detach())
        drawn_errors.append(drawn)
        if found is not None and batch.supervises_labels:
            labels = attrs.evolve(found, energy=errors.new_zeros(0))  # energies: once, below
            sums = accumulate_residuals(sums, labels, batch)
        if on_batch is not None:
            with torch.inference_mode(False):  # (energy-only steps run in inference mode)
                on_batch(len(own_errors), n_batches)

    if speedups.table is not None:
        stepped = _energy_epoch(state, order, speedups, config, on_step)
    else:
        jacobian = speedups.jacobian
        stepped = _batch_epoch(state, order, train, config, world, on_step, jacobian, loss)
    sums = accumulate_errors(sums, torch.cat(own_errors))
    sums = reduce_error_sums(sums, world)
    return finish_epoch(stepped, order, drawn_errors, config), metrics_from_sums(sums)


class TrainingDiverged(ValueError):
    """Training made the loss or the network weights non-finite. ``state``: the last state with
    finite weights (the one the diverging epoch started from); what was written before it (e.g.
    checkpoints) stays as it was."""

    def __init__(self, message: str, state: Any) -> None:
        super().__init__(message)
        self.state = state


def check_finite_epoch(
    before: TrainState, after: TrainState, metrics: dict[str, float], who: str = "training"
) -> None:
    """Raise :class:`TrainingDiverged` (carrying ``before``) when the epoch from ``before`` to
    ``after`` left non-finite network weights or a non-finite training energy error (one read
    on the host per epoch)."""
    loss = metrics["rmse_energy"]
    if bool(torch.isfinite(after.model.network.values).all()) and math.isfinite(loss):
        return
    if math.isfinite(loss):
        what = "the network weights became non-finite"
    else:
        what = f"the training energy RMSE became {loss}"
    raise TrainingDiverged(
        f"{who} diverged in epoch {before.epoch}: {what}; stopped at the state before that "
        "epoch (a smaller learning rate, or labels and features checked for outliers, may help)",
        before,
    )


def end_of_epoch(
    state: TrainState,
    train_metrics: dict[str, float],
    test_metrics: dict[str, float] | None,
    config: TrainConfig,
    seconds: float,
) -> TrainState:
    """Record the epoch: history row, best model on the validation monitor, scheduler step."""
    nan = float("nan")
    test = test_metrics or {
        "rmse_energy": nan,
        "mae_energy": nan,
        "rmse_forces": nan,
    }
    row = {
        "epoch": state.epoch,
        "MAE_train": train_metrics["mae_energy"],
        "RMSE_train": train_metrics["rmse_energy"],
        "MAE_test": test["mae_energy"],
        "RMSE_test": test["rmse_energy"],
        "RMSE_force_train": train_metrics["rmse_forces"],
        "RMSE_force_test": test["rmse_forces"],
        "learning_rate": state.lr,
        "epoch_time": seconds,
    }
    if config.uses_stress:  # (histories without stress training keep their columns)
        row.update(
            RMSE_stress_train=train_metrics.get("rmse_stress", nan),
            RMSE_stress_test=test.get("rmse_stress", nan),
        )
    changes: dict[str, Any] = {"epoch": state.epoch + 1, "history": (*state.history, row)}
    if test_metrics is not None:
        monitor = monitored_value(test_metrics, config)
        if monitor < state.best_monitor:
            changes.update(
                best_monitor=monitor,
                best_epoch=state.epoch,
                best_values=state.model.network.values.detach().clone(),
            )
        if state.sched_state is not None:
            sched_state, lr = plateau_step(config.scheduler, state.sched_state, monitor)
            changes.update(sched_state=sched_state, lr=lr)
    return attrs.evolve(state, **changes)


def fit(
    state: TrainState,
    train: Split,
    test: Split | None,
    config: TrainConfig,
    callbacks: Sequence[Callable[[TrainState], None]] = (),
    on_batch: Callable[[int, int], None] | None = None,
    world: World | None = None,
    speedups: Speedups | None = None,
    loss: Loss | None = None,
) -> TrainState:
    """Run ``config.epochs`` more epochs from ``state``; after each, evaluate the test split
    (exact metrics), record history/best/scheduler and call every callback with the new state
    (progress bars, checkpoints, logs). An epoch that makes the loss or the weights non-finite
    stops the run with :class:`TrainingDiverged` before its callbacks run (so checkpoints stay
    finite). Under ``torch.distributed`` every process runs this
    same loop on its shares; callbacks and ``on_batch`` run on rank 0 only. ``world``: the
    processes sharing each batch (default: the current process group; ``World()`` trains in
    this process alone, e.g. committee members spread over ranks). A state already trained
    on other splits is refused (:func:`check_same_data`). ``speedups``: the CPU's
    fast route for these splits (:func:`prepare_speedups`), when several runs on the same
    splits share it (prepared here when not given). ``loss``: a custom
    :data:`~aenet_fn.driver.step.Loss` ``loss(model, batch) -> (value, residuals)`` (default
    :func:`~aenet_fn.driver.step.default_loss`), trained on the ``torch.func`` route in one
    process; the test split's metrics stay the exact RMSE/MAE."""
    check_split(train, state.model.descriptor, "fit: training split")
    check_resumable(state, train, config)
    fingerprint = data_fingerprint(train, test, state.model.descriptor)
    check_same_data(state, fingerprint, config)
    state = attrs.evolve(state, data_fingerprint=fingerprint)
    check_labels(train, config.uses_forces, "fit: training", config.uses_stress)
    if test is not None:
        check_split(test, state.model.descriptor, "fit: test split")
        check_labels(test, config.uses_forces, "fit: test", config.uses_stress)
    world = current_world() if world is None else world
    if not world.is_main:
        callbacks, on_batch = (), None
    check_custom_loss(loss, speedups, world)
    if speedups is None:
        speedups = prepare_speedups(state, train, test, config, world, loss is not None)

    def draw(left: int) -> list[DrawnEpoch]:  # from the state the loop has reached
        return draw_energy_epochs(state, train, config, speedups, left)

    ahead = draws_ahead(speedups, train, config)
    for drawn, start in epochs_drawn_ahead(config.epochs, draw if ahead else None):
        epoch_speedups = attrs.evolve(speedups, drawn=drawn)
        before = state
        state, train_metrics = run_epoch(
            state, train, config, on_batch, world, epoch_speedups, loss
        )
        check_finite_epoch(before, state, train_metrics)
        test_metrics = (
            None
            if test is None
            else split_metrics(
                state.model,
                test,
                config.uses_forces,
                EVALUATE_BATCH,
                world,
                speedups.test_jacobian,
                config.uses_stress,
            )
        )
        state = end_of_epoch(
            state, train_metrics, test_metrics, config, time.perf_counter() - start
        )
        for callback in callbacks:
            callback(state)
    return state
