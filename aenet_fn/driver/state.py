"""The training state and its configuration: :class:`TrainConfig`, :class:`TrainState`, the
first model of a run (:func:`init_model`), and each epoch's draw from the state's generator
(:func:`plan_epoch`), so that a resumed run draws what the uninterrupted one would have."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

import attrs
import torch

from aenet_fn.core.checks import is_integer, is_real
from aenet_fn.core.descriptor import ChebyshevParams
from aenet_fn.core.network import Architecture, NetworkParams, init_network, weight_mask
from aenet_fn.core.normalization import (
    fit_normalization,
    reference_energy_vector,
    referenced_energy_per_atom,
)
from aenet_fn.core.optim import (
    AdamConfig,
    AdamState,
    Optimizer,
    PlateauConfig,
    PlateauState,
    SGDConfig,
    SGDState,
    adam,
    decoupled_weight_decay,
    plateau_init,
    sgd,
)
from aenet_fn.core.potential import (
    Model,
)
from aenet_fn.core.records import host_field, on_cpu, pytree_record, serializable, static_field
from aenet_fn.core.sampling import (
    POLICIES as SAMPLING_POLICIES,
)
from aenet_fn.core.sampling import (
    SamplerState,
    epoch_order,
    force_resample_due,
    force_subset,
    force_subset_size,
    sampler_init,
)
from aenet_fn.driver.loader import (
    Split,
    check_split,
    normalization_features,
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
        optimizer: :class:`~aenet_fn.core.optim.AdamConfig` or
            :class:`~aenet_fn.core.optim.SGDConfig`.
        decoupled_weight_decay: AdamW-style decay of the networks' weights (not their biases)
            chained onto the optimiser (:func:`~aenet_fn.core.optim.decoupled_weight_decay`),
            ``p ← p − lr·λ·p`` per step (>= 0; 0: none). The optimiser's own
            ``weight_decay`` is the reference's L2 term added to every gradient.
        force_weight: α in ``(1 − α − β) RMSE_E + α RMSE_F + β RMSE_S``, in [0, 1].
        stress_weight: β, the weight of the stress RMSE (eV/Å³) over the structures with a
            stress label, in [0, 1] with α + β <= 1; it needs splits featurized
            ``with_stress`` (in memory).
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
            numbers to round-off. ``"auto"``: ``"fast"`` on the CPU, ``"func"`` elsewhere;
            force training builds stored Jacobians only for runs of at least
            ``JACOBIAN_MIN_EPOCHS`` epochs (their one-time set-up would not pay in shorter).
        jacobian_memory_gib: the most memory (GiB) the fast route may spend on a split's
            stored Jacobian (an upper bound is checked before it is built); a split that
            could need more trains its forces on the ``torch.func`` route.
        allow_other_data: let :func:`fit` continue a state on other structures than those it
            was trained on (refused by default: see :func:`data_fingerprint`).
    """

    epochs: int = 100
    batch_size: int = 32
    optimizer: AdamConfig | SGDConfig = attrs.field(factory=AdamConfig)
    decoupled_weight_decay: float = 0.0
    force_weight: float = 0.0
    stress_weight: float = 0.0
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
        _check_fraction("stress_weight", self.stress_weight)
        _check(
            self.force_weight + self.stress_weight <= 1,
            f"force_weight + stress_weight must be <= 1, got {self.force_weight} + "
            f"{self.stress_weight}",
        )
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
        _check(
            is_real(self.decoupled_weight_decay) and self.decoupled_weight_decay >= 0,
            f"decoupled_weight_decay must be a number >= 0, got {self.decoupled_weight_decay!r}",
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

    @property
    def uses_stress(self) -> bool:
        """True when stresses enter the loss."""
        return self.stress_weight > 0


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
    :func:`~aenet_fn.core.normalization.fit_normalization`), in the split's dtype and on its
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


def optimizer_of(config: TrainConfig, network: NetworkParams) -> Optimizer:
    """The :class:`~aenet_fn.core.optim.Optimizer` of ``config`` for ``network``'s values,
    chained with the decoupled decay of its weights where ``config`` asks for it."""
    optimizer = (
        adam(config.optimizer)
        if isinstance(config.optimizer, AdamConfig)
        else sgd(config.optimizer)
    )
    if config.decoupled_weight_decay == 0:
        return optimizer
    mask = weight_mask(network)
    return decoupled_weight_decay(optimizer, config.decoupled_weight_decay, mask)


def check_labels(data: Split, with_forces: bool, caller: str, with_stress: bool = False) -> None:
    """Refuse a split with structures that lack an energy, or, ``with_forces``, one in which
    no structure has forces, or, ``with_stress``, one without stress data (featurized
    ``with_stress``, in memory) or without any stress label (``caller`` names the split in
    the message)."""
    missing = torch.nonzero(~torch.isfinite(data.energies)).flatten().tolist()
    if missing:
        names = [data.names[i] or f"#{i}" for i in missing[:5]]
        raise ValueError(f"{caller} structures without an energy: {names}")
    if with_forces and not bool(data.has_forces.any()):
        raise ValueError(
            f"{caller} forces are weighted (force_weight > 0) but no structure has forces"
        )
    if with_stress:
        strain = getattr(data, "strain", None)
        if strain is None:
            raise ValueError(
                f"{caller} stresses are weighted (stress_weight > 0) but the split carries no "
                "stress data: featurize it in memory with with_stress=True"
            )
        if not bool(strain.known.any()):
            raise ValueError(
                f"{caller} stresses are weighted (stress_weight > 0) but no structure has a stress"
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
        strain = getattr(split, "strain", None)
        if strain is not None and bool(strain.known.any()):  # (runs without stresses: as before)
            digest.update(strain.stresses.detach().cpu().contiguous().numpy().tobytes())
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
    check_labels(train, config.uses_forces, "init_train_state: training", config.uses_stress)
    generator = torch.Generator().manual_seed(config.seed)
    sampler = sampler_init(config.sampling_policy, train.n_structures, device=train.device)
    sampler = _draw_force_subset(sampler, train, config, generator)
    lr = config.optimizer.lr
    return TrainState(
        model=model,
        opt_state=optimizer_of(config, model.network).init(model.network.values),
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
