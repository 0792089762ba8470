"""Training losses and exactly accumulated error metrics (spec §4.5, §4.6).

Per batch: ``RMSE_E = sqrt(mean_s ((E_pred,s − E_ref,s) / N_s)²)`` (eV/atom),
``RMSE_F = sqrt(mean over the Cartesian components of force-supervised atoms of (ΔF)²)``
(eV/Å), ``RMSE_S = sqrt(mean over the nine components of the stress-supervised structures of
(Δσ)²)`` (eV/Å³) and ``L = (1 − α − β) RMSE_E + α RMSE_F + β RMSE_S`` with ``α = force_weight``
and ``β = stress_weight`` (a term is dropped for a batch without supervised forces or stresses).

Epoch metrics are *global* over a split: :class:`ErrorSums` accumulates sums of squared and
absolute errors and their counts, so that the reported RMSE is the RMSE over every structure
(or force component) of the split, independent of the batch size. (The reference averages
per-batch RMSEs instead; see docs/differences.md.)
"""

from __future__ import annotations

import math

import attrs
import torch

from aenet_fn.core.records import pytree_record


def _safe_sqrt(value: torch.Tensor) -> torch.Tensor:
    """``sqrt`` whose gradient stays finite at 0."""
    return torch.sqrt(value.clamp_min(torch.finfo(value.dtype).tiny))


def energy_error_per_atom(
    predicted: torch.Tensor, reference: torch.Tensor, n_atoms: torch.Tensor
) -> torch.Tensor:
    """``[B]`` signed energy errors per atom ``(E_pred − E_ref) / N`` (eV/atom)."""
    return (predicted - reference) / n_atoms.to(predicted.dtype)


def energy_rmse(
    predicted: torch.Tensor, reference: torch.Tensor, n_atoms: torch.Tensor
) -> torch.Tensor:
    """Per-atom energy RMSE over the structures given (eV/atom)."""
    error = energy_error_per_atom(predicted, reference, n_atoms)
    return _safe_sqrt((error * error).mean())


def masked_force_differences(
    predicted: torch.Tensor, reference: torch.Tensor, supervised: torch.Tensor
) -> torch.Tensor:
    """``[n, 3]`` force differences (eV/Å) of the ``supervised`` ``[n]`` atoms, 0 elsewhere (no
    boolean indexing, so it works under ``vmap``; NaN labels of other atoms are ignored)."""
    return torch.where(supervised[..., None], predicted - reference, 0.0)


def force_rmse(differences: torch.Tensor, supervised: torch.Tensor) -> torch.Tensor:
    """RMSE over the Cartesian components of the ``supervised`` atoms (eV/Å), from the masked
    differences of :func:`masked_force_differences`."""
    n_components = 3 * supervised.sum().clamp_min(1)
    return _safe_sqrt((differences * differences).sum() / n_components)


def force_unbiased_factor(n_supervised: torch.Tensor, n_labelled: torch.Tensor) -> torch.Tensor:
    """``1/√f`` with ``f = n_supervised / n_labelled`` when ``0 < f < 1``, else 1: rescales the
    force RMSE of a sub-sampled batch (``force_scale_unbiased``)."""
    fraction = n_supervised / n_labelled.clamp_min(1)
    inside = (fraction > 0) & (fraction < 1)
    return torch.where(inside, torch.rsqrt(fraction.clamp_min(1e-30)), 1.0)


def combined_loss(
    rmse_energy: torch.Tensor,
    rmse_forces: torch.Tensor,
    has_forces: torch.Tensor,
    force_weight: float,
    rmse_stress: torch.Tensor | None = None,
    has_stress: torch.Tensor | None = None,
    stress_weight: float = 0.0,
) -> torch.Tensor:
    """``(1 − α − β) RMSE_E + α RMSE_F + β RMSE_S``; the force (stress) term is 0 where
    ``has_forces`` (``has_stress``) is False or not given."""
    force_term = torch.where(has_forces, force_weight * rmse_forces, 0.0)
    loss = (1.0 - force_weight - stress_weight) * rmse_energy + force_term
    if rmse_stress is None:
        return loss
    return loss + torch.where(has_stress, stress_weight * rmse_stress, 0.0)


def loss_from_sums(
    energy_squared: torch.Tensor,
    n_energies: torch.Tensor | float,
    force_squared: torch.Tensor,
    n_supervised: torch.Tensor,
    n_labelled: torch.Tensor,
    force_weight: float,
    unbiased: bool,
    stress_squared: torch.Tensor | None = None,
    n_stresses: torch.Tensor | None = None,
    stress_weight: float = 0.0,
) -> torch.Tensor:
    """The training loss ``(1 − α − β) RMSE_E + α RMSE_F + β RMSE_S`` of a batch from its
    sums: Σ (ΔE/N)² over ``n_energies`` structures, Σ ΔF² over the components of
    ``n_supervised`` supervised atoms (``n_labelled`` atoms of the batch carry labels; used by
    ``unbiased``, see :func:`force_unbiased_factor`) and Σ Δσ² over the nine components of
    ``n_stresses`` stress-supervised structures (none where not given). Sums rather than
    residuals, so that processes holding parts of one batch can add theirs (data-parallel
    training)."""
    rmse_energy = _safe_sqrt(energy_squared / n_energies)
    rmse_forces = _safe_sqrt(force_squared / (3 * n_supervised.clamp_min(1)))
    if unbiased:
        rmse_forces = rmse_forces * force_unbiased_factor(n_supervised, n_labelled)
    if stress_squared is None:
        return combined_loss(rmse_energy, rmse_forces, n_supervised > 0, force_weight)
    rmse_stress = _safe_sqrt(stress_squared / (9 * n_stresses.clamp_min(1)))
    return combined_loss(
        rmse_energy,
        rmse_forces,
        n_supervised > 0,
        force_weight,
        rmse_stress,
        n_stresses > 0,
        stress_weight,
    )


@pytree_record
@attrs.frozen(eq=False)
class Residuals:
    """A batch's residuals, prediction − label.

    Attributes:
        energy: ``[b]`` per-atom energy errors (eV/atom).
        forces: ``[n, 3]`` force differences (eV/Å) of the atoms whose forces the batch
            supervises, 0 elsewhere.
        stress: ``[b, 3, 3]`` stress differences (eV/Å³) of the structures whose stress the
            batch supervises, 0 elsewhere.

    Leading member axes (committees) carry through every field.
    """

    energy: torch.Tensor
    forces: torch.Tensor
    stress: torch.Tensor


@pytree_record
@attrs.frozen(eq=False)
class ErrorSums:
    """Running sums for exact split metrics (all 0-d tensors, float64).

    Attributes:
        energy_squared: Σ over structures of (ΔE/N)² (eV²/atom²).
        energy_absolute: Σ over structures of |ΔE/N| (eV/atom).
        n_energies: number of structures summed.
        force_squared: Σ over supervised force components of (ΔF)² (eV²/Å²).
        n_force_components: number of force components summed.
        stress_squared: Σ over the nine components of supervised stresses of (Δσ)² (eV²/Å⁶).
        n_stress_components: number of stress components summed.
    """

    energy_squared: torch.Tensor
    energy_absolute: torch.Tensor
    n_energies: torch.Tensor
    force_squared: torch.Tensor
    n_force_components: torch.Tensor
    stress_squared: torch.Tensor = attrs.field(factory=lambda: torch.zeros((), dtype=torch.float64))
    n_stress_components: torch.Tensor = attrs.field(
        factory=lambda: torch.zeros((), dtype=torch.float64)
    )


def error_sums_init(device: torch.device | str | None = None) -> ErrorSums:
    """Empty sums."""
    zero = torch.zeros((), dtype=torch.float64, device=device)
    return ErrorSums(zero, zero, zero, zero, zero, zero, zero)


def accumulate_errors(
    sums: ErrorSums,
    energy_errors: torch.Tensor,
    force_differences: torch.Tensor | None = None,
    supervised: torch.Tensor | None = None,
    stress_differences: torch.Tensor | None = None,
    stress_supervised: torch.Tensor | None = None,
) -> ErrorSums:
    """Add per-atom energy errors ``[b]`` (eV/atom), the masked force differences ``[n, 3]``
    (eV/Å) of the ``supervised`` ``[n]`` atoms and the masked stress differences
    ``[b, 3, 3]`` (eV/Å³) of the ``stress_supervised`` ``[b]`` structures (none where not
    given)."""
    changes = {}
    if energy_errors.numel():  # (empty parts change nothing: skipped)
        e = energy_errors.detach().to(torch.float64)
        changes.update(
            energy_squared=sums.energy_squared + torch.dot(e, e),
            energy_absolute=sums.energy_absolute + torch.linalg.vector_norm(e, 1),
            n_energies=sums.n_energies + e.numel(),
        )
    if supervised is not None and supervised.numel():
        f = force_differences.detach().to(torch.float64)
        changes.update(
            force_squared=sums.force_squared + (f * f).sum(),
            n_force_components=sums.n_force_components + 3 * supervised.sum(),
        )
    if stress_supervised is not None and stress_supervised.numel():
        s = stress_differences.detach().to(torch.float64)
        changes.update(
            stress_squared=sums.stress_squared + (s * s).sum(),
            n_stress_components=sums.n_stress_components + 9 * stress_supervised.sum(),
        )
    return attrs.evolve(sums, **changes)


def metrics_from_sums(sums: ErrorSums) -> dict[str, float]:
    """``{"rmse_energy", "mae_energy", "rmse_forces"}`` (NaN where nothing was summed), and
    ``"rmse_stress"`` where stresses were."""
    n_e, n_f = float(sums.n_energies), float(sums.n_force_components)
    n_s = float(sums.n_stress_components)
    nan = float("nan")
    return {
        "rmse_energy": math.sqrt(float(sums.energy_squared) / n_e) if n_e else nan,
        "mae_energy": float(sums.energy_absolute) / n_e if n_e else nan,
        "rmse_forces": math.sqrt(float(sums.force_squared) / n_f) if n_f else nan,
        **({"rmse_stress": math.sqrt(float(sums.stress_squared) / n_s)} if n_s else {}),
    }
