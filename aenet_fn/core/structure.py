"""The atomic structure record.

A :class:`Structure` is one configuration of atoms: Cartesian positions (Å), chemical symbols, an
optional cell (rows are the lattice vectors a, b, c in Å) with periodic flags, and optional labels
(total energy in eV, forces in eV/Å). It is immutable and validated at construction, so that every
function downstream can trust it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import torch
from ase.data import chemical_symbols
from ase.stress import voigt_6_to_full_3x3_stress

from aenet_fn.core.records import pytree_record, static_field

ELEMENT_SYMBOLS = frozenset(chemical_symbols[1:])
"""Chemical symbols accepted as species (H to Og)."""

_SINGULAR_VOLUME = 1e-8  # Å^3; a cell with |det| below this is rejected as singular


def _label(name: str | None) -> str:
    return f"structure {name!r}" if name else "structure"


def check_float_dtype(dtype: Any, where: str) -> torch.dtype:
    """Validate a floating dtype argument; returns it. Raises ``TypeError`` when ``dtype`` is not
    a ``torch.dtype`` (e.g. the string ``"float64"``) and ``ValueError`` for any dtype other than
    ``torch.float32`` or ``torch.float64`` (integers would truncate, float16 loses accuracy)."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"{where}: dtype must be torch.float32 or torch.float64, got {dtype!r} "
            f"({type(dtype).__name__}, not a torch.dtype)"
        )
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{where}: dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype


def _non_real_kind(value: Any) -> str | None:
    """``"complex"`` or ``"boolean"`` when ``value`` holds such numbers, else None."""
    if isinstance(value, torch.Tensor):
        if value.is_complex():
            return "complex"
        return "boolean" if value.dtype == torch.bool else None
    kind = np.asarray(value).dtype.kind
    return {"c": "complex", "b": "boolean"}.get(kind)


def _as_float64(value: Any, what: str, name: str | None) -> torch.Tensor:
    try:
        kind = _non_real_kind(value)
        if kind is None:
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            array = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{_label(name)}: {what} is not numeric: {err}") from None
    if kind is not None:
        raise ValueError(f"{_label(name)}: {what} must be real numbers, got {kind} values")
    return torch.from_numpy(array)


def _stress_tensor(stress: torch.Tensor, label: str) -> torch.Tensor:
    """``stress`` as a ``[3, 3]`` tensor: Voigt ``[6]`` (xx, yy, zz, yz, xz, xy) made
    symmetric by ASE's conversion, ``[3, 3]`` kept."""
    if stress.shape == (6,):
        return torch.from_numpy(voigt_6_to_full_3x3_stress(stress.numpy()))
    if stress.shape != (3, 3):
        raise ValueError(
            f"{label}: stress must have shape [3, 3] or Voigt [6], got {tuple(stress.shape)}"
        )
    return stress


def _check_finite(tensor: torch.Tensor, what: str, name: str | None) -> None:
    bad = ~torch.isfinite(tensor)
    if bad.any():
        rows = torch.nonzero(bad.reshape(tensor.shape[0], -1).any(dim=1)).flatten().tolist()
        raise ValueError(f"{_label(name)}: {what} contain NaN or inf (rows {rows[:10]})")


def check_species_symbols(species: Sequence[str], where: str) -> tuple[str, ...]:
    """Validate chemical symbols; returns them as a tuple. Raises ``ValueError`` naming the
    offending entry (blank, not a string, or not an element symbol)."""
    if isinstance(species, str):
        raise ValueError(
            f"{where}: species must be a sequence of symbols, not the string {species!r}"
        )
    symbols = tuple(species)
    for index, symbol in enumerate(symbols):
        if not isinstance(symbol, str) or not symbol.strip():
            raise ValueError(f"{where}: species[{index}] = {symbol!r} is blank or not a string")
        if symbol not in ELEMENT_SYMBOLS:
            raise ValueError(
                f"{where}: species[{index}] = {symbol!r} is not a chemical element symbol"
            )
    return symbols


@pytree_record
@attrs.frozen(eq=False)
class Structure:
    """One atomic configuration.

    Attributes:
        positions: ``[n_atoms, 3]`` float64 Cartesian coordinates (Å).
        species: chemical symbols, one per atom.
        energy: total energy (eV) or ``None`` when unknown.
        forces: ``[n_atoms, 3]`` float64 forces (eV/Å) or ``None``.
        cell: ``[3, 3]`` float64 lattice vectors as rows (Å) or ``None`` for an isolated system.
        pbc: three periodic flags; defaults to all True with a cell, all False without.
        name: a label used in messages and outputs (e.g. the file it came from).
        stress: ``[3, 3]`` float64 stress (eV/Å³, ASE's sign convention ``σ = (1/V) ∂E/∂ε``:
            positive when the cell wants to shrink) or ``None``; given in Voigt order
            ``[xx, yy, zz, yz, xz, xy]`` it is stored as the symmetric ``[3, 3]`` tensor. Only
            for structures periodic along all three axes.
    """

    positions: torch.Tensor
    species: tuple[str, ...] = static_field()
    energy: float | None = static_field(default=None)
    forces: torch.Tensor | None = attrs.field(default=None)
    cell: torch.Tensor | None = attrs.field(default=None)
    pbc: tuple[bool, bool, bool] | None = static_field(default=None)
    name: str | None = static_field(default=None)
    stress: torch.Tensor | None = attrs.field(default=None)

    def __attrs_post_init__(self) -> None:
        name = self.name
        label = _label(name)
        positions = _as_float64(self.positions, "positions", name)
        if positions.ndim != 2 or positions.shape[1] != 3:
            raise ValueError(
                f"{label}: positions must have shape [n_atoms, 3], got {tuple(positions.shape)}"
            )
        if positions.shape[0] == 0:
            raise ValueError(f"{label}: the structure has no atoms")
        _check_finite(positions, "positions", name)
        species = check_species_symbols(self.species, label)
        if len(species) != positions.shape[0]:
            raise ValueError(f"{label}: {len(species)} species for {positions.shape[0]} positions")
        forces = self.forces
        if forces is not None:
            forces = _as_float64(forces, "forces", name)
            if forces.shape != positions.shape:
                raise ValueError(
                    f"{label}: forces have shape {tuple(forces.shape)}, "
                    f"positions {tuple(positions.shape)}"
                )
            _check_finite(forces, "forces", name)
        energy = self.energy
        if energy is not None:
            try:
                kind = _non_real_kind(energy)
            except (TypeError, ValueError):
                kind = None
            if kind is not None:
                raise ValueError(f"{label}: energy must be a real number, got {energy!r} ({kind})")
            try:
                energy = float(energy)
            except (TypeError, ValueError):
                raise ValueError(f"{label}: energy {self.energy!r} is not a number") from None
            if not np.isfinite(energy):
                raise ValueError(f"{label}: energy is {energy}; use None for an unknown energy")
        cell = self.cell
        if cell is not None:
            cell = _as_float64(cell, "cell", name)
            if cell.shape != (3, 3):
                raise ValueError(f"{label}: cell must have shape [3, 3], got {tuple(cell.shape)}")
            _check_finite(cell, "cell", name)
            if abs(float(torch.linalg.det(cell))) < _SINGULAR_VOLUME:
                raise ValueError(
                    f"{label}: the cell is singular "
                    f"(volume {float(torch.linalg.det(cell)):.3g} Å^3)"
                )
        pbc = self.pbc
        if pbc is None:
            pbc = (cell is not None,) * 3
        else:
            flags = np.asarray(pbc).reshape(-1)
            if flags.shape != (3,) or flags.dtype.kind not in "bi":
                raise ValueError(f"{label}: pbc must be three booleans, got {pbc!r}")
            pbc = tuple(bool(f) for f in flags)
        if any(pbc) and cell is None:
            raise ValueError(f"{label}: periodic boundary conditions {pbc} need a cell")
        stress = self.stress
        if stress is not None:
            stress = _stress_tensor(_as_float64(stress, "stress", name), label)
            _check_finite(stress, "stress", name)
            if not all(pbc):
                raise ValueError(f"{label}: a stress needs a cell periodic along x, y and z")
        for field, value in (
            ("positions", positions),
            ("species", species),
            ("energy", energy),
            ("forces", forces),
            ("cell", cell),
            ("pbc", pbc),
            ("stress", stress),
        ):
            object.__setattr__(self, field, value)

    @property
    def n_atoms(self) -> int:
        """Number of atoms."""
        return int(self.positions.shape[0])

    def has_forces(self) -> bool:
        """True when force labels are present."""
        return self.forces is not None

    def has_stress(self) -> bool:
        """True when a stress label is present."""
        return self.stress is not None

    def is_periodic(self) -> bool:
        """True when any axis is periodic."""
        return any(self.pbc)

    @property
    def formula(self) -> str:
        """Chemical formula in order of first appearance, e.g. ``Ti2O4``."""
        counts: dict[str, int] = {}
        for symbol in self.species:
            counts[symbol] = counts.get(symbol, 0) + 1
        return "".join(f"{s}{n if n > 1 else ''}" for s, n in counts.items())

    def __repr__(self) -> str:
        return (
            f"Structure({self.formula}, name={self.name!r}, pbc={self.pbc}, energy={self.energy})"
        )
