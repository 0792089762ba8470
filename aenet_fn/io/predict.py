"""``PredictOut`` (per-structure prediction results) and ``PredictOutAnalyzer`` (the spread of
several predictions of the same structures), with the ænet tools' names."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from aenet_fn.core.structure import Structure
from aenet_fn.io.ase_io import read_structures, to_ase
from aenet_fn.io.atomic import replacing


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

    def to_structures(self) -> list[Structure]:
        """The predicted structures read again from ``structure_paths`` (``file`` or
        ``file#frame=k``), one per prediction; raises ``ValueError`` when the predictions did
        not come from structure files."""
        if not self.structure_paths:
            raise ValueError("PredictOut.to_structures: the predictions carry no structure paths")
        files: dict[str, list[Structure]] = {}
        return [_read_again(name, files) for name in self.structure_paths]

    @classmethod
    def from_file(
        cls, filename: str | os.PathLike, structure_paths: Sequence[str] | None = None
    ) -> PredictOut:
        """The predictions printed by ænet's Fortran ``predict.x`` in ``filename``: per
        structure the atom types and coordinates (Å), the forces (eV/Å) where the run asked
        for them (``FORCES``), the cohesive and total energies (eV). ``structure_paths``: the
        structures' files (default: the file names ``predict.x`` printed). Raises
        ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file and line
        for output it cannot read."""
        path = os.fspath(filename)
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
        blocks = _predict_x_blocks(path, lines)
        names = [block["name"] for block in blocks]
        if structure_paths is not None and len(structure_paths) != len(blocks):
            raise ValueError(
                f"{path}: {len(blocks)} structures, but {len(structure_paths)} structure paths"
            )
        return cls(
            coords=[block["coords"] for block in blocks],
            forces=[block["forces"] for block in blocks],
            atom_types=[block["types"] for block in blocks],
            atom_energies=[None] * len(blocks),
            cohesive_energy=[block["cohesive"] for block in blocks],
            total_energy=[block["total"] for block in blocks],
            structure_paths=list(structure_paths) if structure_paths is not None else names,
        )

    def __str__(self) -> str:
        lines = [f"PredictOut: {self.num_structures} structures"]
        names: Sequence[str] = self.structure_paths or [f"#{i}" for i in range(self.num_structures)]
        for name, energy, atoms in zip(names, self.total_energy, self.atom_types):
            lines.append(f"  {name}: {len(atoms)} atoms, total energy {energy:.8f} eV")
        return "\n".join(lines)


def _predict_x_blocks(path: str, lines: list[str]) -> list[dict]:
    """The structures of a ``predict.x`` output (see :meth:`PredictOut.from_file`)."""
    blocks: list[dict] = []
    block: dict | None = None
    k = 0

    def fail(message: str) -> ValueError:
        return ValueError(f"{path}, line {k + 1}: {message}")

    def value(line: str) -> str:
        return line.split(":", 1)[1].strip()

    def number(text: str, what: str) -> float:
        try:
            return float(text.split()[0])
        except (ValueError, IndexError):
            raise fail(f"expected {what}, found {text!r}") from None

    while k < len(lines):
        line = lines[k].strip()
        if line.startswith("Structure number"):
            block = {"name": None, "atoms": None, "forces": None, "cohesive": None}
            blocks.append(block)
        elif block is None:
            pass
        elif line.startswith("File name"):
            block["name"] = value(line)
        elif line.startswith("Number of atoms"):
            block["atoms"] = int(number(value(line), "the number of atoms"))
        elif line.startswith("Cartesian atomic coordinates"):
            if block["atoms"] is None:
                raise fail("coordinates before the number of atoms")
            with_forces = "forces" in line
            k += 1
            while k < len(lines) and not lines[k].strip().startswith("---"):
                k += 1
            rows = lines[k + 1 : k + 1 + block["atoms"]]
            types, table = [], []
            for offset, row in enumerate(rows):
                fields = row.split()
                if len(fields) != (7 if with_forces else 4):
                    k += 1 + offset
                    raise fail(f"expected an atom row of {block['atoms']}, found {row!r}")
                types.append(fields[0])
                table.append([number(f, "a coordinate") for f in fields[1:]])
            if len(rows) != block["atoms"]:
                k = len(lines) - 1
                raise fail(f"the file ends within the {block['atoms']} atom rows")
            values = np.array(table, dtype=np.float64).reshape(len(rows), -1)
            block["types"], block["coords"] = types, values[:, :3]
            block["forces"] = values[:, 3:] if with_forces else None
            k += block["atoms"]
        elif line.startswith("Cohesive energy"):
            block["cohesive"] = number(value(line), "the cohesive energy")
        elif line.startswith("Total energy"):
            block["total"] = number(value(line), "the total energy")
        k += 1
    if not blocks:
        raise ValueError(f"{path}: no structure found (not predict.x output?)")
    for index, found in enumerate(blocks, start=1):
        missing = [key for key in ("coords", "cohesive", "total") if found.get(key) is None]
        if missing:
            raise ValueError(f"{path}: structure {index} lacks its {', '.join(missing)}")
    return blocks


def _read_again(name: str, files: dict[str, list[Structure]]) -> Structure:
    """The structure ``name`` (``file`` or ``file#frame=k``) from its file (``files`` caches
    what was read)."""
    path, _, frame = name.partition("#frame=")
    if not os.path.isfile(path):
        raise ValueError(
            f"PredictOut.to_structures: {name!r} is not a structure file (these predictions "
            "were not made from files)"
        )
    if path not in files:
        files[path] = read_structures(path)
    return files[path][int(frame) if frame else 0]


class PredictOutAnalyzer:
    """Spread of several predictions of the same structures (e.g. by committee members
    predicting one after another): energy and force statistics per structure.

    Raises ``ValueError`` unless every output holds the same structures (counts, atom types
    and coordinates to 1e-8 Å)."""

    def __init__(self, pout_list: Sequence[PredictOut]) -> None:
        outputs = list(pout_list)
        if not outputs:
            raise ValueError("PredictOutAnalyzer: no predictions given")
        first = outputs[0]
        for k, other in enumerate(outputs[1:], start=1):
            if other.num_structures != first.num_structures:
                raise ValueError(
                    f"PredictOutAnalyzer: prediction {k} has {other.num_structures} structures, "
                    f"prediction 0 has {first.num_structures}"
                )
            for i in range(first.num_structures):
                same = other.atom_types[i] == first.atom_types[i] and np.allclose(
                    other.coords[i], first.coords[i], rtol=0, atol=1e-8
                )
                if not same:
                    raise ValueError(
                        f"PredictOutAnalyzer: structure {i} of prediction {k} differs from "
                        "prediction 0 (atom types or coordinates)"
                    )
        self.outputs = outputs

    def energy_stats(self, i: int, normalize: bool = True) -> tuple[float, float, float, float]:
        """``(min, max, mean, std)`` over the predictions of the total energy of structure
        ``i`` (eV; eV/atom with ``normalize``); std with ddof 0."""
        energies = np.array([out.total_energy[i] for out in self.outputs], dtype=float)
        if normalize:
            energies = energies / self.outputs[0].num_atoms(i)
        return (
            float(energies.min()),
            float(energies.max()),
            float(energies.mean()),
            float(energies.std()),
        )

    def all_energy_stats(self, normalize: bool = True) -> np.ndarray:
        """``[n_structures, 4]`` :meth:`energy_stats` of every structure."""
        count = self.outputs[0].num_structures
        return np.array([self.energy_stats(i, normalize) for i in range(count)]).reshape(count, 4)

    def _forces(self, i: int) -> np.ndarray:
        """``[n_predictions, n_atoms, 3]`` forces of structure ``i`` (eV/Å)."""
        forces = [out.forces[i] for out in self.outputs]
        if any(f is None for f in forces):
            raise ValueError(f"PredictOutAnalyzer: structure {i} was predicted without forces")
        return np.stack([np.asarray(f, dtype=float) for f in forces])

    def force_stats(self, i: int) -> np.ndarray:
        """``[n_atoms, 4]`` per atom ``(min, max, mean, std)`` over the predictions of the
        force magnitude ``|F|`` (eV/Å)."""
        magnitude = np.linalg.norm(self._forces(i), axis=-1)
        return np.stack(
            [magnitude.min(0), magnitude.max(0), magnitude.mean(0), magnitude.std(0)], axis=1
        )

    def force_uncertainty(self, i: int) -> np.ndarray:
        """``[n_atoms]`` mean over x, y, z of the per-component standard deviation of the
        forces over the predictions (eV/Å), as committees report it."""
        return self._forces(i).std(axis=0).mean(axis=-1)

    def structure(self, i: int) -> Structure:
        """Structure ``i`` with the predictions' mean total energy and mean forces (periodic
        cell from its file when the predictions came from files, else an isolated system)."""
        first = self.outputs[0]
        cell, pbc = None, None
        if first.structure_paths:
            source = _read_again(first.structure_paths[i], {})
            cell, pbc = source.cell, source.pbc
        forces = None
        if all(out.forces[i] is not None for out in self.outputs):
            forces = torch.as_tensor(self._forces(i).mean(axis=0))
        return Structure(
            torch.as_tensor(np.asarray(first.coords[i], dtype=float)),
            list(first.atom_types[i]),
            cell=cell,
            pbc=pbc,
            energy=self.energy_stats(i, normalize=False)[2],
            forces=forces,
            name=None if not first.structure_paths else first.structure_paths[i],
        )

    def write_pdb_with_force_uncertainty(self, i: int, filename: str | os.PathLike) -> None:
        """Structure ``i`` as a PDB file whose B-factor column holds each atom's
        :meth:`force_uncertainty` (eV/Å), for colouring in a viewer; written atomically."""
        from ase.io import write

        atoms = to_ase(self.structure(i))
        atoms.set_array("bfactor", self.force_uncertainty(i))
        with replacing(filename) as temporary:
            write(temporary, atoms, format="proteindatabank")
