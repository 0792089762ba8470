"""``aenet-fn predict`` and the predictions that ``train`` and ``demo`` share: loading a
model or committee (:func:`load_potential`), energies and forces of structures
(:class:`Prediction`, :func:`predict_structures`), and their output as an aligned table,
CSV or JSON."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aenet_fn import calculator
from aenet_fn.cli.errors import CLIError
from aenet_fn.cli.files import (
    check_output_file,
    check_species,
    input_files,
    naming_structures,
    read_structure_files,
)
from aenet_fn.core.structure import Structure
from aenet_fn.io.atomic import atomic_write_text
from aenet_fn.torch_training import TorchANNPotential, TorchCommitteePotential

PREDICT_CHUNK = 32
"""Structures per committee prediction pass (bounds memory with forces)."""


# ---------------------------------------------------------------------------------------------
# predictions shared by train, predict and demo


@dataclass
class Prediction:
    """One structure's prediction (eV, eV/Å); the ``*_std``/uncertainty fields are committee
    spreads (population standard deviations over members), None for a single potential."""

    name: str
    species: list[str]
    energy: float
    reference_energy: float | None
    forces: np.ndarray | None = None
    reference_forces: np.ndarray | None = None
    energy_std: float | None = None
    member_energies: list[float] | None = None
    forces_std: np.ndarray | None = None
    force_uncertainty: np.ndarray | None = None

    @property
    def n_atoms(self) -> int:
        """Number of atoms."""
        return len(self.species)


Potential = TorchANNPotential | TorchCommitteePotential


def load_potential(path: str | os.PathLike, device: str | None = None) -> Potential:
    """A model file (``TorchANNPotential.save``) or a committee directory, on ``device`` (None:
    the CPU)."""
    try:
        return calculator.load_potential(Path(path), device)
    except (ValueError, FileNotFoundError) as error:
        raise CLIError(str(error)) from error


def predict_structures(
    potential: Potential, structures: Sequence[Structure], forces: bool
) -> list[Prediction]:
    """Energies (and ``forces``) of ``structures``; committee members in one vmapped pass per
    chunk of :data:`PREDICT_CHUNK` structures."""
    predictions = []
    for first in range(0, len(structures), PREDICT_CHUNK):
        chunk = list(structures[first : first + PREDICT_CHUNK])
        with naming_structures(chunk, lambda structure: potential.predict([structure])):
            result = potential.predict(chunk, eval_forces=forces)
        if isinstance(potential, TorchCommitteePotential):
            for structure, member in zip(chunk, result):
                predictions.append(
                    Prediction(
                        structure.name,
                        list(structure.species),
                        member.energy_mean,
                        structure.energy,
                        member.forces_mean,
                        _reference_forces(structure, forces),
                        member.energy_std,
                        member.member_energies.tolist(),
                        member.forces_std,
                        member.force_uncertainty,
                    )
                )
        else:
            for k, structure in enumerate(chunk):
                predictions.append(
                    Prediction(
                        structure.name,
                        list(structure.species),
                        float(result.total_energy[k]),
                        structure.energy,
                        result.forces[k],
                        _reference_forces(structure, forces),
                    )
                )
    return predictions


def _reference_forces(structure: Structure, wanted: bool) -> np.ndarray | None:
    if not wanted or structure.forces is None:
        return None
    return structure.forces.detach().cpu().numpy()


def _models(potential: Potential) -> list[Any]:
    if isinstance(potential, TorchCommitteePotential):
        return [m.model for m in potential.members]
    return [potential.model]


def _aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    """Text lines of a table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in rows
    ]


def _json_ready(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, (np.floating, np.integer)):
        return _json_ready(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------------------------------
# predict


def _prediction_records(predictions: Sequence[Prediction], forces: bool) -> list[dict]:
    """JSON-ready dicts, one per structure."""
    records = []
    for p in predictions:
        record: dict[str, Any] = {
            "name": p.name,
            "n_atoms": p.n_atoms,
            "energy": p.energy,
            "energy_per_atom": p.energy / p.n_atoms,
            "reference_energy": p.reference_energy,
        }
        if p.energy_std is not None:
            record["energy_std"] = p.energy_std
            record["energy_std_per_atom"] = p.energy_std / p.n_atoms
            record["member_energies"] = p.member_energies
        if forces:
            record["species"] = p.species
            record["forces"] = p.forces
            if p.forces_std is not None:
                record["forces_std"] = p.forces_std
                record["force_uncertainty"] = p.force_uncertainty
        records.append(_json_ready(record))
    return records


_STRUCTURE_COLUMNS = ("name", "n_atoms", "energy", "energy_per_atom", "reference_energy")
_COMMITTEE_COLUMNS = ("energy_std", "energy_std_per_atom")


def _csv_text(predictions: Sequence[Prediction], forces: bool) -> str:
    """One row per structure, or with ``forces`` one row per atom (the structure's columns
    repeated); floats written exactly (``repr``)."""
    committee = bool(predictions) and predictions[0].energy_std is not None
    header = [*_STRUCTURE_COLUMNS, *(_COMMITTEE_COLUMNS if committee else ())]
    if forces:
        header += ["atom", "species", "fx", "fy", "fz"]
        if committee:
            header += ["fx_std", "fy_std", "fz_std", "force_uncertainty"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for record, p in zip(_prediction_records(predictions, False), predictions):
        cells = [record[c] for c in header[: len(_STRUCTURE_COLUMNS)]]
        cells += [record[c] for c in (_COMMITTEE_COLUMNS if committee else ())]
        if not forces:
            writer.writerow(_csv_cells(cells))
            continue
        for atom in range(p.n_atoms):
            extra = [atom, p.species[atom], *p.forces[atom]]
            if committee:
                extra += [*p.forces_std[atom], p.force_uncertainty[atom]]
            writer.writerow(_csv_cells([*cells, *extra]))
    return buffer.getvalue()


def _csv_cells(cells: Sequence[Any]) -> list[Any]:
    return ["" if c is None else repr(float(c)) if isinstance(c, float) else c for c in cells]


def _table_text(predictions: Sequence[Prediction], forces: bool) -> str:
    """Aligned text: the structures' energies, then with ``forces`` one block per structure."""
    committee = bool(predictions) and predictions[0].energy_std is not None
    header = ["structure", "atoms", "E (eV)", "E/atom (eV)"]
    header += ["std E (eV)", "std E/atom (eV)"] if committee else []
    header.append("E ref (eV)")
    rows = []
    for p in predictions:
        row = [p.name, str(p.n_atoms), f"{p.energy:.6f}", f"{p.energy / p.n_atoms:.6f}"]
        if committee:
            row += [f"{p.energy_std:.6f}", f"{p.energy_std / p.n_atoms:.6f}"]
        row.append("-" if p.reference_energy is None else f"{p.reference_energy:.6f}")
        rows.append(row)
    lines = _aligned([header, *rows])
    if forces:
        for p in predictions:
            lines += [
                "",
                f"{p.name}: forces (eV/Å)" + (", uncertainty (eV/Å)" if committee else ""),
            ]
            for atom in range(p.n_atoms):
                line = f"{atom:6d} {p.species[atom]:>3} " + " ".join(
                    f"{f:12.6f}" for f in p.forces[atom]
                )
                if committee:
                    line += f" {p.force_uncertainty[atom]:12.6f}"
                lines.append(line)
    return "\n".join(lines) + "\n"


def _cmd_predict(args: argparse.Namespace) -> int:
    if args.output is not None:
        inputs = input_files([args.model]) | input_files(args.files, ".xsf")
        check_output_file(Path(args.output), inputs, args.overwrite)
    potential = load_potential(args.model, args.device)
    structures = read_structure_files([Path(f) for f in args.files], args.input_format)
    species = _models(potential)[0].descriptor.species
    check_species(structures, species, "FILES", "the model's")
    predictions = predict_structures(potential, structures, args.forces)
    if args.format == "json":
        members = len(potential.members) if isinstance(potential, TorchCommitteePotential) else None
        document = {
            "model": str(args.model),
            "committee_members": members,
            "units": {"energy": "eV", "forces": "eV/Å"},
            "structures": _prediction_records(predictions, args.forces),
        }
        text = json.dumps(document) + "\n"
    elif args.format == "csv":
        text = _csv_text(predictions, args.forces)
    else:
        text = _table_text(predictions, args.forces)
    if args.output is None:
        sys.stdout.write(text)
    else:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.output, text)
    return 0
