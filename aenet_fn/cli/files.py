"""The commands' files: which files a command reads (:func:`input_files`), refusing an
output that would replace an input or an existing file (:func:`check_output_file`), reading
structure files (:func:`read_structure_files`), checking their species and naming the
structure behind a ``ValueError`` (:func:`naming_structures`); shared by the commands."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from aenet_fn.cli.errors import CLIError
from aenet_fn.core.structure import Structure
from aenet_fn.io.ase_io import read_structures
from aenet_fn.torch_training import convert_to_structures


def input_files(paths: Sequence[str | os.PathLike], suffix: str | None = None) -> set[Path]:
    """The files a command reads from ``paths``, resolved: a file itself, a folder its files
    whose names end in ``suffix`` (case-insensitive), or with ``suffix`` None every file under
    it (a committee directory)."""
    found: set[Path] = set()
    for path in map(Path, paths):
        if path.is_dir():
            candidates = path.rglob("*") if suffix is None else path.iterdir()
            found.update(
                p.resolve()
                for p in candidates
                if p.is_file() and (suffix is None or p.name.lower().endswith(suffix))
            )
        elif path.is_file():
            found.add(path.resolve())
    return found


def check_output_file(
    path: Path, inputs: set[Path], overwrite: bool, what: str = "--output"
) -> None:
    """Refuse to write the file ``path`` when it is a folder or one of the command's ``inputs``
    (see :func:`input_files`; also with ``overwrite``), or when it exists and ``overwrite`` is
    not given."""
    if not path.exists():
        return
    if path.is_dir():
        raise CLIError(f"{what} {path} is a folder; give the path of a file")
    if any(path.samefile(p) for p in inputs):  # resolved paths and hard links alike
        raise CLIError(
            f"{what} {path} is one of this command's inputs; writing it would destroy the "
            "input: choose another path"
        )
    if not overwrite:
        raise CLIError(
            f"{what} {path} already exists; choose another path or pass --overwrite to replace it"
        )


@contextlib.contextmanager
def naming_structures(
    structures: Sequence[Any],
    check: Callable[[Any], Any],
    name: Callable[[Any], str] = lambda structure: structure.name,
) -> Iterator[None]:
    """Turn a ``ValueError`` raised inside into a :class:`CLIError` that names (by ``name``) the
    first of ``structures`` (records or files) for which ``check``, run on it alone, raises too,
    with that one's message (overlapping atoms, ...); the original message when none does."""
    try:
        yield
    except ValueError as error:
        for structure in structures:
            try:
                check(structure)
            except ValueError as single:
                raise CLIError(f"{name(structure)}: {single}") from error
        raise CLIError(str(error)) from error


def read_structure_files(paths: Sequence[Path], format: str | None = None) -> list[Structure]:
    """Every structure of ``paths`` (any ASE format, XSF, folders of XSF files), named."""
    try:
        return convert_to_structures(read_structures(list(paths), format=format))
    except (OSError, ValueError) as error:
        raise CLIError(str(error)) from error


def check_species(
    structures: Sequence[Structure], species: Sequence[str], what: str, whose: str
) -> None:
    """Raise :class:`CLIError` naming the structures (``what``: where they came from) that hold
    a species not in ``species`` (``whose``: the list's owner, for the message)."""
    unknown = sorted({s for st in structures for s in st.species} - set(species))
    if unknown:
        names = [st.name for st in structures if not set(st.species) <= set(species)]
        raise CLIError(
            f"{what}: species {unknown} are not in {whose} species {list(species)} "
            f"(in {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
        )
