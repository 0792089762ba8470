"""One optimiser step on one mini-batch, and exact metrics over a split.

``train_step(state, batch, config) -> (state, errors)``: the loss of :func:`batch_loss`, its
gradient by ``torch.func.grad`` (:func:`member_step`, which committees vmap), and the
optimiser's pure update.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs
import torch
from torch.func import grad
from torch.utils._pytree import tree_map

from aenet_fn.core.checks import is_integer
from aenet_fn.core.loss import (
    ErrorSums,
    Residuals,
    accumulate_errors,
    energy_error_per_atom,
    error_sums_init,
    loss_from_sums,
    masked_force_differences,
    metrics_from_sums,
)
from aenet_fn.core.minibatch import MiniBatch
from aenet_fn.core.potential import (
    Model,
    atomic_energies_from_features,
    autograd_with_aux,
    energy_and_feature_gradient,
    stress_from_feature_gradient,
    sum_by_structure,
    with_values,
)
from aenet_fn.driver.distributed import (
    World,
    all_reduce_sum,
    current_world,
    global_batch_loss,
    reduce_error_sums,
    shares,
)
from aenet_fn.driver.loader import (
    Split,
    check_split,
    take_batch,
)
from aenet_fn.driver.state import TrainConfig, TrainState, check_labels, optimizer_of
from aenet_fn.speedups.force_jacobian import BatchJacobian, SetJacobian
from aenet_fn.speedups.fused_optim import update_eagerly


def batch_residuals(
    model: Model, values: torch.Tensor, batch: MiniBatch, by_autograd: bool = False
) -> Residuals:
    """The :class:`~aenet_fn.core.loss.Residuals` of ``batch`` for network parameters
    ``values`` ``[P]``: per-atom energy errors ``[b]`` (eV/atom), the force differences
    ``[n, 3]`` (eV/Å) of the supervised atoms and the stress differences ``[b, 3, 3]``
    (eV/Å³) of the stress-supervised structures (0 elsewhere). Written without data-dependent
    shapes, so it ``vmap``s over members (and over padded, stacked batches); stacked members'
    values ``[M, P]`` on one batch, or on their stacked batches with an assembled Jacobian,
    give a leading member axis without ``vmap``. ``by_autograd``: see
    :func:`~aenet_fn.core.potential.energy_and_forces_from_derivatives` (outside ``torch.func``
    transforms only)."""
    model = with_values(model, values)
    slots = batch.n_structures + 1  # the last slot collects padding atoms of stacked batches
    strain = batch.strain
    if batch.local is None and strain is None:
        atomic = atomic_energies_from_features(
            model, batch.features, batch.species_index, batch.species_blocks
        )
        energies = sum_by_structure(atomic, batch.structure_index, slots)
        feature_gradient = None
    else:
        energies, feature_gradient = energy_and_feature_gradient(
            model,
            batch.features,
            batch.species_index,
            batch.structure_index,
            slots,
            batch.species_blocks,
            by_autograd,
        )
    members = energies.shape[:-1]
    if batch.local is None:
        differences = batch.forces.new_zeros(*members, batch.force_atoms.shape[-1], 3)
    else:
        forces = -batch.local.position_gradient(model.descriptor, feature_gradient)
        differences = masked_force_differences(forces, batch.forces, batch.force_atoms)
    if strain is None:
        stress = energies.new_zeros(*members, batch.n_structures, 3, 3)
    else:
        predicted = stress_from_feature_gradient(
            feature_gradient, strain.derivatives, batch.structure_index, slots, strain.volumes
        )
        supervised = strain.supervised[..., None, None]
        stress = torch.where(supervised, predicted - strain.stresses.to(predicted.dtype), 0.0)
    errors = energy_error_per_atom(
        energies[..., : batch.n_structures], batch.energies, batch.n_atoms
    )
    return Residuals(energy=errors, forces=differences, stress=stress)


def batch_loss(
    model: Model,
    values: torch.Tensor,
    batch: MiniBatch,
    force_weight: float,
    unbiased: bool,
    by_autograd: bool = False,
    stress_weight: float = 0.0,
) -> tuple[torch.Tensor, Residuals]:
    """Loss of ``batch`` for network parameters ``values`` ``[P]`` (see
    :func:`~aenet_fn.core.loss.loss_from_sums`; the stress term where the batch supervises
    stresses), with :func:`batch_residuals` as auxiliary output; for stacked members' values
    ``[M, P]``, their losses ``[M]``. ``by_autograd``: see :func:`batch_residuals`."""
    found = batch_residuals(model, values, batch, by_autograd)
    errors, differences = found.energy, found.forces
    stress_sums = {}
    if batch.strain is not None:
        stress_sums = {
            "stress_squared": (found.stress * found.stress).sum((-3, -2, -1)),
            "n_stresses": batch.strain.supervised.sum(-1),
            "stress_weight": stress_weight,
        }
    loss = loss_from_sums(
        (errors * errors).sum(-1),
        errors.shape[-1],
        (differences * differences).sum((-2, -1)),
        batch.force_atoms.sum(-1),
        batch.n_force_labelled,
        force_weight,
        unbiased,
        **stress_sums,
    )
    return loss, found


Loss = Callable[[Model, MiniBatch], tuple[torch.Tensor, Residuals]]
"""A training loss: ``loss(model, batch) -> (value, residuals)``, pure and differentiable in
the model's network parameters; ``residuals`` (:func:`residuals` of the model and batch, a
:class:`~aenet_fn.core.loss.Residuals`) is what training records as its errors."""


def residuals(model: Model, batch: MiniBatch) -> Residuals:
    """The :class:`~aenet_fn.core.loss.Residuals` of ``model`` on ``batch`` inside a loss:
    per-atom energy errors ``[b]`` (prediction − label, eV/atom), the force differences
    ``[n, 3]`` (eV/Å) of the atoms whose forces the batch supervises (``batch.force_atoms``)
    and the stress differences ``[b, 3, 3]`` (eV/Å³) of the structures whose stress it
    supervises (``batch.strain.supervised``), zero elsewhere."""
    return batch_residuals(model, model.network.values, batch)


def default_loss(config: TrainConfig) -> Loss:
    """The loss :func:`fit` trains by default, ``(1 − α − β) RMSE_E + α RMSE_F + β RMSE_S``
    with α ``config.force_weight`` and β ``config.stress_weight`` (see
    :func:`~aenet_fn.core.loss.loss_from_sums`), as a :data:`Loss`."""

    def loss(model: Model, batch: MiniBatch) -> tuple[torch.Tensor, Residuals]:
        return config_loss(model, model.network.values, batch, config)

    return loss


def config_loss(
    model: Model,
    values: torch.Tensor,
    batch: MiniBatch,
    config: TrainConfig,
    by_autograd: bool = False,
) -> tuple[torch.Tensor, Residuals]:
    """:func:`batch_loss` with the weights of ``config``."""
    return batch_loss(
        model,
        values,
        batch,
        config.force_weight,
        config.force_scale_unbiased,
        by_autograd,
        config.stress_weight,
    )


LossFunction = Callable[[torch.Tensor], tuple[torch.Tensor, Any]]


def func_gradient(loss: LossFunction, values: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """``(∂loss/∂values, aux)`` by ``torch.func.grad``: composes with ``vmap`` (committees)."""
    return grad(loss, has_aux=True)(values)


def autograd_gradient(loss: LossFunction, values: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """``(∂loss/∂values, aux)`` by ``torch.autograd`` on a leaf copy of ``values``: the same
    numbers as :func:`func_gradient` (tested) at about half the per-op overhead, for the
    un-vmapped single-model step (:func:`~aenet_fn.core.potential.autograd_with_aux`, the
    auxiliary output detached). Not for use inside ``vmap``."""
    gradient, aux = autograd_with_aux(loss, values)
    return gradient, tree_map(lambda t: t.detach(), aux)


def member_step(
    model: Model,
    values: torch.Tensor,
    opt_state: Any,
    lr: float,
    batch: MiniBatch,
    config: TrainConfig,
    loss: Loss | None = None,
) -> tuple[torch.Tensor, Any, Residuals]:
    """One optimiser step of one model's parameters ``values`` with ``torch.func.grad`` of
    ``loss`` (default: :func:`default_loss`); pure and ``vmap``-able over ``values`` and
    ``opt_state`` (committees)."""

    chosen = default_loss(config) if loss is None else loss
    gradient, aux = func_gradient(lambda v: chosen(with_values(model, v), batch), values)
    new_values, new_state = optimizer_of(config, model.network).update(
        gradient, opt_state, values, lr
    )
    return new_values, new_state, aux


def apply_gradient(state: TrainState, gradient: torch.Tensor, config: TrainConfig) -> TrainState:
    """``state`` after one optimiser update of its network parameters with ``gradient`` ``[P]``
    (outside ``torch.func`` transforms: the optimiser's eager form on the CPU)."""
    values = state.model.network.values
    updated = update_eagerly(
        optimizer_of(config, state.model.network), gradient, state.opt_state, values, state.lr
    )
    return _with_parameters(state, *updated)


def _with_parameters(state: TrainState, values: torch.Tensor, opt_state: Any) -> TrainState:
    """``state`` with network parameters ``values`` and optimiser state ``opt_state``."""
    return attrs.evolve(state, model=with_values(state.model, values), opt_state=opt_state)


def train_step(
    state: TrainState, batch: MiniBatch, config: TrainConfig, loss: Loss | None = None
) -> tuple[TrainState, Residuals]:
    """One optimiser step on ``batch``; returns the new state and the batch's residuals
    (:data:`Residuals`, measured before the step): the :func:`member_step` of the state's
    parameters (``torch.func.grad`` of ``loss``, default :func:`default_loss`). A batch with an
    assembled Jacobian (the CPU's fast route, :func:`assembled_jacobian`) takes its gradient
    from ``torch.autograd`` and the optimiser's eager form instead (the same numbers to
    round-off; tested; not with a custom ``loss``). Off the CPU the step reads nothing back to
    the host (tested on the meta device)."""
    values = state.model.network.values
    if not isinstance(batch.local, BatchJacobian):
        new_values, opt_state, aux = member_step(
            state.model, values, state.opt_state, state.lr, batch, config, loss
        )
        return _with_parameters(state, new_values, opt_state), aux
    if loss is not None:
        raise ValueError("a custom loss takes batches without a stored Jacobian (route='func')")
    gradient, aux = autograd_gradient(
        lambda v: config_loss(state.model, v, batch, config, by_autograd=True), values
    )
    return apply_gradient(state, gradient, config), aux


def data_parallel_step(
    state: TrainState, batch: MiniBatch, config: TrainConfig, world: World
) -> tuple[TrainState, Residuals]:
    """:func:`train_step` for one process's share ``batch`` of a global batch split over the
    processes of ``world``: the loss is that of the global batch, the gradients of all shares
    are summed (all-reduce), and every process applies the same update (see
    :mod:`aenet_fn.driver.distributed`). Returns this share's residuals."""
    assembled = isinstance(batch.local, BatchJacobian)

    def loss(values: torch.Tensor) -> tuple[torch.Tensor, Any]:
        found = batch_residuals(state.model, values, batch, by_autograd=assembled)
        stress_supervised = batch.stress_supervised
        value = global_batch_loss(
            found,
            batch.force_atoms,
            batch.n_force_labelled,
            stress_supervised,
            config.force_weight,
            config.force_scale_unbiased,
            config.stress_weight,
            world,
        )
        return value, found

    values = state.model.network.values
    gradient, aux = (autograd_gradient if assembled else func_gradient)(loss, values)
    return apply_gradient(state, all_reduce_sum(gradient, world), config), aux


EVALUATE_BATCH = 256
"""Structures per batch of :func:`evaluate` (and of ``fit``'s test metrics)."""


def evaluate(
    model: Model,
    data: Split,
    with_forces: bool,
    batch_size: int = EVALUATE_BATCH,
    world: World | None = None,
    jacobian: SetJacobian | None = None,
    with_stress: bool = False,
) -> dict[str, float]:
    """Exact metrics of ``model`` over all of ``data``: per-atom energy RMSE and MAE (eV/atom)
    over every structure, force RMSE (eV/Å) over every labelled component when ``with_forces``
    (with ``jacobian``, :func:`assembled_jacobian` of ``data``, through assembled Jacobians),
    stress RMSE (eV/Å³) over the nine components of every stress label when ``with_stress``.
    In a data-parallel run (``world``; default: the current process group) each process
    evaluates its share and the sums are reduced."""
    if not (is_integer(batch_size) and batch_size >= 1):
        raise ValueError(f"evaluate: batch_size must be an integer >= 1, got {batch_size!r}")
    check_split(data, model.descriptor, "evaluate")
    check_labels(data, with_forces, "evaluate:", with_stress)
    return split_metrics(model, data, with_forces, batch_size, world, jacobian, with_stress)


def split_metrics(
    model, data, with_forces, batch_size, world, jacobian, with_stress=False
) -> dict[str, float]:
    """:func:`evaluate` (the same arguments) of a split already checked: ``fit`` checks its
    test split once, before the first epoch."""
    world = current_world() if world is None else world
    sums = error_sums_init()
    everything = data.has_forces if with_forces else None
    for first in range(0, data.n_structures, batch_size):
        last = min(first + batch_size, data.n_structures)
        selection = torch.arange(first, last, device="cpu")  # batches are laid out on the host
        share = shares(selection, world)[world.rank]
        if share.numel() == 0:
            continue
        batch = take_batch(data, share, everything, jacobian, with_stress)
        with torch.no_grad():
            found = batch_residuals(model, model.network.values, batch, by_autograd=True)
        sums = accumulate_residuals(sums, found, batch)
    return metrics_from_sums(reduce_error_sums(sums, world))


def accumulate_residuals(sums: ErrorSums, found: Residuals, batch: MiniBatch) -> ErrorSums:
    """``sums`` with the residuals ``found`` of ``batch`` added (forces and stresses where the
    batch supervises them)."""
    stress_supervised = batch.stress_supervised
    return accumulate_errors(
        sums, found.energy, found.forces, batch.force_atoms, found.stress, stress_supervised
    )


def monitored_value(metrics: dict[str, float], config: TrainConfig) -> float:
    """The validation monitor: the loss's weighting of the split's exact RMSEs."""
    value = (1 - config.force_weight - config.stress_weight) * metrics["rmse_energy"]
    for weight, key in (
        (config.force_weight, "rmse_forces"),
        (config.stress_weight, "rmse_stress"),
    ):
        if weight > 0 and not math.isnan(metrics.get(key, math.nan)):
            value += weight * metrics[key]
    return value
