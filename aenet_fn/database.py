"""The public path of HDF5 structure databases: build, open, read; the code lives in
:mod:`aenet_fn.io.database`."""

from aenet_fn.io.database import (
    FORMAT,
    SCHEMA_VERSION,
    BuildSummary,
    DatabaseError,
    EntryMetadata,
    StructureDatabase,
    build_database,
    compression_filters,
    descriptor_fingerprint,
    descriptor_from_json,
    descriptor_json,
    entry_identifier,
    open_database,
    plain_atomic_energies,
)

__all__ = [
    "FORMAT",
    "SCHEMA_VERSION",
    "BuildSummary",
    "DatabaseError",
    "EntryMetadata",
    "StructureDatabase",
    "build_database",
    "compression_filters",
    "descriptor_fingerprint",
    "descriptor_from_json",
    "descriptor_json",
    "entry_identifier",
    "open_database",
    "plain_atomic_energies",
]
