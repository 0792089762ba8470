"""Feature and energy normalisation (spec §4.1–§4.3), fitted by a pure function.

* Features: ``Ĝ = (G − μ_s) / max(σ_s, 1e-12)`` with statistics per species ``s`` (the Fortran
  files carry one set per species). :func:`fit_normalization` fits one pooled z-score over all
  atoms of the training split (all species together, as the reference does) and gives every
  species that same row: ``σ = sqrt(max(E[G²] − μ², 0) + 1e-12)``.
* Energies: per-atom *referenced* energies ``e = (E − Σ_a E_atom(a)) / N`` of the training
  structures give ``E_scaling = 2 / (e_max − e_min)`` and ``E_shift = (e_max + e_min) / 2``
  (eV/atom); a degenerate range gives scaling 1 and shift 0.
* A network output ``y_a`` becomes the atomic energy ``y_a / E_scaling + E_shift + E_atom(a)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import attrs
import torch

from aenet_fn.core.checks import is_real
from aenet_fn.core.records import pytree_record

STD_FLOOR = 1e-12

ENERGY_DTYPE = torch.float64
"""The dtype of every energy: reference energies, shift, scaling and per-structure sums stay
float64 whatever the features' and networks' dtype (float32 networks give float64 energies)."""


def as_energy(value: object) -> torch.Tensor:
    """``value`` as an energy tensor (:data:`ENERGY_DTYPE`, on its device)."""
    tensor = torch.as_tensor(value)
    return tensor if tensor.dtype == ENERGY_DTYPE else tensor.to(ENERGY_DTYPE)


@pytree_record
@attrs.frozen(eq=False)
class Normalization:
    """Normalisation constants of a model.

    Attributes:
        feature_mean: ``[M, F]`` mean of each feature, one row per species.
        feature_std: ``[M, F]`` standard deviation (``inf`` switches a feature off).
        feature_min, feature_max: ``[M, F]`` exact extrema (for export).
        energy_shift: ``[]`` E_shift (eV/atom).
        energy_scaling: ``[]`` E_scaling (1/(eV/atom)).
        atomic_energies: ``[M]`` reference energy of each species (eV), descriptor order.

    The feature statistics have the features' dtype; the three energy fields are always
    float64 (:data:`ENERGY_DTYPE`; converted at construction).
    """

    feature_mean: torch.Tensor
    feature_std: torch.Tensor
    feature_min: torch.Tensor
    feature_max: torch.Tensor
    energy_shift: torch.Tensor = attrs.field(converter=as_energy)
    energy_scaling: torch.Tensor = attrs.field(converter=as_energy)
    atomic_energies: torch.Tensor = attrs.field(converter=as_energy)

    def normalize_features(
        self, features: torch.Tensor, species_index: torch.Tensor
    ) -> torch.Tensor:
        """``(G − μ_s) / max(σ_s, 1e-12)`` for ``features`` ``[N, F]`` of atoms of species
        ``species_index`` ``[N]``."""
        mean = self.feature_mean[species_index]
        return (features - mean) / self.feature_std.clamp_min(STD_FLOOR)[species_index]


def check_reference_keys(
    atomic_energies: Mapping[str, float], species: Sequence[str], what: str = "atomic energies"
) -> None:
    """Raise ``ValueError`` when ``atomic_energies`` names a symbol that is not one of
    ``species`` (a misspelt key would otherwise leave its species at 0 eV), with a hint where
    only the letter case differs; ``what`` names the mapping in the message."""
    unknown = sorted((str(key) for key in atomic_energies if key not in species), key=str)
    if unknown:
        hints = [
            f"{symbol!r} instead of {key!r}"
            for key in unknown
            for symbol in species
            if key.lower() == symbol.lower()
        ]
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        raise ValueError(
            f"{what} names {unknown}, which are not species of the descriptor {list(species)}{hint}"
        )


def reference_energy_vector(
    species: Sequence[str],
    atomic_energies: Mapping[str, float] | None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``[M]`` atomic reference energies (eV, :data:`ENERGY_DTYPE`, on ``device``) in
    ``species`` order; missing species get 0.
    Keys that are not ``species`` are refused (:func:`check_reference_keys`)."""
    atomic_energies = dict(atomic_energies or {})
    check_reference_keys(atomic_energies, species)
    for symbol, value in atomic_energies.items():
        if not (is_real(value) and math.isfinite(value)):
            raise ValueError(f"atomic energy of {symbol!r} must be a finite number, got {value!r}")
    values = [float(atomic_energies.get(s, 0.0)) for s in species]
    return torch.tensor(values, dtype=ENERGY_DTYPE, device=device)


def identity_normalization(
    n_features: int, atomic_energies: torch.Tensor, dtype: torch.dtype
) -> Normalization:
    """Normalisation that changes nothing (zero mean, unit std, scaling 1, shift 0) for the
    ``M = len(atomic_energies)`` species, with feature statistics in ``dtype``."""
    device = atomic_energies.device
    zeros = torch.zeros(atomic_energies.shape[0], n_features, dtype=dtype, device=device)
    return Normalization(
        feature_mean=zeros,
        feature_std=torch.ones_like(zeros),
        feature_min=zeros - 1,
        feature_max=zeros + 1,
        energy_shift=torch.zeros((), dtype=dtype, device=device),
        energy_scaling=torch.ones((), dtype=dtype, device=device),
        atomic_energies=atomic_energies,
    )


def referenced_energy_per_atom(
    energies: torch.Tensor, species_counts: torch.Tensor, atomic_energies: torch.Tensor
) -> torch.Tensor:
    """``[B]`` per-atom referenced energies ``(E − Σ_a E_atom(a)) / N`` (eV/atom), from total
    energies ``[B]`` (eV) and per-structure species counts ``[B, M]``."""
    energies, atomic_energies = as_energy(energies), as_energy(atomic_energies)
    counts = species_counts.to(ENERGY_DTYPE)
    return (energies - counts @ atomic_energies) / counts.sum(dim=1)


@attrs.frozen(eq=False)
class FeatureMoments:
    """Pooled moments of features over atoms, mergeable chunk by chunk (so statistics of a
    training set larger than memory can be gathered in one pass).

    Attributes:
        count: number of atoms.
        total, total_squares: ``[F]`` sums of ``G`` and ``G²``.
        minimum, maximum: ``[F]`` extrema.
    """

    count: int
    total: torch.Tensor
    total_squares: torch.Tensor
    minimum: torch.Tensor
    maximum: torch.Tensor

    @classmethod
    def of(cls, features: torch.Tensor) -> FeatureMoments:
        """Moments of ``features`` ``[N > 0, F]``."""
        if features.ndim != 2 or features.shape[0] == 0:
            raise ValueError(f"feature moments need features [N>0, F], got {tuple(features.shape)}")
        return cls(
            count=features.shape[0],
            total=features.sum(dim=0),
            total_squares=(features * features).sum(dim=0),
            minimum=features.min(dim=0).values,
            maximum=features.max(dim=0).values,
        )

    def merge(self, other: FeatureMoments) -> FeatureMoments:
        """Moments of both sets of atoms together."""
        return FeatureMoments(
            count=self.count + other.count,
            total=self.total + other.total,
            total_squares=self.total_squares + other.total_squares,
            minimum=torch.minimum(self.minimum, other.minimum),
            maximum=torch.maximum(self.maximum, other.maximum),
        )


def fit_normalization(
    features: torch.Tensor | FeatureMoments,
    energies: torch.Tensor,
    species_counts: torch.Tensor,
    atomic_energies: torch.Tensor,
    *,
    normalize_features: bool = True,
    normalize_energy: bool = True,
    feature_stats: Mapping[str, Sequence[float] | torch.Tensor] | None = None,
    energy_shift: float | None = None,
    energy_scaling: float | None = None,
) -> Normalization:
    """Normalisation constants from the training split.

    Args:
        features: ``[N_train, F]`` raw features of every training atom, or their
            :class:`FeatureMoments` (gathered chunk by chunk for large sets).
        energies: ``[B]`` total energies (eV) of the training structures.
        species_counts: ``[B, M]`` atoms of each species per structure.
        atomic_energies: ``[M]`` reference energies (eV).
        normalize_features / normalize_energy: switch either part off (identity).
        feature_stats: user override ``{"mean": [F], "std": [F]}`` (optionally ``min``/``max``).
        energy_shift / energy_scaling: user override, honoured only when both are given.
    """
    if isinstance(features, torch.Tensor):
        if features.ndim != 2 or features.shape[0] == 0:
            raise ValueError(
                f"fit_normalization: need features [N>0, F], got {tuple(features.shape)}"
            )
        moments = None
    else:
        moments = features
    if energies.numel() == 0:
        raise ValueError("fit_normalization: no training structures")
    if not torch.isfinite(energies).all():
        raise ValueError("fit_normalization: training energies must be finite")
    dtype = features.dtype if moments is None else moments.total.dtype
    n_features = features.shape[1] if moments is None else moments.total.shape[0]
    device = atomic_energies.device
    result = identity_normalization(n_features, atomic_energies, dtype)
    n_species = result.atomic_energies.shape[0]

    def per_species(row: torch.Tensor) -> torch.Tensor:
        return row.expand(n_species, -1).clone()

    if moments is None:
        stats = {
            "feature_min": features.min(dim=0).values,
            "feature_max": features.max(dim=0).values,
        }
    else:
        stats = {"feature_min": moments.minimum, "feature_max": moments.maximum}
    if feature_stats is not None:
        stats.update(_feature_override(feature_stats, n_features, dtype, device))
    elif normalize_features:
        if moments is None:
            mean, mean_square = features.mean(dim=0), (features * features).mean(dim=0)
        else:
            mean = moments.total / moments.count
            mean_square = moments.total_squares / moments.count
        variance = (mean_square - mean * mean).clamp_min(0.0)
        stats.update(feature_mean=mean, feature_std=torch.sqrt(variance + 1e-12))
    result = attrs.evolve(result, **{k: per_species(v) for k, v in stats.items()})
    if energy_shift is not None and energy_scaling is not None:
        if not math.isfinite(energy_shift):
            raise ValueError(f"energy shift must be finite, got {energy_shift}")
        if not (math.isfinite(energy_scaling) and energy_scaling > 0):
            raise ValueError(f"energy scaling must be finite and > 0, got {energy_scaling}")
        shift, scaling = float(energy_shift), float(energy_scaling)
    elif normalize_energy:
        per_atom = referenced_energy_per_atom(energies, species_counts, result.atomic_energies)
        low, high = float(per_atom.min()), float(per_atom.max())
        shift, scaling = ((high + low) / 2, 2 / (high - low)) if high > low else (0.0, 1.0)
    else:
        shift, scaling = 0.0, 1.0
    return attrs.evolve(
        result,
        energy_shift=torch.tensor(shift, dtype=ENERGY_DTYPE, device=device),
        energy_scaling=torch.tensor(scaling, dtype=ENERGY_DTYPE, device=device),
    )


def _feature_override(
    stats: Mapping, n_features: int, dtype: torch.dtype, device: torch.device
) -> dict:
    unknown = set(stats) - {"mean", "std", "min", "max"}
    if unknown or not {"mean", "std"} <= set(stats):
        raise ValueError(
            "feature_stats must give 'mean' and 'std' (and optionally 'min', 'max'); "
            f"got keys {sorted(stats)}"
        )
    values = {}
    for key, value in stats.items():
        tensor = torch.as_tensor(value, dtype=dtype, device=device).flatten()
        if tensor.shape != (n_features,) or not torch.isfinite(tensor).all():
            raise ValueError(
                f"feature_stats[{key!r}] must be {n_features} finite numbers, got shape "
                f"{tuple(tensor.shape)}"
            )
        values[f"feature_{key}"] = tensor
    if (values["feature_std"] <= 0).any():
        raise ValueError("feature_stats['std'] must be positive")
    return values
