"""The one seam between the driver and the CPU speed-ups (:mod:`aenet_fn.speedups`).

:func:`prepare_speedups` builds a :class:`Speedups` once per run: the energy table and
workspace for energy-only epochs laid out many batches at a time, and the stored position
Jacobians of the splits for force batches. :func:`~aenet_fn.driver.train.fit` hands it down;
without it (``route="func"``, and off the CPU) the driver takes the ``torch.func`` route.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import torch

from aenet_fn.core.featurized import FeaturizedSet
from aenet_fn.core.potential import (
    Model,
)
from aenet_fn.core.sampling import (
    SamplerState,
)
from aenet_fn.driver.distributed import (
    World,
    current_world,
)
from aenet_fn.driver.loader import (
    Split,
)
from aenet_fn.driver.state import TrainConfig, TrainState, plan_epoch, takes_fast_route
from aenet_fn.speedups.energy_gradient import (
    PLAN_ATOMS,
    EnergySteps,
    EnergyTable,
    EnergyWorkspace,
    energy_plan,
    energy_table,
)
from aenet_fn.speedups.force_jacobian import SetJacobian, set_jacobian

_TABLE_ELEMENTS = 1 << 25
"""Largest featurized set (atoms × features) whose energy-only epochs use an EnergyTable."""


def energy_epoch_table(
    state: TrainState,
    train: Split,
    config: TrainConfig,
    world: World | None = None,
    custom_loss: bool = False,
) -> EnergyTable | None:
    """The table that lets :func:`run_epoch` take its energy-only route (one gather per many
    steps) for ``train``, or None where that route does not apply: force or stress training,
    a ``custom_loss`` (the table computes the default loss), several processes, DataLoader
    workers, lazy splits, sets too large to copy, or the ``torch.func`` route
    (:func:`takes_fast_route`)."""
    world = current_world() if world is None else world
    if (
        custom_loss
        or config.uses_forces
        or config.uses_stress
        or world.size > 1
        or config.num_workers > 0
    ):
        return None
    if not takes_fast_route(config, state.model.network.values):
        return None
    if not isinstance(train, FeaturizedSet) or train.features.numel() > _TABLE_ELEMENTS:
        return None
    return energy_table(state.model, train, config.batch_size)


def stored_jacobian_bytes(data: FeaturizedSet) -> int:
    """An upper bound of the memory (bytes) of the stored Jacobian of ``data``
    (:func:`~aenet_fn.speedups.force_jacobian.set_jacobian`), whichever way each structure is
    stored: a structure of ``n`` atoms has at most ``entries`` blocks (one per radial entry, two per
    triplet and their mirrors, one per atom), each stored twice with two indices when sparse,
    and is dense (one ``n²`` block matrix) only where that is at most twice its blocks; per
    atom two counts."""
    n = data.n_atoms
    entries = data.radial_count + 4 * data.triplet_count + n
    block = 3 * data.features.shape[1] * data.features.element_size()
    per_structure = torch.minimum(n * n * (block + 8), entries * (2 * block + 16))
    return int(per_structure.sum()) + 16 * data.features.shape[0]


JACOBIAN_MIN_EPOCHS = 10
"""Fewest epochs left in a ``route="auto"`` run for which its force training builds a stored
Jacobian larger than :data:`QUICK_JACOBIAN_BYTES`: shorter runs would not repay its one-time
set-up (``benchmarks/NOTES.md``)."""

QUICK_JACOBIAN_BYTES = 256 * 2**20
"""Stored Jacobians up to this bound (:func:`stored_jacobian_bytes`) build in about a second
and are built for runs of any length."""


def assembled_jacobian(
    model: Model, data: Split | None, config: TrainConfig, epochs_left: int | None = None
) -> SetJacobian | None:
    """The stored position Jacobian of ``data``
    (:class:`~aenet_fn.speedups.force_jacobian.SetJacobian`) that lets its force batches apply
    assembled matrices (dense per small structure, sparse otherwise) instead of the per-entry maps
    (the same numbers to round-off, several times faster on CPU; built once per run), or None where
    that does not apply: energy-only training, DataLoader workers, lazy or missing splits, sets
    without derivatives, the ``torch.func`` route (:func:`takes_fast_route`), data off the CPU, a
    Jacobian that could exceed ``config.jacobian_memory_gib`` (:func:`stored_jacobian_bytes`), or
    one above :data:`QUICK_JACOBIAN_BYTES` in a ``route="auto"`` run with fewer than
    :data:`JACOBIAN_MIN_EPOCHS` ``epochs_left`` (None: not weighed)."""
    if not config.uses_forces or config.num_workers > 0 or not isinstance(data, FeaturizedSet):
        return None
    if not takes_fast_route(config, model.network.values):
        return None
    if data.local is None or data.features.device.type != "cpu":
        return None
    bound = stored_jacobian_bytes(data)
    if bound > config.jacobian_memory_gib * 2**30:
        return None
    short = epochs_left is not None and epochs_left < JACOBIAN_MIN_EPOCHS
    if config.route == "auto" and short and bound > QUICK_JACOBIAN_BYTES:
        return None
    return set_jacobian(model.descriptor, data)


@attrs.frozen(eq=False)
class Speedups:
    """The CPU's fast route for one run (:func:`prepare_speedups`), the one thing the driver
    passes on to take it; each part None where it does not apply.

    Attributes:
        table: the training split's
            :class:`~aenet_fn.speedups.energy_gradient.EnergyTable`, through which energy-only
            epochs lay out many batches at once (:func:`energy_epoch_table`).
        workspace: the :class:`~aenet_fn.speedups.energy_gradient.EnergyWorkspace` those
            epochs update in place (the run's parameters, a committee's stacked), kept from
            epoch to epoch.
        jacobian, test_jacobian: the stored position Jacobians of the train and test splits,
            through which force batches and metrics go (:func:`assembled_jacobian`).
        drawn: this epoch, drawn ahead (:func:`draw_energy_epochs`; a committee's: one per
            member), set by :func:`fit` for each epoch.
    """

    table: EnergyTable | None = None
    workspace: EnergyWorkspace | None = None
    jacobian: SetJacobian | None = None
    test_jacobian: SetJacobian | None = None
    drawn: Any = None

    @property
    def applied(self) -> bool:
        """Whether any speed-up applies to the run."""
        return self.table is not None or self.jacobian is not None


def prepare_speedups(
    run: TrainState | Sequence[TrainState],
    train: Split,
    test: Split | None,
    config: TrainConfig,
    world: World | None = None,
    custom_loss: bool = False,
) -> Speedups:
    """The :class:`Speedups` of a run of one model (``run``: its state) or of a committee
    (``run``: its members' states, stacked) on these splits: built once per run, before the
    first epoch (the energy table and the stored Jacobians depend on the splits and the
    normalisation only, which training does not change); nothing on the ``torch.func`` route
    (``config.route``, every device but the CPU) nor for a ``custom_loss`` (the speed-ups
    compute the default loss)."""
    if custom_loss:
        return Speedups()
    members = [run] if isinstance(run, TrainState) else list(run)
    template = members[0]
    epochs_left = config.epochs  # fit runs config.epochs more epochs
    table = energy_epoch_table(template, train, config, world)
    workspace = None
    if table is not None:
        values = [m.model.network.values for m in members]
        if isinstance(run, TrainState):
            stacked = values[0].clone(memory_format=torch.contiguous_format)
        else:
            stacked = torch.stack(values)
        workspace = EnergyWorkspace(attrs.evolve(template.model.network, values=stacked))
    return Speedups(
        table=table,
        workspace=workspace,
        jacobian=assembled_jacobian(template.model, train, config, epochs_left),
        test_jacobian=assembled_jacobian(template.model, test, config, epochs_left),
    )


@attrs.frozen(eq=False)
class DrawnEpoch:
    """An energy-only epoch drawn ahead (:func:`draw_energy_epochs`): the generator state it
    starts from, the sampler and generator state after :func:`plan_epoch`, the order it drew,
    and the steps of the plan its batches are laid out in (``first``: its first batch
    there)."""

    start_rng: torch.Tensor
    sampler: SamplerState
    rng: torch.Tensor
    order: torch.Tensor
    steps: EnergySteps
    first: int

    def gradients(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The steps' gradients and errors of its batches (:meth:`EnergySteps.gradients`)."""
        first = self.first
        return self.steps.gradients(
            range(first, first + math.ceil(self.order.numel() / batch_size))
        )

    def take(self, state: TrainState, speedups: Speedups) -> tuple[TrainState, torch.Tensor]:
        """What :func:`plan_epoch` gives for ``state``: ``state`` with the sampler and
        generator after the draw, and the order drawn. Refuses a ``state`` this epoch was not
        drawn from, and a run without the table or with another workspace than its steps'."""
        if speedups.table is None or self.steps.workspace is not speedups.workspace:
            raise ValueError("an epoch drawn ahead needs its table and workspace")
        if not torch.equal(self.start_rng, state.rng):
            raise ValueError("this epoch was drawn ahead from another state")
        return attrs.evolve(state, sampler=self.sampler, rng=self.rng), self.order


DRAW_AHEAD = 8
"""Most energy-only epochs :func:`fit` draws and lays out at once."""


def epochs_per_plan(table: EnergyTable, train: Split) -> int:
    """How many energy-only epochs over ``train`` :func:`draw_energy_epochs` lays out in one
    plan: ``DRAW_AHEAD``, fewer where they would pass about 2¹⁶ atoms (0 for sets larger)."""
    return min(DRAW_AHEAD, int(PLAN_ATOMS / (table.atoms_per_structure * train.n_structures)))


def draws_ahead(speedups: Speedups, train: Split, config: TrainConfig) -> bool:
    """Whether :func:`fit` draws energy-only epochs ahead: on the energy route (the table of
    ``speedups``), where the draws do not depend on the epochs before (not
    ``error_weighted``) and several epochs fit one plan."""
    return (
        speedups.table is not None
        and config.sampling_policy != "error_weighted"
        and epochs_per_plan(speedups.table, train) > 1
    )


def epochs_drawn_ahead(
    n_epochs: int, draw: Callable[[int], Sequence[Any]] | None
) -> Iterator[tuple[Any, float]]:
    """For each of ``n_epochs`` epochs, what ``draw`` drew ahead for it (``draw(left)``, called
    with the epochs left whenever those drawn run out, lays out the next ones from the
    caller's current state), or None throughout where ``draw`` is None; with the
    ``time.perf_counter()`` of the epoch's start, before any drawing (the first epoch of a
    plan pays for laying it out)."""
    pending: list[Any] = []
    for epoch in range(n_epochs):
        start = time.perf_counter()
        if draw is not None and not pending:
            pending = list(draw(n_epochs - epoch))
        yield (pending.pop(0) if pending else None), start


def draw_energy_epochs(
    state: TrainState, train: Split, config: TrainConfig, speedups: Speedups, n_epochs: int
) -> list[DrawnEpoch]:
    """Up to ``n_epochs`` (at most ``DRAW_AHEAD``, and about 2¹⁶ atoms) energy-only epochs
    from ``state``, their orders drawn as :func:`plan_epoch` would draw them one epoch at a
    time (only sampler and generator take part: not for ``error_weighted`` sampling, whose
    scores change every epoch), laid out in one plan (each epoch's short last batch ends in
    empty slots): one plan's fixed cost per several epochs. Each batch is laid out as in a
    plan of its epoch alone (the same numbers, bit for bit). ``speedups``: the run's, with
    its table and workspace."""
    epochs = draw_member_energy_epochs([state], train, config, speedups, n_epochs)
    return [epoch for (epoch,) in epochs]


def draw_member_energy_epochs(
    states: Sequence[TrainState],
    train: Split,
    config: TrainConfig,
    speedups: Speedups,
    n_epochs: int,
) -> list[tuple[DrawnEpoch, ...]]:
    """:func:`draw_energy_epochs` of committee members (the workspace of ``speedups``: of
    their stacked values): per epoch, each member's; one plan of all, with one order per
    member, or one for all where every member draws the same."""
    table, workspace = speedups.table, speedups.workspace
    if config.sampling_policy == "error_weighted":
        raise ValueError(
            "draw_energy_epochs: error_weighted epochs depend on the errors of the ones before"
        )
    n_epochs = max(1, min(n_epochs, epochs_per_plan(table, train)))
    members, orders = [], []
    for current in states:
        epochs, draws = [], []
        for _ in range(n_epochs):
            start_rng = current.rng
            current, order = plan_epoch(current, train, config)
            epochs.append((start_rng, current.sampler, current.rng, order))
            empty = -order.numel() % config.batch_size
            draws.append(torch.cat([order, order.new_full((empty,), -1)]))
        members.append(epochs)
        orders.append(torch.cat(draws))
    shared = all(torch.equal(orders[0], order) for order in orders)
    draws = orders[0] if shared else torch.stack(orders)
    network = workspace.network
    steps = EnergySteps(
        network,
        energy_plan(table, network, draws, config.batch_size),
        config.force_weight,
        workspace,
    )
    per_epoch_batches = orders[0].numel() // (n_epochs * config.batch_size)
    return [
        tuple(DrawnEpoch(*member[e], steps, e * per_epoch_batches) for member in members)
        for e in range(n_epochs)
    ]
