"""Periodic neighbour lists by cell binning, batched over many structures.

The list is *full*: every pair appears in both directions, and periodic images of an atom,
including images of the centre atom itself, are separate entries. An entry ``(i, j, S)`` means
that atom ``j`` shifted by the integer lattice translation ``S`` lies within the cutoff of atom
``i``; its displacement is ``r_j - r_i + S · cell`` with the positions *as given* (the convention of
``ase.neighborlist.neighbor_list``). This equals ``(f_j + T) · cell - f_i · cell`` with wrapped
fractional coordinates ``f`` and ``T = S + floor(f_j) - floor(f_i)``, so atoms outside the cell
are handled exactly (spec §1.8, §12.1). Along non-periodic axes there are no images and no
wrapping.

The search is linear in the number of atoms: atoms and the ghost images within the cutoff of the
cell are binned on a grid of cubes with half the cutoff as edge, and each atom scans the 125 bins
around it. Everything is native torch (sort, searchsorted, repeat_interleave) and runs on any
device; no Python loop over atoms or structures.
"""

from __future__ import annotations

import attrs
import torch

from aenet_fn.core.records import pytree_record

OVERLAP_DISTANCE = 1e-4
"""Å; two atoms closer than this are reported as overlapping."""

_BINS_PER_CUTOFF = 2
"""Bin edge = cutoff / this; each atom scans (2·this + 1)³ bins around its own."""
_CENTRE_CHUNK = 4096
"""Centre atoms searched at a time: keeps the temporaries of a chunk in cache."""

MAX_PAIRS = 1 << 28
"""Most neighbour entries one search returns (with their shifts and distances about 13 GiB):
beyond, the structures are refused with their numbers instead of being left to the allocator."""

_CANDIDATES_PER_CHUNK = 1 << 24
"""Most candidate pairs (points in the bins around the centres) one step of the search holds:
a denser chunk of centres is searched in halves, and a single atom with more is refused."""

_DENSE_BINS_PER_POINT = 16
_DENSE_BINS_MIN = 1 << 16
"""Bins are looked up in a dense table up to this many per binned point (plus the minimum)."""


@pytree_record
@attrs.frozen(eq=False)
class Neighbors:
    """A full neighbour list with ``E`` entries.

    Attributes:
        centers: ``[E]`` int64 atom index ``i``.
        neighbors: ``[E]`` int64 atom index ``j``.
        shifts: ``[E, 3]`` int64 lattice translation ``S``; the displacement from ``i`` to the
            image of ``j`` is ``r_j - r_i + S · cell`` (Å).
    """

    centers: torch.Tensor
    neighbors: torch.Tensor
    shifts: torch.Tensor

    def __len__(self) -> int:
        return int(self.centers.shape[0])

    def select(self, mask_or_index: torch.Tensor | slice) -> Neighbors:
        """The entries picked by a boolean mask, an index tensor or a slice."""
        indices = isinstance(mask_or_index, torch.Tensor) and mask_or_index.dtype != torch.bool

        def pick(values: torch.Tensor) -> torch.Tensor:
            return values.index_select(0, mask_or_index) if indices else values[mask_or_index]

        return Neighbors(pick(self.centers), pick(self.neighbors), pick(self.shifts))


def pair_vectors(
    positions: torch.Tensor, cells: torch.Tensor, structure_index: torch.Tensor, pairs: Neighbors
) -> torch.Tensor:
    """Displacements ``r_j - r_i + S · cell`` of the entries of ``pairs``, ``[E, 3]`` (Å).

    Differentiable in ``positions`` ``[N, 3]`` and ``cells`` ``[B, 3, 3]``.
    """
    cell_of_pair = cells.index_select(0, structure_index.index_select(0, pairs.centers))
    lattice = torch.einsum("ei,eij->ej", pairs.shifts.to(positions.dtype), cell_of_pair)
    ends = positions.index_select(0, pairs.neighbors) - positions.index_select(0, pairs.centers)
    return ends + lattice


def _check_inputs(positions, cells, pbc, structure_index, cutoff) -> None:
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"neighbor_list: positions must be [N, 3], got {tuple(positions.shape)}")
    if cells.ndim != 3 or cells.shape[1:] != (3, 3):
        raise ValueError(f"neighbor_list: cells must be [B, 3, 3], got {tuple(cells.shape)}")
    if pbc.shape != (cells.shape[0], 3):
        raise ValueError(f"neighbor_list: pbc must be [B, 3], got {tuple(pbc.shape)}")
    if structure_index.shape != positions.shape[:1]:
        raise ValueError("neighbor_list: structure_index must have one entry per atom")
    if not (isinstance(cutoff, (int, float)) and 0 < cutoff < float("inf")):
        raise ValueError(f"neighbor_list: cutoff must be a positive number of Å, got {cutoff!r}")
    if not torch.isfinite(positions).all():
        raise ValueError("neighbor_list: positions contain NaN or inf")
    if not torch.isfinite(cells).all():
        raise ValueError("neighbor_list: cells contain NaN or inf")
    if cells.dtype != positions.dtype:
        raise ValueError(
            f"neighbor_list: cells are {cells.dtype} but positions {positions.dtype}; "
            "give both in one floating dtype"
        )


MAX_IMAGES_PER_ATOM = 100_000
"""Most periodic images of one atom the search takes (a cell about 22 times narrower than the
cutoff): beyond, the cell is refused as too small instead of exhausting memory."""


def _ghost_points(frac, pbc, basis, structure_index, cutoff):
    """All atom images within ``cutoff`` of their cell: (atom, translation T, Cartesian point)."""
    volume = torch.linalg.det(basis).abs()
    a, b, c = basis.unbind(dim=1)
    face_areas = torch.stack(
        [torch.linalg.cross(b, c), torch.linalg.cross(c, a), torch.linalg.cross(a, b)], dim=1
    ).norm(dim=-1)
    widths = volume[:, None] / face_areas  # [B, 3] perpendicular widths
    n_images = torch.where(pbc, torch.ceil(cutoff / widths), 0).long()
    margin = cutoff / widths * (1 + 1e-9) + 1e-12

    # Per atom and axis, the translations T that keep f + T within the margin of the cell
    # (``-margin <= f + T < 1 + margin``, ``|T| <= n_images``); none along non-periodic axes.
    images = n_images[structure_index]
    bound = margin[structure_index]
    lowest = torch.maximum(torch.ceil(-bound - frac).long(), -images)
    highest = torch.minimum(torch.ceil(1 + bound - frac).long() - 1, images)
    sizes = torch.where(pbc[structure_index], highest - lowest + 1, 1).clamp(min=0)
    lowest = torch.where(pbc[structure_index], lowest, 0)
    per_atom = sizes.prod(dim=1)
    if per_atom.numel() and int(per_atom.max()) > MAX_IMAGES_PER_ATOM:
        worst = int(structure_index[per_atom.argmax()])
        raise ValueError(
            f"neighbor_list: the cell of structure {worst} is too small for the cutoff "
            f"{cutoff} Å: {int(per_atom.max())} periodic images of an atom (more than "
            f"{MAX_IMAGES_PER_ATOM}); its perpendicular widths are "
            f"{[round(w, 4) for w in widths[worst].tolist()]} Å"
        )
    atom = torch.repeat_interleave(torch.arange(frac.shape[0], device=frac.device), per_atom)
    start = torch.cumsum(per_atom, 0) - per_atom
    local = torch.arange(atom.shape[0], device=frac.device) - start[atom]
    size = sizes[atom]
    digits_z = local % size[:, 2]
    digits_y = (local // size[:, 2]) % size[:, 1]
    digits_x = local // (size[:, 2] * size[:, 1])
    translation = torch.stack([digits_x, digits_y, digits_z], dim=1) + lowest[atom]
    structure = structure_index[atom]
    points = torch.einsum("pi,pij->pj", frac[atom] + translation, basis[structure])
    return atom, translation, structure, points


def _bin_lookup(sorted_keys: torch.Tensor, n_keys: int):
    """A function from bin keys to (position of the bin's first point in ``sorted_keys``, number
    of points in the bin). A dense table when the key space is small next to the number of
    points, binary search otherwise (e.g. a molecule with a stray atom far away)."""
    if n_keys <= _DENSE_BINS_PER_POINT * sorted_keys.numel() + _DENSE_BINS_MIN:
        counts = torch.bincount(sorted_keys, minlength=n_keys)
        starts = torch.cumsum(counts, 0) - counts
        return lambda keys: (starts[keys], counts[keys])

    def binary_search(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = torch.searchsorted(sorted_keys, keys)
        return first, torch.searchsorted(sorted_keys, keys, right=True) - first

    return binary_search


@torch.no_grad()
def batch_neighbor_list(
    positions: torch.Tensor,
    cells: torch.Tensor,
    pbc: torch.Tensor,
    structure_index: torch.Tensor,
    cutoff: float,
) -> Neighbors:
    """Full neighbour lists of many structures at once, in the flat atom numbering.

    Args:
        positions: ``[N, 3]`` Cartesian coordinates (Å) of all atoms.
        cells: ``[B, 3, 3]`` lattice vectors as rows (Å); ignored for structures with no
            periodic axis (zeros are fine there).
        pbc: ``[B, 3]`` bool periodic flags.
        structure_index: ``[N]`` int64 structure of each atom.
        cutoff: radius (Å); pairs with distance ``<= cutoff`` are listed.

    Returns:
        :class:`Neighbors` sorted by centre atom. Not differentiable (integer data); get
        differentiable displacements with :func:`pair_vectors`.
    """
    return neighbors_with_distances(positions, cells, pbc, structure_index, cutoff)[0]


@torch.no_grad()
def neighbors_with_distances(
    positions: torch.Tensor,
    cells: torch.Tensor,
    pbc: torch.Tensor,
    structure_index: torch.Tensor,
    cutoff: float,
) -> tuple[Neighbors, torch.Tensor]:
    """:func:`batch_neighbor_list` and the ``[E]`` float64 distance (Å) of every entry."""
    pbc = torch.as_tensor(pbc, dtype=torch.bool, device=positions.device)
    _check_inputs(positions, cells, pbc, structure_index, cutoff)
    device = positions.device
    pos = positions.detach().to(torch.float64)
    n_atoms = pos.shape[0]
    periodic = pbc.any(dim=1)
    eye = torch.eye(3, dtype=torch.float64, device=device).expand(cells.shape[0], 3, 3)
    basis = torch.where(periodic[:, None, None], cells.detach().to(torch.float64), eye)
    frac = torch.einsum("ni,nij->nj", pos, torch.linalg.inv(basis)[structure_index])
    wraps = torch.where(pbc[structure_index], torch.floor(frac), 0.0)
    frac = frac - wraps
    centre_points = torch.einsum("ni,nij->nj", frac, basis[structure_index])

    atom, translation, structure, points = _ghost_points(frac, pbc, basis, structure_index, cutoff)

    # Bin all points on a per-structure grid of cubes (edge = cutoff / 2); keys are unique per
    # (structure, bin), and the points are stored sorted by key.
    n_structures = cells.shape[0]
    fill = torch.full((n_structures, 3), float("inf"), dtype=torch.float64, device=device)
    origin = fill.scatter_reduce(0, structure[:, None].expand(-1, 3), points, "amin")
    bin_edge = cutoff / _BINS_PER_CUTOFF
    bins = torch.floor((points - origin[structure]) / bin_edge)
    dims = torch.zeros((n_structures, 3), dtype=torch.float64, device=device)
    dims = dims.scatter_reduce(0, structure[:, None].expand(-1, 3), bins + 1, "amax")
    if float(dims.prod(dim=1).sum()) > 2.0**62:
        raise ValueError(
            "neighbor_list: the atoms are spread over too large a region for binning "
            f"(cutoff {cutoff} Å); check the coordinates for stray atoms"
        )
    bins, dims = bins.long(), dims.long()
    per_structure = dims.prod(dim=1)
    key_offset = torch.cumsum(per_structure, 0) - per_structure

    d = dims[structure]
    keys = key_offset[structure] + (bins[:, 0] * d[:, 1] + bins[:, 1]) * d[:, 2] + bins[:, 2]
    order = torch.argsort(keys, stable=True)  # store points bin by bin: gathers stay local
    sorted_keys, points, atom, translation = (
        keys[order],
        points[order],
        atom[order],
        translation[order],
    )

    centre_bins_real = (centre_points - origin[structure_index]) / bin_edge
    centre_bins = torch.floor(centre_bins_real).long()
    # Where each centre sits inside its bin (0..1 per axis), to skip the bins around it that lie
    # entirely beyond the cutoff; the slack keeps round-off in the binning from dropping a pair.
    centre_fraction = centre_bins_real - centre_bins
    reach2 = (_BINS_PER_CUTOFF * (1 + 1e-9)) ** 2 + 1e-12
    steps = torch.arange(-_BINS_PER_CUTOFF, _BINS_PER_CUTOFF + 1, device=device)
    strides = torch.stack([dims[:, 1] * dims[:, 2], dims[:, 2], torch.ones_like(dims[:, 2])], 1)
    bin_ranges = _bin_lookup(sorted_keys, int(per_structure.sum()))
    wraps = wraps.long()

    def search(low: int, high: int) -> tuple[torch.Tensor, ...]:
        """Entries (centre, neighbour, shift, distance) of the centres ``low .. high - 1``."""
        own = structure_index[low:high]
        # Per axis: the bins scanned around each centre, whether they exist, their distance
        # from the centre (in bin edges) and their part of the key; [n, 3, steps].
        around = centre_bins[low:high, :, None] + steps
        exists = (around >= 0) & (around < dims[own][:, :, None])
        fraction = centre_fraction[low:high, :, None]
        gap = (steps - fraction).clamp(min=0) + (fraction - 1 - steps).clamp(min=0)
        gap2 = gap * gap
        key_part = around * strides[own][:, :, None]
        scanned = (
            exists[:, 0, :, None, None] & exists[:, 1, None, :, None] & exists[:, 2, None, None, :]
        ) & (
            gap2[:, 0, :, None, None] + gap2[:, 1, None, :, None] + gap2[:, 2, None, None, :]
            <= reach2
        )
        key_table = (
            key_part[:, 0, :, None, None]
            + key_part[:, 1, None, :, None]
            + key_part[:, 2, None, None, :]
        ) + key_offset[own][:, None, None, None]
        scanned_bins = torch.nonzero(scanned.flatten()).flatten()
        first, counts = bin_ranges(key_table.flatten()[scanned_bins])
        candidates = int(counts.sum())  # counted before they are made
        if candidates > _CANDIDATES_PER_CHUNK:
            if high - low == 1:
                raise ValueError(
                    f"neighbor_list: atom {low} (structure {int(structure_index[low])}) has "
                    f"{candidates} atoms in the bins around it (more than "
                    f"{_CANDIDATES_PER_CHUNK}) for the cutoff {cutoff} Å: atoms far too close "
                    "together (are the coordinates in Å?)"
                )
            middle = (low + high) // 2
            return tuple(map(torch.cat, zip(search(low, middle), search(middle, high))))
        centre = torch.repeat_interleave(scanned_bins // steps.shape[0] ** 3 + low, counts)
        run_start = torch.cumsum(counts, 0) - counts
        point = torch.arange(centre.shape[0], device=device) + torch.repeat_interleave(
            first - run_start, counts
        )
        gap = points.index_select(0, point) - centre_points.index_select(0, centre)
        distance = torch.linalg.vector_norm(gap, dim=1)
        close = torch.nonzero(distance <= cutoff).flatten()
        centre, point, distance = (x.index_select(0, close) for x in (centre, point, distance))
        neighbour, shift = atom.index_select(0, point), translation.index_select(0, point)
        keep = (neighbour != centre) | (shift != 0).any(dim=1)  # drop (i, i, T = 0)
        keep = torch.nonzero(keep).flatten()
        centre, neighbour, shift, distance = (
            x.index_select(0, keep) for x in (centre, neighbour, shift, distance)
        )
        shift = shift - wraps.index_select(0, neighbour) + wraps.index_select(0, centre)
        return centre, neighbour, shift, distance  # shifts relative to r as given

    chunks, found = [], 0
    for low in range(0, n_atoms, _CENTRE_CHUNK):
        chunks.append(search(low, min(low + _CENTRE_CHUNK, n_atoms)))
        found += chunks[-1][0].shape[0]
        if found > MAX_PAIRS:
            searched = min(low + _CENTRE_CHUNK, n_atoms)
            raise ValueError(
                f"neighbor_list: more than {MAX_PAIRS} neighbour entries within the cutoff "
                f"{cutoff} Å ({found} for the first {searched} of {n_atoms} atoms, "
                f"{found / searched:.0f} per atom): atoms far too close together (are the "
                "coordinates in Å?), or too many structures at once"
            )
    centre, neighbour, shifts, distance = (torch.cat(parts) for parts in zip(*chunks))

    if distance.numel() and float(distance.min()) < OVERLAP_DISTANCE:
        k = int(torch.argmin(distance))
        i, j = int(centre[k]), int(neighbour[k])
        raise ValueError(
            f"neighbor_list: atoms {i} and {j} (structure {int(structure_index[i])}) overlap: "
            f"distance {float(distance[k]):.3g} Å"
        )
    return Neighbors(centers=centre, neighbors=neighbour, shifts=shifts), distance


def neighbor_list(
    positions: torch.Tensor,
    cell: torch.Tensor | None,
    pbc: torch.Tensor | tuple[bool, bool, bool] | None,
    cutoff: float,
) -> Neighbors:
    """Full neighbour list of one structure (see :func:`batch_neighbor_list`).

    Args:
        positions: ``[n, 3]`` Cartesian coordinates (Å).
        cell: ``[3, 3]`` lattice vectors as rows (Å), or None for an isolated system.
        pbc: three periodic flags; None means all periodic with a cell, none without.
        cutoff: radius (Å).
    """
    positions = torch.as_tensor(positions)
    if not positions.is_floating_point():
        positions = positions.to(torch.float64)
    if cell is None:
        if pbc is not None and any(bool(p) for p in pbc):
            raise ValueError("neighbor_list: periodic boundary conditions need a cell")
        cell = torch.zeros(3, 3, dtype=positions.dtype, device=positions.device)
        pbc = (False, False, False)
    elif pbc is None:
        pbc = (True, True, True)
    cell = torch.as_tensor(cell, dtype=positions.dtype, device=positions.device)
    pbc = torch.as_tensor(pbc, dtype=torch.bool, device=positions.device).reshape(1, 3)
    if pbc.any() and abs(float(torch.linalg.det(cell.double()))) < 1e-8:
        raise ValueError("neighbor_list: the cell is singular")
    index = torch.zeros(positions.shape[0], dtype=torch.long, device=positions.device)
    return batch_neighbor_list(positions, cell.reshape(1, 3, 3), pbc, index, cutoff)
