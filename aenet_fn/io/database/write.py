"""Writing a database file: the file object HDF5 writes through (a failed write never reaches
HDF5), the writer that appends prepared chunks of structures, and the final repack into the
layout readers use (the arrays batches read contiguous, to be memory-mapped)."""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import h5py
import numpy as np

from aenet_fn.core.descriptor import ChebyshevParams
from aenet_fn.io.database.schema import (
    BASE_COLUMNS,
    FORMAT,
    SCHEMA_VERSION,
    STRESS_COLUMNS,
    TEXT,
    derivative_columns,
    descriptor_fingerprint,
    descriptor_json,
    feature_columns,
)

_CHUNK_BYTES = 1 << 14
"""Target size of an HDF5 chunk (before compression): a structure read decompresses little."""


@attrs.frozen
class Chunk:
    """The arrays of one build task, ready to append: ``sources`` rows (id, kind, display
    name, frames), ``arrays`` by dataset path (``source_index`` relative to the task) and the
    counts that extend the offset arrays."""

    sources: tuple[tuple[str, str, str, int], ...]
    arrays: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    n_removed: int


class LatchingFile(io.RawIOBase):
    """A new file for HDF5 to write through (h5py's file-object driver) that keeps the first
    write error instead of passing it on: later writes are dropped and reported done, so
    HDF5 never meets a failed write (after one, closing an HDF5 file can crash the process)
    and the caller raises :attr:`error` itself. The file is abandoned after an error."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.stream = open(path, "xb+", buffering=0)
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self.stream.readinto(buffer)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.stream.seek(offset, whence)

    def tell(self) -> int:
        return self.stream.tell()

    def write(self, data: Any) -> int:
        if self.error is None:
            try:
                return self.stream.write(data)
            except OSError as err:
                self.error = err
        return memoryview(data).nbytes

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return self.stream.truncate(size)
            except OSError as err:
                self.error = err
        return self.tell() if size is None else size

    def close(self) -> None:
        self.stream.close()
        super().close()


class Writer:
    """Appends chunks to a new database file; :meth:`finish` marks it complete. A failed write
    (disk full, file size limit) raises its ``OSError``."""

    def __init__(
        self,
        path: Path,
        params: ChebyshevParams | None,
        features: bool,
        derivatives: bool,
        filters: dict[str, Any],
    ) -> None:
        self.stream = LatchingFile(path)
        self.file = h5py.File(self.stream, "w")
        self.columns = {**BASE_COLUMNS, **STRESS_COLUMNS}
        if params is not None:
            group = self.file.create_group("descriptor")
            group.attrs["kind"] = "chebyshev"
            group.attrs["parameters"] = descriptor_json(params)
            group.attrs["sha256"] = descriptor_fingerprint(params)
        if features:
            group = self.file.create_group("features")
            group.attrs["descriptor_sha256"] = descriptor_fingerprint(params)
            group.attrs["n_features"] = params.n_features
            self.columns.update(feature_columns(params.n_features))
        if derivatives:
            group = self.file.create_group("local_derivatives")
            group.attrs["descriptor_sha256"] = descriptor_fingerprint(params)
            group.attrs["n_radial"] = params.rad_order + 1
            group.attrs["n_angular"] = params.ang_order + 1
            self.columns.update(derivative_columns(params.rad_order + 1, params.ang_order + 1))
        for path_, column in self.columns.items():
            row_bytes = np.dtype(column.dtype).itemsize * int(np.prod(column.shape, dtype=int))
            self.file.create_dataset(
                path_,
                shape=(1 if column.rows == "offset" else 0, *column.shape),
                maxshape=(None, *column.shape),
                dtype=column.dtype,
                chunks=(max(1, _CHUNK_BYTES // max(row_bytes, 8)), *column.shape),
                **({} if column.dtype is TEXT else filters),  # HDF5 filters skip text
            )
        self.n_sources = self.n_structures = self.n_removed = 0

    def append(self, chunk: Chunk) -> None:
        """Append ``chunk`` (its source indices shifted past the sources written so far)."""
        arrays = dict(chunk.arrays)
        if chunk.sources:
            ids, kinds, names, frames = zip(*chunk.sources)
            arrays["sources/source_id"] = np.array(ids, dtype=object)
            arrays["sources/kind"] = np.array(kinds, dtype=object)
            arrays["sources/display_name"] = np.array(names, dtype=object)
            arrays["sources/n_frames"] = np.array(frames, dtype=np.int64)
        if "structures/source_index" in arrays:
            arrays["structures/source_index"] = arrays["structures/source_index"] + self.n_sources
        for path_, counts in chunk.counts.items():
            dataset = self.file[path_]
            arrays[path_] = int(dataset[-1]) + np.cumsum(counts)
        for path_, values in arrays.items():
            if len(values):
                dataset = self.file[path_]
                start = dataset.shape[0]
                dataset.resize(start + len(values), axis=0)
                dataset[start:] = values
        self.n_sources += len(chunk.sources)
        self.n_structures += len(chunk.counts.get("structures/atom_offset", ()))
        self.n_removed += chunk.n_removed
        self.check()

    def check(self) -> None:
        """Raise the first failed write."""
        if self.stream.error is not None:
            raise self.stream.error

    def finish(self, max_energy: float | None, atomic_energies: Mapping[str, float] | None) -> None:
        """Write the root attributes; the format mark comes last."""
        attributes = self.file.attrs
        attributes["energy_filter_max_energy"] = math.nan if max_energy is None else max_energy
        attributes["energy_filter_atomic_energies"] = (
            ""
            if atomic_energies is None
            else json.dumps(dict(atomic_energies), sort_keys=True, separators=(",", ":"))
        )
        attributes["schema_version"] = SCHEMA_VERSION
        attributes["format"] = FORMAT

    def close(self) -> None:
        """Close the file (a failed write during the last flush raises, see :meth:`check`)."""
        try:
            self.file.close()
        finally:
            self.stream.close()
        self.check()


BATCH_COLUMNS = ("features/values", "structures/positions", "structures/forces")
"""The per-atom arrays training batches read, with the local derivatives' entry arrays
(:func:`batch_column`): stored contiguous and uncompressed, so that a reader maps them into
memory and reads a structure's rows without an HDF5 call (the derivatives barely compress)."""


def batch_column(path: str) -> bool:
    """Whether the dataset ``path`` is one training batches read row by row."""
    derivative = path.startswith("local_derivatives/") and not path.endswith("_offset")
    return derivative or path in BATCH_COLUMNS


_COPY_ROWS = 1 << 20
"""Rows copied at a time when a column is repacked."""


def repack(appended: Path, final: Path) -> None:
    """Copy the database ``appended`` (written in appended chunks) to the new file ``final``:
    the batch columns (:func:`batch_column`) contiguous and uncompressed, every other dataset
    as it is, the
    attributes with them (the root's format mark last)."""
    stream = LatchingFile(final)
    try:
        with h5py.File(appended, "r") as source, h5py.File(stream, "w") as target:
            _copy_group(source, target)
            marks = {k: v for k, v in source.attrs.items() if k != "format"}
            target.attrs.update(marks)
            if "format" in source.attrs:
                target.attrs["format"] = source.attrs["format"]
    finally:
        stream.close()
    if stream.error is not None:
        raise stream.error


def _copy_group(source: h5py.Group, target: h5py.Group) -> None:
    """Copy the members of ``source`` into ``target`` (see :func:`repack`)."""
    for name, member in source.items():
        if isinstance(member, h5py.Group):
            group = target.create_group(name)
            group.attrs.update(dict(member.attrs))
            _copy_group(member, group)
        elif batch_column(member.name.lstrip("/")):
            column = target.create_dataset(name, shape=member.shape, dtype=member.dtype)
            for first in range(0, member.shape[0], _COPY_ROWS):
                column[first : first + _COPY_ROWS] = member[first : first + _COPY_ROWS]
            column.attrs.update(dict(member.attrs))
        else:
            source.copy(member, target, name=name)
