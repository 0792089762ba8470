"""The descriptor's position Jacobian as pair blocks and sparse matrices, for force training.

The entries of :class:`~aenet_fn.core.local_derivatives.LocalDerivatives` hold one small block per
pair or triplet. Summed by (atom moved ``j``, atom described ``i``) they give the Jacobian
``∂G_i/∂r_j`` as one dense ``[3, F]`` block per pair of atoms of a structure within the cutoff
(the periodic images of a pair and every triplet through it fall into the same block), and the
force map ``∂E/∂r_j = Σ_i (∂G_i/∂r_j) ∂E/∂G_i`` becomes a sparse (CSR) matrix product per
Cartesian component, with committee members as the dense operand's columns: one product for
every atom and member instead of gathers, per-entry products and scatters.

:func:`block_values` sums a featurized set's blocks once; :func:`pair_blocks` keeps those of
the structures stored sparse (:mod:`aenet_fn.speedups.force_jacobian` stores small ones dense),
:func:`pair_jacobian` cuts a mini-batch's matrices out of them and
:func:`jacobian_position_gradient` applies them, differentiably to any order.
"""

from __future__ import annotations

import attrs
import torch

from aenet_fn.core.batch import inverse_permutation, ranges
from aenet_fn.core.descriptor import ChebyshevParams
from aenet_fn.core.linear_maps import csr_matrix, linear_pair, members_inner, members_outer
from aenet_fn.core.local_derivatives import LocalDerivatives
from aenet_fn.core.records import pytree_record


@pytree_record
@attrs.frozen(eq=False)
class PairBlocks:
    """The position Jacobian of a featurized set, one block per pair of atoms ``(j, i)``.

    Attributes:
        values: ``[3, U, F]``: ``values[c, b] = ∂G_i/∂r_{j,c}`` for block ``b = (j, i)``
            (1/Å; raw features, plain then typespin-weighted columns as in the features).
        mirrored: ``[F, U, 3]``: ``mirrored[f, b, c] = values[c, b', f]`` for the mirror block
            ``b' = (i, j)`` of ``b = (j, i)`` (every block has one: cutoffs are symmetric, and a
            missing mirror is stored as zeros); the transposed map's values, laid out so that
            a batch gathers whole rows.
        row, col: ``[U]`` atoms ``j`` (moved) and ``i`` (described), in the set's numbering;
            sorted by ``j``, then by ``i`` in species-major order within its structure.
        row_start, row_count: ``[N]`` each atom's run of blocks.
    """

    values: torch.Tensor
    mirrored: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    row_start: torch.Tensor
    row_count: torch.Tensor


def block_values(
    params: ChebyshevParams,
    local: LocalDerivatives,
    species_index: torch.Tensor,
    structure_index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The position Jacobian of a featurized set's local derivatives ``local`` (atom indices
    into ``species_index`` / ``structure_index`` ``[N]``) summed into one block per pair of
    atoms: ``(values, row, col, mirror)``, ``values`` ``[3, U, F]`` with ``values[c, b] =
    ∂G_i/∂r_{j,c}`` for block ``b = (j, i)`` at ``row[b] = j``, ``col[b] = i`` (sorted by ``j``,
    then by ``i`` in species-major order within its structure), and ``mirror[b]`` the block
    ``(i, j)`` (every block has one: cutoffs are symmetric, and a missing mirror is added as
    zeros)."""
    n_rad, n_ang, multi = params.rad_order + 1, params.ang_order + 1, params.multi
    n = species_index.shape[0]
    device = species_index.device
    n_species = len(params.species)
    order = torch.argsort(structure_index * n_species + species_index, stable=True)
    rank = inverse_permutation(order)
    # (moved atom, described atom, radial (0) or angular (1) columns, block [E, w, 3], weight)
    parts = [
        (local.radial_neighbour, local.radial_centre, 0, local.radial, local.radial_spin),
        (local.radial_centre, local.radial_centre, 0, local.radial, local.radial_spin),
    ]
    for moved, block in (
        (local.triplet_first, local.angular_first),
        (local.triplet_second, local.angular_second),
    ):
        parts += [
            (moved, local.triplet_centre, 1, block, local.triplet_spin),
            (local.triplet_centre, local.triplet_centre, 1, block, local.triplet_spin),
        ]
    centres = torch.bincount(local.radial_centre, minlength=n) + torch.bincount(
        local.triplet_centre, minlength=n
    )
    described = torch.nonzero(centres).view(-1)  # the atoms with a diagonal block
    keys = [moved * n + rank[centre] for moved, centre, *_ in parts if moved is not centre]
    unique = torch.unique(torch.cat([*keys, described * n + rank[described]]))
    row, col = unique // n, order[unique % n]
    mirror_keys = col * n + rank[row]
    mirror = torch.searchsorted(unique, mirror_keys).clamp_(max=max(unique.shape[0] - 1, 0))
    if not torch.equal(unique[mirror], mirror_keys):  # a block whose mirror has no entry
        unique = torch.unique(torch.cat([unique, mirror_keys]))
        row, col = unique // n, order[unique % n]
        mirror = torch.searchsorted(unique, col * n + rank[row])
    # One accumulator per column group (radial, angular; plain, typespin-weighted), rows of
    # whole blocks. A moved atom's terms enter its block (+); a centre moves every pair the
    # other way: its terms are summed per centre and subtracted from its own block.
    slot = torch.zeros(n, dtype=torch.long, device=device)
    slot[described] = torch.arange(described.shape[0], device=device)
    sizes = [n_rad, n_ang] * (2 if multi else 1)
    moving = [local.radial.new_zeros(unique.shape[0], size, 3) for size in sizes]
    centred = [local.radial.new_zeros(described.shape[0], size, 3) for size in sizes]
    off_diagonal = iter(keys)
    for moved, centre, group, block, spin in parts:
        if moved is centre:
            accumulators, where = centred, slot[centre]
        else:
            accumulators, where = moving, torch.searchsorted(unique, next(off_diagonal))
        accumulators[group].index_add_(0, where, block)
        if multi:
            accumulators[group + 2].index_add_(0, where, block * spin[:, None, None])
    accumulated = torch.cat(moving, dim=1)  # [U, F, 3]
    diagonal = torch.searchsorted(unique, described * n + rank[described])
    accumulated.index_add_(0, diagonal, torch.cat(centred, dim=1), alpha=-1)
    del moving, centred, keys  # (peak memory)
    values = accumulated.permute(2, 0, 1).contiguous()
    return values, row, col, mirror


def pair_blocks(
    values: torch.Tensor,
    row: torch.Tensor,
    col: torch.Tensor,
    mirror: torch.Tensor,
    keep: torch.Tensor,
    n_atoms: int,
) -> PairBlocks:
    """The :class:`PairBlocks` of the blocks ``keep`` ``[U]`` (bool; a block and its mirror
    both or neither) of :func:`block_values` ``(values, row, col, mirror)`` of a set of
    ``n_atoms`` atoms."""
    kept = torch.nonzero(keep).view(-1)
    renumbered = torch.cumsum(keep, 0) - 1  # a kept block's place among the kept
    values = values.index_select(1, kept)
    row = row.index_select(0, kept)
    counts = torch.bincount(row, minlength=n_atoms)
    return PairBlocks(
        values=values,
        mirrored=values.permute(2, 1, 0)[:, renumbered[mirror[kept]]].contiguous(),
        row=row,
        col=col.index_select(0, kept),
        row_start=torch.cumsum(counts, 0) - counts,
        row_count=counts,
    )


@pytree_record
@attrs.frozen(eq=False)
class PositionJacobian:
    """The Jacobian ``∂G/∂r`` of a mini-batch's force-supervised structures as CSR matrices,
    one per Cartesian component ``c`` (``n`` batch atoms, ``F`` features, ``K`` blocks).

    Attributes:
        crow, col: ``[n + 1]``, ``[K F]`` CSR indices of ``J_c`` ``[n, n F]`` (row ``j``,
            column ``i F + f``: ``∂G_{i,f}/∂r_{j,c}``), shared by the components.
        values: ``[3, K F]`` their values.
        transposed_crow, transposed_col: ``[F n + 1]``, ``[3 F K]`` CSR indices of ``Jᵀ``
            ``[F n, 3 n]`` (row ``f n + i``, column ``3 j + c``).
        transposed_values: ``[3 F K]`` its values.
    """

    crow: torch.Tensor
    col: torch.Tensor
    values: torch.Tensor
    transposed_crow: torch.Tensor
    transposed_col: torch.Tensor
    transposed_values: torch.Tensor


def pair_jacobian(
    blocks: PairBlocks,
    atoms: torch.Tensor,
    structure_major: torch.Tensor,
    position: torch.Tensor,
    supervised: torch.Tensor,
) -> PositionJacobian:
    """The :class:`PositionJacobian` of a mini-batch cut out of ``blocks``: ``atoms`` ``[n]``
    (set indices, in batch order; a structure drawn twice appears twice), ``structure_major``
    ``[n]`` the structure-major position of each (structures one after another, their atoms in
    set order), ``position`` ``[n]`` its inverse map, and ``supervised`` ``[n]`` bool the atoms
    whose structures' forces are supervised (the others get no rows or columns)."""
    take = torch.Tensor.index_select  # much faster than advanced indexing on CPU
    counts = take(blocks.row_count, 0, atoms) * supervised
    chosen = ranges(take(blocks.row_start, 0, atoms), counts)
    # a block's column atom is in its row atom's structure: shift it as the row atom moved
    shift = torch.repeat_interleave(structure_major - atoms, counts)
    columns = take(position, 0, take(blocks.col, 0, chosen) + shift)
    _, n_set, width = blocks.values.shape
    n_blocks = chosen.shape[0]
    index = torch.int32 if 3 * n_blocks * width < 2**31 else torch.int64

    def rows(table: torch.Tensor, n_rows: int) -> torch.Tensor:
        """Rows ``chosen`` of each of the ``n_rows`` leading slices of ``table``."""
        where = torch.arange(n_rows, device=atoms.device)[:, None] * n_set + chosen
        return take(table.view(n_rows * n_set, table.shape[-1]), 0, where.view(-1))

    crow, col, transposed_crow, transposed_col = _csr_indices(
        counts.to(index), columns.to(index), width
    )
    return PositionJacobian(
        crow=crow,
        col=col,
        values=rows(blocks.values, 3).view(3, -1),
        transposed_crow=transposed_crow,
        transposed_col=transposed_col,
        transposed_values=rows(blocks.mirrored, width).view(-1),
    )


def _csr_indices(
    counts: torch.Tensor, columns: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR indices (crow, col, transposed crow, transposed col) of :class:`PositionJacobian`
    for rows of ``counts`` ``[n]`` blocks each, whose column atoms are ``columns`` ``[K]``
    (both of the index dtype)."""
    index, device = columns.dtype, columns.device
    ends = torch.cumsum(counts, 0).to(index)
    features = torch.arange(width, dtype=index, device=device)
    zero = ends.new_zeros(1)
    transposed_ends = (features[:, None] * columns.shape[0] + ends).view(-1) * 3
    components = torch.arange(3, dtype=index, device=device)
    return (
        torch.cat([zero, ends * width]),
        (columns[:, None] * width + features).view(-1),
        torch.cat([zero, transposed_ends]),
        (columns[:, None] * 3 + components).view(1, -1).expand(width, -1).reshape(-1),
    )


def _rows_to_positions(layout: None, g: torch.Tensor, *fields: torch.Tensor) -> torch.Tensor:
    """``∂E/∂r`` ``[..., n, 3]`` from ``∂E/∂G`` ``[..., n, F]`` (any leading member dims): one
    CSR product per component, the members as columns."""
    jacobian = PositionJacobian(*fields)
    g, lead = members_inner(g)  # [n, M, F]
    n, members, width = g.shape
    operand = g.permute(0, 2, 1).reshape(n * width, members)
    out = torch.stack(
        [
            csr_matrix(jacobian.crow, jacobian.col, values, (n, n * width)) @ operand
            for values in jacobian.values
        ],
        dim=-1,
    )  # [n, M, 3]
    return members_outer(out, lead)


def _positions_to_rows(layout: None, d: torch.Tensor, *fields: torch.Tensor) -> torch.Tensor:
    """The transpose of :func:`_rows_to_positions`: ``[..., n, 3]`` → ``[..., n, F]``."""
    jacobian = PositionJacobian(*fields)
    d, lead = members_inner(d)  # [n, M, 3]
    n, members = d.shape[:2]
    width = (jacobian.transposed_crow.shape[0] - 1) // max(n, 1)
    matrix = csr_matrix(
        jacobian.transposed_crow,
        jacobian.transposed_col,
        jacobian.transposed_values,
        (width * n, 3 * n),
    )
    out = matrix @ d.permute(0, 2, 1).reshape(3 * n, members)  # [F n, M]
    return members_outer(out.view(width, n, members).permute(1, 2, 0), lead)


_JacobianMap = linear_pair(_rows_to_positions, _positions_to_rows)


def jacobian_position_gradient(
    jacobian: PositionJacobian, feature_gradient: torch.Tensor
) -> torch.Tensor:
    """``∂E/∂r`` ``[n, 3]`` (eV/Å) from ``∂E/∂G`` ``feature_gradient`` ``[n, F]`` (raw
    features) with a batch's assembled Jacobian. Differentiable in ``feature_gradient`` (to any
    order) and ``vmap``-able over it (committee members share ``jacobian``)."""
    fields = [getattr(jacobian, f.name) for f in attrs.fields(PositionJacobian)]
    return _JacobianMap(None, feature_gradient, *fields)
