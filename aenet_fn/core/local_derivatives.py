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

import math
from collections.abc import Callable
from typing import Any, Protocol

import attrs
import torch
from torch.func import jacfwd, vmap

from aenet_fn.core.descriptor import (
    ChebyshevParams,
    DescriptorGraph,
    angular_basis,
    cutoff_function,
    radial_basis,
)
from aenet_fn.core.linear_maps import csr_matrix, linear_pair, members_inner, members_outer
from aenet_fn.core.neighbors import pair_vectors
from aenet_fn.core.records import pytree_record


class PositionMap(Protocol):
    """What turns ``∂E/∂G`` into ``∂E/∂r`` for a batch's force-supervised atoms: the
    batch's :class:`LocalDerivatives`, or a form assembled from them by a speed-up (stored
    Jacobians), which the energy model then uses without knowing it."""

    def position_gradient(
        self, params: ChebyshevParams, feature_gradient: torch.Tensor
    ) -> torch.Tensor:
        """``∂E/∂r`` ``[..., n, 3]`` (eV/Å) from ``∂E/∂G`` ``feature_gradient``
        ``[..., n, F]`` (raw features); differentiable in ``feature_gradient``."""
        ...


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

    def position_gradient(
        self, params: ChebyshevParams, feature_gradient: torch.Tensor
    ) -> torch.Tensor:
        """:func:`position_gradient` of these entries (the :class:`PositionMap` method)."""
        return position_gradient(params, self, feature_gradient)

    def without_entries(self) -> LocalDerivatives:
        """No entries, in the dtypes, devices and trailing shapes of these."""
        return LocalDerivatives(**{f.name: getattr(self, f.name)[:0] for f in attrs.fields(self)})


ATOM_INDEX_FIELDS = (
    "radial_centre",
    "radial_neighbour",
    "triplet_centre",
    "triplet_first",
    "triplet_second",
)
"""The fields of :class:`LocalDerivatives` that hold atom indices (shifted when sets are
joined, re-indexed when batches are cut, range-checked when read from a file)."""


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
        cosine = (first * second).sum(-1, keepdim=True) / (d_first * d_second)
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
        radial = _in_pieces(vmap(jacfwd(radial_of_vector)), vectors, graph.radial)
        first, second = _in_pieces(
            vmap(jacfwd(angular_of_vectors, argnums=(0, 1))),
            vectors,
            graph.triplet_first,
            graph.triplet_second,
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


ENTRIES_PER_PIECE = 1 << 15
"""Entries whose derivatives are computed at once: forward-mode AD keeps several times the
result in temporaries, so pieces bound the memory of large chunks of structures."""


def _in_pieces(derivative: Callable[..., Any], vectors: torch.Tensor, *entries: torch.Tensor):
    """``derivative`` of the pair vectors picked by each of ``entries`` (index tensors of one
    length), ``ENTRIES_PER_PIECE`` at a time, written into one result (a tensor, or a tuple
    of tensors as ``derivative`` returns)."""
    total = entries[0].shape[0]
    out = None
    for first in range(0, total, ENTRIES_PER_PIECE) or (0,):
        last = min(first + ENTRIES_PER_PIECE, total)
        piece = derivative(*(vectors[index[first:last]] for index in entries))
        parts = piece if isinstance(piece, tuple) else (piece,)
        if out is None:
            out = tuple(p.new_empty((total, *p.shape[1:])) for p in parts)
        for target, part in zip(out, parts):
            target[first:last] = part
    return out if len(out) > 1 else out[0]


_FIELDS = tuple(f.name for f in attrs.fields(LocalDerivatives))


def _split_columns(g: torch.Tensor, n_rad: int, n_ang: int, multi: bool):
    """The radial and the angular columns of ``∂E/∂G`` ``[N, M, F]`` (each with its
    typespin-weighted half appended), contiguous for row gathers."""
    offset = n_rad + n_ang
    if not multi:
        return g[..., :n_rad].contiguous(), g[..., n_rad:].contiguous()
    radial = torch.cat([g[..., :n_rad], g[..., offset : offset + n_rad]], -1)
    return radial, torch.cat([g[..., n_rad:offset], g[..., offset + n_rad :]], -1)


def _entry_coefficients(
    columns: torch.Tensor, centres: torch.Tensor, spin: torch.Tensor, multi: bool
) -> torch.Tensor:
    """``[E, M, n]`` coefficients of each entry: its centre's plain columns, plus (``multi``)
    its typespin weight times the weighted ones."""
    rows = columns.index_select(0, centres)
    if not multi:
        return rows
    n = rows.shape[-1] // 2
    return torch.addcmul(rows[..., :n], spin[:, None, None], rows[..., n:])


def _to_positions(layout: tuple[int, int, bool], g: torch.Tensor, *fields) -> torch.Tensor:
    """``∂E/∂r`` ``[..., N, 3]`` from ``∂E/∂G`` ``[..., N, F]`` (any leading member dims).

    Members sit inside each atom's row, so every gather and scatter moves whole rows and each
    entry's block meets all members in one small matrix product."""
    n_rad, n_ang, multi = layout
    local = LocalDerivatives(**dict(zip(_FIELDS, fields)))
    g, lead = members_inner(g)
    radial_columns, angular_columns = _split_columns(g, n_rad, n_ang, multi)
    coeff = _entry_coefficients(radial_columns, local.radial_centre, local.radial_spin, multi)
    radial = torch.bmm(coeff, local.radial)  # [E, M, 3]
    coeff = _entry_coefficients(angular_columns, local.triplet_centre, local.triplet_spin, multi)
    on_j, on_k = torch.bmm(coeff, local.angular_first), torch.bmm(coeff, local.angular_second)
    out = g.new_zeros(g.shape[0], g.shape[1], 3)
    out = out.index_add(0, local.radial_neighbour, radial).index_add(
        0, local.radial_centre, -radial
    )
    out = out.index_add(0, local.triplet_first, on_j).index_add(0, local.triplet_second, on_k)
    out = out.index_add(0, local.triplet_centre, -(on_j + on_k))
    return members_outer(out, lead)


_CSR_DEVICES = ("cpu",)
"""Devices whose centre sums are sparse CSR matrix products (others, accelerators included,
keep ``index_add``; see ``benchmarks/NOTES.md``)."""

_CSR_WIDEST = 64
"""Widest rows whose plain sums are CSR products (beyond it ``index_add`` is faster). Weighted
sums are CSR products at any width: the weights are the matrix values, where ``index_add``
needs a weighted copy."""


def centre_sums(
    centres: torch.Tensor, n_atoms: int, values: torch.Tensor, *weights: torch.Tensor
) -> list[torch.Tensor]:
    """``Σ_e values[e]`` over the entries ``e`` of each centre atom, then the same sums with
    each entry weighted by each of ``weights`` (``[E]`` each): ``[n_atoms, ...]`` tensors from
    ``values`` ``[E, ...]`` and ``centres`` ``[E]``. Entries sorted by centre (as featurized
    sets and mini-batches hold them) are summed as sparse (CSR) matrix products where that is
    faster on CPU (see ``_CSR_WIDEST``; CPU only, not under ``torch.compile``), others by
    ``index_add``; either way in a fixed order on CPU (deterministic)."""
    flat = values.reshape(values.shape[0], math.prod(values.shape[1:]))
    shape = (n_atoms, *values.shape[1:])
    if (
        torch.compiler.is_compiling()
        or centres.device.type not in _CSR_DEVICES
        or not _sorted(centres)
    ):
        return [
            _index_sums(centres, n_atoms, flat if w is None else flat * w[:, None]).view(shape)
            for w in (None, *weights)
        ]
    counts = torch.bincount(centres, minlength=n_atoms)
    rows = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    entries = torch.arange(centres.shape[0], device=centres.device)

    def product(w: torch.Tensor) -> torch.Tensor:
        matrix = csr_matrix(rows, entries, w.to(flat.dtype), (n_atoms, centres.shape[0]))
        return (matrix @ flat).view(shape)

    if flat.shape[1] > _CSR_WIDEST:
        plain = _index_sums(centres, n_atoms, flat).view(shape)
    else:
        plain = product(flat.new_ones(centres.shape[0]))
    return [plain, *(product(w) for w in weights)]


def _index_sums(centres: torch.Tensor, n_atoms: int, flat: torch.Tensor) -> torch.Tensor:
    """``[n_atoms, C]`` sums of the rows of ``flat`` ``[E, C]`` by ``index_add``."""
    return flat.new_zeros(n_atoms, flat.shape[1]).index_add_(0, centres, flat)


def _sorted(index: torch.Tensor) -> bool:
    """Whether ``index`` ``[E]`` never decreases (and is not empty)."""
    return index.shape[0] > 0 and bool((index[1:] >= index[:-1]).all())


def _from_positions(layout: tuple[int, int, bool], d: torch.Tensor, *fields) -> torch.Tensor:
    """The transpose of :func:`_to_positions`: ``[..., N, 3]`` → ``[..., N, F]``."""
    multi = layout[2]
    local = LocalDerivatives(**dict(zip(_FIELDS, fields)))
    d, lead = members_inner(d)
    at = d.index_select
    pair = at(0, local.radial_neighbour) - at(0, local.radial_centre)  # [E, M, 3]
    radial = torch.bmm(pair, local.radial.transpose(1, 2))  # [E, M, n_rad]
    first = at(0, local.triplet_first) - at(0, local.triplet_centre)
    second = at(0, local.triplet_second) - at(0, local.triplet_centre)
    angular = torch.bmm(first, local.angular_first.transpose(1, 2)) + torch.bmm(
        second, local.angular_second.transpose(1, 2)
    )
    radial_spin, angular_spin = ((local.radial_spin,), (local.triplet_spin,)) if multi else ((), ())
    radial_sums = centre_sums(local.radial_centre, d.shape[0], radial, *radial_spin)
    angular_sums = centre_sums(local.triplet_centre, d.shape[0], angular, *angular_spin)
    columns = [radial_sums[0], angular_sums[0], *radial_sums[1:], *angular_sums[1:]]
    return members_outer(torch.cat(columns, dim=-1), lead)


_ToPositions = linear_pair(_to_positions, _from_positions)


def position_gradient(
    params: ChebyshevParams, local: LocalDerivatives, feature_gradient: torch.Tensor
) -> torch.Tensor:
    """``∂E/∂r`` ``[N, 3]`` (eV/Å) from ``∂E/∂G`` ``feature_gradient`` ``[N, F]`` (raw, not
    normalised features). Differentiable in ``feature_gradient``; forces are the negative."""
    layout = (params.rad_order + 1, params.ang_order + 1, params.multi)
    return _ToPositions(layout, feature_gradient, *(getattr(local, f) for f in _FIELDS))
