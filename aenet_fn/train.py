"""The training driver: a :class:`TrainState` threaded through epochs by pure steps.

``train_step(state, batch, config) -> (state, errors)`` is one optimiser step on one mini-batch;
:func:`run_epoch` draws the epoch's batches from the sampler and folds ``train_step`` over them;
:func:`fit` loops over epochs and calls back for progress and checkpoints. All randomness comes
from the generator state stored in the :class:`TrainState`, so a run resumed from a checkpoint
continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import attrs
import torch
from torch.func import grad
from torch.utils._pytree import tree_map

from aenet_fn._records import host_field, on_cpu, pytree_record, serializable, static_field
from aenet_fn.checks import is_integer, is_real
from aenet_fn.descriptor import ChebyshevParams
from aenet_fn.distributed import (
    World,
    all_reduce_sum,
    current_world,
    gather_parts,
    global_batch_loss,
    reduce_error_sums,
    shares,
)
from aenet_fn.energy_gradient import (
    PLAN_ATOMS,
    EnergySteps,
    EnergyTable,
    EnergyWorkspace,
    energy_gradients,
    energy_plan,
    energy_table,
)
from aenet_fn.featurized import FeaturizedSet, MiniBatch
from aenet_fn.force_jacobian import BatchJacobian, SetJacobian, set_jacobian
from aenet_fn.fused_optim import update_eagerly, update_in_place
from aenet_fn.loader import (
    Split,
    batch_stream,
    check_split,
    normalization_features,
    take_batch,
)
from aenet_fn.loss import (
    ErrorSums,
    accumulate_errors,
    energy_error_per_atom,
    error_sums_init,
    loss_from_sums,
    masked_force_differences,
    metrics_from_sums,
)
from aenet_fn.network import Architecture, init_network
from aenet_fn.normalization import (
    fit_normalization,
    reference_energy_vector,
    referenced_energy_per_atom,
)
from aenet_fn.optim import (
    AdamConfig,
    AdamState,
    PlateauConfig,
    PlateauState,
    SGDConfig,
    SGDState,
    adam,
    plateau_init,
    plateau_step,
    sgd,
)
from aenet_fn.potential import (
    Model,
    atomic_energies_from_features,
    autograd_with_aux,
    energy_and_forces_from_derivatives,
    sum_by_structure,
)
from aenet_fn.sampling import (
    POLICIES as SAMPLING_POLICIES,
)
from aenet_fn.sampling import (
    SamplerState,
    epoch_order,
    error_scores_update,
    force_resample_due,
    force_subset,
    force_subset_size,
    sampler_init,
)

FORCE_SAMPLING = ("random", "fixed")
ROUTES = ("auto", "func", "fast")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"TrainConfig: {message}")


def _check_integer(name: str, value: Any, low: int) -> None:
    message = f"{name} must be an integer >= {low}, got {value!r}"
    _check(is_integer(value) and value >= low, message)


def _check_fraction(name: str, value: Any) -> None:
    _check(is_real(value) and 0.0 <= value <= 1.0, f"{name} must lie in [0, 1], got {value!r}")


def _check_switch(name: str, value: Any) -> None:
    _check(isinstance(value, bool), f"{name} must be True or False, got {value!r}")


@serializable
@attrs.frozen
class TrainConfig:
    """Hyper-parameters of a training run (all plain values).

    Attributes:
        epochs: epochs to run in this call to :func:`fit` (additional epochs when resuming).
        batch_size: structures per mini-batch (last partial batch kept).
        optimizer: :class:`~aenet_fn.optim.AdamConfig` or :class:`~aenet_fn.optim.SGDConfig`.
        force_weight: α in ``(1 − α) RMSE_E + α RMSE_F``, in [0, 1].
        force_fraction: fraction of the training structures whose forces are supervised.
        force_sampling: ``"random"`` (re-drawn every ``force_resample_num_epochs``) or
            ``"fixed"``.
        force_resample_num_epochs: re-draw period of the force subset (0: never).
        force_min_structures_per_epoch: lower bound of the force subset size (None: none).
        force_scale_unbiased: rescale the force RMSE of sub-sampled batches by ``1/√f``.
        sampling_policy: ``"uniform"``, ``"energy_weighted"`` or ``"error_weighted"``.
        use_scheduler: reduce the learning rate on a validation plateau.
        scheduler: plateau scheduler settings.
        seed: seeds shuffling, weighted sampling and force subsets of this run.
        num_workers: DataLoader worker processes preparing batches ahead of the step (0:
            in this process); results do not depend on it.
        prefetch_factor: batches prepared ahead per worker.
        persistent_workers: keep the workers (and their caches) of a lazy split from one
            epoch to the next.
        route: how steps are computed. ``"func"``: the ``torch.func`` route (parameter
            gradients by ``torch.func.grad``, committees by ``vmap``, pure optimiser updates),
            which runs on every device and dtype. ``"fast"``: the CPU speed-ups (hand-derived
            energy gradient, stored Jacobians, fused optimiser forms; CPU only), the same
            numbers to round-off. ``"auto"``: ``"fast"`` on the CPU, ``"func"`` elsewhere.
        jacobian_memory_gib: the most memory (GiB) the fast route may spend on a split's
            stored Jacobian (an upper bound is checked before it is built); a split that
            could need more trains its forces on the ``torch.func`` route.
        allow_other_data: let :func:`fit` continue a state on other structures than those it
            was trained on (refused by default: see :func:`data_fingerprint`).
    """

    epochs: int = 100
    batch_size: int = 32
    optimizer: AdamConfig | SGDConfig = attrs.field(factory=AdamConfig)
    force_weight: float = 0.0
    force_fraction: float = 1.0
    force_sampling: str = "random"
    force_resample_num_epochs: int = 0
    force_min_structures_per_epoch: int | None = 1
    force_scale_unbiased: bool = False
    sampling_policy: str = "uniform"
    use_scheduler: bool = False
    scheduler: PlateauConfig = attrs.field(factory=PlateauConfig)
    seed: int = 0
    num_workers: int = 0
    prefetch_factor: int = 2
    persistent_workers: bool = False
    route: str = "auto"
    jacobian_memory_gib: float = 8.0
    allow_other_data: bool = False

    def __attrs_post_init__(self) -> None:
        for name, low in (("epochs", 0), ("batch_size", 1), ("force_resample_num_epochs", 0)):
            _check_integer(name, getattr(self, name), low)
        for name, low in (("num_workers", 0), ("prefetch_factor", 1)):
            _check_integer(name, getattr(self, name), low)
        _check(is_integer(self.seed), f"seed must be an integer, got {self.seed!r}")
        if self.force_min_structures_per_epoch is not None:
            _check_integer("force_min_structures_per_epoch", self.force_min_structures_per_epoch, 0)
        _check_fraction("force_weight", self.force_weight)
        _check_fraction("force_fraction", self.force_fraction)
        switches = ("force_scale_unbiased", "use_scheduler", "persistent_workers")
        for name in (*switches, "allow_other_data"):
            _check_switch(name, getattr(self, name))
        _check(
            self.force_sampling in FORCE_SAMPLING,
            f"force_sampling must be one of {FORCE_SAMPLING}, got {self.force_sampling!r}",
        )
        _check(
            self.sampling_policy in SAMPLING_POLICIES,
            f"sampling_policy must be one of {SAMPLING_POLICIES}, got {self.sampling_policy!r}",
        )
        _check(self.route in ROUTES, f"route must be one of {ROUTES}, got {self.route!r}")
        _check(
            is_real(self.jacobian_memory_gib) and self.jacobian_memory_gib >= 0,
            f"jacobian_memory_gib must be a number >= 0, got {self.jacobian_memory_gib!r}",
        )
        _check(
            isinstance(self.optimizer, (AdamConfig, SGDConfig)),
            f"optimizer must be AdamConfig or SGDConfig, got {type(self.optimizer).__name__}",
        )
        _check(
            isinstance(self.scheduler, PlateauConfig),
            f"scheduler must be a PlateauConfig, got {type(self.scheduler).__name__}",
        )

    @property
    def uses_forces(self) -> bool:
        """True when forces enter the loss."""
        return self.force_weight > 0


def takes_fast_route(config: TrainConfig, values: torch.Tensor) -> bool:
    """Whether a run of ``config`` whose parameters are ``values`` takes the CPU speed-ups
    (``route="fast"``, or ``"auto"`` on the CPU) rather than the ``torch.func`` route. Refuses
    ``"fast"`` off the CPU."""
    if config.route == "func":
        return False
    if on_cpu(values):
        return True
    if config.route == "fast":
        raise ValueError(
            f"route='fast' runs on the CPU only, not on {values.device}: use 'auto' or 'func'"
        )
    return False


@pytree_record
@attrs.frozen(eq=False)
class TrainState:
    """Everything a run needs to continue exactly.

    Attributes:
        model: the current model.
        opt_state: optimiser state (moments, step count).
        sched_state: plateau-scheduler state, or None without a scheduler.
        sampler: structure-sampling state (error scores, force subset).
        rng: state of the run's CPU ``torch.Generator`` (uint8 tensor; stays on the CPU).
        lr: current learning rate.
        best_values: network parameters of the best validation epoch so far (or None).
        epoch: epochs completed.
        best_monitor: best validation monitor so far (inf when none).
        best_epoch: epoch of ``best_values`` (-1 when none).
        history: one dict of metrics per completed epoch.
        data_fingerprint: the :func:`data_fingerprint` of the splits :func:`fit` trained it
            on ("" before its first fit, and in states saved before fingerprints existed).
    """

    model: Model
    opt_state: Any
    sched_state: PlateauState | None
    sampler: SamplerState
    rng: torch.Tensor = host_field()  # noqa: RUF009 (an attrs field, not a default)
    lr: float = static_field()
    best_values: torch.Tensor | None = None
    epoch: int = static_field(default=0)
    best_monitor: float = static_field(default=math.inf)
    best_epoch: int = static_field(default=-1)
    history: tuple[dict[str, float], ...] = static_field(default=())
    data_fingerprint: str = static_field(default="")


def init_model(
    descriptor: ChebyshevParams,
    arch: Architecture,
    train: Split,
    *,
    seed: int = 0,
    atomic_energies: Mapping[str, float] | None = None,
    normalize_features: bool = True,
    normalize_energy: bool = True,
    feature_stats: Mapping[str, Any] | None = None,
    energy_shift: float | None = None,
    energy_scaling: float | None = None,
) -> Model:
    """A fresh model for ``train``: networks initialised from ``seed``, normalisation fitted
    on the training split (spec §4.2–§4.3; overrides as in
    :func:`~aenet_fn.normalization.fit_normalization`), in the split's dtype and on its
    device."""
    check_split(train, descriptor, "init_model")
    reference = reference_energy_vector(descriptor.species, atomic_energies, train.device)
    if not bool(torch.isfinite(train.energies).all()):
        raise ValueError("init_model: every training structure needs a finite energy")
    normalization = fit_normalization(
        normalization_features(train),
        train.energies,
        train.species_counts,
        reference,
        normalize_features=normalize_features,
        normalize_energy=normalize_energy,
        feature_stats=feature_stats,
        energy_shift=energy_shift,
        energy_scaling=energy_scaling,
    )
    generator = torch.Generator().manual_seed(seed)
    network = init_network(
        arch,
        descriptor.species,
        descriptor.n_features,
        generator=generator,
        dtype=train.dtype,
        device=train.device,
    )
    return Model(descriptor, network, normalization)


def optimizer_of(config: TrainConfig):
    """The :class:`~aenet_fn.optim.Optimizer` of ``config``."""
    return (
        adam(config.optimizer)
        if isinstance(config.optimizer, AdamConfig)
        else sgd(config.optimizer)
    )


def check_labels(data: Split, with_forces: bool, caller: str) -> None:
    """Refuse a split with structures that lack an energy, or, ``with_forces``, one in which
    no structure has forces (``caller`` names the split in the message)."""
    missing = torch.nonzero(~torch.isfinite(data.energies)).flatten().tolist()
    if missing:
        names = [data.names[i] or f"#{i}" for i in missing[:5]]
        raise ValueError(f"{caller} structures without an energy: {names}")
    if with_forces and not bool(data.has_forces.any()):
        raise ValueError(
            f"{caller} forces are weighted (force_weight > 0) but no structure has forces"
        )


def data_fingerprint(train: Split, test: Split | None, descriptor: ChebyshevParams) -> str:
    """sha256 (hex) of what identifies a run's data: per structure of the training and test
    splits its name, atom count, species counts and energy, and the descriptor. Read on the
    host once per :func:`fit`."""
    digest = hashlib.sha256(repr(descriptor).encode())
    for split in (train, test):
        if split is None:
            digest.update(b"no split")
            continue
        digest.update("\0".join(str(name) for name in split.names).encode())
        for tensor in (split.n_atoms, split.species_counts, split.energies):
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_same_data(state: TrainState, fingerprint: str, config: TrainConfig) -> None:
    """Refuse to continue ``state`` on data whose :func:`data_fingerprint` differs from the
    one it was trained on, unless ``config.allow_other_data``."""
    if state.data_fingerprint and state.data_fingerprint != fingerprint:
        if not config.allow_other_data:
            raise ValueError(
                "fit: the state was trained on other structures or another descriptor (data "
                f"fingerprint {state.data_fingerprint[:12]}…, these splits {fingerprint[:12]}…); "
                "continue on these only with TrainConfig(allow_other_data=True)"
            )


def check_resumable(state: TrainState, train: Split, config: TrainConfig) -> None:
    """Refuse to continue ``state`` on ``train`` under ``config`` where they do not belong
    together: another number of training structures, sampling policy or optimiser."""
    n_state, n_train = state.sampler.scores.numel(), train.n_structures
    if n_state != n_train:
        raise ValueError(
            f"fit: the state was made for a training split of {n_state} structures; "
            f"this one has {n_train}"
        )
    if state.sampler.policy != config.sampling_policy:
        raise ValueError(
            f"fit: the state samples {state.sampler.policy!r}; the config asks for "
            f"{config.sampling_policy!r} (start a new state to change the policy)"
        )
    expected = AdamState if isinstance(config.optimizer, AdamConfig) else SGDState
    if not isinstance(state.opt_state, expected):
        raise ValueError(
            f"fit: the state holds {type(state.opt_state).__name__}; the config's optimizer "
            f"{type(config.optimizer).__name__} needs {expected.__name__}"
        )


def init_train_state(model: Model, train: Split, config: TrainConfig) -> TrainState:
    """The state before the first epoch: fresh optimiser, sampler and generator from
    ``config.seed``; the initial force subset is drawn here."""
    if train.n_structures == 0:
        raise ValueError("init_train_state: the training split is empty")
    check_split(train, model.descriptor, "init_train_state")
    check_labels(train, config.uses_forces, "init_train_state: training")
    generator = torch.Generator().manual_seed(config.seed)
    sampler = sampler_init(config.sampling_policy, train.n_structures, device=train.device)
    sampler = _draw_force_subset(sampler, train, config, generator)
    lr = config.optimizer.lr
    return TrainState(
        model=model,
        opt_state=optimizer_of(config).init(model.network.values),
        sched_state=plateau_init(config.scheduler, lr) if config.use_scheduler else None,
        sampler=sampler,
        rng=generator.get_state(),
        lr=lr,
    )


def _draw_force_subset(
    sampler: SamplerState, train: Split, config: TrainConfig, generator: torch.Generator
) -> SamplerState:
    mask = torch.zeros(train.n_structures, dtype=torch.bool, device="cpu")  # on the host
    if config.uses_forces:
        candidates = torch.nonzero(train.has_forces.cpu()).flatten()
        size = force_subset_size(
            candidates.numel(),
            train.n_structures,
            config.force_fraction,
            config.force_min_structures_per_epoch,
        )
        mask[force_subset(candidates, size, generator=generator)] = True
    return attrs.evolve(sampler, force_subset=mask)


def batch_residuals(
    model: Model, values: torch.Tensor, batch: MiniBatch, by_autograd: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-atom energy errors ``[b]`` (eV/atom) and force differences ``[n, 3]`` (eV/Å) of the
    supervised atoms (0 elsewhere, and everywhere when the batch supervises no force) of
    ``batch`` for network parameters ``values`` ``[P]``. Written without data-dependent shapes,
    so it ``vmap``s over members (and over padded, stacked batches); stacked members' values
    ``[M, P]`` on one batch, or on their stacked batches with an assembled Jacobian, give
    ``[M, b]`` and ``[M, n, 3]`` without ``vmap``. ``by_autograd``: see
    :func:`~aenet_fn.potential.energy_and_forces_from_derivatives` (outside ``torch.func``
    transforms only)."""
    model = attrs.evolve(model, network=attrs.evolve(model.network, values=values))
    slots = batch.n_structures + 1  # the last slot collects padding atoms of stacked batches
    if batch.local is None:
        atomic = atomic_energies_from_features(
            model, batch.features, batch.species_index, batch.species_blocks
        )
        energies = sum_by_structure(atomic, batch.structure_index, slots)
        differences = batch.forces.new_zeros(*energies.shape[:-1], batch.force_atoms.shape[0], 3)
    else:
        energies, forces = energy_and_forces_from_derivatives(
            model,
            batch.features,
            batch.species_index,
            batch.structure_index,
            slots,
            batch.local,
            batch.species_blocks,
            by_autograd,
        )
        differences = masked_force_differences(forces, batch.forces, batch.force_atoms)
    errors = energy_error_per_atom(
        energies[..., : batch.n_structures], batch.energies, batch.n_atoms
    )
    return errors, differences


def batch_loss(
    model: Model,
    values: torch.Tensor,
    batch: MiniBatch,
    force_weight: float,
    unbiased: bool,
    by_autograd: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Loss of ``batch`` for network parameters ``values`` ``[P]`` (see
    :func:`~aenet_fn.loss.loss_from_sums`), with :func:`batch_residuals` as auxiliary
    output; for stacked members' values ``[M, P]``, their losses ``[M]``. ``by_autograd``:
    see :func:`batch_residuals`."""
    errors, differences = batch_residuals(model, values, batch, by_autograd)
    loss = loss_from_sums(
        (errors * errors).sum(-1),
        errors.shape[-1],
        (differences * differences).sum((-2, -1)),
        batch.force_atoms.sum(-1),
        batch.n_force_labelled,
        force_weight,
        unbiased,
    )
    return loss, (errors, differences)


LossFunction = Callable[[torch.Tensor], tuple[torch.Tensor, Any]]


def func_gradient(loss: LossFunction, values: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """``(∂loss/∂values, aux)`` by ``torch.func.grad``: composes with ``vmap`` (committees)."""
    return grad(loss, has_aux=True)(values)


def autograd_gradient(loss: LossFunction, values: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """``(∂loss/∂values, aux)`` by ``torch.autograd`` on a leaf copy of ``values``: the same
    numbers as :func:`func_gradient` (tested) at about half the per-op overhead, for the
    un-vmapped single-model step (:func:`~aenet_fn.potential.autograd_with_aux`, the
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
) -> tuple[torch.Tensor, Any, tuple[torch.Tensor, torch.Tensor]]:
    """One optimiser step of one model's parameters ``values`` with ``torch.func.grad``; pure
    and ``vmap``-able over ``values`` and ``opt_state`` (committees)."""

    def loss(v: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return batch_loss(model, v, batch, config.force_weight, config.force_scale_unbiased)

    gradient, aux = func_gradient(loss, values)
    new_values, new_state = optimizer_of(config).update(gradient, opt_state, values, lr)
    return new_values, new_state, aux


def apply_gradient(state: TrainState, gradient: torch.Tensor, config: TrainConfig) -> TrainState:
    """``state`` after one optimiser update of its network parameters with ``gradient`` ``[P]``
    (outside ``torch.func`` transforms: the optimiser's eager form on the CPU)."""
    values = state.model.network.values
    updated = update_eagerly(optimizer_of(config), gradient, state.opt_state, values, state.lr)
    return _with_parameters(state, *updated)


def _with_parameters(state: TrainState, values: torch.Tensor, opt_state: Any) -> TrainState:
    """``state`` with network parameters ``values`` and optimiser state ``opt_state``."""
    model = attrs.evolve(state.model, network=attrs.evolve(state.model.network, values=values))
    return attrs.evolve(state, model=model, opt_state=opt_state)


def train_step(
    state: TrainState, batch: MiniBatch, config: TrainConfig
) -> tuple[TrainState, tuple[torch.Tensor, torch.Tensor]]:
    """One optimiser step on ``batch``; returns the new state and the batch's per-atom energy
    errors ``[b]`` and supervised force differences (measured before the step): the
    :func:`member_step` of the state's parameters (``torch.func.grad``). A batch with an
    assembled Jacobian (the CPU's fast route, :func:`assembled_jacobian`) takes its gradient
    from ``torch.autograd`` and the optimiser's eager form instead (the same numbers to
    round-off; tested). Off the CPU the step reads nothing back to the host (tested on the
    meta device)."""
    values = state.model.network.values
    if not isinstance(batch.local, BatchJacobian):
        new_values, opt_state, aux = member_step(
            state.model, values, state.opt_state, state.lr, batch, config
        )
        return _with_parameters(state, new_values, opt_state), aux
    gradient, aux = autograd_gradient(
        lambda v: batch_loss(
            state.model,
            v,
            batch,
            config.force_weight,
            config.force_scale_unbiased,
            by_autograd=True,
        ),
        values,
    )
    return apply_gradient(state, gradient, config), aux


def data_parallel_step(
    state: TrainState, batch: MiniBatch, config: TrainConfig, world: World
) -> tuple[TrainState, tuple[torch.Tensor, torch.Tensor]]:
    """:func:`train_step` for one process's share ``batch`` of a global batch split over the
    processes of ``world``: the loss is that of the global batch, the gradients of all shares
    are summed (all-reduce), and every process applies the same update (see
    :mod:`aenet_fn.distributed`). Returns this share's residuals."""
    assembled = isinstance(batch.local, BatchJacobian)

    def loss(values: torch.Tensor) -> tuple[torch.Tensor, Any]:
        errors, differences = batch_residuals(state.model, values, batch, by_autograd=assembled)
        value = global_batch_loss(
            errors,
            differences,
            batch.force_atoms,
            batch.n_force_labelled,
            config.force_weight,
            config.force_scale_unbiased,
            world,
        )
        return value, (errors, differences)

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
) -> dict[str, float]:
    """Exact metrics of ``model`` over all of ``data``: per-atom energy RMSE and MAE (eV/atom)
    over every structure, force RMSE (eV/Å) over every labelled component when ``with_forces``
    (with ``jacobian``, :func:`assembled_jacobian` of ``data``, through assembled Jacobians).
    In a data-parallel run (``world``; default: the current process group) each process
    evaluates its share and the sums are reduced."""
    if not (is_integer(batch_size) and batch_size >= 1):
        raise ValueError(f"evaluate: batch_size must be an integer >= 1, got {batch_size!r}")
    check_split(data, model.descriptor, "evaluate")
    check_labels(data, with_forces, "evaluate:")
    return _split_metrics(model, data, with_forces, batch_size, world, jacobian)


def _split_metrics(model, data, with_forces, batch_size, world, jacobian) -> dict[str, float]:
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
        batch = take_batch(data, share, everything, jacobian)
        with torch.no_grad():
            errors, differences = batch_residuals(
                model, model.network.values, batch, by_autograd=True
            )
        sums = accumulate_errors(sums, errors, differences, batch.force_atoms)
    return metrics_from_sums(reduce_error_sums(sums, world))


def _monitor(metrics: dict[str, float], force_weight: float) -> float:
    value = (1 - force_weight) * metrics["rmse_energy"]
    if force_weight > 0 and not math.isnan(metrics["rmse_forces"]):
        value += force_weight * metrics["rmse_forces"]
    return value


def plan_epoch(
    state: TrainState, train: Split, config: TrainConfig
) -> tuple[TrainState, torch.Tensor]:
    """Draw one epoch's plan from the state's generator: the force subset (re-drawn when due)
    and the order of structures. Returns the state with sampler and generator advanced, and the
    order ``[n_draws]``, on the host (where batches are laid out)."""
    generator = torch.Generator()
    generator.set_state(state.rng)
    sampler = state.sampler
    if config.uses_forces and force_resample_due(
        state.epoch, 0, config.force_sampling, config.force_resample_num_epochs
    ):
        sampler = _draw_force_subset(sampler, train, config, generator)
    per_atom = None
    if sampler.policy == "energy_weighted":
        per_atom = referenced_energy_per_atom(
            train.energies, train.species_counts, state.model.normalization.atomic_energies
        )
    order = epoch_order(sampler, per_atom, generator=generator)
    return attrs.evolve(state, sampler=sampler, rng=generator.get_state()), order


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
    return batch_stream(
        train,
        selections,
        force_mask,
        num_workers=config.num_workers,
        prefetch_factor=config.prefetch_factor,
        persistent_workers=config.persistent_workers,
        jacobian=jacobian,
    )


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


_TABLE_ELEMENTS = 1 << 25
"""Largest featurized set (atoms × features) whose energy-only epochs use an EnergyTable."""


def energy_epoch_table(
    state: TrainState, train: Split, config: TrainConfig, world: World | None = None
) -> EnergyTable | None:
    """The table that lets :func:`run_epoch` take its energy-only route (one gather per many
    steps) for ``train``, or None where that route does not apply: force training, several
    processes, DataLoader workers, lazy splits, sets too large to copy, or the ``torch.func``
    route (:func:`takes_fast_route`)."""
    world = current_world() if world is None else world
    if config.uses_forces or world.size > 1 or config.num_workers > 0:
        return None
    if not takes_fast_route(config, state.model.network.values):
        return None
    if not isinstance(train, FeaturizedSet) or train.features.numel() > _TABLE_ELEMENTS:
        return None
    return energy_table(state.model, train, config.batch_size)


def stored_jacobian_bytes(data: FeaturizedSet) -> int:
    """An upper bound of the memory (bytes) of the stored Jacobian of ``data``
    (:func:`~aenet_fn.force_jacobian.set_jacobian`), whichever way each structure is stored: a
    structure of ``n`` atoms has at most ``entries`` blocks (one per radial entry, two per
    triplet and their mirrors, one per atom), each stored twice with two indices when sparse,
    and is dense (one ``n²`` block matrix) only where that is at most twice its blocks; per
    atom two counts."""
    n = data.n_atoms
    entries = data.radial_count + 4 * data.triplet_count + n
    block = 3 * data.features.shape[1] * data.features.element_size()
    per_structure = torch.minimum(n * n * (block + 8), entries * (2 * block + 16))
    return int(per_structure.sum()) + 16 * data.features.shape[0]


def assembled_jacobian(model: Model, data: Split | None, config: TrainConfig) -> SetJacobian | None:
    """The stored position Jacobian of ``data`` (:class:`~aenet_fn.force_jacobian.SetJacobian`)
    that lets its force batches apply assembled matrices (dense per small structure, sparse
    otherwise) instead of the per-entry maps (the same numbers to round-off, several times
    faster on CPU; built once per run), or None where that does not apply: energy-only
    training, DataLoader workers, lazy or missing splits, sets without derivatives, the
    ``torch.func`` route (:func:`takes_fast_route`), data off the CPU, or a Jacobian that
    could exceed ``config.jacobian_memory_gib`` (:func:`stored_jacobian_bytes`)."""
    if not config.uses_forces or config.num_workers > 0 or not isinstance(data, FeaturizedSet):
        return None
    if not takes_fast_route(config, model.network.values):
        return None
    if data.local is None or data.features.device.type != "cpu":
        return None
    if stored_jacobian_bytes(data) > config.jacobian_memory_gib * 2**30:
        return None
    return set_jacobian(model.descriptor, data)


@attrs.frozen(eq=False)
class Speedups:
    """The CPU's fast route for one run (:func:`prepare_speedups`), the one thing the driver
    passes on to take it; each part None where it does not apply.

    Attributes:
        table: the training split's :class:`~aenet_fn.energy_gradient.EnergyTable`, through
            which energy-only epochs lay out many batches at once (:func:`energy_epoch_table`).
        workspace: the :class:`~aenet_fn.energy_gradient.EnergyWorkspace` those epochs update
            in place (the run's parameters, a committee's stacked), kept from epoch to epoch.
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
) -> Speedups:
    """The :class:`Speedups` of a run of one model (``run``: its state) or of a committee
    (``run``: its members' states, stacked) on these splits: built once per run, before the
    first epoch (the energy table and the stored Jacobians depend on the splits and the
    normalisation only, which training does not change); nothing on the ``torch.func`` route
    (``config.route``, every device but the CPU)."""
    members = [run] if isinstance(run, TrainState) else list(run)
    template = members[0]
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
        jacobian=assembled_jacobian(template.model, train, config),
        test_jacobian=assembled_jacobian(template.model, test, config),
    )


StepReport = Callable[[torch.Tensor, torch.Tensor, Any], None]
"""Called after each step with this process's per-atom energy errors, those of the whole
batch, and (force differences, supervised atoms) or None."""


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
    optimizer = optimizer_of(config)
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
) -> TrainState:
    """The steps of an epoch over assembled mini-batches (:func:`train_step`, or
    :func:`data_parallel_step` under ``torch.distributed``; with ``jacobian``, the training
    split's stored Jacobian); returns the state after the last step."""
    batches = epoch_batches(state, order, train, config, world, jacobian)
    for selection, batch in zip(order.split(config.batch_size), batches):
        if world.size == 1:
            state, (errors, differences) = train_step(state, batch, config)
            drawn = errors.detach()
        else:
            state, (errors, differences) = data_parallel_step(state, batch, config, world)
            sizes = [part.numel() for part in shares(selection, world)]
            drawn = gather_parts(errors.detach(), sizes, world)
        on_step(errors, drawn, None if batch.local is None else (differences, batch.force_atoms))
    return state


def run_epoch(
    state: TrainState,
    train: Split,
    config: TrainConfig,
    on_batch: Callable[[int, int], None] | None = None,
    world: World | None = None,
    speedups: Speedups | None = None,
) -> tuple[TrainState, dict[str, float]]:
    """One epoch over the training split: sampler order, optional force re-draw, a
    :func:`train_step` per batch (:func:`data_parallel_step` under ``torch.distributed``),
    error-score update. Returns the new state and the epoch's training metrics (global
    RMSE/MAE over every draw, measured before each step). ``world``: the processes sharing
    each batch (default: the current process group).

    ``speedups``: the run's CPU fast route (:func:`prepare_speedups`, which :func:`fit` calls
    once per run), the same steps faster: energy-only epochs lay out the batches of many steps
    at once from its table (:mod:`aenet_fn.energy_gradient`), or take this epoch drawn ahead
    from this ``state``; force batches go through its stored Jacobian. Without it, energy-only
    epochs build their own table where one applies; force batches take the ``torch.func``
    route."""
    world = current_world() if world is None else world
    if speedups is None:
        speedups = Speedups(table=energy_epoch_table(state, train, config, world))
    if speedups.drawn is None:
        state, order = plan_epoch(state, train, config)
    else:
        state, order = speedups.drawn.take(state, speedups)
    n_batches = math.ceil(order.numel() / config.batch_size)
    sums: ErrorSums = error_sums_init()
    own_errors: list[torch.Tensor] = []
    drawn_errors: list[torch.Tensor] = []

    def on_step(errors: torch.Tensor, drawn: torch.Tensor, forces: Any) -> None:
        nonlocal sums
        own_errors.append(errors.detach())
        drawn_errors.append(drawn)
        if forces is not None:
            sums = accumulate_errors(sums, errors.new_zeros(0), *forces)
        if on_batch is not None:
            with torch.inference_mode(False):  # (energy-only steps run in inference mode)
                on_batch(len(own_errors), n_batches)

    if speedups.table is not None:
        stepped = _energy_epoch(state, order, speedups, config, on_step)
    else:
        stepped = _batch_epoch(state, order, train, config, world, on_step, speedups.jacobian)
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
    test = test_metrics or {"rmse_energy": nan, "mae_energy": nan, "rmse_forces": nan}
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
    changes: dict[str, Any] = {"epoch": state.epoch + 1, "history": (*state.history, row)}
    if test_metrics is not None:
        monitor = _monitor(test_metrics, config.force_weight)
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
    splits share it (prepared here when not given)."""
    check_split(train, state.model.descriptor, "fit: training split")
    check_resumable(state, train, config)
    fingerprint = data_fingerprint(train, test, state.model.descriptor)
    check_same_data(state, fingerprint, config)
    state = attrs.evolve(state, data_fingerprint=fingerprint)
    check_labels(train, config.uses_forces, "fit: training")
    if test is not None:
        check_split(test, state.model.descriptor, "fit: test split")
        check_labels(test, config.uses_forces, "fit: test")
    world = current_world() if world is None else world
    if not world.is_main:
        callbacks, on_batch = (), None
    if speedups is None:
        speedups = prepare_speedups(state, train, test, config, world)

    def draw(left: int) -> list[DrawnEpoch]:  # from the state the loop has reached
        return draw_energy_epochs(state, train, config, speedups, left)

    ahead = draws_ahead(speedups, train, config)
    for drawn, start in epochs_drawn_ahead(config.epochs, draw if ahead else None):
        epoch_speedups = attrs.evolve(speedups, drawn=drawn)
        before = state
        state, train_metrics = run_epoch(state, train, config, on_batch, world, epoch_speedups)
        check_finite_epoch(before, state, train_metrics)
        test_metrics = (
            None
            if test is None
            else _split_metrics(
                state.model,
                test,
                config.uses_forces,
                EVALUATE_BATCH,
                world,
                speedups.test_jacobian,
            )
        )
        state = end_of_epoch(
            state, train_metrics, test_metrics, config, time.perf_counter() - start
        )
        for callback in callbacks:
            callback(state)
    return state
