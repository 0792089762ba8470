"""Conversion between :class:`~aenet_fn.core.structure.Structure` and ``ase.Atoms``, and reading of
any structure file: XSF through :mod:`aenet_fn.io.xsf`, everything else through ``ase.io``.

Units are ASE's and ours: Å for positions and cells, eV for energies, eV/Å for forces.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import ase
import ase.io
import attrs
import numpy as np
from ase.calculators.singlepoint import SinglePointCalculator
from ase.stress import full_3x3_to_voigt_6_stress

from aenet_fn.core.structure import Structure
from aenet_fn.io.xsf import read_xsf

__all__ = ["convert_to_structures", "from_ase", "read_structures", "to_ase"]

PathLike = str | os.PathLike[str]


def _stored_results(atoms: ase.Atoms) -> dict[str, Any]:
    """The results an attached calculator already holds, without triggering a calculation.

    Results are ignored when the calculator remembers the atoms it computed them for and those
    differ from ``atoms`` (moved atoms, changed cell): they would be stale.
    """
    calc = atoms.calc
    if calc is None:
        return {}
    results = getattr(calc, "results", None)
    if not results:
        return {}
    if getattr(calc, "atoms", None) is not None and hasattr(calc, "check_state"):
        try:
            if calc.check_state(atoms):
                return {}
        except Exception:  # an odd calculator: trust its results
            pass
    return dict(results)


def from_ase(atoms: ase.Atoms, name: str | None = None) -> Structure:
    """A :class:`Structure` from an ``ase.Atoms``.

    Positions ``[n, 3]`` (Å) are taken as they are (not wrapped). The cell ``[3, 3]`` (Å, rows)
    and pbc are kept when any pbc flag is True; with pbc all False the structure has no cell.
    Energy (eV) and forces ``[n, 3]`` (eV/Å) come from the results already stored on an
    attached calculator (e.g. the ``SinglePointCalculator`` that ``ase.io.read`` attaches):
    ``results["energy"]`` (or ``"free_energy"`` when there is no ``"energy"``) and
    ``results["forces"]``, and the stress (eV/Å³, ASE's convention, Voigt or ``[3, 3]``) of a
    structure periodic along all three axes from ``results["stress"]``. Nothing is ever
    computed, and stale results (the calculator's atoms differ from ``atoms``) are ignored.
    ``name`` defaults to ``atoms.info["name"]`` if that is a string.
    """
    if name is None and isinstance(atoms.info.get("name"), str):
        name = atoms.info["name"]
    results = _stored_results(atoms)
    energy = results.get("energy", results.get("free_energy"))
    forces = results.get("forces")
    pbc = tuple(bool(p) for p in atoms.pbc)
    periodic = any(pbc)
    stress = results.get("stress") if all(pbc) else None
    return Structure(
        positions=np.array(atoms.get_positions(), dtype=np.float64),
        species=tuple(atoms.get_chemical_symbols()),
        energy=None if energy is None else float(np.asarray(energy).reshape(())),
        forces=None if forces is None else np.array(forces, dtype=np.float64),
        cell=np.array(atoms.cell.array, dtype=np.float64) if periodic else None,
        pbc=pbc if periodic else None,
        name=name,
        stress=None if stress is None else np.array(stress, dtype=np.float64),
    )


def to_ase(structure: Structure) -> ase.Atoms:
    """An ``ase.Atoms`` from a :class:`Structure`: symbols, positions (Å), cell (Å, zero when
    the structure has none) and pbc. When the energy (eV), forces ``[n, 3]`` (eV/Å) or stress
    (eV/Å³, Voigt) are known they are attached as a ``SinglePointCalculator``; the name goes
    to ``atoms.info["name"]``."""
    atoms = ase.Atoms(
        symbols=list(structure.species),
        positions=structure.positions.detach().cpu().numpy().copy(),
        cell=None if structure.cell is None else structure.cell.detach().cpu().numpy().copy(),
        pbc=structure.pbc,
    )
    if structure.name is not None:
        atoms.info["name"] = structure.name
    labels: dict[str, Any] = {}
    if structure.energy is not None:
        labels["energy"] = float(structure.energy)
    if structure.forces is not None:
        labels["forces"] = structure.forces.detach().cpu().numpy().copy()
    if structure.stress is not None:
        labels["stress"] = full_3x3_to_voigt_6_stress(structure.stress.detach().cpu().numpy())
    if labels:
        atoms.calc = SinglePointCalculator(atoms, **labels)
    return atoms


def _missing(path: Path) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, f"No such file or directory: {str(path)!r}", str(path))


def _read_with_ase(path: Path, format: str | None) -> list[Structure]:
    try:
        images = ase.io.read(path, index=":", format=format)
    except FileNotFoundError:
        raise
    except Exception as err:
        kind = f"format {format!r}" if format else "an automatically detected format"
        raise ValueError(
            f"{path}: ASE could not read the file as {kind}: {type(err).__name__}: {err}"
        ) from err
    if isinstance(images, ase.Atoms):
        images = [images]
    if not images:
        raise ValueError(f"{path}: the file holds no structures")
    label = str(path)
    return [
        from_ase(atoms, name=label if len(images) == 1 else f"{label}#frame={index}")
        for index, atoms in enumerate(images)
    ]


def _read_one(path: Path, format: str | None) -> list[Structure]:
    if path.is_dir():
        if format not in (None, "xsf"):
            raise ValueError(f"{path}: a directory is read as its *.xsf files, not as {format!r}")
        files = sorted(
            (p for p in path.iterdir() if p.suffix.lower() == ".xsf" and p.is_file()),
            key=lambda p: p.name,
        )
        if not files:
            raise ValueError(f"{path}: the directory contains no *.xsf files")
        return [s for file in files for s in read_xsf(file)]
    if not path.exists():
        raise _missing(path)
    if format == "xsf" or (format is None and path.suffix.lower() == ".xsf"):
        return read_xsf(path)
    return _read_with_ase(path, format)


def read_structures(
    path_or_paths: PathLike | Sequence[PathLike], format: str | None = None
) -> list[Structure]:
    """Read every structure from one path or a sequence of paths, in order.

    * ``*.xsf`` files (or any file with ``format="xsf"``) go through :func:`read_xsf`.
    * Any other file goes through ``ase.io.read(path, index=":", format=format)`` (extxyz, xyz,
      VASP POSCAR/OUTCAR/vasprun.xml, ...); energies (eV) and forces (eV/Å) the file carries are
      kept (see :func:`from_ase`).
    * A directory stands for all ``*.xsf`` files directly in it, sorted by file name.

    Each structure is named after its file (``#frame=N``, N from 0, appended for multi-frame
    files). Raises ``FileNotFoundError`` naming a missing path, ``ValueError`` naming a file
    that cannot be parsed (the original exception is chained) and, like an empty folder, an
    empty sequence of paths; ``TypeError`` for anything but a path or a sequence of paths.
    """
    if isinstance(path_or_paths, (str, os.PathLike)):
        paths = [path_or_paths]
    elif isinstance(path_or_paths, Iterable) and not isinstance(path_or_paths, bytes):
        paths = list(path_or_paths)
    else:
        raise TypeError(
            f"read_structures: expected a path (str or os.PathLike) or a sequence of paths, "
            f"got {type(path_or_paths).__name__}"
        )
    if not paths:
        raise ValueError("read_structures: no paths given (an empty sequence of paths)")
    structures: list[Structure] = []
    for path in paths:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"read_structures: expected a path, got {type(path).__name__}")
        structures.extend(_read_one(Path(os.fspath(path)), format))
    return structures


def convert_to_structures(inputs: Any) -> list[Structure]:
    """Structures from :class:`Structure` records, ASE ``Atoms``, file paths (every frame; any
    format ASE reads, XSF by aenet_fn's reader) or a list mixing them. Unnamed structures are
    named ``structure_{index:06d}``."""
    if isinstance(inputs, (str, os.PathLike, Structure, ase.Atoms)):
        inputs = [inputs]
    structures: list[Structure] = []
    for item in inputs:
        if isinstance(item, Structure):
            structures.append(item)
        elif isinstance(item, ase.Atoms):
            structures.append(from_ase(item))
        elif isinstance(item, (str, os.PathLike)):
            structures.extend(read_structures(item))
        else:
            raise TypeError(f"cannot use a {type(item).__name__} as a structure")
    return [
        s if s.name else _renamed(s, f"structure_{index:06d}") for index, s in enumerate(structures)
    ]


def _renamed(structure: Structure, name: str) -> Structure:
    return attrs.evolve(structure, name=name)
