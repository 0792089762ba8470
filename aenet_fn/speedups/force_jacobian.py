"""A featurized set's position Jacobian stored for force training, and a mini-batch's cut.

The blocks of :func:`~aenet_fn.speedups.position_jacobian.block_values` are stored two ways, chosen
per structure: a structure whose ``n²`` atom pairs are at most ``dense_up_to`` (2) times its
blocks keeps its Jacobian as one dense matrix (:mod:`aenet_fn.speedups.structure_jacobian`: no more
memory than the blocks with their mirrors, and a batch uses it without copying), the others
keep their pair blocks (:mod:`aenet_fn.speedups.position_jacobian`: a batch gathers its blocks into
sparse matrices). Small periodic cells, where every pair of atoms is within the cutoff through
some image, are dense; large cells and molecules are sparse. A batch's forces are the sum of
both maps (each zero on the other's atoms).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

from aenet_fn.core.descriptor import ChebyshevParams
from aenet_fn.core.featurized import FeaturizedSet
from aenet_fn.core.local_derivatives import LocalDerivatives
from aenet_fn.core.records import pytree_record, static_field
from aenet_fn.speedups.position_jacobian import (
    PairBlocks,
    PositionJacobian,
    block_values,
    jacobian_position_gradient,
    pair_blocks,
    pair_jacobian,
)
from aenet_fn.speedups.structure_jacobian import (
    StructureBlocks,
    StructureJacobian,
    structure_blocks,
    structure_jacobian,
    structure_position_gradient,
)


@pytree_record
@attrs.frozen(eq=False)
class SetJacobian:
    """The position Jacobian of a featurized set: the pair blocks of the structures stored
    sparse (none of the others' atoms has a block) and the dense matrices of the others."""

    pairs: PairBlocks
    structures: StructureBlocks

    @property
    def n_atoms(self) -> int:
        """Atoms of the set."""
        return int(self.pairs.row_count.shape[0])

    @property
    def n_structures(self) -> int:
        """Structures of the set."""
        return int(self.structures.n_atoms.shape[0])

    def batch(
        self,
        selection: torch.Tensor,
        supervised: torch.Tensor,
        atoms: torch.Tensor,
        structure_major: torch.Tensor,
        position: torch.Tensor,
        force_atoms: torch.Tensor,
    ) -> BatchJacobian:
        """The :class:`BatchJacobian` of the batch of structures ``selection`` ``[b]`` of this
        Jacobian's set (the :class:`~aenet_fn.core.minibatch.StoredJacobian` method), of which
        ``supervised`` ``[b]`` have their forces supervised: ``atoms`` ``[n]`` (set
        indices, in batch order; a structure drawn twice appears twice),
        ``structure_major`` ``[n]`` the structure-major position of each (structures one after
        another, their atoms in set order), ``position`` ``[n]`` its inverse map, and
        ``force_atoms`` ``[n]`` bool the atoms of the supervised structures."""
        dense = structure_jacobian(
            self.structures, selection, supervised, position, structure_major
        )
        pairs = None  # needed where a supervised structure has no dense matrix
        if int(supervised.sum()) > (0 if dense is None else len(dense.matrices)):
            pairs = pair_jacobian(self.pairs, atoms, structure_major, position, force_atoms)
        return BatchJacobian(pairs=pairs, structures=dense)


def set_jacobian(
    params: ChebyshevParams, data: FeaturizedSet, dense_up_to: float = 2.0
) -> SetJacobian:
    """The position Jacobian of ``data`` (which must carry local derivatives) stored for
    :func:`~aenet_fn.core.minibatch.take_structures` (:class:`SetJacobian`: dense for the
    structures of ``n`` atoms with at least ``n² / dense_up_to`` pair blocks)."""
    if data.local is None:
        raise ValueError("set_jacobian: the featurized set has no local derivatives")
    if params.n_features != data.features.shape[1]:
        raise ValueError(
            f"set_jacobian: the descriptor has {params.n_features} features, the featurized "
            f"set {data.features.shape[1]}: not the descriptor that featurized it"
        )
    return assemble_set_jacobian(
        params, data.local, data.species_index, data.structure_index, data.n_atoms, dense_up_to
    )


def assemble_set_jacobian(
    params: ChebyshevParams,
    local: LocalDerivatives,
    species_index: torch.Tensor,
    structure_index: torch.Tensor,
    n_atoms: torch.Tensor,
    dense_up_to: float = 2.0,
) -> SetJacobian:
    """The :class:`SetJacobian` of a featurized set's local derivatives ``local`` (atoms
    ``species_index`` / ``structure_index`` ``[N]``, structures of ``n_atoms`` ``[S]`` atoms
    one after another); a structure is stored dense when ``n² ≤ dense_up_to`` × its blocks
    (``0``: none, ``inf``: all)."""
    if not dense_up_to >= 0:  # (NaN too)
        raise ValueError(f"dense_up_to must be a number ≥ 0, got {dense_up_to!r}")
    values, row, col, mirror = block_values(params, local, species_index, structure_index)
    block_structure = structure_index.index_select(0, row)
    blocks = torch.bincount(block_structure, minlength=n_atoms.shape[0])
    dense = (n_atoms * n_atoms <= dense_up_to * blocks) & (blocks > 0)
    sparse_block = ~dense.index_select(0, block_structure)
    return SetJacobian(
        pairs=pair_blocks(values, row, col, mirror, sparse_block, species_index.shape[0]),
        structures=structure_blocks(values, row, col, dense, structure_index, n_atoms),
    )


@pytree_record
@attrs.frozen(eq=False)
class BatchJacobian:
    """A mini-batch's position Jacobian: the sparse matrices of its structures stored sparse
    and the dense ones of the others (None: no supervised structure of that kind; not both)."""

    pairs: PositionJacobian | None
    structures: StructureJacobian | None

    def position_gradient(
        self, params: ChebyshevParams, feature_gradient: torch.Tensor
    ) -> torch.Tensor:
        """:func:`batch_position_gradient` (the
        :class:`~aenet_fn.core.local_derivatives.PositionMap` method; ``params`` unused)."""
        return batch_position_gradient(self, feature_gradient)

    @staticmethod
    def stack(
        jacobians: Sequence[BatchJacobian | None], positions: Sequence[torch.Tensor]
    ) -> StackedJacobians:
        """:func:`stack_jacobians` (how :func:`~aenet_fn.core.minibatch.stack_batches` stacks
        the members' batches that carry Jacobians)."""
        return stack_jacobians(jacobians, positions)


def batch_position_gradient(
    jacobian: BatchJacobian, feature_gradient: torch.Tensor
) -> torch.Tensor:
    """``∂E/∂r`` ``[n, 3]`` (eV/Å) from ``∂E/∂G`` ``feature_gradient`` ``[n, F]`` (raw
    features) with a batch's Jacobian: zero for the atoms of structures without supervised
    forces. Differentiable in ``feature_gradient`` (to any order) and ``vmap``-able over it
    (committee members share ``jacobian``)."""
    if jacobian.pairs is None:
        return structure_position_gradient(jacobian.structures, feature_gradient)
    forces = jacobian_position_gradient(jacobian.pairs, feature_gradient)
    if jacobian.structures is None:
        return forces
    return forces + structure_position_gradient(jacobian.structures, feature_gradient)


@pytree_record
@attrs.frozen(eq=False)
class StackedJacobians:
    """The Jacobians of the batches of committee members stacked by
    :func:`~aenet_fn.core.minibatch.stack_batches`, each kept in its own batch's numbering.

    Attributes:
        jacobians: the :class:`BatchJacobian` of each member whose batch supervises forces.
        positions: ``[n_m]`` each such member's atoms' positions in the padded layout.
        members: the index of each such member (static).
    """

    jacobians: tuple[BatchJacobian, ...]
    positions: tuple[torch.Tensor, ...]
    members: tuple[int, ...] = static_field()

    def position_gradient(
        self, params: ChebyshevParams, feature_gradient: torch.Tensor
    ) -> torch.Tensor:
        """:func:`stacked_position_gradient` (the
        :class:`~aenet_fn.core.local_derivatives.PositionMap` method; ``params`` unused)."""
        return stacked_position_gradient(self, feature_gradient)


def stack_jacobians(
    jacobians: Sequence[BatchJacobian | None], positions: Sequence[torch.Tensor]
) -> StackedJacobians:
    """:class:`StackedJacobians` of the members' ``jacobians`` (None: a batch without
    supervised forces) and their atoms' padded ``positions``. Nothing is copied."""
    kept = [m for m, jacobian in enumerate(jacobians) if jacobian is not None]
    return StackedJacobians(
        jacobians=tuple(jacobians[m] for m in kept),
        positions=tuple(positions[m] for m in kept),
        members=tuple(kept),
    )


def stacked_position_gradient(
    stacked: StackedJacobians, feature_gradient: torch.Tensor
) -> torch.Tensor:
    """``∂E/∂r`` ``[M, n, 3]`` of stacked batches from each member's ``∂E/∂G``
    ``feature_gradient`` ``[M, n, F]`` (padded layout; the members a leading axis, no
    ``vmap``): each member's rows taken out, its own Jacobian applied, put back. Zero for
    padding atoms and members without supervised forces; differentiable to any order."""
    n_members, n_padded = feature_gradient.shape[0], feature_gradient.shape[-2]
    out = [feature_gradient.new_zeros(n_padded, 3) for _ in range(n_members)]
    for m, jacobian, position in zip(stacked.members, stacked.jacobians, stacked.positions):
        rows = feature_gradient[m].index_select(0, position)
        out[m] = out[m].index_copy(0, position, batch_position_gradient(jacobian, rows))
    return torch.stack(out)
