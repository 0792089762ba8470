"""The Chebyshev descriptor from a neighbour list alone: no triplets, no data-dependent shapes.

:mod:`~aenet_fn.core.descriptor` enumerates the angular triplets of a batch, a step whose output
size depends on the data. Here the angular sums come from moments of the neighbours' directions
instead, so every array has the size of the atoms or of the neighbour list (the form
``torch.export`` needs for a program with dynamic sizes; the numbers agree with
:func:`~aenet_fn.core.descriptor.featurize` to rounding).

With ``u_j`` the unit vector towards neighbour ``j`` and ``w_j`` its weight (``fc(d_ij; Ra)``,
times the typespin ``s(j)`` for the weighted half)::

    Σ_{j<k} w_j w_k T_n(u_j·u_k) = ½ [ Σ_m c_nm Σ_{|α|=m} (m! / α!) (Σ_j w_j u_j^α)² − Σ_j w_j² ]

where ``T_n(x) = Σ_m c_nm x^m`` and ``u^α = u_x^a u_y^b u_z^c`` runs over the monomials of
degree ``m`` (the multinomial expansion of ``(u_j·u_k)^m``); ``T_n(u_j·u_j) = 1`` gives the
subtracted diagonal. The cost is ``O(pairs × monomials)`` (84 monomials at angular order 6)
instead of ``O(pairs × neighbours)``.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from aenet_fn.core.descriptor import (
    ChebyshevParams,
    cutoff_function,
    radial_basis,
    typespin_vector,
)
from aenet_fn.core.neighbors import Neighbors, pair_vectors


def chebyshev_in_legendre(order: int) -> list[list[Fraction]]:
    """``b[n][l]`` with ``T_n(x) = Σ_l b[n][l] P_l(x)`` for ``n, l = 0..order`` (exact)."""
    chebyshev = [[Fraction(1)] + [Fraction(0)] * order]
    legendre = [[Fraction(1)] + [Fraction(0)] * order]
    if order:
        chebyshev.append([Fraction(0), Fraction(1)] + [Fraction(0)] * (order - 1))
        legendre.append(list(chebyshev[1]))
    for n in range(
        1, order
    ):  # T_{n+1} = 2x T_n − T_{n−1}; (n+1) P_{n+1} = (2n+1) x P_n − n P_{n−1}
        shifted_t = [Fraction(0), *chebyshev[n][:-1]]
        shifted_p = [Fraction(0), *legendre[n][:-1]]
        chebyshev.append([2 * a - b for a, b in zip(shifted_t, chebyshev[n - 1])])
        legendre.append(
            [((2 * n + 1) * a - n * b) / (n + 1) for a, b in zip(shifted_p, legendre[n - 1])]
        )
    result = []
    for row in chebyshev:  # peel off the highest power with P_l (triangular solve)
        rest, coefficients = list(row), [Fraction(0)] * (order + 1)
        for degree in range(order, -1, -1):
            coefficients[degree] = rest[degree] / legendre[degree][degree]
            rest = [r - coefficients[degree] * q for r, q in zip(rest, legendre[degree])]
        result.append(coefficients)
    return result


def harmonic_degrees(order: int) -> list[int]:
    """The degree ``l`` of each column of :func:`addition_harmonics` (``2l + 1`` per degree)."""
    return [degree for degree in range(order + 1) for _ in range(2 * degree + 1)]


def addition_harmonics(units: torch.Tensor, order: int) -> torch.Tensor:
    """``[P, (order + 1)²]`` real harmonics ``h`` of unit vectors ``[P, 3]`` with
    ``P_l(u·v) = Σ_{columns of degree l} h(u) h(v)`` (the addition theorem; columns by
    degree, :func:`harmonic_degrees`). Polynomials in ``x, y, z``: smooth everywhere."""
    x, y, z = units.unbind(dim=1)
    real, imaginary = [torch.ones_like(x)], [torch.zeros_like(x)]  # (x + iy)^m
    for _ in range(order):
        real, imaginary = (
            [*real, real[-1] * x - imaginary[-1] * y],
            [*imaginary, real[-1] * y + imaginary[-1] * x],
        )
    columns: dict[tuple[int, int], list[torch.Tensor]] = {}
    for m in range(order + 1):
        # P̃_l^m(z) = P_l^m(z) / (1 − z²)^{m/2} by its recurrence in l
        diagonal = math.prod(range(1, 2 * m, 2))
        legendre = [torch.full_like(z, float(diagonal)), (2 * m + 1) * diagonal * z]
        for degree in range(m + 2, order + 1):
            legendre.append(
                ((2 * degree - 1) * z * legendre[-1] - (degree + m - 1) * legendre[-2])
                / (degree - m)
            )
        for degree in range(m, order + 1):
            scale = math.sqrt(
                (2 - (m == 0)) * math.factorial(degree - m) / math.factorial(degree + m)
            )
            value = legendre[degree - m] * scale
            columns[degree, m] = [value * real[m]] + ([value * imaginary[m]] if m else [])
    return torch.stack(
        [c for degree in range(order + 1) for m in range(degree + 1) for c in columns[degree, m]],
        dim=1,
    )


def _angular_mixing(order: int, like: torch.Tensor) -> torch.Tensor:
    """``[(order + 1)², order + 1]`` map from squared harmonic moments to
    ``Σ_{j,k} w_j w_k T_n(u_j·u_k)``: ``b[n][l]`` of each column's degree ``l``."""
    coefficients = chebyshev_in_legendre(order)
    rows = [
        [float(coefficients[n][degree]) for n in range(order + 1)]
        for degree in harmonic_degrees(order)
    ]
    return torch.tensor(rows, dtype=like.dtype, device=like.device)


def _per_center(values: torch.Tensor, centers: torch.Tensor, n_atoms: int) -> torch.Tensor:
    """``[n_atoms, ...]`` sums of per-pair ``values`` ``[P, ...]`` over each centre's pairs."""
    return values.new_zeros(n_atoms, *values.shape[1:]).index_add(0, centers, values)


def pair_features(
    params: ChebyshevParams,
    positions: torch.Tensor,
    cell: torch.Tensor,
    species: torch.Tensor,
    pairs: Neighbors,
) -> torch.Tensor:
    """Chebyshev features ``[N, F]`` of one structure from a full neighbour list.

    Args:
        params: the descriptor.
        positions: ``[N, 3]`` Cartesian coordinates (Å); the features take their dtype.
        cell: ``[3, 3]`` lattice vectors as rows (Å); any value when ``shifts`` are all zero.
        species: ``[N]`` int64 index of each atom's element in ``params.species``.
        pairs: the full neighbour list (both directions; shifts ``S`` in any integer or
            float dtype).

    Entries beyond the cutoffs or at ``d <= min_cutoff`` contribute nothing, so a list made
    with any radius ``>= params.cutoff`` gives the same features. Differentiable in
    ``positions`` and ``cell``.
    """
    n_atoms, centers = positions.shape[0], pairs.centers
    one_structure = torch.zeros(n_atoms, dtype=torch.long, device=positions.device)
    vectors = pair_vectors(positions, cell.reshape(1, 3, 3), one_structure, pairs)
    squared = (vectors * vectors).sum(dim=1)
    kept = squared > params.min_cutoff**2
    distance = torch.sqrt(torch.where(kept, squared, torch.ones_like(squared)))
    kept = kept.to(positions.dtype)
    weights = [kept]
    if params.multi:
        weights.append(
            kept * typespin_vector(len(params.species), positions)[species[pairs.neighbors]]
        )

    radial_terms = radial_basis(params, distance)  # [P, n_rad]
    angular_weight = cutoff_function(distance, params.ang_cutoff)
    units = vectors / distance[:, None]
    harmonics = addition_harmonics(units, params.ang_order)  # [P, K]
    mixing = _angular_mixing(params.ang_order, positions)
    radial_blocks, angular_blocks = [], []
    for weight in weights:
        radial_blocks.append(_per_center(radial_terms * weight[:, None], centers, n_atoms))
        leg = angular_weight * weight
        moments = _per_center(harmonics * leg[:, None], centers, n_atoms)  # [N, K]
        diagonal = _per_center(leg * leg, centers, n_atoms)
        angular_blocks.append(0.5 * ((moments * moments) @ mixing - diagonal[:, None]))
    blocks = [radial_blocks[0], angular_blocks[0]]
    if params.multi:
        blocks += [radial_blocks[1], angular_blocks[1]]
    return torch.cat(blocks, dim=1)
