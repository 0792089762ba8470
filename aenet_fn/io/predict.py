"""``PredictOut``: per-structure prediction results with the ænet tools' names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class PredictOut:
    """Predictions for a list of structures (one entry per structure in every list).

    Attributes:
        coords: ``[n, 3]`` positions (Å).
        forces: ``[n, 3]`` forces (eV/Å), or None when not evaluated.
        atom_types: chemical symbols.
        atom_energies: ``[n]`` atomic energies (eV; they sum to the total energy), or None.
        cohesive_energy: total energy minus the atomic reference energies (eV).
        total_energy: total energies (eV).
        structure_paths: source file of each structure, when read from files.
    """

    coords: list[np.ndarray]
    forces: list[np.ndarray | None]
    atom_types: list[list[str]]
    atom_energies: list[np.ndarray | None]
    cohesive_energy: list[float]
    total_energy: list[float]
    structure_paths: list[str] | None = None
    timing: dict[str, list[float]] | None = field(default=None)

    @property
    def paths(self) -> list[str] | None:
        """Alias of ``structure_paths``."""
        return self.structure_paths

    @property
    def num_structures(self) -> int:
        """Number of structures."""
        return len(self.total_energy)

    def num_atoms(self, i: int) -> int:
        """Atoms of structure ``i``."""
        return len(self.atom_types[i])

    @property
    def total_energy_per_atom(self) -> np.ndarray:
        """Total energies per atom (eV/atom)."""
        return np.array([e / len(t) for e, t in zip(self.total_energy, self.atom_types)])

    @property
    def cohesive_energy_per_atom(self) -> np.ndarray:
        """Cohesive energies per atom (eV/atom)."""
        return np.array([e / len(t) for e, t in zip(self.cohesive_energy, self.atom_types)])

    def __str__(self) -> str:
        lines = [f"PredictOut: {self.num_structures} structures"]
        names: Sequence[str] = self.structure_paths or [f"#{i}" for i in range(self.num_structures)]
        for name, energy, atoms in zip(names, self.total_energy, self.atom_types):
            lines.append(f"  {name}: {len(atoms)} atoms, total energy {energy:.8f} eV")
        return "\n".join(lines)
