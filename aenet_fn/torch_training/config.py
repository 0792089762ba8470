"""``TorchTrainingConfig`` and the training-method records of the ænet Python tools.

Same field names, defaults and validation as the reference (spec reference-api.md §1.1); each
config translates to the functional core's :class:`~aenet_fn.driver.state.TrainConfig` with
:meth:`TorchTrainingConfig.to_train_config`. Options that only make sense for the reference's data
loaders are accepted and validated; what aenet_fn does with each is documented on the field.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from aenet_fn.core.optim import AdamConfig, PlateauConfig, SGDConfig
from aenet_fn.driver.state import ROUTES, TrainConfig
from aenet_fn.torch_featurize.chebyshev import as_device


@dataclass
class TrainingMethod:
    """Base class of the training methods (``Adam``, ``SGD``)."""

    @property
    def method_name(self) -> str:
        """Name of the method (``"adam"``, ``"sgd"``)."""
        raise NotImplementedError("TrainingMethod is abstract: use Adam or SGD")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the fields the trainer reads itself: ``batchsize`` must be an integer >= 1
        (``ValueError`` naming it; an integral float such as ``8.0`` is stored as ``8``)."""
        if hasattr(self, "batchsize"):
            self.batchsize = _integer("batchsize", self.batchsize, minimum=1)

    def to_params_dict(self) -> dict[str, Any]:
        """The method's public fields as a dict."""
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


@dataclass
class Adam(TrainingMethod):
    """Adam with L2 weight decay (``torch.optim.Adam``); ``mu`` is the learning rate and
    ``batchsize`` the number of structures per batch."""

    mu: float = 0.001
    batchsize: int = 32
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8

    @property
    def method_name(self) -> str:
        """``"adam"``."""
        return "adam"

    def to_core(self) -> AdamConfig:
        """The functional core's optimiser configuration."""
        return AdamConfig(
            lr=self.mu,
            beta1=self.beta1,
            beta2=self.beta2,
            epsilon=self.epsilon,
            weight_decay=self.weight_decay,
        )


@dataclass
class SGD(TrainingMethod):
    """Stochastic gradient descent with momentum and L2 weight decay (``torch.optim.SGD``)."""

    lr: float = 0.01
    batchsize: int = 32
    momentum: float = 0.0
    weight_decay: float = 0.0

    @property
    def method_name(self) -> str:
        """``"sgd"``."""
        return "sgd"

    def to_core(self) -> SGDConfig:
        """The functional core's optimiser configuration."""
        return SGDConfig(lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


_BOOLEANS = (
    "force_scale_unbiased",
    "cache_features",
    "cache_neighbors",
    "cache_force_triplets",
    "cache_warmup",
    "save_energies",
    "save_forces",
    "timing",
    "normalize_features",
    "normalize_energy",
    "persistent_workers",
    "show_progress",
    "show_batch_progress",
    "save_best",
    "use_scheduler",
    "allow_other_data",
)
"""The options that must be ``True`` or ``False`` (a string such as ``"no"`` is refused)."""

_INTEGERS: dict[str, tuple[int | None, str | None]] = {
    "force_resample_num_epochs": (0, None),
    "force_min_structures_per_epoch": (0, "no lower bound"),
    "cache_feature_max_entries": (0, "unbounded"),
    "cache_neighbor_max_entries": (0, "unbounded"),
    "cache_force_triplet_max_entries": (0, "unbounded"),
    "num_workers": (0, None),
    "prefetch_factor": (1, None),
    "checkpoint_interval": (0, None),
    "max_checkpoints": (None, "keep every checkpoint"),
    "scheduler_patience": (0, None),
}
"""Integer options: their minimum (None: any) and, for those that may be None, what None
means."""

_CHOICES = {
    "sampling_policy": ("uniform", "energy_weighted", "error_weighted"),
    "force_sampling": ("random", "fixed"),
    "cache_scope": ("train", "val", "all"),
    "memory_mode": ("cpu", "gpu", "mixed"),
    "precision": ("auto", "float32", "float64"),
    "route": ROUTES,
}


@dataclass
class TorchTrainingConfig:
    """Training options (spec reference-api.md §1.1 lists all 48 with their semantics).

    Differences from the reference, on purpose: with ``num_workers = 0`` a split is featurized
    once and kept in memory (every runtime cache is then moot); with ``num_workers > 0`` it is
    read lazily and the runtime caches (``cache_*``, bounded per worker, ``cache_scope``) apply;
    ``precision`` selects the training dtype (the reference ignores it); ``save_forces`` and
    ``cache_persist_dir`` are accepted for compatibility (features and derivatives persist in
    HDF5 databases instead: ``HDF5StructureDataset.build_database(persist_features=True)``).

    Additions: ``stress_weight`` β weighs the stress RMSE (eV/Å³) of the structures with a
    stress label in ``(1 − α − β) RMSE_E + α RMSE_F + β RMSE_S`` (splits kept in memory).
    ``device`` None trains on CUDA when it is available and the splits are in
    memory (``num_workers = 0``; DataLoader workers prepare batches for the CPU only), else
    on the CPU; the trained potential then returns to its descriptor's device. ``route``: the
    training route of :class:`~aenet_fn.driver.state.TrainConfig` (``"auto"``, ``"func"`` or
    ``"fast"``). ``decoupled_weight_decay``: AdamW-style decay of the networks' weights (not
    their biases), ``p ← p − lr·λ·p`` per step, beside the method's ``weight_decay`` (the
    reference's L2 term on every gradient). ``memory_budget_gib``: the most memory (GiB) a
    split's stored derivative data may take. Force training on the CPU keeps a split's local
    derivatives in memory when they fit it (estimated from a sample of its structures), else
    recomputes them for each batch (memory bounded by the batch, the same numbers); the CPU's
    stored Jacobians are built within it too (``TrainConfig.jacobian_memory_gib``).
    ``allow_other_data``: let ``resume_from`` continue a checkpoint on other structures than
    it was trained on (refused
    by default).
    """

    iterations: int = 100
    method: TrainingMethod | None = None
    testpercent: float = 10
    seed: int | None = None
    split_seed: int | None = None
    force_weight: float = 0.0
    stress_weight: float = 0.0
    force_fraction: float = 1.0
    sampling_policy: str = "uniform"
    force_sampling: str = "random"
    force_resample_num_epochs: int = 0
    force_min_structures_per_epoch: int | None = 1
    force_scale_unbiased: bool = False
    cache_features: bool = False
    cache_feature_max_entries: int | None = 1024
    cache_neighbors: bool = False
    cache_neighbor_max_entries: int | None = 512
    cache_force_triplets: bool = False
    cache_force_triplet_max_entries: int | None = 256
    cache_persist_dir: str | None = None
    cache_scope: str = "all"
    cache_warmup: bool = False
    memory_mode: str = "gpu"
    max_energy: float | None = None
    max_forces: float | None = None
    save_energies: bool = False
    save_forces: bool = False
    timing: bool = False
    device: str | None = None
    precision: str = "auto"
    atomic_energies: dict[str, float] | None = None
    normalize_features: bool = True
    normalize_energy: bool = True
    num_workers: int = 0
    prefetch_factor: int = 2
    persistent_workers: bool = True
    route: str = "auto"
    decoupled_weight_decay: float = 0.0
    memory_budget_gib: float = 8.0
    allow_other_data: bool = False
    feature_stats: dict[str, Any] | None = None
    E_shift: float | None = None
    E_scaling: float | None = None
    show_progress: bool = True
    show_batch_progress: bool = False
    checkpoint_dir: str | None = "checkpoints"
    checkpoint_interval: int = 1
    max_checkpoints: int | None = None
    save_best: bool = True
    use_scheduler: bool = False
    scheduler_patience: int = 10
    scheduler_factor: float = 0.5
    scheduler_min_lr: float = 1e-6
    _alpha: float | None = field(default=None, repr=False)

    def __init__(self, **kwargs: Any) -> None:
        if "alpha" in kwargs:
            if "force_weight" in kwargs:
                raise ValueError("give force_weight or its alias alpha, not both")
            kwargs["force_weight"] = kwargs.pop("alpha")
        for old in ("force_resample_each_epoch", "epochs_per_force_window"):
            if old in kwargs:
                raise ValueError(
                    f"{old} was replaced by force_resample_num_epochs (0: draw once, N: redraw "
                    "every N epochs)"
                )
        names = {f.name for f in fields(self) if not f.name.startswith("_")}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"TorchTrainingConfig got unknown options {unknown}")
        for f in fields(self):
            if not f.name.startswith("_"):
                setattr(self, f.name, kwargs.get(f.name, f.default))
        self.validate()

    @property
    def alpha(self) -> float:
        """Alias of ``force_weight``."""
        return self.force_weight

    @property
    def batch_size(self) -> int:
        """Structures per batch, from the method."""
        return int(getattr(self.method, "batchsize", getattr(self.method, "batch_size", 32)))

    def validate(self) -> None:
        """Check every option; raises ``ValueError`` (``NotImplementedError`` for
        ``memory_mode='mixed'``) naming the option and the allowed values."""
        if self.method is None:
            self.method = Adam()
        if not isinstance(self.method, (Adam, SGD)):
            raise ValueError(f"method must be Adam(...) or SGD(...), got {self.method!r}")
        self.method.validate()
        for name in _BOOLEANS:
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{name} must be True or False, got {value!r}")
            setattr(self, name, bool(value))
        self.iterations = _integer("iterations", self.iterations, minimum=0)
        if not _is_number(self.memory_budget_gib) or not self.memory_budget_gib >= 0:
            raise ValueError(
                f"memory_budget_gib must be a number >= 0, got {self.memory_budget_gib!r}"
            )
        if not _is_number(self.testpercent) or not 0 <= self.testpercent <= 100:
            raise ValueError(f"testpercent must lie in [0, 100], got {self.testpercent!r}")
        for name in ("seed", "split_seed"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _integer(name, value))
        for name in ("force_weight", "stress_weight", "force_fraction"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 <= value <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.memory_mode == "mixed":
            raise NotImplementedError("memory_mode='mixed' is not implemented; use 'cpu' or 'gpu'")
        for name, (minimum, none_means) in _INTEGERS.items():
            value = getattr(self, name)
            if value is not None or none_means is None:
                setattr(self, name, _integer(name, value, minimum, none_means))
        if self.max_checkpoints is not None and self.max_checkpoints <= 0:
            self.max_checkpoints = None  # as the reference: None or <= 0 keeps every checkpoint
        for name in ("max_energy", "max_forces", "E_shift", "E_scaling"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or not math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number or None, got {value!r}")
        if self.E_scaling is not None and self.E_scaling <= 0:
            raise ValueError(f"E_scaling must be > 0, got {self.E_scaling!r}")
        if not 0 < self.scheduler_factor < 1:
            raise ValueError(f"scheduler_factor must lie in (0, 1), got {self.scheduler_factor!r}")
        if self.device is not None:
            device = as_device("device", self.device)
            if device.type != "cpu" and self.num_workers > 0:
                raise ValueError(
                    f"DataLoader workers (num_workers={self.num_workers}) prepare batches for "
                    f"the CPU only, not for device={self.device!r}: use num_workers=0 there"
                )
        if self.atomic_energies is not None:
            for symbol, value in dict(self.atomic_energies).items():
                if not _is_number(value) or not math.isfinite(value):
                    raise ValueError(
                        f"atomic_energies[{symbol!r}] must be a finite number, got {value!r}"
                    )

    def resolved_device(self) -> torch.device:
        """``device``, or CUDA when available and the splits are in memory (``num_workers``
        0), the CPU otherwise."""
        if self.device is None:
            cuda = torch.cuda.is_available() and self.num_workers == 0
            return torch.device("cuda" if cuda else "cpu")
        return torch.device(self.device)

    def runtime_cache_entries(self) -> int | None:
        """Entries of the per-process (per-worker) runtime cache of a split read lazily
        (``num_workers > 0``): ``cache_force_triplet_max_entries`` for force training with
        ``cache_force_triplets`` (an entry holds features, neighbour pairs, triplets and their
        derivatives, so it also serves ``cache_neighbors``), ``cache_feature_max_entries`` with
        ``cache_features``; 0 (nothing kept) otherwise. None: unbounded."""
        if self.force_weight > 0:
            return self.cache_force_triplet_max_entries if self.cache_force_triplets else 0
        return self.cache_feature_max_entries if self.cache_features else 0

    def to_train_config(self) -> TrainConfig:
        """The functional core's :class:`~aenet_fn.driver.state.TrainConfig` for these options."""
        self.validate()
        return TrainConfig(
            epochs=self.iterations,
            batch_size=self.batch_size,
            optimizer=self.method.to_core(),
            force_weight=float(self.force_weight),
            stress_weight=float(self.stress_weight),
            force_fraction=float(self.force_fraction),
            force_sampling=self.force_sampling,
            force_resample_num_epochs=self.force_resample_num_epochs,
            force_min_structures_per_epoch=self.force_min_structures_per_epoch,
            force_scale_unbiased=bool(self.force_scale_unbiased),
            sampling_policy=self.sampling_policy,
            use_scheduler=bool(self.use_scheduler),
            scheduler=PlateauConfig(
                factor=self.scheduler_factor,
                patience=self.scheduler_patience,
                min_lr=self.scheduler_min_lr,
            ),
            seed=0 if self.seed is None else int(self.seed),
            num_workers=int(self.num_workers),
            prefetch_factor=int(self.prefetch_factor),
            persistent_workers=bool(self.persistent_workers),
            route=self.route,
            decoupled_weight_decay=self.decoupled_weight_decay,
            jacobian_memory_gib=float(self.memory_budget_gib),
            allow_other_data=bool(self.allow_other_data),
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(
    name: str, value: Any, minimum: int | None = None, none_means: str | None = None
) -> int:
    """``value`` as an ``int`` (an integral float such as ``2.0`` included); ``ValueError``
    naming ``name`` for a bool, a non-integral value or one below ``minimum``. ``none_means``
    (what None stands for) is added to the message of an option that may be None."""
    alternative = "" if none_means is None else f", or None ({none_means})"
    integral = isinstance(value, (int, np.integer)) or (
        isinstance(value, (float, np.floating)) and float(value).is_integer()
    )
    if isinstance(value, (bool, np.bool_)) or not integral:
        raise ValueError(f"{name} must be an integer{alternative}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}{alternative}, got {value!r}")
    return int(value)
