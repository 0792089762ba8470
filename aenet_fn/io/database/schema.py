"""The database's schema: its format name and version, the columns of each group, the
descriptor's stored form and fingerprint, and the per-entry metadata (layout:
:mod:`aenet_fn.io.database`)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import h5py
import numpy as np

from aenet_fn.core.descriptor import ChebyshevParams
from aenet_fn.core.local_derivatives import ATOM_INDEX_FIELDS

FORMAT = "aenet_fn-structure-database"
SCHEMA_VERSION = 1

PathLike = str | os.PathLike[str]


class DatabaseError(ValueError):
    """A file that is not a (readable, compatible) aenet_fn structure database."""


# ---------------------------------------------------------------------------------------------
# Descriptor identity


def descriptor_json(params: ChebyshevParams) -> str:
    """Compact, key-sorted JSON of the parameters that decide the descriptor's values: kind,
    species (in order), orders, cutoffs and ``min_cutoff`` (Å); not dtype or device."""
    return json.dumps(
        {
            "kind": "chebyshev",
            "species": list(params.species),
            "rad_order": int(params.rad_order),
            "rad_cutoff": float(params.rad_cutoff),
            "ang_order": int(params.ang_order),
            "ang_cutoff": float(params.ang_cutoff),
            "min_cutoff": float(params.min_cutoff),
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def descriptor_fingerprint(params: ChebyshevParams) -> str:
    """sha256 (hex) of :func:`descriptor_json`: equal exactly when the features are."""
    return hashlib.sha256(descriptor_json(params).encode()).hexdigest()


def descriptor_from_json(text: str) -> ChebyshevParams:
    """The :class:`~aenet_fn.ChebyshevParams` of a :func:`descriptor_json` text."""
    values = json.loads(text)
    if values.pop("kind", None) != "chebyshev":
        raise ValueError(f"not a Chebyshev descriptor: {text}")
    return ChebyshevParams(**values)


# ---------------------------------------------------------------------------------------------
# Records


@attrs.frozen
class EntryMetadata:
    """Where a database entry came from and its labels.

    Attributes:
        source_id: the source's identifier (a file path as given; "" for in-memory records).
        source_kind: "file", "structure" or "atoms".
        display_name: the source's name for outputs ("" when it has none).
        frame: index of the entry among its source's frames (from 0).
        n_frames: frames the source held (before the energy filter).
        name: the structure's name, or None.
        has_forces: whether force labels are stored.
        n_atoms: number of atoms.
        energy: total energy (eV), or None when unknown.
    """

    source_id: str
    source_kind: str
    display_name: str
    frame: int
    n_frames: int
    name: str | None
    has_forces: bool
    n_atoms: int
    energy: float | None


def entry_identifier(
    index: int, display_name: str, source_id: str, name: str | None, frame: int, n_frames: int
) -> str:
    """Output identifier of entry ``index``: the first non-empty of ``display_name``,
    ``source_id``, ``name``, ``structure_{index:06d}``, with ``#frame={frame}`` appended for
    sources holding several frames (unless the chosen name already ends with it)."""
    base = display_name or source_id or name or f"structure_{index:06d}"
    suffix = f"#frame={frame}"
    if n_frames > 1 and not base.endswith(suffix):
        return base + suffix
    return base


@attrs.frozen
class Column:
    """A dataset: element dtype, trailing shape, and which count its first axis has."""

    dtype: Any
    shape: tuple[int, ...]
    rows: str  # "source" | "structure" | "offset" | "atom" | "radial" | "triplet"


TEXT = h5py.string_dtype()

BASE_COLUMNS = {
    "sources/source_id": Column(TEXT, (), "source"),
    "sources/kind": Column(TEXT, (), "source"),
    "sources/display_name": Column(TEXT, (), "source"),
    "sources/n_frames": Column(np.int64, (), "source"),
    "structures/atom_offset": Column(np.int64, (), "offset"),
    "structures/source_index": Column(np.int64, (), "structure"),
    "structures/frame": Column(np.int64, (), "structure"),
    "structures/name": Column(TEXT, (), "structure"),
    "structures/cell": Column(np.float64, (3, 3), "structure"),
    "structures/has_cell": Column(np.bool_, (), "structure"),
    "structures/pbc": Column(np.bool_, (3,), "structure"),
    "structures/energy": Column(np.float64, (), "structure"),
    "structures/has_forces": Column(np.bool_, (), "structure"),
    "structures/numbers": Column(np.uint8, (), "atom"),
    "structures/positions": Column(np.float64, (3,), "atom"),
    "structures/forces": Column(np.float64, (3,), "atom"),
}


STRESS_COLUMNS = {"structures/stress": Column(np.float64, (3, 3), "structure")}
"""Stress labels (eV/Å³, NaN: unknown): written by every build since they were added, read
where present (databases written before have none, and read as unknown stresses)."""


def feature_columns(n_features: int) -> dict[str, Column]:
    return {"features/values": Column(np.float64, (n_features,), "atom")}


def derivative_columns(n_radial: int, n_angular: int) -> dict[str, Column]:
    columns = {
        "local_derivatives/radial_offset": Column(np.int64, (), "offset"),
        "local_derivatives/triplet_offset": Column(np.int64, (), "offset"),
        "local_derivatives/radial_spin": Column(np.float64, (), "radial"),
        "local_derivatives/radial": Column(np.float64, (n_radial, 3), "radial"),
        "local_derivatives/triplet_spin": Column(np.float64, (), "triplet"),
        "local_derivatives/angular_first": Column(np.float64, (n_angular, 3), "triplet"),
        "local_derivatives/angular_second": Column(np.float64, (n_angular, 3), "triplet"),
    }
    for field in ATOM_INDEX_FIELDS:
        rows = "radial" if field.startswith("radial") else "triplet"
        columns[f"local_derivatives/{field}"] = Column(np.int32, (), rows)
    return columns


OFFSET_ROWS = {
    "structures/atom_offset": "atom",
    "local_derivatives/radial_offset": "radial",
    "local_derivatives/triplet_offset": "triplet",
}


# ---------------------------------------------------------------------------------------------
# Building


def missing_file(path: Path) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, f"No such file or directory: {str(path)!r}", str(path))


def plain_atomic_energies(atomic_energies: Mapping[str, float] | None) -> dict[str, float] | None:
    """``atomic_energies`` as a plain ``{symbol: float}`` dict (eV), or None."""
    if atomic_energies is None:
        return None
    return {str(k): float(v) for k, v in dict(atomic_energies).items()}
