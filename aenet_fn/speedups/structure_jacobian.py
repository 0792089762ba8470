"""Dense position Jacobians of small structures, for force training.

A structure of ``n`` atoms that mostly see each other (a small periodic cell sees every other
atom through some image) has close to ``n²`` pair blocks. Its whole Jacobian as one dense
matrix ``D`` ``[3 n, F n]`` (row ``3 j + c``, column ``F i + f``: ``∂G_{i,f}/∂r_{j,c}``) then
takes no more memory than its blocks and their mirrors, and a mini-batch uses the set's
matrices as they are: no values gathered, no index arrays built, one matrix product per
structure for ``∂E/∂r = D ∂E/∂G`` and one with the transposed view ``Dᵀ`` for the transposed
map (the loss-gradient direction), committee members as the rows of the other operand.

:func:`structure_blocks` stores the matrices of a set's chosen structures once;
:func:`structure_jacobian` takes a mini-batch's views of them and
:func:`structure_position_gradient` applies them, differentiably to any order.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

from aenet_fn.core.linear_maps import linear_pair
from aenet_fn.core.records import pytree_record, static_field


@pytree_record
@attrs.frozen(eq=False)
class StructureBlocks:
    """The dense position Jacobians of some structures of a featurized set.

    Attributes:
        values: ``[V]`` the matrices one after another, each ``[3 n, F n]`` row-major (atoms
            in the set's order within their structure; 1/Å, raw features).
        offset: ``[S]`` where each structure's matrix starts in ``values``; -1 for the
            structures stored otherwise.
        n_atoms: ``[S]`` atoms of each structure.
        width: features ``F`` (static).
    """

    values: torch.Tensor
    offset: torch.Tensor
    n_atoms: torch.Tensor
    width: int = static_field()


def structure_blocks(
    values: torch.Tensor,
    row: torch.Tensor,
    col: torch.Tensor,
    dense: torch.Tensor,
    structure_index: torch.Tensor,
    n_atoms: torch.Tensor,
) -> StructureBlocks:
    """The :class:`StructureBlocks` of the structures ``dense`` ``[S]`` (bool) from pair blocks
    ``values`` ``[3, U, F]`` of atoms ``row`` (moved) and ``col`` (described) ``[U]`` (see
    :func:`~aenet_fn.speedups.position_jacobian.block_values`) of a set whose atoms belong to
    ``structure_index`` ``[N]``, structures of ``n_atoms`` ``[S]`` atoms one after another."""
    width = values.shape[2]
    sizes = torch.where(dense, 3 * width * n_atoms * n_atoms, 0)
    offset = torch.where(dense, torch.cumsum(sizes, 0) - sizes, -1)
    first_atom = torch.cumsum(n_atoms, 0) - n_atoms
    structure = structure_index.index_select(0, row)
    chosen = torch.nonzero(dense.index_select(0, structure)).view(-1)
    structure = structure.index_select(0, chosen)
    n, first = n_atoms.index_select(0, structure), first_atom.index_select(0, structure)
    moved = row.index_select(0, chosen) - first
    described = col.index_select(0, chosen) - first
    start = offset.index_select(0, structure) + (3 * n * moved + described) * width  # c = f = 0
    features = torch.arange(width, device=values.device)
    stored = values.new_zeros(int(sizes.sum()))
    for component in range(3):  # one component at a time (peak memory)
        where = (start + component * n * width)[:, None] + features
        stored.index_copy_(0, where.view(-1), values[component].index_select(0, chosen).view(-1))
    return StructureBlocks(values=stored, offset=offset, n_atoms=n_atoms, width=width)


@pytree_record
@attrs.frozen(eq=False)
class StructureJacobian:
    """The dense Jacobians of a mini-batch's structures: views of the set's matrices.

    Attributes:
        matrices: ``[3 n_s, F n_s]`` of each batch structure that has one (stored dense and
            force-supervised), in batch order.
        to_structures: ``[n]`` the batch position of each atom in structure-major order
            (the batch's structures one after another, their atoms in set order).
        to_batch: ``[n]`` its inverse: the structure-major place of each batch atom.
        layout: ``(sizes, with_matrix, F)`` (static): atoms of each batch structure, whether
            it has a matrix, and the number of features.
    """

    matrices: tuple[torch.Tensor, ...]
    to_structures: torch.Tensor
    to_batch: torch.Tensor
    layout: tuple[tuple[int, ...], tuple[bool, ...], int] = static_field()


def structure_jacobian(
    blocks: StructureBlocks,
    selection: torch.Tensor,
    supervised: torch.Tensor,
    to_structures: torch.Tensor,
    to_batch: torch.Tensor,
) -> StructureJacobian | None:
    """The :class:`StructureJacobian` of the batch of structures ``selection`` ``[b]`` of the
    set of ``blocks`` (``supervised`` ``[b]``: those whose forces are; ``to_structures``,
    ``to_batch``: the batch's atom orders, see :class:`StructureJacobian`), or None when no
    supervised structure of the batch is stored dense."""
    width = blocks.width
    sizes = blocks.n_atoms.index_select(0, selection).tolist()
    offsets = blocks.offset.index_select(0, selection).tolist()
    with_matrix = [bool(s) and o >= 0 for s, o in zip(supervised.tolist(), offsets)]
    matrices = tuple(
        blocks.values.narrow(0, offset, 3 * width * n * n).view(3 * n, width * n)
        for n, offset, used in zip(sizes, offsets, with_matrix)
        if used
    )
    if not matrices:
        return None
    return StructureJacobian(
        matrices=matrices,
        to_structures=to_structures,
        to_batch=to_batch,
        layout=(tuple(sizes), tuple(with_matrix), width),
    )


def _per_structure(
    rows: torch.Tensor,
    layout: tuple[Sequence[int], Sequence[bool], int],
    matrices: Sequence[torch.Tensor],
    transposed: bool,
) -> torch.Tensor:
    """Each structure's rows of ``rows`` ``[M, n, k]`` (structure-major, contiguous; members
    ``M`` first, so that each product has them as its rows, the faster order) times its
    matrix's transpose (or the matrix, for the transposed map): ``[M, n, k']``, zero for the
    structures without one."""
    sizes, with_matrix, width = layout
    out_width, members = (width if transposed else 3), rows.shape[0]
    pieces, start, matrix = [], 0, iter(matrices)
    for size, used in zip(sizes, with_matrix):
        if used:
            m = next(matrix)
            block = rows[:, start : start + size].reshape(members, -1)  # a view
            pieces.append(block @ (m if transposed else m.t()))
        else:
            pieces.append(rows.new_zeros(members, size * out_width))
        start += size
    return torch.cat(pieces, dim=1).view(members, -1, out_width)


def _structure_rows(x: torch.Tensor, to_structures: torch.Tensor) -> torch.Tensor:
    """``[..., n, k]`` (batch order, any leading member dims) → ``[M, n, k]`` structure-major."""
    return x.reshape(-1, *x.shape[-2:]).index_select(1, to_structures)


def _batch_rows(y: torch.Tensor, to_batch: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """The inverse of :func:`_structure_rows`: ``[M, n, k]`` → ``[*lead, n, k]``."""
    return y.index_select(1, to_batch).view(*lead, *y.shape[1:])


def _dense_rows_to_positions(layout, g, to_structures, to_batch, *matrices) -> torch.Tensor:
    """``∂E/∂r`` ``[..., n, 3]`` from ``∂E/∂G`` ``[..., n, F]``."""
    rows = _structure_rows(g, to_structures)
    return _batch_rows(_per_structure(rows, layout, matrices, False), to_batch, g.shape[:-2])


def _dense_positions_to_rows(layout, d, to_structures, to_batch, *matrices) -> torch.Tensor:
    """The transpose of :func:`_dense_rows_to_positions`: ``[..., n, 3]`` → ``[..., n, F]``."""
    rows = _structure_rows(d, to_structures)
    return _batch_rows(_per_structure(rows, layout, matrices, True), to_batch, d.shape[:-2])


_StructureMap = linear_pair(_dense_rows_to_positions, _dense_positions_to_rows)


def structure_position_gradient(
    jacobian: StructureJacobian, feature_gradient: torch.Tensor
) -> torch.Tensor:
    """``∂E/∂r`` ``[n, 3]`` (eV/Å) from ``∂E/∂G`` ``feature_gradient`` ``[n, F]`` (raw
    features) with a batch's dense Jacobians; zero for atoms without one. Differentiable in
    ``feature_gradient`` (to any order) and ``vmap``-able over it (members share the map)."""
    return _StructureMap(
        jacobian.layout,
        feature_gradient,
        jacobian.to_structures,
        jacobian.to_batch,
        *jacobian.matrices,
    )
