"""HDF5 structure databases (h5py): typed, offset-indexed storage of structures, with optional
persisted descriptor features and local descriptor derivatives.

Nothing in a database is a pickled Python object: every value is a typed array, so any HDF5 tool
can read it and reading never runs code. Per-atom arrays of all structures are concatenated and
indexed by offsets (CSR), so one structure is a contiguous slice. Layout (``B`` structures, ``N``
atoms, ``S`` sources; units Å, eV, eV/Å)::

    /                    attrs format="aenet_fn-structure-database", schema_version=1,
                         energy_filter_max_energy (eV/atom, NaN: no filter),
                         energy_filter_atomic_energies (compact sorted JSON, "": none)
    /sources/            source_id, kind ("file" | "structure" | "atoms"), display_name [S] str;
                         n_frames [S] i8 (frames the source held before filtering)
    /structures/         atom_offset [B+1] i8; source_index, frame [B] i8; name [B] str ("": none)
                         cell [B,3,3] f8 (zeros without a cell), has_cell [B] bool, pbc [B,3] bool
                         energy [B] f8 (NaN: unknown), has_forces [B] bool
                         numbers [N] u1 (atomic numbers), positions [N,3] f8,
                         forces [N,3] f8 (NaN rows where unknown),
                         stress [B,3,3] f8 (eV/Å³, NaN: unknown; absent in databases written
                         before stresses, read as unknown)
    /descriptor          (optional) attrs kind="chebyshev", parameters (JSON), sha256
    /features/           (optional) attrs descriptor_sha256, n_features; values [N,F] f8 (raw)
    /local_derivatives/  (optional) attrs descriptor_sha256, n_radial, n_angular;
                         radial_offset, triplet_offset [B+1] i8;
                         radial_centre, radial_neighbour [E] i4 (atoms within the structure),
                         radial_spin [E] f8, radial [E,n_radial,3] f8 (1/Å);
                         triplet_centre, triplet_first, triplet_second [P] i4,
                         triplet_spin [P] f8, angular_first, angular_second [P,n_angular,3] f8

Local derivatives (:class:`~aenet_fn.core.local_derivatives.LocalDerivatives`) are stored only for
structures with force labels (the others have empty ranges): nothing uses them for the rest.
Persisted features and derivatives carry the sha256 of the descriptor parameters that made them
(:func:`descriptor_fingerprint`) and are refused for another descriptor.

:func:`build_database` writes a database (in parallel processes with ``build_workers > 1``,
always in source order) to a temporary file beside the target and renames it into place, so a
failed or killed build never leaves a partial file under the final name. :func:`open_database`
returns a read-only :class:`StructureDatabase`.
"""

from aenet_fn.io.database.build import BuildSummary, build_database, compression_filters
from aenet_fn.io.database.read import SplitMetadata, StructureDatabase, open_database
from aenet_fn.io.database.schema import (
    FORMAT,
    SCHEMA_VERSION,
    DatabaseError,
    EntryMetadata,
    descriptor_fingerprint,
    descriptor_from_json,
    descriptor_json,
    entry_identifier,
    plain_atomic_energies,
)

__all__ = [
    "FORMAT",
    "SCHEMA_VERSION",
    "BuildSummary",
    "DatabaseError",
    "EntryMetadata",
    "SplitMetadata",
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
