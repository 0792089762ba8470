"""Valid random structures by construction: atoms on a jittered grid of sites.

A cell shape is scaled until a grid of ``n_a × n_b × n_c`` sites fits it with every pair of
sites, periodic images included, at least ``min_distance`` apart; atoms take distinct sites and
move within the middle ``jitter`` fraction of their site. Two atoms in different sites then
differ by at least ``(1 − jitter) / n_k`` in some fractional coordinate ``k``, i.e. by at least
``(1 − jitter) w_k / n_k ≥ min_distance`` Å across the lattice planes of width ``w_k``: the
minimum distance holds by construction, with no draw ever rejected.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import numpy as np

from aenet_fn.core.structure import Structure

PERIODICITIES: dict[str, tuple[bool, bool, bool]] = {
    "bulk": (True, True, True),
    "slab": (True, True, False),
    "wire": (True, False, False),
    "molecule": (False, False, False),
}
"""Named periodicities: a bulk cell, a slab (periodic in a and b), a wire (periodic in a) and a
molecule or cluster (no cell)."""


def as_pbc(periodicity: str | Sequence[bool]) -> tuple[bool, bool, bool]:
    """Three periodic flags from a name of :data:`PERIODICITIES` or three booleans."""
    if isinstance(periodicity, str):
        if periodicity not in PERIODICITIES:
            raise ValueError(
                f"unknown periodicity {periodicity!r}; use one of {sorted(PERIODICITIES)} "
                "or three booleans"
            )
        return PERIODICITIES[periodicity]
    flags = tuple(periodicity)
    if len(flags) != 3 or not all(isinstance(f, (bool, np.bool_)) for f in flags):
        raise ValueError(f"periodicity must be a name or three booleans, got {periodicity!r}")
    return tuple(bool(f) for f in flags)


def cell_shape(
    lengths: Sequence[float], tilts: Sequence[float], orientation: np.ndarray
) -> np.ndarray:
    """``[3, 3]`` lattice vectors as rows: a lower-triangular cell with diagonal ``lengths``
    and tilt factors ``tilts`` (b_x/a, c_x/a, c_y/b, as LAMMPS' xy, xz, yz), rotated by the
    ``[3, 3]`` orthogonal ``orientation`` (rows times ``orientation``)."""
    a, b, c = (float(x) for x in lengths)
    xy, xz, yz = (float(t) for t in tilts)
    lower = np.array([[a, 0.0, 0.0], [xy * a, b, 0.0], [xz * a, yz * b, c]])
    return lower @ np.asarray(orientation, dtype=np.float64)


def plane_widths(cell: np.ndarray) -> np.ndarray:
    """``[3]`` distance (Å) between neighbouring lattice planes of each family: the cell's volume
    over the area spanned by the other two vectors."""
    volume = abs(float(np.linalg.det(cell)))
    areas = [np.linalg.norm(np.cross(cell[(k + 1) % 3], cell[(k + 2) % 3])) for k in range(3)]
    return volume / np.array(areas)


@attrs.frozen
class SiteGrid:
    """A cell and its grid of sites (see the module docstring).

    Attributes:
        cell: ``[3, 3]`` lattice vectors as rows (Å).
        counts: sites along each lattice vector.
        jitter: the fraction of a site's width an atom moves within.
    """

    cell: np.ndarray
    counts: tuple[int, int, int]
    jitter: float

    @property
    def n_sites(self) -> int:
        """Number of sites."""
        return math.prod(self.counts)

    def positions(self, sites: Sequence[int], offsets: np.ndarray) -> np.ndarray:
        """``[n, 3]`` Cartesian positions (Å) of atoms at the distinct flat site indices
        ``sites`` moved by ``offsets`` ``[n, 3]`` in ``[-0.5, 0.5]`` (fractions of the jitter
        range)."""
        index = np.array(np.unravel_index(np.asarray(sites, dtype=np.int64), self.counts)).T
        offsets = np.clip(np.asarray(offsets, dtype=np.float64).reshape(-1, 3), -0.5, 0.5)
        fractional = (index + 0.5 + self.jitter * offsets) / np.array(self.counts)
        return fractional @ self.cell


def site_grid(
    shape: np.ndarray, n_atoms: int, min_distance: float, fill: float = 0.5, jitter: float = 0.5
) -> SiteGrid:
    """The smallest scaling of the cell ``shape`` ``[3, 3]`` (steps of 2 %) whose grid has at
    least ``n_atoms / fill`` sites at least ``min_distance`` Å apart, images included.

    ``fill`` in (0, 1] is the largest fraction of sites occupied (lower: sparser structures);
    ``jitter`` in [0, 1) the fraction of its site an atom moves within.
    """
    if not min_distance > 0:
        raise ValueError(f"min_distance must be > 0 Å, got {min_distance}")
    if not 0 < fill <= 1:
        raise ValueError(f"fill must be in (0, 1], got {fill}")
    if not 0 <= jitter < 1:
        raise ValueError(f"jitter must be in [0, 1), got {jitter}")
    if n_atoms < 1:
        raise ValueError(f"n_atoms must be >= 1, got {n_atoms}")
    shape = np.asarray(shape, dtype=np.float64)
    widths = plane_widths(shape)
    spacing = min_distance / (1.0 - jitter)  # the narrowest a site may be
    scale = spacing / widths.min()
    needed = math.ceil(n_atoms / fill)
    while True:
        counts = tuple(int(c) for c in np.floor(scale * widths / spacing * (1 + 1e-12)))
        if math.prod(counts) >= needed:
            return SiteGrid(cell=scale * shape, counts=counts, jitter=jitter)
        scale *= 1.02


def random_structure(
    seed: int | np.random.Generator,
    n_atoms: int,
    species: Sequence[str] = ("Ti", "O"),
    periodicity: str | Sequence[bool] = "bulk",
    min_distance: float = 1.0,
    max_tilt: float = 0.6,
    fill: float = 0.5,
    name: str | None = None,
) -> Structure:
    """A random structure of ``n_atoms`` atoms of ``species`` (cycled, then shuffled) at least
    ``min_distance`` Å apart, periodic images included, in a random triclinic cell (rotated,
    tilt factors up to ``max_tilt``) of the given periodicity (a name of
    :data:`PERIODICITIES` or three booleans; a molecule has no cell). Deterministic for a
    given integer ``seed``; for drawing with hypothesis use
    :func:`aenet_fn.testing.strategies.structures`."""
    rng = np.random.default_rng(seed)
    pbc = as_pbc(periodicity)
    u = rng.uniform(0.0, 1.0, 3)
    shape = cell_shape(rng.uniform(1.0, 1.6, 3), rng.uniform(-max_tilt, max_tilt, 3), rotation(u))
    grid = site_grid(shape, n_atoms, min_distance, fill=fill)
    sites = rng.choice(grid.n_sites, size=n_atoms, replace=False)
    positions = grid.positions(sites, rng.uniform(-0.5, 0.5, (n_atoms, 3)))
    symbols = [species[i % len(species)] for i in range(n_atoms)]
    rng.shuffle(symbols)
    label = name if name is not None else (f"random-{seed}" if isinstance(seed, int) else None)
    return assemble(positions, symbols, grid.cell, pbc, label)


def assemble(
    positions: np.ndarray,
    symbols: Sequence[str],
    cell: np.ndarray,
    pbc: tuple[bool, bool, bool],
    name: str | None,
) -> Structure:
    """A :class:`Structure` with ``cell`` kept only when some axis is periodic."""
    periodic = any(pbc)
    return Structure(
        positions,
        tuple(symbols),
        cell=cell if periodic else None,
        pbc=pbc if periodic else None,
        name=name,
    )


def rotation(u: Sequence[float], improper: bool = False) -> np.ndarray:
    """``[3, 3]`` orthogonal matrix from three numbers ``u`` in [0, 1]: the rotation of the unit
    quaternion of Shoemake's construction (uniform over rotations for uniform ``u``), times
    −1 when ``improper`` (a rotation combined with the inversion: a reflection)."""
    u1, u2, u3 = (float(x) for x in u)
    a, b = math.sqrt(1.0 - u1), math.sqrt(u1)
    x, y = a * math.sin(2 * math.pi * u2), a * math.cos(2 * math.pi * u2)
    z, w = b * math.sin(2 * math.pi * u3), b * math.cos(2 * math.pi * u3)
    matrix = np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )
    return -matrix if improper else matrix
