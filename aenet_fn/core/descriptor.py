"""The Chebyshev (Artrith–Urban–Ceder) descriptor as pure functions.

Spec: ``aenet-reference.md`` §1. For atom ``i`` with neighbours ``j`` (all periodic images, the
centre's own images included, ``min_cutoff < d_ij``):

* radial ``R_n(i) = Σ_j T_n(2 d_ij / Rr - 1) fc(d_ij; Rr)``, ``n = 0..rad_order`` (``d_ij <= Rr``);
* angular ``A_n(i) = Σ_{j<k} T_n(cos θ_ijk) fc(d_ij; Ra) fc(d_ik; Ra)``, ``n = 0..ang_order``,
  over unordered pairs of distinct neighbour entries with ``d <= Ra``;
* with more than one species, the same sums weighted by the typespin ``s(j)`` (radial) and
  ``s(j) s(k)`` (angular) follow; layout ``[R, A, R̃, Ã]``.

``fc(d; Rc) = (cos(π d / Rc) + 1) / 2`` for ``d < Rc``, else 0. The polynomials use the three-term
recurrence, which is smooth everywhere (no infinite ``arccos`` slope at ``x = ±1``), so
gradients with respect to positions (forces) and cells (stress) are finite and exact; ``cos θ``
is not clamped, so collinear triplets (rounded just past ±1) keep their exact gradients.

The work is split in two: :func:`build_graph` finds the pairs and triplets (integer data, computed
once, no gradients), and :func:`features_from_graph` is the differentiable, batched part.
:func:`featurize` does both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import torch

from aenet_fn.core.batch import Batch
from aenet_fn.core.neighbors import Neighbors, neighbors_with_distances, pair_vectors
from aenet_fn.core.records import pytree_record, static_field
from aenet_fn.core.structure import check_species_symbols


def typespin_weights(n_species: int) -> tuple[int, ...]:
    """Integer typespin weights for ``n_species`` species in list order (spec §1.6):
    centred on zero, skipping 0 when the count is even, e.g. 2 → (-1, 1), 3 → (-1, 0, 1)."""
    start = int(-n_species / 2)
    values = [v for v in range(start, start + n_species + 1) if n_species % 2 or v != 0]
    return tuple(values[:n_species])


def typespin_vector(n_species: int, like: torch.Tensor) -> torch.Tensor:
    """:func:`typespin_weights` as a ``[n_species]`` tensor of ``like``'s dtype and device,
    computed there (no host-to-device copy inside a step)."""
    spin = torch.arange(n_species, dtype=like.dtype, device=like.device) + int(-n_species / 2)
    return spin + (spin >= 0).to(spin.dtype) if n_species % 2 == 0 else spin


def _positive(name: str):
    def check(instance, attribute, value) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"ChebyshevParams: {name} must be a positive number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"ChebyshevParams: {name} must be finite, got {value!r}")

    return check


def _order(name: str):
    def check(instance, attribute, value) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"ChebyshevParams: {name} must be an integer >= 0, got {value!r}")

    return check


def _species(value: Sequence[str]) -> tuple[str, ...]:
    symbols = check_species_symbols(value, "ChebyshevParams")
    if not symbols:
        raise ValueError("ChebyshevParams: species must name at least one element")
    repeated = sorted({s for s in symbols if symbols.count(s) > 1})
    if repeated:
        raise ValueError(f"ChebyshevParams: species listed twice: {repeated}")
    return symbols


@pytree_record
@attrs.frozen
class ChebyshevParams:
    """Hyper-parameters of the Chebyshev descriptor (all static; no tensors).

    Attributes:
        species: element symbols; the order defines the typespin weights (spec §1.6).
        rad_order: highest radial polynomial order (``rad_order + 1`` radial functions).
        rad_cutoff: radial cutoff ``Rr`` (Å).
        ang_order: highest angular polynomial order.
        ang_cutoff: angular cutoff ``Ra`` (Å).
        min_cutoff: neighbours at ``d <= min_cutoff`` (Å) are ignored.
    """

    species: tuple[str, ...] = static_field(converter=_species)
    rad_order: int = static_field(validator=_order("rad_order"))
    rad_cutoff: float = static_field(validator=_positive("rad_cutoff"))
    ang_order: int = static_field(validator=_order("ang_order"))
    ang_cutoff: float = static_field(validator=_positive("ang_cutoff"))
    min_cutoff: float = static_field(default=0.55)

    def __attrs_post_init__(self) -> None:
        low = self.min_cutoff
        if isinstance(low, bool) or not isinstance(low, (int, float)) or not 0 <= low:
            raise ValueError(f"ChebyshevParams: min_cutoff must be a number >= 0, got {low!r}")
        if low >= min(self.rad_cutoff, self.ang_cutoff):
            raise ValueError(
                f"ChebyshevParams: min_cutoff {low} must be below both cutoffs "
                f"(rad {self.rad_cutoff}, ang {self.ang_cutoff})"
            )

    @property
    def multi(self) -> bool:
        """True with more than one species (the typespin-weighted half is present)."""
        return len(self.species) > 1

    @property
    def cutoff(self) -> float:
        """Neighbour search radius ``max(Rr, Ra)`` (Å)."""
        return float(max(self.rad_cutoff, self.ang_cutoff))

    @property
    def n_features(self) -> int:
        """Features per atom: ``(rad_order + 1 + ang_order + 1)``, doubled with several species."""
        n = self.rad_order + self.ang_order + 2
        return 2 * n if self.multi else n

    @property
    def typespin(self) -> tuple[int, ...]:
        """Typespin weight of each species, in ``species`` order."""
        return typespin_weights(len(self.species))


@pytree_record
@attrs.frozen(eq=False)
class DescriptorGraph:
    """The integer data the descriptor needs for a batch, computed once.

    Attributes:
        pairs: neighbour entries with ``min_cutoff < d <= max(Rr, Ra)``, sorted by centre.
        radial: ``[E_r]`` indices into ``pairs`` of the radial entries (``d <= Rr``).
        triplet_first, triplet_second: ``[P]`` indices into ``pairs`` of the two legs ``(i→j,
            i→k)`` of each angular triplet (``d <= Ra``, each unordered pair once).
        species: ``[N]`` int64 index of every atom's element in ``ChebyshevParams.species``.
        by_species: ``[N]`` the atoms ordered by species (stably), and ``species_blocks`` how
            many atoms of each species: each species' network then runs on a static slice,
            with no data-dependent shapes (None for the partial graphs of chunked features).
    """

    pairs: Neighbors
    radial: torch.Tensor
    triplet_first: torch.Tensor
    triplet_second: torch.Tensor
    species: torch.Tensor
    by_species: torch.Tensor | None = None
    species_blocks: tuple[int, ...] | None = static_field(default=None)


def species_lookup(
    params: ChebyshevParams, batch_species: Sequence[str], device: torch.device | None = None
) -> torch.Tensor:
    """``[len(batch_species)]`` index of each batch symbol in ``params.species``; raises
    ``ValueError`` for a symbol the descriptor does not know. Made on ``device`` (default CPU)."""
    unknown = [s for s in batch_species if s not in params.species]
    if unknown:
        raise ValueError(
            f"species {unknown} are not in the descriptor's species {list(params.species)}"
        )
    indices = [params.species.index(s) for s in batch_species]
    return torch.tensor(indices, dtype=torch.long, device=device)


MAX_TRIPLETS = 1 << 30
"""Most angular triplets one graph may hold (their indices alone take 16 GiB): beyond, the
structures are refused with their numbers instead of being left to the allocator."""


def _triplets(
    centers: torch.Tensor, n_atoms: int, ang_cutoff: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``(a, b)`` with ``a < b`` among entries sharing a centre (entries sorted by centre),
    counted before they are made (at most ``MAX_TRIPLETS``)."""
    counts = torch.bincount(centers, minlength=n_atoms)
    total = int((counts * (counts - 1) // 2).sum()) if counts.numel() else 0
    if total > MAX_TRIPLETS:
        crowded = int(counts.argmax())
        raise ValueError(
            f"build_graph: {total} angular triplets, more than {MAX_TRIPLETS}: atom {crowded} "
            f"has {int(counts[crowded])} neighbours within the angular cutoff {ang_cutoff} Å "
            "(atoms far too close together, or too many structures at once)"
        )
    group_start = torch.cumsum(counts, 0) - counts
    local = torch.arange(centers.shape[0], device=centers.device) - group_start[centers]
    partners_after = counts[centers] - 1 - local
    first = torch.repeat_interleave(
        torch.arange(centers.shape[0], device=centers.device), partners_after
    )
    run_start = torch.cumsum(partners_after, 0) - partners_after
    step = torch.arange(first.shape[0], device=centers.device) - run_start[first]
    return first, first + 1 + step


@torch.no_grad()
def build_graph(params: ChebyshevParams, batch: Batch) -> DescriptorGraph:
    """Neighbour pairs and angular triplets of ``batch`` for ``params`` (integer data).

    Depends on positions only through which pairs lie inside the cutoffs, so it can be reused
    while positions move less than the distance to the nearest cutoff crossing (e.g. within a
    training run on fixed structures, or for finite-difference checks).
    """
    lookup = species_lookup(params, batch.species, batch.positions.device)
    neighbors, distance = neighbors_with_distances(
        batch.positions, batch.cells, batch.pbc, batch.structure_index, params.cutoff
    )
    beyond_minimum = torch.nonzero(distance > params.min_cutoff).flatten()
    pairs = neighbors.select(beyond_minimum)
    distance = distance.index_select(0, beyond_minimum)
    radial = torch.nonzero(distance <= params.rad_cutoff).flatten()
    angular = torch.nonzero(distance <= params.ang_cutoff).flatten()
    first, second = _triplets(pairs.centers[angular], batch.positions.shape[0], params.ang_cutoff)
    species = lookup[batch.species_index]
    blocks = torch.bincount(species, minlength=len(params.species))
    return DescriptorGraph(
        pairs=pairs,
        radial=radial,
        triplet_first=angular.index_select(0, first),
        triplet_second=angular.index_select(0, second),
        species=species,
        by_species=torch.argsort(species, stable=True),
        species_blocks=tuple(blocks.tolist()),
    )


def scaled_chebyshev(x: torch.Tensor, scale: torch.Tensor, order: int) -> torch.Tensor:
    """``[order + 1, *x.shape]`` values ``scale · T_n(x)``, ``n = 0..order``, by the three-term
    recurrence (which is linear, so it carries the scale). Orders come first: each is one
    contiguous row, which makes building and summing them cheap."""
    values = [scale, x * scale]
    for _ in range(2, order + 1):
        values.append(2 * x * values[-1] - values[-2])
    return torch.stack(values[: order + 1])


def chebyshev_polynomials(x: torch.Tensor, order: int) -> torch.Tensor:
    """``[..., order + 1]`` values ``T_0(x) .. T_order(x)``."""
    return scaled_chebyshev(x, torch.ones_like(x), order).movedim(0, -1)


def cutoff_function(distance: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Cosine cutoff ``(cos(π d / Rc) + 1) / 2`` for ``d < Rc``, else 0 (spec §1.2)."""
    value = 0.5 * (torch.cos(distance * (math.pi / cutoff)) + 1)
    return torch.where(distance < cutoff, value, torch.zeros_like(value))


def _radial_rows(params: ChebyshevParams, distance: torch.Tensor) -> torch.Tensor:
    return scaled_chebyshev(
        2 * distance / params.rad_cutoff - 1,
        cutoff_function(distance, params.rad_cutoff),
        params.rad_order,
    )


def radial_basis(params: ChebyshevParams, distance: torch.Tensor) -> torch.Tensor:
    """``[..., rad_order + 1]`` radial terms ``T_n(2d/Rr − 1) fc(d; Rr)`` of distances ``d`` (Å)."""
    return _radial_rows(params, distance).movedim(0, -1)


def angular_basis(
    params: ChebyshevParams,
    cosine: torch.Tensor,
    cutoff_first: torch.Tensor,
    cutoff_second: torch.Tensor,
) -> torch.Tensor:
    """``[..., ang_order + 1]`` angular terms ``T_n(cos θ) fc(d_ij; Ra) fc(d_ik; Ra)``."""
    return scaled_chebyshev(cosine, cutoff_first * cutoff_second, params.ang_order).movedim(0, -1)


_PAIRS_PER_CHUNK = 1 << 18
"""Pairs featurized at a time: bounds the temporaries, so the cost per atom stays flat for large
systems (the result is the same; chunks split at atom boundaries)."""


def features_from_graph(
    params: ChebyshevParams,
    positions: torch.Tensor,
    cells: torch.Tensor,
    structure_index: torch.Tensor,
    graph: DescriptorGraph,
) -> torch.Tensor:
    """Descriptor of every atom, ``[N, F]``, differentiable in ``positions`` ``[N, 3]`` (Å) and
    ``cells`` ``[B, 3, 3]`` (Å); dtype of ``positions``. ``graph`` comes from
    :func:`build_graph` for the same atoms."""
    n_atoms = positions.shape[0]
    centers = graph.pairs.centers
    if centers.shape[0] <= _PAIRS_PER_CHUNK:
        return _chunk_features(params, positions, cells, structure_index, graph, 0, n_atoms)
    per_atom = torch.bincount(centers, minlength=n_atoms).cumsum(0)
    targets = torch.arange(
        _PAIRS_PER_CHUNK, int(per_atom[-1]), _PAIRS_PER_CHUNK, device=centers.device
    )
    cuts = torch.searchsorted(per_atom, targets, right=True).tolist()
    bounds = sorted({0, *cuts, n_atoms})
    parts = []
    for low, high in zip(bounds[:-1], bounds[1:]):
        p0, p1 = torch.searchsorted(
            centers, torch.tensor([low, high], device=centers.device)
        ).tolist()
        r0, r1 = torch.searchsorted(
            graph.radial, torch.tensor([p0, p1], device=centers.device)
        ).tolist()
        t0, t1 = torch.searchsorted(
            graph.triplet_first, torch.tensor([p0, p1], device=centers.device)
        ).tolist()
        piece = DescriptorGraph(
            pairs=graph.pairs.select(slice(p0, p1)),
            radial=graph.radial[r0:r1] - p0,
            triplet_first=graph.triplet_first[t0:t1] - p0,
            triplet_second=graph.triplet_second[t0:t1] - p0,
            species=graph.species,
        )
        parts.append(_chunk_features(params, positions, cells, structure_index, piece, low, high))
    return torch.cat(parts)


def _chunk_features(params, positions, cells, structure_index, graph, first_atom, end_atom):
    """Features of atoms ``first_atom .. end_atom - 1`` from the pairs (centred on them) and
    triplets of ``graph``.

    Terms are summed per centre *and* neighbour species (radial) or species pair (angular) in
    one scatter each; the plain and typespin-weighted sums are then small combinations of these
    channels (``Σ_j s(j) φ_j = Σ_t s_t Σ_{j of species t} φ_j``)."""
    n_atoms = end_atom - first_atom
    n_species = len(params.species) if params.multi else 1
    vectors = pair_vectors(positions, cells, structure_index, graph.pairs)
    distance = torch.linalg.vector_norm(vectors, dim=1)
    centers = graph.pairs.centers - first_atom
    neighbour_species = (
        graph.species.index_select(0, graph.pairs.neighbors) if params.multi else None
    )

    radial_terms = _radial_rows(params, distance.index_select(0, graph.radial))  # [n_rad, E_r]
    radial_channel = centers.index_select(0, graph.radial) * n_species
    if params.multi:
        radial_channel = radial_channel + neighbour_species.index_select(0, graph.radial)
    radial = radial_terms.new_zeros(radial_terms.shape[0], n_atoms * n_species)
    radial = radial.index_add(1, radial_channel, radial_terms)

    units = vectors / distance[:, None]
    first, second = graph.triplet_first, graph.triplet_second
    cosine = (units.index_select(0, first) * units.index_select(0, second)).sum(dim=1)
    fc_ang = cutoff_function(distance, params.ang_cutoff)
    fc_pair = fc_ang.index_select(0, first) * fc_ang.index_select(0, second)
    angular_terms = scaled_chebyshev(cosine, fc_pair, params.ang_order)
    angular_channel = centers.index_select(0, first) * n_species**2
    if params.multi:
        angular_channel = angular_channel + (
            neighbour_species.index_select(0, first) * n_species
            + neighbour_species.index_select(0, second)
        )
    angular = angular_terms.new_zeros(angular_terms.shape[0], n_atoms * n_species**2)
    angular = angular.index_add(1, angular_channel, angular_terms)

    radial = radial.view(-1, n_atoms, n_species)
    angular = angular.view(-1, n_atoms, n_species**2)
    blocks = [radial.sum(dim=2), angular.sum(dim=2)]
    if params.multi:
        spin = typespin_vector(len(params.species), positions)
        blocks += [radial @ spin, angular @ torch.outer(spin, spin).flatten()]
    return torch.cat(blocks).T


def featurize(
    params: ChebyshevParams, batch: Batch, graph: DescriptorGraph | None = None
) -> torch.Tensor:
    """Chebyshev features of every atom of ``batch``, ``[N, F]`` in batch atom order, in the dtype
    of ``batch.positions``. Differentiable in ``batch.positions`` and ``batch.cells``.

    ``graph`` (from :func:`build_graph`) may be passed to reuse the pair and triplet indices.
    """
    if graph is None:
        graph = build_graph(params, batch)
    return features_from_graph(params, batch.positions, batch.cells, batch.structure_index, graph)
