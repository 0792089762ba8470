"""Local derivatives of the descriptor, for force training on fixed structures.

During training the positions never move, so the descriptor ``G`` and its derivatives with respect
to positions are constants; only ``∂E/∂G`` depends on the network. Each descriptor term depends on
one pair vector (radial) or two (angular), so its derivatives are small local blocks:

* radial entry ``e = (i → j)``: ``J_e = ∂φ(r_ij)/∂r_ij`` ``[Nr, 3]``, entering ``+J`` for atom
  ``j`` and ``−J`` for atom ``i``;
* triplet ``(i; j, k)``: ``∂ψ/∂r_ij`` and ``∂ψ/∂r_ik`` ``[Na, 3]`` each, entering ``j``, ``k``
  and ``−(both)`` for ``i``.

They are computed once with ``torch.func.jacfwd`` (no hand-written derivative), and
:func:`position_gradient` contracts them with ``∂E/∂G`` to give ``∂E/∂r`` for any network; this
contraction is differentiable in ``∂E/∂G``, so force losses train through it while the descriptor
is never recomputed.
"""

from __future__ import annotations

import attrs
import torch
from torch.func import jacfwd, vmap

from aenet_fn._records import pytree_record
from aenet_fn.descriptor import (
    ChebyshevParams,
    DescriptorGraph,
    angular_basis,
    cutoff_function,
    radial_basis,
)
from aenet_fn.neighbors import pair_vectors


@pytree_record
@attrs.frozen(eq=False)
class LocalDerivatives:
    """Local descriptor derivatives of a set of atoms, with the atom indices they act on.

    Attributes:
        radial_centre, radial_neighbour: ``[E_r]`` atoms ``i``, ``j`` of each radial entry.
        triplet_centre, triplet_first, triplet_second: ``[P]`` atoms ``i``, ``j``, ``k`` of each
            angular triplet.
        radial_spin: ``[E_r]`` typespin weight ``s(j)`` of each radial entry.
        triplet_spin: ``[P]`` weight ``s(j) s(k)`` of each triplet.
        radial: ``[E_r, rad_order + 1, 3]`` derivative of each radial entry's terms with respect
            to its pair vector ``r_ij`` (1/Å).
        angular_first: ``[P, ang_order + 1, 3]`` derivative of each triplet's terms with respect
            to ``r_ij``.
        angular_second: ``[P, ang_order + 1, 3]`` the same with respect to ``r_ik``.
    """

    radial_centre: torch.Tensor
    radial_neighbour: torch.Tensor
    triplet_centre: torch.Tensor
    triplet_first: torch.Tensor
    triplet_second: torch.Tensor
    radial_spin: torch.Tensor
    triplet_spin: torch.Tensor
    radial: torch.Tensor
    angular_first: torch.Tensor
    angular_second: torch.Tensor


def local_derivatives(
    params: ChebyshevParams,
    positions: torch.Tensor,
    cells: torch.Tensor,
    structure_index: torch.Tensor,
    graph: DescriptorGraph,
) -> LocalDerivatives:
    """Local derivative blocks of the descriptor at ``positions`` ``[N, 3]`` (Å)."""

    # Distances are kept 1-element (not 0-d) tensors: forward-mode AD promotes 0-d tensors
    # times Python floats to float64, which would break float32 training.
    def radial_of_vector(vector: torch.Tensor) -> torch.Tensor:
        return radial_basis(params, vector.norm(dim=-1, keepdim=True))[0]

    def angular_of_vectors(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        d_first = first.norm(dim=-1, keepdim=True)
        d_second = second.norm(dim=-1, keepdim=True)
        cosine = ((first * second).sum(-1, keepdim=True) / (d_first * d_second)).clamp(-1.0, 1.0)
        return angular_basis(
            params,
            cosine,
            cutoff_function(d_first, params.ang_cutoff),
            cutoff_function(d_second, params.ang_cutoff),
        )[0]

    centers, neighbours = graph.pairs.centers, graph.pairs.neighbors
    weights = torch.tensor(params.typespin, dtype=positions.dtype, device=positions.device)
    typespin = weights[graph.species]
    with torch.no_grad():
        vectors = pair_vectors(positions, cells, structure_index, graph.pairs)
        radial = vmap(jacfwd(radial_of_vector))(vectors[graph.radial])
        first, second = vmap(jacfwd(angular_of_vectors, argnums=(0, 1)))(
            vectors[graph.triplet_first], vectors[graph.triplet_second]
        )
    return LocalDerivatives(
        radial_centre=centers[graph.radial],
        radial_neighbour=neighbours[graph.radial],
        triplet_centre=centers[graph.triplet_first],
        triplet_first=neighbours[graph.triplet_first],
        triplet_second=neighbours[graph.triplet_second],
        radial_spin=typespin[neighbours[graph.radial]],
        triplet_spin=typespin[neighbours[graph.triplet_first]]
        * typespin[neighbours[graph.triplet_second]],
        radial=radial,
        angular_first=first,
        angular_second=second,
    )


class _Contract(torch.autograd.Function):
    """``v[..., e, k] = Σ_n c[..., e, n] J[e, n, k]`` with shared blocks ``J`` ``[E, n, 3]``.

    A linear map, so its backward is the transposed contraction (:class:`_ContractT`, whose
    backward is this one again, so any order of differentiation works). The point is the
    ``vmap`` rule: coefficients batched over committee members meet the one shared ``J`` in a
    single contraction with a member axis, instead of ``vmap``'s generic rule for ``einsum``,
    which is several times slower here."""

    @staticmethod
    def forward(coeff: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...en,enk->...ek", coeff, blocks)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (blocks,) = ctx.saved_tensors
        return _ContractT.apply(grad_out, blocks), None

    @staticmethod
    def vmap(info, in_dims, coeff, blocks):
        return _batched(_Contract, "...en,...enk->...ek", in_dims, coeff, blocks)


class _ContractT(torch.autograd.Function):
    """``c[..., e, n] = Σ_k v[..., e, k] J[e, n, k]``: the transpose of :class:`_Contract`."""

    @staticmethod
    def forward(grad: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...ek,enk->...en", grad, blocks)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (blocks,) = ctx.saved_tensors
        return _Contract.apply(grad_out, blocks), None

    @staticmethod
    def vmap(info, in_dims, grad, blocks):
        return _batched(_ContractT, "...ek,...enk->...en", in_dims, grad, blocks)


def _batched(function, batched_equation, in_dims, values, blocks):
    """vmap rule shared by both contractions: shared blocks keep the fast path."""
    values_dim, blocks_dim = in_dims
    if blocks_dim is None:
        return function.apply(values.movedim(values_dim, 0), blocks), 0
    values = values if values_dim is None else values.movedim(values_dim, 0)
    return torch.einsum(batched_equation, values, blocks.movedim(blocks_dim, 0)), 0


def position_gradient(
    params: ChebyshevParams, local: LocalDerivatives, feature_gradient: torch.Tensor
) -> torch.Tensor:
    """``∂E/∂r`` ``[N, 3]`` (eV/Å) from ``∂E/∂G`` ``feature_gradient`` ``[N, F]`` (raw, not
    normalised features). Differentiable in ``feature_gradient``; forces are the negative."""
    n_rad, n_ang = params.rad_order + 1, params.ang_order + 1
    rad_i, rad_j = local.radial_centre, local.radial_neighbour
    ang_i, ang_j, ang_k = local.triplet_centre, local.triplet_first, local.triplet_second
    rad_coeff = feature_gradient[rad_i, :n_rad]
    ang_coeff = feature_gradient[ang_i, n_rad : n_rad + n_ang]
    if params.multi:
        offset = n_rad + n_ang
        rad_weighted = feature_gradient[rad_i, offset : offset + n_rad]
        ang_weighted = feature_gradient[ang_i, offset + n_rad :]
        rad_coeff = rad_coeff + local.radial_spin[:, None] * rad_weighted
        ang_coeff = ang_coeff + local.triplet_spin[:, None] * ang_weighted
    radial = _Contract.apply(rad_coeff, local.radial)
    on_j = _Contract.apply(ang_coeff, local.angular_first)
    on_k = _Contract.apply(ang_coeff, local.angular_second)
    gradient = feature_gradient.new_zeros(feature_gradient.shape[0], 3)
    gradient = gradient.index_add(0, rad_j, radial).index_add(0, rad_i, -radial)
    gradient = gradient.index_add(0, ang_j, on_j).index_add(0, ang_k, on_k)
    return gradient.index_add(0, ang_i, -(on_j + on_k))
