"""Reading and writing XCrySDen structure files (XSF) with the ænet conventions.

Conventions (reference §7):

* Coordinates are Cartesian (Å) and are never wrapped into the cell; lattice vectors are the
  rows of ``PRIMVEC`` (Å); forces (eV/Å, F = −∂E/∂r) are the optional columns 5–7 of an atom line.
* The total energy (eV) comes from a comment line containing ``total energy``: the first token
  after ``=`` (``# total energy = -19517.09425849 eV``). A unit after the number is converted
  (``eV``, ``Ry``, ``Ha``/``Hartree``, ``kcal/mol``, ``kJ/mol``, case-insensitive); any other
  word there is refused, never read as eV.
* Numbers follow Fortran's syntax (``-1.5``, ``2.``, ``.5``, ``1.0E-3``, ``1.0D-3``); Python-only
  forms (``1_000``, ``inf``, ``nan``, hexadecimal) are refused.
* ``CRYSTAL`` gives pbc (T, T, T) with the cell from ``PRIMVEC``; ``SLAB`` (T, T, F) and
  ``POLYMER`` (T, F, F) are read the same way; ``ATOMS`` blocks are isolated (no cell).
* Several ``PRIMCOORD``/``ATOMS`` blocks in one file are frames; the ``ANIMSTEPS`` variant, where
  each block reads ``PRIMCOORD n`` / ``ATOMS n``, is supported both ways. An energy comment belongs
  to the next frame that starts after it (or to the last frame when it follows every block).

Errors in a file raise ``ValueError`` as ``"<file>, line <n>: <what was expected>"``; missing or
truncated blocks are reported at the line of the keyword or count that announced them.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from ase import units
from ase.data import chemical_symbols

from aenet_fn.core.structure import ELEMENT_SYMBOLS, Structure
from aenet_fn.io.atomic import replacing

__all__ = ["read_xsf", "write_xsf"]

_PBC = {
    "CRYSTAL": (True, True, True),
    "SLAB": (True, True, False),
    "POLYMER": (True, False, False),
    "MOLECULE": (False, False, False),
}
_KEYWORDS = frozenset(
    {*_PBC, "ANIMSTEPS", "PRIMVEC", "CONVVEC", "PRIMCOORD", "CONVCOORD", "ATOMS", "DIM-GROUP"}
)
FORTRAN_REAL = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))(?:[eEdD]([+-]?\d+))?\Z")
"""A real number as Fortran writes one: mantissa and optional E or D exponent."""
ENERGY_UNITS = {
    "ev": 1.0,
    "ry": units.Ry,
    "ha": units.Hartree,
    "hartree": units.Hartree,
    "kcal/mol": units.kcal / units.mol,
    "kj/mol": units.kJ / units.mol,
}
"""Energy units an energy comment may name, in eV."""
_EXPECTED = "an XSF keyword (CRYSTAL, PRIMVEC, PRIMCOORD, ATOMS, ANIMSTEPS, ...)"
_ATOM_FORMAT = "'<species> x y z' or '<species> x y z fx fy fz'"


# --------------------------------------------------------------------------------------------
# reading


def _is_keyword(token: str) -> bool:
    key = token.upper()
    return key in _KEYWORDS or key.startswith(("BEGIN_", "END_"))


class _Frame:
    """One coordinate block while parsing (converted to a Structure at the end)."""

    def __init__(self, line: int, cell: list[list[float]] | None, pbc: tuple[bool, ...]):
        self.line = line
        self.count_line: int | None = None  # the 'N 1' line of a PRIMCOORD block
        self.cell = cell
        self.pbc = pbc
        self.energy: float | None = None
        self.species: list[str] = []
        self.positions: list[list[float]] = []
        self.forces: list[list[float]] | None = None


class _XsfParser:
    def __init__(self, path: str, lines: list[str]):
        self.path = path
        self.lines = lines
        self.pos = 0  # index of the next unread line
        self.pending_energy: tuple[float, int] | None = None  # (energy, line) not yet assigned
        self.frames: list[_Frame] = []
        self.dimension: tuple[str, int] | None = None  # (keyword, line)
        self.cell: list[list[float]] | None = None
        self.animsteps: tuple[int, int] | None = None  # (count, line)
        self.first_keyword_seen = False

    # -- helpers ------------------------------------------------------------------------------

    def error(self, line: int, message: str) -> ValueError:
        return ValueError(f"{self.path}, line {line}: {message}")

    def peek(self) -> tuple[int, str] | None:
        """The next line with content as ``(line number, text without comment)``, not consumed.
        Blank lines and comments are skipped (energy comments are recorded on the way)."""
        while self.pos < len(self.lines):
            text = self.lines[self.pos].strip()
            if text.startswith("#"):
                self._comment(self.pos + 1, text)
            else:
                text = text.split("#", 1)[0].strip()  # trailing comment on a content line
                if text:
                    return self.pos + 1, text
            self.pos += 1
        return None

    def take(self) -> tuple[int, str] | None:
        item = self.peek()
        if item is not None:
            self.pos += 1
        return item

    def _comment(self, line: int, text: str) -> None:
        if "total energy" not in text.lower() or "=" not in text:
            return
        after = text.split("=", 1)[1].split()
        if not after:
            raise self.error(line, f"expected a number after '=' in the energy line {text!r}")
        energy = self._number(line, after[0], "total energy")
        if len(after) > 1:
            unit = ENERGY_UNITS.get(after[1].lower())
            if unit is None:
                raise self.error(
                    line,
                    f"unknown energy unit {after[1]!r} in {text!r}; expected one of "
                    f"{', '.join(sorted(ENERGY_UNITS))} (or none: eV)",
                )
            energy *= unit
        if self.pending_energy is not None:
            raise self.error(
                line,
                f"a second 'total energy' line before the same frame (the first is on line "
                f"{self.pending_energy[1]}); expected one energy per frame",
            )
        self.pending_energy = (energy, line)

    def _number(self, line: int, token: str, what: str) -> float:
        match = FORTRAN_REAL.match(token)
        if match is None:
            raise self.error(line, f"{what} {token!r} is not a number") from None
        value = float(f"{match.group(1)}e{match.group(2) or 0}")  # Fortran 1.0D-3 too
        if not math.isfinite(value):
            raise self.error(line, f"{what} is {token!r}; expected a finite number")
        return value

    def _int(self, line: int, token: str, what: str) -> int:
        try:
            return int(token)
        except ValueError:
            raise self.error(line, f"expected {what} (an integer), got {token!r}") from None

    def _found(self, item: tuple[int, str] | None) -> str:
        if item is None:
            return f"the file ends at line {len(self.lines)}"
        return f"line {item[0]} is {item[1]!r}"

    # -- blocks -------------------------------------------------------------------------------

    def parse(self) -> list[_Frame]:
        if not any(line.strip() for line in self.lines):
            raise self.error(
                1, "the file is empty; expected an XSF structure (CRYSTAL/PRIMCOORD or ATOMS)"
            )
        while (item := self.take()) is not None:
            line, text = item
            tokens = text.split()
            key = tokens[0].upper()
            if not _is_keyword(key):
                if self.frames and self.frames[-1].count_line and len(tokens) >= 4:
                    raise self.error(
                        line,
                        f"expected {_EXPECTED}, got the atom-like line {text!r} outside a "
                        f"PRIMCOORD block (more atom lines than the count on line "
                        f"{self.frames[-1].count_line} announces?)",
                    )
                raise self.error(line, f"expected {_EXPECTED}, got {text!r}")
            if key == "ANIMSTEPS":
                self._animsteps(line, tokens)
            elif key in _PBC:
                self.dimension = (key, line)
            elif key == "PRIMVEC":
                self.cell = self._vectors(line, key)
            elif key == "CONVVEC":
                self._vectors(line, key)  # conventional cell: not used
            elif key == "PRIMCOORD":
                self._primcoord(line, tokens, keep=True)
            elif key == "CONVCOORD":
                self._primcoord(line, tokens, keep=False)
            elif key == "ATOMS":
                self._atoms(line)
            elif key.startswith("BEGIN_"):
                self._skip_block(line, key)
            elif key == "DIM-GROUP":
                self.take()  # "<dimensionality> <group>" line, not used
            else:
                raise self.error(line, f"unexpected {text!r} without a matching BEGIN_ line")
            self.first_keyword_seen = True
        self._finish()
        return self.frames

    def _animsteps(self, line: int, tokens: list[str]) -> None:
        if self.first_keyword_seen:
            raise self.error(line, "ANIMSTEPS must come before every other keyword")
        if len(tokens) < 2:
            raise self.error(line, "expected 'ANIMSTEPS <number of frames>'")
        count = self._int(line, tokens[1], "the number of frames after ANIMSTEPS")
        if count < 1:
            raise self.error(line, f"ANIMSTEPS {count}: expected at least one frame")
        self.animsteps = (count, line)

    def _vectors(self, line: int, key: str) -> list[list[float]]:
        rows = []
        for index in range(3):
            item = self.peek()
            if item is None or _is_keyword(item[1].split()[0]):
                raise self.error(
                    line,
                    f"{key} needs 3 lattice-vector rows 'x y z', found {index} "
                    f"({self._found(item)})",
                )
            self.take()
            row_line, text = item
            tokens = text.split()
            if len(tokens) != 3:
                raise self.error(
                    row_line,
                    f"expected lattice vector {index + 1} of {key} as 3 numbers, got {text!r}",
                )
            rows.append([self._number(row_line, t, f"{key} component") for t in tokens])
        return rows

    def _start_frame(self, line: int, periodic_block: bool) -> _Frame:
        if periodic_block:
            if self.cell is None:
                raise self.error(
                    line, "PRIMCOORD needs the cell: expected a PRIMVEC block before it"
                )
            key = self.dimension[0] if self.dimension else "CRYSTAL"
            frame = _Frame(line, self.cell, _PBC[key])
        else:
            frame = _Frame(line, None, (False, False, False))
        if self.pending_energy is not None:
            frame.energy = self.pending_energy[0]
            self.pending_energy = None
        return frame

    def _primcoord(self, line: int, tokens: list[str], keep: bool) -> None:
        key = tokens[0].upper()
        frame = self._start_frame(line, periodic_block=True) if keep else _Frame(line, None, ())
        item = self.take()
        if item is None or _is_keyword(item[1].split()[0]):
            raise self.error(
                line, f"expected the atom count line 'N 1' after {key}, but {self._found(item)}"
            )
        count_line, text = item
        count = self._int(count_line, text.split()[0], f"the atom count line 'N 1' after {key}")
        if count < 1:
            raise self.error(count_line, f"{key} announces {count} atoms; expected at least 1")
        frame.count_line = count_line
        for index in range(count):
            following = self.peek()
            if following is None or _is_keyword(following[1].split()[0]):
                raise self.error(
                    count_line,
                    f"{key} count says {count} atoms but only {index} atom lines follow "
                    f"({self._found(following)})",
                )
            self.take()
            self._atom(frame, *following, f"atom {index + 1} of {count}")
        if keep:
            self.frames.append(frame)

    def _atoms(self, line: int) -> None:
        frame = self._start_frame(line, periodic_block=False)
        while (item := self.peek()) is not None and not _is_keyword(item[1].split()[0]):
            self.take()
            self._atom(frame, *item, f"atom {len(frame.species) + 1}")
        if not frame.species:
            raise self.error(
                line, f"ATOMS block without atom lines {_ATOM_FORMAT} ({self._found(item)})"
            )
        self.frames.append(frame)

    def _atom(self, frame: _Frame, line: int, text: str, what: str) -> None:
        tokens = text.split()
        if len(tokens) not in (4, 7):
            raise self.error(
                line,
                f"expected an atom line {_ATOM_FORMAT} ({what}), got {len(tokens)} columns: "
                f"{text!r}",
            )
        frame.species.append(self._species(line, tokens[0]))
        frame.positions.append([self._number(line, t, "coordinate") for t in tokens[1:4]])
        has_forces = len(tokens) == 7
        if not frame.positions[:-1]:
            frame.forces = [] if has_forces else None
        elif has_forces != (frame.forces is not None):
            raise self.error(
                line,
                f"{what} {'has' if has_forces else 'lacks'} force columns but the atom lines "
                f"before it in this block {'do not' if has_forces else 'do'}; expected all or none",
            )
        if frame.forces is not None:
            frame.forces.append([self._number(line, t, "force component") for t in tokens[4:7]])

    def _species(self, line: int, token: str) -> str:
        if token.isdigit():
            number = int(token)
            if not 1 <= number < len(chemical_symbols):
                raise self.error(line, f"atomic number {number} is not an element (1 to 118)")
            return chemical_symbols[number]
        symbol = token[:1].upper() + token[1:].lower()
        if symbol not in ELEMENT_SYMBOLS:
            raise self.error(line, f"expected a chemical symbol or atomic number, got {token!r}")
        return symbol

    def _skip_block(self, line: int, key: str) -> None:
        end = "END_" + key[len("BEGIN_") :]
        while self.pos < len(self.lines):
            tokens = self.lines[self.pos].split()
            self.pos += 1
            if tokens and tokens[0].upper() == end:
                return
        raise self.error(line, f"{key} block without its closing {end} line")

    def _finish(self) -> None:
        if not self.frames:
            raise self.error(
                len(self.lines),
                "no structure found: expected a PRIMCOORD or ATOMS block before the end of file",
            )
        if self.pending_energy is not None:
            energy, line = self.pending_energy
            if self.frames[-1].energy is not None:
                raise self.error(
                    line,
                    "a 'total energy' line after the last frame, which already has one; "
                    "expected one energy per frame",
                )
            self.frames[-1].energy = energy
        if self.animsteps is not None and self.animsteps[0] != len(self.frames):
            count, line = self.animsteps
            raise self.error(
                line,
                f"ANIMSTEPS announces {count} frames but the file has {len(self.frames)} "
                f"(it ends at line {len(self.lines)})",
            )


def read_xsf(path: str | os.PathLike[str]) -> list[Structure]:
    """Read every frame of an XSF file.

    Returns one :class:`Structure` per ``PRIMCOORD``/``ATOMS`` block: positions ``[n, 3]``
    Cartesian and unwrapped (Å), cell ``[3, 3]`` from ``PRIMVEC`` for periodic files (rows are
    lattice vectors, Å), energy (eV) from a ``total energy`` comment, forces ``[n, 3]`` (eV/Å)
    when the atom lines carry them. Atomic numbers are converted to symbols. The name is the
    path string, with ``#frame=N`` (N from 0) appended when the file holds several frames.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file, the
    1-based line number and what was expected for a corrupt or truncated one.
    """
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        raise ValueError(f"{name}, line {line}: expected a text (XSF) file: {err}") from err
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    parser = _XsfParser(name, lines)
    frames = parser.parse()
    structures = []
    for index, frame in enumerate(frames):
        label = name if len(frames) == 1 else f"{name}#frame={index}"
        try:
            structures.append(
                Structure(
                    positions=frame.positions,
                    species=frame.species,
                    energy=frame.energy,
                    forces=frame.forces,
                    cell=frame.cell,
                    pbc=frame.pbc,
                    name=label,
                )
            )
        except ValueError as err:
            raise parser.error(frame.line, f"invalid structure in this block: {err}") from err
    return structures


# --------------------------------------------------------------------------------------------
# writing


def _dimension(structure: Any) -> str | None:
    """The XSF dimensionality keyword for a structure's pbc (``None``: isolated, ATOMS)."""
    pbc = tuple(bool(p) for p in structure.pbc)
    if not any(pbc):
        return None
    for key, flags in _PBC.items():
        if flags == pbc and any(flags):
            return key
    raise ValueError(
        f"write_xsf: XSF cannot represent pbc {pbc} of {structure!r}; it knows CRYSTAL "
        "(T, T, T), SLAB (T, T, F), POLYMER (T, F, F) and isolated molecules (F, F, F)"
    )


def _rows(values: Any) -> list[list[float]]:
    if hasattr(values, "detach"):
        values = values.detach().cpu()
    return [[float(v) for v in row] for row in values]


def _write_energy(handle: TextIO, structure: Any) -> None:
    if structure.energy is not None:
        handle.write(f"# total energy = {float(structure.energy):.8f} eV\n\n")


def _write_block(handle: TextIO, structure: Any, dimension: str | None, step: int | None) -> None:
    """The PRIMVEC + PRIMCOORD (periodic) or ATOMS (isolated) block of one structure."""
    suffix = "" if step is None else f" {step}"
    if dimension is not None:
        handle.write(f"PRIMVEC{suffix}\n")
        for row in _rows(structure.cell):
            handle.write("    " + " ".join(f"{v:14.8f}" for v in row) + "\n")
        handle.write(f"PRIMCOORD{suffix}\n{len(structure.species)} 1\n")
    else:
        handle.write(f"ATOMS{suffix}\n")
    positions = _rows(structure.positions)
    forces = None if structure.forces is None else _rows(structure.forces)
    for index, (symbol, xyz) in enumerate(zip(structure.species, positions, strict=True)):
        columns = xyz if forces is None else xyz + forces[index]
        handle.write(f"{symbol:2s} " + "".join(f" {v:14.8f}" for v in columns) + "\n")


def _as_list(structures: Any) -> list[Any]:
    if hasattr(structures, "positions"):
        return [structures]
    try:
        return list(structures)
    except TypeError:
        raise TypeError(
            f"write_xsf: expected a Structure or a sequence of them, got {type(structures)}"
        ) from None


def write_xsf(
    path: str | os.PathLike[str],
    structures: Structure | Sequence[Structure],
    comment: str | None = None,
) -> None:
    """Write one structure, or several as frames, to an XSF file (reference §7 format).

    One structure: optional ``# comment`` lines and a blank line, ``# total energy = {E:.8f} eV``
    and a blank line when the energy (eV) is known, then ``CRYSTAL``/``PRIMVEC`` (3 rows,
    Å)/``PRIMCOORD``/``N 1`` for a periodic structure or ``ATOMS`` for an isolated one, and one
    line per atom: symbol, Cartesian ``x y z`` (Å, ``%14.8f``) and forces ``fx fy fz`` (eV/Å)
    when known. Positions are written as they are (not wrapped).

    Several structures: one ``ANIMSTEPS n`` file with blocks ``PRIMVEC i``/``PRIMCOORD i`` (or
    ``ATOMS i``), i from 1, each preceded by its own ``# total energy`` comment when known.
    :func:`read_xsf` reads the energies back per frame; other programs that expect one energy
    per XSF file (aenet) will only see the first. All frames must share one XSF dimensionality
    (CRYSTAL, SLAB (T, T, F), POLYMER (T, F, F) or isolated). An isolated structure (pbc all
    False) is written as ``ATOMS`` and its cell, if any, is dropped.

    The file is written atomically: to a temporary file in the same directory, then renamed over
    ``path`` with ``os.replace``, so that a failure never leaves a partial file under ``path``.
    """
    frames = _as_list(structures)
    if not frames:
        raise ValueError("write_xsf: no structures to write")
    dimensions = {_dimension(s) for s in frames}
    if len(dimensions) > 1:
        raise ValueError(
            "write_xsf: one XSF file holds a single kind of system, got a mix of "
            f"{sorted(d or 'isolated' for d in dimensions)} structures; write them separately"
        )
    dimension = dimensions.pop()
    if comment is not None and "total energy" in comment.lower():
        raise ValueError(
            "write_xsf: the comment must not contain 'total energy' (it would be read as the "
            "energy); use the structure's energy"
        )
    target = Path(os.fspath(path))
    directory = target.parent
    if not directory.is_dir():
        raise FileNotFoundError(f"write_xsf: the directory {str(directory)!r} does not exist")
    with replacing(target) as temporary, open(temporary, "x", encoding="utf-8") as handle:
        if comment is not None:
            for line in comment.splitlines() or [""]:
                handle.write(f"# {line}".rstrip() + "\n")
            handle.write("\n")
        if len(frames) == 1:
            _write_energy(handle, frames[0])
            if dimension is not None:
                handle.write(f"{dimension}\n")
            _write_block(handle, frames[0], dimension, None)
        else:
            handle.write(f"ANIMSTEPS {len(frames)}\n")
            if dimension is not None:
                handle.write(f"{dimension}\n")
            for step, structure in enumerate(frames, start=1):
                _write_energy(handle, structure)
                _write_block(handle, structure, dimension, step)
