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

from aenet_fn._records import pytree_record

OVERLAP_DISTANCE = 1e-4
"""Å; two atoms closer than this are reported as overlapping."""

_BINS_PER_CUTOFF = 2
"""Bin edge = cutoff / this; each atom scans (2·this + 1)³ bins around its own."""
_CENTRE_CHUNK = 4096
"""Centre atoms searched at a time: keeps the temporaries of a chunk in cache."""
_BIN_OFFSETS = torch.stack(
    torch.meshgrid(*(torch.arange(-_BINS_PER_CUTOFF, _BINS_PER_CUTOFF + 1),) * 3, indexing="ij"),
    dim=-1,
).reshape(-1, 3)


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

    def select(self, mask_or_index: torch.Tensor) -> Neighbors:
        """The entries picked by a boolean mask or an index tensor."""
        return Neighbors(
            self.centers[mask_or_index], self.neighbors[mask_or_index], self.shifts[mask_or_index]
        )


def pair_vectors(
    positions: torch.Tensor, cells: torch.Tensor, structure_index: torch.Tensor, pairs: Neighbors
) -> torch.Tensor:
    """Displacements ``r_j - r_i + S · cell`` of the entries of ``pairs``, ``[E, 3]`` (Å).

    Differentiable in ``positions`` ``[N, 3]`` and ``cells`` ``[B, 3, 3]``.
    """
    cell_of_pair = cells[structure_index[pairs.centers]]
    lattice = torch.einsum("ei,eij->ej", pairs.shifts.to(positions.dtype), cell_of_pair)
    return positions[pairs.neighbors] - positions[pairs.centers] + lattice


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

    sizes = 2 * n_images + 1  # candidate translations per axis, per structure
    per_atom = sizes.prod(dim=1)[structure_index]
    atom = torch.repeat_interleave(torch.arange(frac.shape[0], device=frac.device), per_atom)
    start = torch.cumsum(per_atom, 0) - per_atom
    local = torch.arange(atom.shape[0], device=frac.device) - start[atom]
    structure = structure_index[atom]
    size = sizes[structure]
    digits_z = local % size[:, 2]
    digits_y = (local // size[:, 2]) % size[:, 1]
    digits_x = local // (size[:, 2] * size[:, 1])
    translation = torch.stack([digits_x, digits_y, digits_z], dim=1) - n_images[structure]
    shifted = frac[atom] + translation
    bound = margin[structure]
    inside = (shifted >= -bound) & (shifted < 1 + bound) | ~pbc[structure]
    keep = inside.all(dim=1)
    atom, translation, structure = atom[keep], translation[keep], structure[keep]
    points = torch.einsum("pi,pij->pj", shifted[keep], basis[structure])
    return atom, translation, structure, points


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
    # (structure, bin) and only occupied bins exist (sorted keys + searchsorted, no dense grid).
    n_structures = cells.shape[0]
    fill = torch.full((n_structures, 3), float("inf"), dtype=torch.float64, device=device)
    origin = fill.scatter_reduce(0, structure[:, None].expand(-1, 3), points, "amin")
    bin_edge = cutoff / _BINS_PER_CUTOFF
    bins = torch.floor((points - origin[structure]) / bin_edge).long()
    dims = torch.zeros((n_structures, 3), dtype=torch.long, device=device)
    dims = dims.scatter_reduce(0, structure[:, None].expand(-1, 3), bins + 1, "amax")
    per_structure = dims.prod(dim=1)
    if float(per_structure.double().sum()) > 2.0**62:
        raise ValueError(
            "neighbor_list: the atoms are spread over too large a region for binning "
            f"(cutoff {cutoff} Å); check the coordinates for stray atoms"
        )
    key_offset = torch.cumsum(per_structure, 0) - per_structure

    def bin_key(ijk: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        d = dims[s]
        return key_offset[s] + (ijk[..., 0] * d[..., 1] + ijk[..., 1]) * d[..., 2] + ijk[..., 2]

    keys = bin_key(bins, structure)
    order = torch.argsort(keys, stable=True)  # store points bin by bin: gathers stay local
    sorted_keys, points, atom, translation = (
        keys[order],
        points[order],
        atom[order],
        translation[order],
    )

    centre_bins = torch.floor((centre_points - origin[structure_index]) / bin_edge).long()
    n_offsets = _BIN_OFFSETS.shape[0]
    offsets = _BIN_OFFSETS.to(device)

    def search(centre_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Entries (centre, neighbour, shift, squared distance) of the centres ``centre_ids``."""
        around = centre_bins[centre_ids, None, :] + offsets[None]  # [n, n_offsets, 3]
        centre_structure = structure_index[centre_ids, None].expand(-1, n_offsets)
        valid = ((around >= 0) & (around < dims[centre_structure])).all(dim=-1)
        around_keys = bin_key(around, centre_structure)
        first = torch.searchsorted(sorted_keys, around_keys, right=False)
        last = torch.searchsorted(sorted_keys, around_keys, right=True)
        counts = torch.where(valid, last - first, 0).flatten()
        centre = torch.repeat_interleave(centre_ids.repeat_interleave(n_offsets), counts)
        run_start = torch.cumsum(counts, 0) - counts
        within = torch.arange(centre.shape[0], device=device) - torch.repeat_interleave(
            run_start, counts
        )
        point = torch.repeat_interleave(first.flatten(), counts) + within
        gap = points.index_select(0, point) - centre_points.index_select(0, centre)
        distance2 = (gap * gap).sum(dim=1)
        close = torch.nonzero(distance2 <= cutoff * cutoff).flatten()
        centre, point, distance2 = centre[close], point[close], distance2[close]
        neighbour, shift = atom[point], translation[point]
        keep = (neighbour != centre) | (shift != 0).any(dim=1)  # drop (i, i, T = 0)
        centre, neighbour, shift = centre[keep], neighbour[keep], shift[keep]
        shift = shift - wraps[neighbour].long() + wraps[centre].long()  # relative to r as given
        return centre, neighbour, shift, distance2[keep]

    chunks = [
        search(torch.arange(low, min(low + _CENTRE_CHUNK, n_atoms), device=device))
        for low in range(0, n_atoms, _CENTRE_CHUNK)
    ]
    centre, neighbour, shifts, distance2 = (torch.cat(parts) for parts in zip(*chunks))

    if distance2.numel() and float(distance2.min()) < OVERLAP_DISTANCE**2:
        k = int(torch.argmin(distance2))
        i, j = int(centre[k]), int(neighbour[k])
        raise ValueError(
            f"neighbor_list: atoms {i} and {j} (structure {int(structure_index[i])}) overlap: "
            f"distance {float(distance2[k]) ** 0.5:.3g} Å"
        )
    return Neighbors(centers=centre, neighbors=neighbour, shifts=shifts)


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
