"""Forces and stress as derivatives of an energy function, with ``torch.func``.

Forces are ``F = -∂E/∂r`` and the stress is ``σ = (1/V) ∂E/∂ε`` for a homogeneous strain ``ε``
applied to positions and cell alike (``r → r (1 + ε)``, ``cell → cell (1 + ε)``; the sign
convention of ASE: positive stress means the cell wants to shrink). Both come from one
``torch.func.grad`` call, so the helper composes with ``torch.func.vmap`` (e.g. over the stacked
parameters of a committee) and with further ``torch.func`` transforms.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch
from torch.func import grad

from aenet_fn.core.records import pytree_record

EnergyFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``energy_fn(positions [N, 3], cells [B, 3, 3]) -> energies [B]`` (eV)."""


@pytree_record
@attrs.frozen(eq=False)
class EnergyForces:
    """Energies and their derivatives.

    Attributes:
        energy: ``[B]`` total energies (eV).
        forces: ``[N, 3]`` forces ``-∂E/∂r`` (eV/Å).
        stress: ``[B, 3, 3]`` symmetric stress ``(1/V) ∂E/∂ε`` (eV/Å³), or None when not asked
            for; NaN for structures that are not periodic in all three directions.
    """

    energy: torch.Tensor
    forces: torch.Tensor
    stress: torch.Tensor | None = None


def strained(
    positions: torch.Tensor,
    cells: torch.Tensor,
    structure_index: torch.Tensor,
    strain: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``r → r (1 + ε_b)``, ``cell_b → cell_b (1 + ε_b)`` with one ``[3, 3]`` strain per
    structure (``strain`` ``[B, 3, 3]``); returns the new positions ``[N, 3]`` and cells."""
    positions = positions + torch.einsum("ni,nij->nj", positions, strain[structure_index])
    return positions, cells + cells @ strain


def symmetric_stress(strain_gradient: torch.Tensor, volumes: torch.Tensor) -> torch.Tensor:
    """The stress ``(1/V) ∂E/∂ε`` (eV/Å³) from the strain gradients ``[..., B, 3, 3]`` (eV)
    and volumes ``[..., B]`` (Å³), symmetrised."""
    symmetric = 0.5 * (strain_gradient + strain_gradient.transpose(-1, -2))
    return symmetric / volumes.to(symmetric.dtype)[..., None, None]


def value_and_forces(
    energy_fn: EnergyFunction,
    positions: torch.Tensor,
    cells: torch.Tensor,
    structure_index: torch.Tensor,
    pbc: torch.Tensor | None = None,
    *,
    compute_stress: bool = False,
) -> EnergyForces:
    """Energies, forces and (optionally) stress of ``energy_fn`` at ``positions``.

    Args:
        energy_fn: ``(positions [N, 3], cells [B, 3, 3]) -> energies [B]`` (eV); must be written
            with differentiable torch ops (no in-place updates of its inputs).
        positions: ``[N, 3]`` Cartesian coordinates (Å).
        cells: ``[B, 3, 3]`` lattice vectors as rows (Å); zeros for isolated structures.
        structure_index: ``[N]`` structure of each atom.
        pbc: ``[B, 3]`` periodic flags; required with ``compute_stress`` (stress is NaN unless
            all three axes are periodic).
        compute_stress: also return the stress.

    Forces of structure ``b`` are ``-∂E_b/∂r``; since structures do not interact this is the
    gradient of ``ΣE_b``. Works under ``torch.func.vmap`` over anything ``energy_fn`` closes over.
    """

    def total(pos: torch.Tensor, strain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos, cell = strained(pos, cells, structure_index, strain)
        energies = energy_fn(pos, cell)
        return energies.sum(), energies

    strain = torch.zeros_like(cells)
    if not compute_stress:
        gradient, energies = grad(lambda p: total(p, strain), has_aux=True)(positions)
        return EnergyForces(energy=energies, forces=-gradient)
    if pbc is None:
        raise ValueError("value_and_forces: pbc is needed to compute the stress")
    (gradient, strain_gradient), energies = grad(total, argnums=(0, 1), has_aux=True)(
        positions, strain
    )
    fully_periodic = torch.as_tensor(pbc, device=positions.device).all(dim=1)
    stress = symmetric_stress(strain_gradient, torch.linalg.det(cells).abs())
    stress = torch.where(fully_periodic[:, None, None], stress, torch.nan)
    return EnergyForces(energy=energies, forces=-gradient, stress=stress)
