"""Splits, structure sampling and force sub-sampling as pure functions (spec §10).

Every random function takes an explicit ``torch.Generator``; nothing touches global random state.
The train/test split uses its own generator (seeded by ``split_seed``), the run another (``seed``).

* ``uniform``: a random permutation per epoch.
* ``energy_weighted``: ``N`` draws with replacement, ``w_i = 1 / (1 + Δ_i / max Δ)`` with
  ``Δ_i = e_i − min e`` (``e``: referenced energy per atom), all ones if ``max Δ = 0``.
* ``error_weighted``: ``N`` draws with replacement, weights from per-structure error scores
  (start 1.0; after an epoch each drawn structure's score becomes the mean of its
  ``|E_pred − E_ref| / N`` over its draws; undrawn keep theirs; non-finite/negative → 0,
  clamp ≥ 1e-12, unit mean; all zero → uniform).
* Force sub-sampling: ``n = int(n_total · force_fraction)``, at least
  ``force_min_structures_per_epoch``, at most the candidates; re-drawn for ``random`` sampling
  every ``force_resample_num_epochs`` epochs.
"""

from __future__ import annotations

import attrs
import torch

from aenet_fn.core.records import host_field, pytree_record, static_field

POLICIES = ("uniform", "energy_weighted", "error_weighted")


def split_indices(
    n: int, test_fraction: float, *, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, test)`` index tensors, each sorted: a random permutation of ``range(n)`` whose
    first ``floor(n · test_fraction)`` entries are the test split."""
    if n < 0:
        raise ValueError(f"split_indices: n must be >= 0, got {n}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"split_indices: test fraction must lie in [0, 1), got {test_fraction}")
    order = torch.randperm(n, generator=generator, device=generator.device)
    n_test = int(n * test_fraction)
    return order[n_test:].sort().values, order[:n_test].sort().values


def energy_weights(energy_per_atom: torch.Tensor) -> torch.Tensor:
    """``[n]`` energy-weighted sampling weights in [0.5, 1] (1 for the lowest energy)."""
    if not bool(torch.isfinite(energy_per_atom).all()):
        raise ValueError("energy_weights: energies per atom must be finite")
    delta = energy_per_atom - energy_per_atom.min()
    top = delta.max()
    if float(top) == 0.0:
        return torch.ones_like(energy_per_atom)
    return 1.0 / (1.0 + delta / top)


def error_weights(scores: torch.Tensor) -> torch.Tensor:
    """``[n]`` unit-mean weights from error scores (non-finite or negative → 0; all zero →
    uniform)."""
    weights = torch.where(torch.isfinite(scores) & (scores >= 0), scores, 0.0)
    if not bool((weights > 0).any()):
        return torch.ones_like(scores)
    weights = weights.clamp_min(1e-12)
    return weights / weights.mean()


def weighted_draw(
    weights: torch.Tensor, n_draws: int, *, generator: torch.Generator
) -> torch.Tensor:
    """``[n_draws]`` indices drawn with replacement with probability ∝ ``weights``, on the
    generator's device (the weights are copied there: once per epoch)."""
    weights = weights.double().to(generator.device)
    return torch.multinomial(weights, n_draws, replacement=True, generator=generator)


def error_scores_update(
    scores: torch.Tensor, drawn: torch.Tensor, abs_error_per_atom: torch.Tensor
) -> torch.Tensor:
    """New ``[n]`` scores: each structure drawn this epoch gets the mean of its draws'
    ``|E_pred − E_ref| / N`` (``abs_error_per_atom`` aligned with ``drawn``); the rest keep
    their score."""
    errors = abs_error_per_atom.detach().to(scores.dtype)
    total = torch.zeros_like(scores).index_add(0, drawn, errors)
    count = torch.zeros_like(scores).index_add(0, drawn, torch.ones_like(errors))
    return torch.where(count > 0, total / count.clamp_min(1), scores)


def force_subset_size(
    n_candidates: int, n_total: int, force_fraction: float, min_structures: int | None
) -> int:
    """Number of force-supervised structures (spec §10.4)."""
    if force_fraction >= 1.0:
        return n_candidates
    size = int(n_total * force_fraction)
    if min_structures is not None:
        size = max(size, min_structures)
    return min(size, n_candidates)


def force_subset(
    candidates: torch.Tensor, size: int, *, generator: torch.Generator
) -> torch.Tensor:
    """``size`` of ``candidates`` drawn without replacement, sorted (drawn on the
    generator's device, then moved to the candidates')."""
    if size >= candidates.numel():
        return candidates.sort().values
    n = candidates.numel()
    picked = torch.randperm(n, generator=generator, device=generator.device)[:size]
    picked = picked.to(candidates.device)
    return candidates[picked].sort().values


def force_resample_due(epoch: int, start_epoch: int, force_sampling: str, every: int) -> bool:
    """True when the ``random`` force subset is re-drawn at ``epoch``."""
    return force_sampling == "random" and every > 0 and (epoch - start_epoch) % every == 0


def energy_filter_mask(energy_per_atom: torch.Tensor, max_energy: float | None) -> torch.Tensor:
    """``[n]`` bool: structures whose referenced energy per atom is ``<= max_energy``."""
    if max_energy is None:
        return torch.ones_like(energy_per_atom, dtype=torch.bool)
    return energy_per_atom <= max_energy


def force_filter_mask(max_abs_force: torch.Tensor, max_forces: float | None) -> torch.Tensor:
    """``[n]`` bool: structures whose largest force component is ``<= max_forces`` (NaN, i.e.
    no forces, is kept)."""
    if max_forces is None:
        return torch.ones_like(max_abs_force, dtype=torch.bool)
    return torch.isnan(max_abs_force) | (max_abs_force <= max_forces)


@pytree_record
@attrs.frozen(eq=False)
class SamplerState:
    """Sampling state of a training split of ``n`` structures.

    Attributes:
        scores: ``[n]`` error scores (used by ``error_weighted``; start at 1.0), on the
            training data's device.
        force_subset: ``[n]`` bool, structures whose forces are supervised; on the host,
            where batches are laid out, whatever the data's device.
        policy: ``uniform``, ``energy_weighted`` or ``error_weighted``.
    """

    scores: torch.Tensor
    force_subset: torch.Tensor = host_field()  # noqa: RUF009 (an attrs field)
    policy: str = static_field()


def sampler_init(policy: str, n: int, device: torch.device | str | None = None) -> SamplerState:
    """Initial state: scores 1.0 on ``device`` (the training data's; None: torch's default
    device), no force subset (on the host)."""
    if policy not in POLICIES:
        raise ValueError(f"sampling policy {policy!r} is not one of {POLICIES}")
    return SamplerState(
        scores=torch.ones(n, dtype=torch.float64, device=device),
        force_subset=torch.zeros(n, dtype=torch.bool, device="cpu"),
        policy=policy,
    )


def epoch_order(
    state: SamplerState, energy_per_atom: torch.Tensor | None, *, generator: torch.Generator
) -> torch.Tensor:
    """Indices of the structures visited in one epoch, ``[n]``: a permutation (``uniform``) or
    ``n`` weighted draws with replacement. ``energy_per_atom`` ``[n]`` (referenced, eV/atom) is
    used (and needed) by ``energy_weighted`` only. The order lies on the generator's device
    (the host, where the driver lays out batches)."""
    n = state.scores.numel()
    if state.policy == "uniform":
        return torch.randperm(n, generator=generator, device=generator.device)
    if state.policy == "energy_weighted":
        if energy_per_atom is None:
            raise ValueError("energy_weighted sampling needs the energies per atom")
        return weighted_draw(energy_weights(energy_per_atom), n, generator=generator)
    return weighted_draw(error_weights(state.scores), n, generator=generator)
