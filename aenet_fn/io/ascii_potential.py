"""ænet ``.nn.ascii`` potential files: read them into a :class:`~aenet_fn.core.potential.Model` and
write a model back out (spec ``aenet-reference.md`` §5).

One file per species holds three sections, read by Fortran with list-directed input (whitespace
or comma separated tokens; every record starts on a new line, may continue over several lines
and discards the rest of its last line):

* network: ``nlayers``, ``nnodes_max``, ``Wsize``, ``nvalues``, ``nnodes``, activation codes,
  offsets ``iw`` and ``iv``, then the weights: per layer the matrix ``[Weight | bias]`` of shape
  ``(n_out, n_in + 1)`` flattened column-major, which is exactly our ``weight [in, out]``
  row-major followed by ``bias [out]``;
* descriptor setup: species, cutoffs, the Chebyshev orders (``sfparam`` column 1 =
  ``[Rr, rad_order, Ra, ang_order]``) and per-feature statistics ``min, max, avg, cov`` where
  ``cov = E[G²]`` (Fortran normalises ``(G − avg) / sqrt(cov − avg²)``, switching a feature off
  when ``cov − avg² <= 1e-10``);
* training-set info: energy normalisation (``E_a = NN_a / scale + shift + E_atom``), the atomic
  reference energies and a summary of the training set.

The writer uses ``%.17e`` exponent form for every float (never fixed-point, spec §12.5), so
float64 values round-trip exactly; only the standard deviation passes through
``sqrt(cov − avg²)``: the writer picks the ``cov`` that reproduces it exactly where float64
allows (always for statistics that came from a file), else to ``~1e-16·(1 + avg²/std²)``.

Why one module of about 770 lines: the reader and the writer of one format share its record
layout and must change together for files to keep round-tripping.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aenet_fn.core.descriptor import ChebyshevParams
from aenet_fn.core.network import NetworkParams
from aenet_fn.core.normalization import Normalization
from aenet_fn.core.potential import Model
from aenet_fn.core.splits import referenced_energies_per_atom
from aenet_fn.core.structure import Structure, check_float_dtype
from aenet_fn.io.atomic import replacing

PathLike = str | os.PathLike
ACTIVATION_CODES: dict[str, int] = {"linear": 0, "tanh": 1, "sigmoid": 2, "mtanh": 3, "twist": 4}
"""Fortran ænet activation codes by activation name (the only exportable activations)."""
_CODE_NAMES = {code: name for name, code in ACTIVATION_CODES.items()}
VARIANCE_FLOOR = 1e-10
"""Fortran switches a feature off (scale 0) when ``cov − avg²`` is at or below this."""
TRAINING_INFO_KEYS = ("filename", "natomtot", "nstrucs", "e_min", "e_max", "e_avg")

_TOKEN = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|[^\s,]+")
_REPEAT = re.compile(r"(\d+)\*(.+)\Z")
_INT = re.compile(r"[+-]?\d+\Z")
_REAL = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))(?:[eEdDqQ]([+-]?\d+)|([+-]\d+))?\Z")
_UNSAFE_WORD = re.compile(r"[\s,/'\"]")


# ----------------------------------------------------------------------------------------------
# list-directed reading


class _Records:
    """Fortran list-directed reads over the lines of one file, with file/line error messages."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()
        self.next_line = 0
        self.ends_with_newline = text.endswith(("\n", "\r"))
        self.last_what = ""

    def check_complete(self) -> None:
        """Refuse a file cut inside its last record: every writer (Fortran, ænet-PyTorch, ours)
        ends the file with a newline, so a last record read from an unterminated last line may
        have lost digits."""
        if self.next_line == len(self.lines) and not self.ends_with_newline:
            raise self.error(
                f"the file is truncated: it ends inside {self.last_what} without the final "
                f"newline every writer puts there",
                self.next_line,
            )

    def error(self, message: str, line: int | None = None) -> ValueError:
        where = f"{self.path}: line {line}: " if line is not None else f"{self.path}: "
        return ValueError(where + message)

    def _tokens(self, count: int, what: str) -> list[tuple[str, int]]:
        """The next ``count`` tokens, starting on a new line (repeat counts ``r*c`` expanded)."""
        self.last_what = what
        found: list[tuple[str, int]] = []
        while len(found) < count:
            if self.next_line >= len(self.lines):
                raise self.error(
                    f"unexpected end of file while reading {what}: expected {count} value(s), "
                    f"found {len(found)}"
                )
            self.next_line += 1
            for token in _TOKEN.findall(self.lines[self.next_line - 1]):
                repeat = _REPEAT.match(token)
                if repeat and not token.startswith(("'", '"')):
                    # values a repeat gives beyond this read are not read (never allocated)
                    times = min(int(repeat.group(1)), count - len(found))
                    found.extend([(repeat.group(2), self.next_line)] * times)
                else:
                    found.append((token, self.next_line))
        return found[:count]

    def line(self, what: str) -> str:
        """The next non-blank line, whole (a free-text record such as the description)."""
        while self.next_line < len(self.lines):
            self.next_line += 1
            text = self.lines[self.next_line - 1].strip()
            if text:
                self.last_what = what
                return text
        raise self.error(f"unexpected end of file while reading {what}")

    def words(self, count: int, what: str) -> list[str]:
        """``count`` character values (quotes removed)."""
        words = []
        for token, _ in self._tokens(count, what):
            if len(token) >= 2 and token[0] in "'\"" and token[-1] == token[0]:
                token = token[1:-1].replace(token[0] * 2, token[0])
            words.append(token)
        return words

    def ints(self, count: int, what: str) -> list[int]:
        """``count`` integers."""
        values = []
        for k, (token, line) in enumerate(self._tokens(count, what)):
            if not _INT.match(token):
                raise self.error(
                    f"expected an integer for {what}{_position(k, count)}, found {token!r}", line
                )
            values.append(int(token))
        return values

    def floats(self, count: int, what: str) -> np.ndarray:
        """``count`` finite reals (Fortran ``E``/``D``/``Q`` exponents accepted); the values
        are read before anything is allocated for them, so a count the file does not hold is
        an error naming both numbers, whatever its size."""
        tokens = self._tokens(count, what)
        values = np.empty(count, dtype=np.float64)
        for k, (token, line) in enumerate(tokens):
            match = _REAL.match(token)
            value = math.nan
            if match:
                exponent = match.group(2) or match.group(3) or "0"
                value = float(f"{match.group(1)}e{exponent}")
            if not math.isfinite(value):
                raise self.error(
                    f"expected a finite number for {what}{_position(k, count)}, found {token!r}",
                    line,
                )
            values[k] = value
        return values

    def int(self, what: str) -> int:
        """One integer record."""
        return self.ints(1, what)[0]

    def float(self, what: str) -> float:
        """One real record."""
        return float(self.floats(1, what)[0])

    def logical(self, what: str) -> bool:
        """One Fortran logical (``T``, ``.true.``, ``True``, ``F``, ...)."""
        [(token, line)] = self._tokens(1, what)
        letter = token[1:2] if token.startswith(".") else token[:1]
        if letter.upper() not in ("T", "F"):
            raise self.error(f"expected a logical (T or F) for {what}, found {token!r}", line)
        return letter.upper() == "T"


def _position(k: int, count: int) -> str:
    return f" (value {k + 1} of {count})" if count > 1 else ""


@dataclass
class _PotentialFile:
    """Everything one ``.nn.ascii`` file says, parsed and checked for internal consistency."""

    path: Path
    sizes: tuple[int, ...]
    activations: tuple[str, ...]
    values: np.ndarray
    atomtype: str
    envtypes: tuple[str, ...]
    descriptor: dict[str, Any]
    stats: dict[str, np.ndarray]
    energy: dict[str, Any]
    atomic_energies: dict[str, float]
    training: dict[str, Any] = field(default_factory=dict)


def _parse_network(records: _Records) -> tuple[tuple[int, ...], tuple[str, ...], np.ndarray]:
    nlayers = records.int("nlayers")
    if nlayers < 2:
        raise records.error(f"nlayers must be >= 2 (input and output), got {nlayers}")
    nnodes_max = records.int("nnodes_max")
    wsize = records.int("Wsize")
    nvalues = records.int("nvalues")
    nnodes = records.ints(nlayers, f"nnodes ({nlayers} layer sizes)")
    codes = records.ints(nlayers - 1, f"activation codes f_a ({nlayers - 1} values)")
    iw = records.ints(nlayers, f"iw ({nlayers} offsets)")
    iv = records.ints(nlayers, f"iv ({nlayers} offsets)")
    if min(nnodes) < 1 or nnodes[-1] != 1:
        raise records.error(f"nnodes must be >= 1 and end in one output node, got {nnodes}")
    expected_iw, expected_iv = [0], [0]
    for n_in, n_out in zip(nnodes[:-1], nnodes[1:]):
        expected_iw.append(expected_iw[-1] + (n_in + 1) * n_out)
        expected_iv.append(expected_iv[-1] + n_in + 1)
    expected = {
        "nnodes_max": (nnodes_max, max(nnodes)),
        "Wsize": (wsize, expected_iw[-1]),
        "nvalues": (nvalues, expected_iv[-1] + nnodes[-1]),
        "iw": (iw, expected_iw),
        "iv": (iv, expected_iv),
    }
    for name, (found, wanted) in expected.items():
        if found != wanted:
            raise records.error(f"{name} is {found} but nnodes {nnodes} imply {wanted}")
    unknown = [c for c in codes if c not in _CODE_NAMES]
    if unknown:
        raise records.error(f"unknown activation code(s) {unknown}; known: {sorted(_CODE_NAMES)}")
    if codes[-1] != 0:
        raise records.error(f"the output layer must be linear (code 0), got code {codes[-1]}")
    weights = records.floats(wsize, f"network weights W ({wsize} values)")
    # Block l, read row-major as (n_in + 1, n_out), is [Weight | bias] transposed: our layout.
    return tuple(nnodes), tuple(_CODE_NAMES[c] for c in codes[:-1]), weights


def _parse_descriptor(records: _Records) -> dict[str, Any]:
    records.line("the descriptor description")
    atomtype = records.words(1, "atomtype")[0]
    nenv = records.int("nenv")
    if nenv < 1:
        raise records.error(f"nenv must be >= 1, got {nenv}")
    envtypes = tuple(records.words(nenv, f"envtypes ({nenv} species)"))
    rc_min = records.float("Rc_min")
    rc_max = records.float("Rc_max")
    sftype = records.words(1, "sftype")[0]
    if sftype.lower() != "chebyshev":
        raise records.error(f"only the Chebyshev descriptor is supported, found sftype {sftype!r}")
    nsf = records.int("nsf")
    nsfparam = records.int("nsfparam")
    if nsf < 1 or nsfparam < 4:
        raise records.error(f"need nsf >= 1 and nsfparam >= 4, got nsf {nsf}, nsfparam {nsfparam}")
    records.ints(nsf, f"sf ({nsf} values)")
    sfparam = records.floats(nsfparam * nsf, f"sfparam ({nsfparam} x {nsf} values)")
    records.ints(2 * nsf, f"sfenv ({2 * nsf} values)")
    records.int("neval")
    stats = {
        key: records.floats(nsf, f"sfval_{key} ({nsf} values)")
        for key in ("min", "max", "avg", "cov")
    }
    rad_cutoff, rad_order, ang_cutoff, ang_order = (float(v) for v in sfparam[:4])
    for name, order in (("radial", rad_order), ("angular", ang_order)):
        if order < 0 or order != int(order):
            raise records.error(f"sfparam: {name} order must be an integer >= 0, got {order}")
    if rc_max < max(rad_cutoff, ang_cutoff) * (1 - 1e-12):
        raise records.error(
            f"Rc_max {rc_max} is below the descriptor cutoffs (radial {rad_cutoff}, "
            f"angular {ang_cutoff})"
        )
    descriptor = {
        "species": envtypes,
        "min_cutoff": rc_min,
        "rad_cutoff": rad_cutoff,
        "rad_order": int(rad_order),
        "ang_cutoff": ang_cutoff,
        "ang_order": int(ang_order),
        "Rc_max": rc_max,
        "nsf": nsf,
    }
    return {"atomtype": atomtype, "descriptor": descriptor, "stats": stats}


def _parse_training(records: _Records, envtypes: tuple[str, ...]) -> dict[str, Any]:
    filename = records.words(1, "the training-set file name")[0]
    normalized = records.logical("normalized")
    scale = records.float("scale")
    shift = records.float("shift")
    ntypes = records.int("ntypes")
    if ntypes < 1:
        raise records.error(f"ntypes must be >= 1, got {ntypes}")
    names = records.words(ntypes, f"type names ({ntypes} species)")
    e_atom = records.floats(ntypes, f"E_atom ({ntypes} values)")
    natomtot = records.int("natomtot")
    nstrucs = records.int("nstrucs")
    e_min, e_max, e_avg = records.floats(3, "E_min E_max E_avg")
    missing = [s for s in envtypes if s not in names]
    if missing:
        raise records.error(f"the training-set section has no E_atom for species {missing}")
    if normalized and not scale > 0:
        raise records.error(f"the energy scale must be > 0, got {scale}")
    energy = {
        "normalized": normalized,
        "scale": scale if normalized else 1.0,
        "shift": shift if normalized else 0.0,
    }
    training = {
        "filename": filename,
        "natomtot": natomtot,
        "nstrucs": nstrucs,
        "e_min": float(e_min),
        "e_max": float(e_max),
        "e_avg": float(e_avg),
    }
    atomic = {name: float(value) for name, value in zip(names, e_atom)}
    return {"energy": energy, "atomic_energies": atomic, "training": training}


def _parse_file(path: PathLike) -> _PotentialFile:
    """Parse and check one ``.nn.ascii`` file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such potential file")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        raise ValueError(f"{path}: cannot read potential file ({error})") from error
    records = _Records(path, text)
    sizes, activations, values = _parse_network(records)
    setup = _parse_descriptor(records)
    envtypes = setup["descriptor"]["species"]
    training = _parse_training(records, envtypes)
    records.check_complete()
    if setup["atomtype"] not in envtypes:
        raise records.error(f"atomtype {setup['atomtype']!r} is not among envtypes {envtypes}")
    if sizes[0] != setup["descriptor"]["nsf"]:
        raise records.error(
            f"the network takes {sizes[0]} inputs but the descriptor has nsf = "
            f"{setup['descriptor']['nsf']}"
        )
    return _PotentialFile(
        path=path,
        sizes=sizes,
        activations=activations,
        values=values,
        atomtype=setup["atomtype"],
        envtypes=envtypes,
        descriptor=setup["descriptor"],
        stats=setup["stats"],
        energy=training["energy"],
        atomic_energies=training["atomic_energies"],
        training=training["training"],
    )


def _potential_paths(paths: Any) -> tuple[list[Path], dict[str, Path] | None]:
    """The files to read, and the species each must hold when ``paths`` is a mapping."""
    if isinstance(paths, Mapping):
        named = {str(k): Path(v) for k, v in paths.items()}
        return list(named.values()), named
    if isinstance(paths, (str, os.PathLike)):
        single = Path(paths)
        if single.is_dir():
            found = sorted(single.glob("*.nn.ascii"))
            if not found:
                raise ValueError(f"{single}: no *.nn.ascii files in this folder")
            return found, None
        return [single], None
    if not isinstance(paths, Sequence) or not paths:
        raise ValueError("read_aenet_ascii: give one .nn.ascii file per species")
    return [Path(p) for p in paths], None


def read_aenet_ascii(
    paths: Sequence[PathLike] | Mapping[str, PathLike] | PathLike,
    *,
    dtype: torch.dtype = torch.float64,
) -> Model:
    """Read an ænet potential from its ``.nn.ascii`` files (spec §5) into a :class:`Model`.

    Args:
        paths: one file per species (any order; each file names its species), a mapping
            species → file (checked against each file's species), a single file
            (single-species potential) or a folder whose ``*.nn.ascii`` files are read.
        dtype: floating dtype of the model's tensors, ``torch.float32`` or ``torch.float64``.

    The species order of the model is the files' ``envtypes`` order (it defines the typespin
    weights). Feature statistics are per species: ``mean = avg``,
    ``std = sqrt(cov − avg²)``, or ``+inf`` (feature off) where ``cov − avg² <= 1e-10``.
    Without energy normalisation (``normalized`` F) scaling is 1 and shift 0 (eV/atom).

    Raises:
        ValueError: naming the file (and line) for a missing, truncated or malformed file,
            inconsistent counts, or files that disagree on the descriptor or the energy model;
            also for a dtype other than float32/float64 (``TypeError`` if not a torch.dtype).
    """
    check_float_dtype(dtype, "read_aenet_ascii")
    files, expected_species = _potential_paths(paths)
    parsed = [_parse_file(p) for p in files]
    first = parsed[0]
    for other in parsed[1:]:
        checks = [(k, first.descriptor[k], other.descriptor[k]) for k in first.descriptor]
        checks += [(k, first.energy[k], other.energy[k]) for k in first.energy]
        checks.append(("E_atom", first.atomic_energies, other.atomic_energies))
        for name, a, b in checks:
            if a != b:
                raise ValueError(
                    f"{first.path} and {other.path} disagree on {name}: {a!r} vs {b!r}"
                )
    by_species: dict[str, _PotentialFile] = {}
    for item in parsed:
        if item.atomtype in by_species:
            raise ValueError(
                f"{by_species[item.atomtype].path} and {item.path} are both for species "
                f"{item.atomtype!r}"
            )
        by_species[item.atomtype] = item
    if expected_species is not None:
        for symbol, path in expected_species.items():
            if by_species.get(symbol) is None or by_species[symbol].path != path:
                found = next((p.atomtype for p in parsed if p.path == path), None)
                raise ValueError(f"{path}: given for species {symbol!r} but holds {found!r}")
    species = first.envtypes
    missing = [s for s in species if s not in by_species]
    if missing:
        raise ValueError(
            f"no potential file for species {missing} (files given: {[str(p) for p in files]})"
        )
    spec = first.descriptor
    try:
        descriptor = ChebyshevParams(
            species=species,
            rad_order=spec["rad_order"],
            rad_cutoff=spec["rad_cutoff"],
            ang_order=spec["ang_order"],
            ang_cutoff=spec["ang_cutoff"],
            min_cutoff=spec["min_cutoff"],
        )
    except ValueError as error:
        raise ValueError(f"{first.path}: {error}") from error
    if descriptor.n_features != spec["nsf"]:
        raise ValueError(
            f"{first.path}: nsf = {spec['nsf']} but the Chebyshev orders (radial "
            f"{spec['rad_order']}, angular {spec['ang_order']}) and {len(species)} species give "
            f"{descriptor.n_features} features"
        )
    ordered = [by_species[s] for s in species]
    network = NetworkParams(
        values=torch.as_tensor(np.concatenate([f.values for f in ordered]), dtype=dtype),
        sizes=tuple(f.sizes for f in ordered),
        activations=tuple(f.activations for f in ordered),
        species=species,
    )
    avg = np.stack([f.stats["avg"] for f in ordered])
    variance = np.stack([f.stats["cov"] for f in ordered]) - avg * avg
    std = np.where(variance > VARIANCE_FLOOR, np.sqrt(np.maximum(variance, 0.0)), np.inf)

    def tensor(value: Any) -> torch.Tensor:
        return torch.as_tensor(np.asarray(value, dtype=np.float64), dtype=dtype)

    normalization = Normalization(
        feature_mean=tensor(avg),
        feature_std=tensor(std),
        feature_min=tensor(np.stack([f.stats["min"] for f in ordered])),
        feature_max=tensor(np.stack([f.stats["max"] for f in ordered])),
        energy_shift=tensor(first.energy["shift"]),
        energy_scaling=tensor(first.energy["scale"]),
        atomic_energies=tensor([first.atomic_energies[s] for s in species]),
    )
    return Model(descriptor=descriptor, network=network, normalization=normalization)


# ----------------------------------------------------------------------------------------------
# writing


def _fmt_float(value: float) -> str:
    return f"{value:24.17e}"


def _fmt_floats(values: Any, per_line: int | None = None) -> str:
    items = [_fmt_float(float(v)) for v in np.asarray(values, dtype=np.float64).ravel()]
    return _join(items, per_line)


def _fmt_ints(values: Sequence[int], per_line: int | None = None) -> str:
    return _join([f"{int(v):17d}" for v in values], per_line)


def _join(items: list[str], per_line: int | None) -> str:
    if per_line is None or not items:
        return " ".join(items)
    return "\n".join(" ".join(items[k : k + per_line]) for k in range(0, len(items), per_line))


def _fmt_word(text: str) -> str:
    """A character value as list-directed input reads it back whole (quoted when needed)."""
    if text and not _UNSAFE_WORD.search(text):
        return text
    return "'" + text.replace("'", "''") + "'"


def _second_moment(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``cov = std² + mean²``, moved by up to 8 ulps to the value whose ``sqrt(cov − mean²)`` is
    closest to ``std`` (exact whenever float64 allows it, e.g. for statistics read from a file;
    otherwise off by about ``eps·(std + mean²/std)``). ``std = inf`` gives ``cov = mean²``
    (variance 0: Fortran scale 0)."""
    finite = np.isfinite(std)
    target = np.where(finite, std, 0.0)
    square = mean * mean
    best = np.where(finite, target * target + square, square)
    best_error = np.abs(np.sqrt(np.maximum(best - square, 0.0)) - target)
    start = best
    for direction in (np.inf, -np.inf):
        candidate = start
        for _ in range(8):
            candidate = np.nextafter(candidate, direction)
            error = np.abs(np.sqrt(np.maximum(candidate - square, 0.0)) - target)
            better = finite & (error < best_error)
            best, best_error = np.where(better, candidate, best), np.minimum(error, best_error)
    return best


def _check_finite(name: str, values: np.ndarray) -> None:
    if not np.isfinite(values).all():
        raise ValueError(f"write_aenet_ascii: {name} must be finite to be exported")


def _training_info(info: Mapping[str, Any] | None) -> dict[str, Any]:
    result: dict[str, Any] = {"filename": "aenet_fn", "natomtot": 0, "nstrucs": 0}
    result.update(e_min=0.0, e_max=0.0, e_avg=0.0)
    if info is None:
        return result
    unknown = sorted(set(info) - set(TRAINING_INFO_KEYS))
    if unknown:
        raise ValueError(
            f"write_aenet_ascii: unknown training_info keys {unknown}; "
            f"allowed: {list(TRAINING_INFO_KEYS)}"
        )
    for key, value in info.items():
        if key == "filename":
            result[key] = str(value)
        elif key in ("natomtot", "nstrucs"):
            if isinstance(value, bool) or int(value) != value or value < 0:
                raise ValueError(f"write_aenet_ascii: training_info[{key!r}] must be an int >= 0")
            result[key] = int(value)
        else:
            if not math.isfinite(float(value)):
                raise ValueError(f"write_aenet_ascii: training_info[{key!r}] must be finite")
            result[key] = float(value)
    return result


def _network_section(sizes: Sequence[int], codes: Sequence[int], weights: np.ndarray) -> str:
    iw, iv = [0], [0]
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        iw.append(iw[-1] + (n_in + 1) * n_out)
        iv.append(iv[-1] + n_in + 1)
    lines = [
        _fmt_ints([len(sizes)]),
        _fmt_ints([max(sizes)]),
        _fmt_ints([iw[-1]]),
        _fmt_ints([iv[-1] + sizes[-1]]),
        _fmt_ints(sizes),
        _fmt_ints([*codes, 0]),
        _fmt_ints(iw),
        _fmt_ints(iv),
        _fmt_floats(weights),
    ]
    return "\n".join(lines)


def _descriptor_section(
    descriptor: ChebyshevParams, symbol: str, stats: dict[str, np.ndarray]
) -> str:
    nsf = descriptor.n_features
    sfparam = np.zeros((nsf, 4))
    sfparam[0] = [
        descriptor.rad_cutoff,
        descriptor.rad_order,
        descriptor.ang_cutoff,
        descriptor.ang_order,
    ]
    lines = [
        "aenet_fn Chebyshev descriptor export",
        _fmt_word(symbol),
        _fmt_ints([len(descriptor.species)]),
        " ".join(_fmt_word(s) for s in descriptor.species),
        _fmt_floats([descriptor.min_cutoff]),
        _fmt_floats([descriptor.cutoff]),
        "Chebyshev",
        _fmt_ints([nsf]),
        _fmt_ints([4]),
        _fmt_ints([0] * nsf),
        _fmt_floats(sfparam, per_line=12),  # row-major (nsf, 4) = column-major sfparam(4, nsf)
        _fmt_ints([0] * (2 * nsf), per_line=24),
        _fmt_ints([0]),
        *(_fmt_floats(stats[key]) for key in ("min", "max", "avg", "cov")),
    ]
    return "\n".join(lines)


def _training_section(
    species: Sequence[str], scaling: float, shift: float, e_atom: np.ndarray, info: dict
) -> str:
    normalized = not (scaling == 1.0 and shift == 0.0)
    lines = [
        _fmt_word(info["filename"]),
        "T" if normalized else "F",
        _fmt_floats([scaling]),
        _fmt_floats([shift]),
        _fmt_ints([len(species)]),
        " ".join(_fmt_word(s) for s in species),
        _fmt_floats(e_atom),
        _fmt_ints([info["natomtot"]]),
        _fmt_ints([info["nstrucs"]]),
        _fmt_floats([info["e_min"], info["e_max"], info["e_avg"]]),
    ]
    return "\n".join(lines)


def training_info(
    structures: Sequence[Structure], atomic_energies: Mapping[str, float]
) -> dict[str, Any]:
    """The training-set section of ``.nn.ascii`` files: atoms, structures and the minimum,
    maximum and mean referenced energy per atom (eV/atom) of ``structures``."""
    per_atom = referenced_energies_per_atom(structures, atomic_energies)
    return {
        "natomtot": sum(s.n_atoms for s in structures),
        "nstrucs": len(structures),
        "e_min": float(per_atom.min()),
        "e_max": float(per_atom.max()),
        "e_avg": float(per_atom.mean()),
    }


def write_aenet_ascii(
    model: Model,
    directory: PathLike,
    prefix: str = "potential",
    training_info: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write ``model`` as ænet ``.nn.ascii`` files, one per species (spec §5).

    Args:
        model: the potential; its activations must be linear, tanh, sigmoid, mtanh or twist.
        directory: output folder (created if needed).
        prefix: files are named ``{prefix}.{SPECIES}.nn.ascii`` (spec §5); a non-empty file-name
            part without path separators that does not start with ``.``.
        training_info: optional summary of the training set written to the last section:
            ``filename``, ``natomtot``, ``nstrucs``, ``e_min``, ``e_max``, ``e_avg`` (eV/atom,
            referenced); missing entries are written as ``aenet_fn`` / zeros.

    Floats are written in ``%.17e`` exponent form, so they read back exactly. Per species the
    statistics are ``avg = mean``, ``cov = std² + mean²`` (so ``sqrt(cov − avg²)`` recovers
    ``std``), ``min``/``max`` the recorded extrema; ``std = inf`` is written as variance 0 (Fortran
    scale 0). Note that Fortran (and :func:`read_aenet_ascii`) also switch off any feature with
    ``std² <= 1e-10``. Energy normalisation is marked off (``F``) when scaling is 1 and shift 0.
    The files are written all or nothing: after all checks passed, every species goes to a
    temporary file in ``directory``, and only when all of them are written are they renamed onto
    their names; on any failure the temporary files are removed and existing files are untouched.

    Returns:
        The paths written, in the model's species order.

    Raises:
        ValueError: for an activation Fortran does not know (relu, silu), stacked (committee)
            parameters, non-finite values, malformed ``training_info`` or a bad ``prefix``.
        IsADirectoryError: when a target name is taken by a folder (nothing is written).
    """
    _check_prefix(prefix)
    descriptor, network, norm = model.descriptor, model.network, model.normalization
    if network.values.ndim != 1:
        raise ValueError(
            f"write_aenet_ascii: export one model at a time (network values have shape "
            f"{tuple(network.values.shape)})"
        )
    species = descriptor.species
    n_species, n_features = len(species), descriptor.n_features
    info = _training_info(training_info)

    def array(tensor: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
        values = tensor.detach().to("cpu", torch.float64).expand(shape)
        return values.numpy().copy()

    stats_rows = {
        "mean": array(norm.feature_mean, (n_species, n_features)),
        "std": array(norm.feature_std, (n_species, n_features)),
        "min": array(norm.feature_min, (n_species, n_features)),
        "max": array(norm.feature_max, (n_species, n_features)),
    }
    for key in ("mean", "min", "max"):
        _check_finite(f"feature_{key}", stats_rows[key])
    if np.isnan(stats_rows["std"]).any() or (stats_rows["std"] < 0).any():
        raise ValueError("write_aenet_ascii: feature_std must be >= 0 (or +inf) to be exported")
    scaling = float(norm.energy_scaling)
    shift = float(norm.energy_shift)
    e_atom = array(norm.atomic_energies, (n_species,))
    _check_finite("energy scaling and shift", np.array([scaling, shift]))
    _check_finite("atomic_energies", e_atom)
    if not scaling > 0:
        raise ValueError(f"write_aenet_ascii: energy scaling must be > 0, got {scaling}")
    cov = _second_moment(stats_rows["mean"], stats_rows["std"])
    _check_finite("feature statistics (std² + mean²)", cov)
    training = _training_section(species, scaling, shift, e_atom, info)

    texts = []
    for p, (symbol, layers, sizes, activations) in enumerate(
        zip(species, network.layers(), network.sizes, network.activations)
    ):
        not_exportable = [a for a in activations if a not in ACTIVATION_CODES]
        if not_exportable:
            raise ValueError(
                f"write_aenet_ascii: activation {not_exportable[0]!r} of species {symbol!r} "
                f"cannot be exported to ænet (Fortran knows {sorted(ACTIVATION_CODES)})"
            )
        blocks = [torch.cat([weight, bias[None]], dim=0).reshape(-1) for weight, bias in layers]
        weights = torch.cat(blocks).detach().to("cpu", torch.float64).numpy()
        _check_finite(f"network weights of species {symbol!r}", weights)
        stats = {
            "min": stats_rows["min"][p],
            "max": stats_rows["max"][p],
            "avg": stats_rows["mean"][p],
            "cov": cov[p],
        }
        sections = [
            _network_section(sizes, [ACTIVATION_CODES[a] for a in activations], weights),
            _descriptor_section(descriptor, symbol, stats),
            training,
        ]
        texts.append("\n".join(sections) + "\n")

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / f"{prefix}.{symbol}.nn.ascii" for symbol in species]
    _replace_all(dict(zip(written, texts)))
    return written


def _check_prefix(prefix: Any) -> None:
    if not isinstance(prefix, str):
        raise TypeError(f"write_aenet_ascii: prefix must be a string, got {type(prefix).__name__}")
    problem = None
    if not prefix.strip():
        problem = "is empty"
    elif set(prefix) & {"/", "\\", os.sep, os.altsep or "/"}:
        problem = "contains a path separator (give the folder as directory)"
    elif prefix.startswith("."):
        problem = "starts with '.' (the files would be hidden)"
    if problem:
        raise ValueError(
            f"write_aenet_ascii: prefix {prefix!r} {problem}; files are named "
            f"{{prefix}}.{{SPECIES}}.nn.ascii inside directory"
        )


def _replace_all(texts: Mapping[Path, str]) -> None:
    """Write ``texts`` all or nothing: every file to a temporary beside it first, then all
    renamed; on any failure the temporaries are removed and existing files untouched."""
    with contextlib.ExitStack() as stack:
        for path, text in texts.items():
            temporary = stack.enter_context(replacing(path))
            with open(temporary, "x", encoding="utf-8", newline="\n") as stream:
                stream.write(text)
        # A rename onto a folder would fail after others had succeeded: refuse it up front.
        for path in texts:
            if path.is_dir():
                raise IsADirectoryError(
                    f"write_aenet_ascii: {str(path)!r} is a folder; no file was written"
                )
