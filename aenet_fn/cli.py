"""The ``aenet-fn`` command line (also ``python -m aenet_fn``).

Sub-commands::

    aenet-fn train CONFIG.toml [--output DIR] [--overwrite] [--no-progress] [--check]
    aenet-fn predict MODEL FILES... [--forces] [--format table|csv|json] [--output PATH]
        [--overwrite]
    aenet-fn export-ascii MODEL OUTDIR [--prefix NAME] [--structures FILES...] [--overwrite]
    aenet-fn import-ascii FILES... --output MODEL.pt [--overwrite]
    aenet-fn featurize FILES... --output DB.h5 [--descriptor CONFIG] [--forces] [--overwrite]
    aenet-fn demo [--fast] [--no-progress] [--output DIR]

:func:`main` returns the exit status: 0 on success, 1 when the input is wrong (a missing or
unreadable file, a model that cannot be exported, ...), 2 for a usage or configuration error; the
message names the problem and is printed without a traceback (``--debug`` shows it). No command
replaces one of its own input files, and none replaces an existing output file (``train``: a
trained model) without ``--overwrite``.

Training configurations are TOML (Python >= 3.11, ``tomllib``) or JSON (any Python; the same
schema, chosen by the ``.json`` suffix). Sections (see :data:`CONFIG_EXAMPLE`):

* ``[data]`` ``paths`` (files, folders of XSF files or glob patterns; any format ASE reads),
  ``test_paths`` (a fixed test set, single potentials only), ``format`` (an ASE format name for
  every file), or ``hdf5`` (a database written by ``aenet-fn featurize``; single potentials).
* ``[descriptor]`` ``species``, ``rad_order``, ``rad_cutoff``, ``ang_order``, ``ang_cutoff``,
  ``min_cutoff`` (default 0.55).
* ``[network]`` per species a list of hidden layers ``[nodes, "activation"]``, or ``default``
  for every species without its own entry.
* ``[training]`` every :class:`~aenet_fn.torch_training.TorchTrainingConfig` option by its own
  name, ``method = "adam" | "sgd"`` and its parameters in ``[training.adam]`` /
  ``[training.sgd]`` (the fields of :class:`~aenet_fn.torch_training.Adam` / ``SGD``). TOML has
  no null: ``false`` sets an option that may be None to None (``checkpoint_dir = false``).
* ``[committee]`` ``members`` (train a committee), ``base_seed``, ``member_seeds``,
  ``execution = "vmap" | "sequential"``, ``shared_batches``.
* ``[output]`` ``directory`` (default ``aenet-fn-run``).

Relative paths in a configuration file are relative to the file's folder; ``checkpoint_dir``
(default ``checkpoints``) and ``cache_persist_dir`` are relative to the output folder.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import glob
import io
import json
import math
import os
import sys
import time
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aenet_fn import calculator
from aenet_fn.ascii_potential import read_aenet_ascii, training_info, write_aenet_ascii
from aenet_fn.atomic import atomic_write_text
from aenet_fn.io.ase_io import read_structures
from aenet_fn.io.train import TrainOut, write_energies, write_history
from aenet_fn.network import check_architecture
from aenet_fn.plots import committee_training_summary, parity_figure, save_figure
from aenet_fn.structure import Structure
from aenet_fn.torch_featurize import ChebyshevDescriptor
from aenet_fn.torch_training import (
    SGD,
    Adam,
    StructureDataset,
    TorchANNPotential,
    TorchCommitteeConfig,
    TorchCommitteePotential,
    TorchTrainingConfig,
    convert_to_structures,
    train_test_split,
)
from aenet_fn.torch_training.trainer import check_reference_species

PROG = "aenet-fn"
DEFAULT_OUTPUT = "aenet-fn-run"
PREDICT_CHUNK = 32
"""Structures per committee prediction pass (bounds memory with forces)."""

CONFIG_EXAMPLE = """\
[data]
paths = ["structures/*.xsf"]        # files, folders or glob patterns (any ASE format, XSF)
# test_paths = ["test/*.xsf"]       # a fixed test set instead of [training] testpercent
# hdf5 = "structures.h5"            # instead of paths: a database from `aenet-fn featurize`

[descriptor]
species = ["Ti", "O"]
rad_order = 10
rad_cutoff = 6.0
ang_order = 3
ang_cutoff = 3.5
min_cutoff = 0.5

[network]
default = [[10, "tanh"], [10, "tanh"]]
# O = [[8, "tanh"]]                 # a species of its own

[training]
iterations = 100
testpercent = 10
split_seed = 1
seed = 1
force_weight = 0.1
atomic_energies = { Ti = -1604.604515075, O = -432.503149303 }
method = "adam"

[training.adam]
mu = 0.003
batchsize = 16

# [committee]
# members = 4
# base_seed = 0

[output]
directory = "tio2-run"
"""
"""An example training configuration (TOML)."""


class CLIError(Exception):
    """A problem with the input, reported without a traceback (exit status 1)."""

    status = 1


class ConfigError(CLIError):
    """A problem with the configuration or the command line (exit status 2)."""

    status = 2


# ---------------------------------------------------------------------------------------------
# configuration schema


@dataclass(frozen=True)
class _Kind:
    """What a configuration value must be: a description for messages and a predicate."""

    description: str
    accepts: Callable[[Any], bool]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_layers(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(layer, list)
        and len(layer) == 2
        and _is_int(layer[0])
        and isinstance(layer[1], str)
        for layer in value
    )


INT = _Kind("an integer", _is_int)
NUMBER = _Kind("a number", _is_number)
STRING = _Kind("a string", lambda v: isinstance(v, str))
BOOL = _Kind("true or false", lambda v: isinstance(v, bool))
TABLE = _Kind("a table", lambda v: isinstance(v, Mapping))
NUMBER_TABLE = _Kind(
    "a table of numbers", lambda v: isinstance(v, Mapping) and all(map(_is_number, v.values()))
)
STRINGS = _Kind(
    "a string or a list of strings",
    lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
)
INTS = _Kind("a list of integers", lambda v: isinstance(v, list) and all(map(_is_int, v)))
SYMBOLS = _Kind(
    "a non-empty list of element symbols",
    lambda v: isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v),
)
LAYERS = _Kind('a list of [nodes, "activation"] pairs', _is_layers)


@dataclass(frozen=True)
class _Key:
    """One key of a section: its kind, whether it is required, whether ``false`` means None."""

    kind: _Kind
    required: bool = False
    nullable: bool = False
    choices: tuple[str, ...] | None = None


_DATA_KEYS = {
    "paths": _Key(STRINGS),
    "test_paths": _Key(STRINGS),
    "format": _Key(STRING),
    "hdf5": _Key(STRING),
}
_DESCRIPTOR_KEYS = {
    "species": _Key(SYMBOLS, required=True),
    "rad_order": _Key(INT, required=True),
    "rad_cutoff": _Key(NUMBER, required=True),
    "ang_order": _Key(INT, required=True),
    "ang_cutoff": _Key(NUMBER, required=True),
    "min_cutoff": _Key(NUMBER),
}
_COMMITTEE_KEYS = {
    "members": _Key(INT, required=True),
    "base_seed": _Key(INT),
    "member_seeds": _Key(INTS),
    "execution": _Key(STRING, choices=("vmap", "sequential")),
    "shared_batches": _Key(BOOL),
}
_OUTPUT_KEYS = {"directory": _Key(STRING)}
_METHODS: dict[str, type] = {"adam": Adam, "sgd": SGD}
_SECTIONS = ("data", "descriptor", "network", "training", "committee", "output")
_REQUIRED_SECTIONS = ("data", "descriptor", "network")


def _key_of_hint(hint: Any) -> _Key:
    """The :class:`_Key` of a dataclass field annotation (``int``, ``float | None``, ...)."""
    nullable = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        arguments = [a for a in typing.get_args(hint) if a is not type(None)]
        nullable = len(arguments) < len(typing.get_args(hint))
        hint = arguments[0]
    if typing.get_origin(hint) is dict:
        kind = NUMBER_TABLE if typing.get_args(hint)[1] is float else TABLE
    else:
        kind = {bool: BOOL, int: INT, float: NUMBER, str: STRING}[hint]
    return _Key(kind, nullable=nullable)


def _field_keys(cls: type, skip: Sequence[str] = ()) -> dict[str, _Key]:
    """The keys of a dataclass's public fields, typed by their annotations."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: _key_of_hint(hints[f.name])
        for f in fields(cls)
        if not f.name.startswith("_") and f.name not in skip
    }


_TRAINING_KEYS = {
    **_field_keys(TorchTrainingConfig, skip=("method",)),
    "alpha": _Key(NUMBER),
    "method": _Key(STRING, choices=tuple(_METHODS)),
    **{name: _Key(TABLE) for name in _METHODS},
}
_METHOD_KEYS = {name: _field_keys(cls) for name, cls in _METHODS.items()}


def _suggestion(name: str, allowed: Sequence[str], shown: str = "{!r}") -> str:
    """``; did you mean ...?`` with the closest of ``allowed``, else the list of them."""
    close = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.6)
    if close:
        return f"; did you mean {shown.format(close[0])}?"
    return f"; allowed: {', '.join(shown.format(a) for a in allowed)}"


def _describe(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    kind = kinds.get(type(value), "a table" if isinstance(value, Mapping) else "a list")
    return f"{value!r} ({kind})"


def _check_section(raw: Any, section: str, keys: Mapping[str, _Key], source: str) -> dict:
    """The values of one section, checked: a table, no unknown key, required keys present, each
    value of its kind (``false`` → None for nullable keys) and among its choices."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: [{section}] must be a table, got {_describe(raw)}")
    for name in raw:
        if name not in keys:
            raise ConfigError(
                f"{source}: [{section}] unknown key {name!r}" + _suggestion(name, list(keys))
            )
    for name, key in keys.items():
        if key.required and name not in raw:
            raise ConfigError(f"{source}: [{section}] the key {name!r} is required")
    values = {}
    for name, value in raw.items():
        key = keys[name]
        if key.nullable and value is False:
            values[name] = None
            continue
        if not key.kind.accepts(value):
            alternative = " (or false for None)" if key.nullable else ""
            raise ConfigError(
                f"{source}: [{section}] {name} must be {key.kind.description}{alternative}, "
                f"got {_describe(value)}"
            )
        if key.choices is not None and value not in key.choices:
            raise ConfigError(
                f"{source}: [{section}] {name} must be one of "
                f"{', '.join(map(repr, key.choices))}, got {value!r}"
            )
        values[name] = value
    return values


# ---------------------------------------------------------------------------------------------
# configuration loading


@dataclass
class RunConfig:
    """A validated training configuration.

    Attributes:
        source: where it came from (for messages).
        paths / test_paths: the structure files (test_paths None: split by testpercent).
        format: ASE format name of the files, or None (by suffix).
        hdf5: a structure database instead of paths, or None.
        descriptor, arch: the descriptor and the per-species hidden layers.
        training: the training options (relative directories already resolved).
        committee: the committee options, or None for a single potential.
        output: the output folder.
    """

    source: str
    paths: list[Path]
    test_paths: list[Path] | None
    format: str | None
    hdf5: Path | None
    descriptor: ChebyshevDescriptor
    arch: dict[str, list[tuple[int, str]]]
    training: TorchTrainingConfig
    committee: TorchCommitteeConfig | None
    output: Path


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The raw tables of a TOML (``.toml``, Python >= 3.11) or JSON (``.json``) config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such configuration file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{path}: not a text file (byte {error.start} is not UTF-8); a configuration is "
            "TOML or JSON text"
        ) from error
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the configuration: {error.strerror}") from error
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: invalid JSON: {error}") from error
    elif path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:
            raise ConfigError(
                f"{path}: TOML configurations need Python >= 3.11 (tomllib); on Python "
                f"{sys.version_info.major}.{sys.version_info.minor} write the same tables as a "
                "JSON file (config.json)"
            ) from None
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: invalid TOML: {error}") from error
    else:
        raise ConfigError(f"{path}: a configuration must be a .toml or .json file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the configuration must be a table of sections")
    return raw


def load_config(path: str | os.PathLike, output: str | os.PathLike | None = None) -> RunConfig:
    """Read and validate a configuration file (see :func:`parse_config`); ``output``
    overrides ``[output] directory``."""
    path = Path(path)
    return parse_config(read_config_file(path), path.resolve().parent, str(path), output)


def parse_config(
    raw: Mapping[str, Any],
    base: Path,
    source: str = "configuration",
    output: str | os.PathLike | None = None,
) -> RunConfig:
    """Validate the tables of a configuration (no heavy work: data files are only looked up).

    Args:
        raw: the sections as parsed from TOML/JSON.
        base: the folder that relative paths are relative to.
        source: the name used in error messages.
        output: overrides ``[output] directory`` (relative to the working directory).

    Raises:
        ConfigError: naming the section and key, with what was expected.
    """
    for section in raw:
        if section not in _SECTIONS:
            raise ConfigError(
                f"{source}: unknown section [{section}]" + _suggestion(section, _SECTIONS, "[{}]")
            )
    for section in _REQUIRED_SECTIONS:
        if section not in raw:
            raise ConfigError(f"{source}: the section [{section}] is required")
    descriptor = _descriptor(raw["descriptor"], source)
    arch = _architecture(raw["network"], descriptor, source)
    training = _training(raw.get("training", {}), descriptor, source)
    committee = _committee(raw["committee"], source) if "committee" in raw else None
    data = _check_section(raw["data"], "data", _DATA_KEYS, source)
    if ("paths" in data) == ("hdf5" in data):
        raise ConfigError(f"{source}: [data] give either 'paths' or 'hdf5'")
    if "hdf5" in data and ("test_paths" in data or "format" in data):
        raise ConfigError(f"{source}: [data] 'hdf5' excludes 'test_paths' and 'format'")
    hdf5 = None
    if "hdf5" in data:
        hdf5 = _resolve_paths([data["hdf5"]], base, "[data] hdf5", source)[0]
    paths = _resolve_paths(data["paths"], base, "[data] paths", source) if hdf5 is None else []
    test_paths = (
        _resolve_paths(data["test_paths"], base, "[data] test_paths", source)
        if "test_paths" in data
        else None
    )
    if test_paths is None and training.testpercent >= 100:
        raise ConfigError(
            f"{source}: [training] testpercent must be < 100 (it would leave no training "
            f"structures; give [data] test_paths for a separate test set), got "
            f"{training.testpercent!r}"
        )
    out = _check_section(raw.get("output", {}), "output", _OUTPUT_KEYS, source)
    if output is not None:
        directory = Path(output).resolve()
    else:
        directory = (base / out.get("directory", DEFAULT_OUTPUT)).resolve()
    for name in ("checkpoint_dir", "cache_persist_dir"):
        value = getattr(training, name)
        if value is not None:
            setattr(training, name, str(directory / value))
    if committee is not None:
        committee.output_dir = directory
    return RunConfig(
        source,
        paths,
        test_paths,
        data.get("format"),
        hdf5,
        descriptor,
        arch,
        training,
        committee,
        directory,
    )


def _descriptor(raw: Any, source: str) -> ChebyshevDescriptor:
    values = _check_section(raw, "descriptor", _DESCRIPTOR_KEYS, source)
    try:
        return ChebyshevDescriptor(**values)
    except ValueError as error:
        raise ConfigError(f"{source}: [descriptor] {error}") from error


def _architecture(
    raw: Any, descriptor: ChebyshevDescriptor, source: str
) -> dict[str, list[tuple[int, str]]]:
    allowed = [*descriptor.species, "default"]
    values = _check_section(raw, "network", {name: _Key(LAYERS) for name in allowed}, source)
    arch = {}
    for symbol in descriptor.species:
        layers = values.get(symbol, values.get("default"))
        if layers is None:
            raise ConfigError(
                f"{source}: [network] no layers for species {symbol!r}: give "
                f'{symbol} = [[10, "tanh"], [10, "tanh"]] or a default'
            )
        arch[symbol] = [(nodes, activation) for nodes, activation in layers]
    try:
        check_architecture(arch, descriptor.species)
    except ValueError as error:
        raise ConfigError(f"{source}: [network] {error}") from error
    return arch


def _training(raw: Any, descriptor: ChebyshevDescriptor, source: str) -> TorchTrainingConfig:
    values = _check_section(raw, "training", _TRAINING_KEYS, source)
    name = values.pop("method", "adam")
    for other in _METHODS:
        if other != name and other in values:
            raise ConfigError(
                f"{source}: [training.{other}] is given but [training] method is {name!r}"
            )
    parameters = _check_section(
        values.pop(name, {}), f"training.{name}", _METHOD_KEYS[name], source
    )
    values.setdefault("checkpoint_dir", "checkpoints")
    try:
        method = _METHODS[name](**parameters)
        config = TorchTrainingConfig(method=method, **values)
        config.to_train_config()
        check_reference_species(config.atomic_energies, descriptor.species, "atomic_energies")
    except (ValueError, TypeError, NotImplementedError) as error:
        message = str(error)
        if name == "adam" and message.startswith("lr "):
            message = "mu " + message[3:]  # the core names Adam's learning rate lr
        section = f"training.{name}" if message.split()[0] in _METHOD_KEYS[name] else "training"
        raise ConfigError(f"{source}: [{section}] {message}") from error
    return config


def _committee(raw: Any, source: str) -> TorchCommitteeConfig:
    values = _check_section(raw, "committee", _COMMITTEE_KEYS, source)
    try:
        return TorchCommitteeConfig(num_members=values.pop("members"), **values)
    except ValueError as error:
        raise ConfigError(f"{source}: [committee] {error}") from error


def _resolve_paths(patterns: str | Sequence[str], base: Path, what: str, source: str) -> list[Path]:
    """Paths of ``patterns`` (relative to ``base``; glob patterns expanded and sorted); each
    must exist or match something."""
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise ConfigError(f"{source}: {what} is empty")
    found: list[Path] = []
    for pattern in patterns:
        full = base / Path(pattern).expanduser()
        where = "" if str(full) == pattern else f" ({full})"
        if glob.has_magic(str(full)):
            matches = sorted(Path(p) for p in glob.glob(str(full), recursive=True))
            if not matches:
                raise ConfigError(f"{source}: {what}: {pattern!r} matches no file{where}")
            found.extend(matches)
        elif full.exists():
            found.append(full)
        else:
            raise ConfigError(f"{source}: {what}: {pattern!r} does not exist{where}")
    return found


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


def error_metrics(predictions: Sequence[Prediction]) -> dict[str, float]:
    """Errors against the reference labels: ``rmse_energy``/``mae_energy`` (eV/atom),
    ``rmse_forces`` (eV/Å, over components) and, for committees, the mean spreads
    ``energy_std`` (eV/atom) and ``force_uncertainty`` (eV/Å, per atom the mean over x, y, z)."""
    labelled = [p for p in predictions if p.reference_energy is not None]
    errors = np.array([(p.energy - p.reference_energy) / p.n_atoms for p in labelled])
    force_errors = [
        p.forces - p.reference_forces
        for p in predictions
        if p.forces is not None and p.reference_forces is not None
    ]
    nan = math.nan
    metrics = {
        "n_structures": len(predictions),
        "rmse_energy": float(np.sqrt(np.mean(errors**2))) if len(errors) else nan,
        "mae_energy": float(np.mean(np.abs(errors))) if len(errors) else nan,
        "rmse_forces": (
            float(np.sqrt(np.mean(np.concatenate(force_errors) ** 2))) if force_errors else nan
        ),
    }
    if predictions and predictions[0].energy_std is not None:
        metrics["energy_std"] = float(np.mean([p.energy_std / p.n_atoms for p in predictions]))
        spreads = [p.force_uncertainty for p in predictions if p.force_uncertainty is not None]
        metrics["force_uncertainty"] = float(np.concatenate(spreads).mean()) if spreads else nan
    return metrics


def format_summary(metrics: Mapping[str, Mapping[str, float]]) -> str:
    """The final-errors table: per split the structure count, energy RMSE/MAE (meV/atom),
    force RMSE (eV/Å) and, for committees, the mean committee spreads."""
    committee = any("energy_std" in m for m in metrics.values())
    header = ["split", "structures", "E RMSE", "E MAE", "F RMSE"]
    units = ["", "", "meV/atom", "meV/atom", "eV/Å"]
    if committee:
        header += ["spread E", "spread F"]
        units += ["meV/atom", "eV/Å"]
    rows = []
    for split, m in metrics.items():
        row = [split, str(m["n_structures"])]
        row += [_number(1000 * m["rmse_energy"], 2), _number(1000 * m["mae_energy"], 2)]
        row.append(_number(m["rmse_forces"], 4))
        if committee:
            row += [_number(1000 * m["energy_std"], 2), _number(m["force_uncertainty"], 4)]
        rows.append(row)
    return "\n".join(_aligned([header, units, *rows]))


def _aligned(rows: Sequence[Sequence[str]]) -> list[str]:
    """Text lines of a table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in rows
    ]


def _number(value: float, digits: int) -> str:
    return "-" if not math.isfinite(value) else f"{value:.{digits}f}"


# ---------------------------------------------------------------------------------------------
# train


@dataclass
class TrainingRun:
    """What :func:`run_training` produced: the potential, the structures of both splits, their
    metrics (see :func:`error_metrics`), the files written and the wall time (s)."""

    potential: Potential
    train_structures: list[Structure]
    test_structures: list[Structure]
    metrics: dict[str, dict[str, float]]
    files: list[Path]
    seconds: float


def check_output(directory: Path, overwrite: bool) -> None:
    """Refuse to train into a folder that already holds a model, unless ``overwrite``."""
    for name in ("model.pt", "committee_metadata.json"):
        if (directory / name).exists() and not overwrite:
            raise CLIError(
                f"{directory} already holds a trained potential ({name}); choose another "
                "[output] directory or pass --overwrite"
            )


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


def _check_labels(structures: Sequence[Structure], descriptor: ChebyshevDescriptor, what: str):
    if not structures:
        raise CLIError(f"{what}: no structures")
    check_species(structures, descriptor.species, what, "[descriptor]")
    unlabelled = [s.name for s in structures if s.energy is None]
    if unlabelled:
        raise CLIError(f"{what}: structures without an energy: {unlabelled[:5]}")


def run_training(
    run: RunConfig, overwrite: bool = False, show_progress: bool | None = None
) -> TrainingRun:
    """Train the potential or committee of ``run`` and write the output folder: the model
    (``model.pt``, or the committee layout), ``history.json``/``.csv``, ``energies.train.0`` /
    ``energies.test.0``, ``metrics.json``, ``training_summary.png`` and ``parity.png``."""
    start = time.perf_counter()
    check_output(run.output, overwrite)
    config = run.training
    if show_progress is not None:
        config.show_progress = show_progress
    config.save_energies = False  # written below, into the output folder
    if config.split_seed is None:  # drawn once, so that the split can be reported
        config.split_seed = int(torch.Generator().seed() % 2**31)
    if run.committee is None:
        potential, train_s, test_s, trainouts = _train_single(run)
    else:
        potential, train_s, test_s, trainouts = _train_committee(run)
    files, metrics = _write_results(run, potential, train_s, test_s, trainouts)
    return TrainingRun(potential, train_s, test_s, metrics, files, time.perf_counter() - start)


def _datasets(run: RunConfig):
    """The training and test datasets of ``run`` and their structures: the split is drawn here
    (as the trainer would), so that the output can report it."""
    config = run.training
    descriptor = run.descriptor
    filters = {"max_energy": config.max_energy, "max_forces": config.max_forces}
    if run.hdf5 is not None:
        from aenet_fn.torch_training.hdf5_dataset import HDF5StructureDataset

        try:
            dataset = HDF5StructureDataset(
                descriptor, run.hdf5, mode="load", atomic_energies=config.atomic_energies
            )
        except (OSError, ValueError) as error:
            raise CLIError(f"{run.hdf5}: {error}") from error
        structures = [dataset.get_structure(i) for i in range(len(dataset))]
    else:
        structures = read_structure_files(run.paths, run.format)
        _check_labels(structures, descriptor, "[data] paths")
        config.max_energy = config.max_forces = None  # the datasets filter
        dataset = StructureDataset(
            structures, descriptor, atomic_energies=config.atomic_energies, **filters
        )
        structures = dataset.structures
    if run.test_paths is not None:
        test = read_structure_files(run.test_paths, run.format)
        _check_labels(test, descriptor, "[data] test_paths")
        test_dataset = StructureDataset(
            test, descriptor, atomic_energies=config.atomic_energies, **filters
        )
        train_dataset, train_s, test_s = dataset, structures, test_dataset.structures
    else:
        train_dataset, test_dataset = train_test_split(
            dataset, config.testpercent / 100, config.split_seed
        )
        train_s = [structures[i] for i in train_dataset.indices]
        test_s = [structures[i] for i in test_dataset.indices]
    return train_dataset, test_dataset if test_s else None, train_s, test_s


def _train_single(run: RunConfig):
    """A single potential trained on the datasets of ``run``."""
    train_dataset, test_dataset, train_s, test_s = _datasets(run)
    potential = TorchANNPotential(run.arch, run.descriptor)
    with naming_structures([*train_s, *test_s], run.descriptor.featurize):
        potential.train(train_dataset=train_dataset, test_dataset=test_dataset, config=run.training)
    return potential, train_s, test_s, [TrainOut.from_torch_history(potential.history)]


def _train_committee(run: RunConfig):
    """A committee trained together (vmap by default) on the datasets of ``run``."""
    train_dataset, test_dataset, train_s, test_s = _datasets(run)
    committee = TorchCommitteePotential(run.arch, run.descriptor)
    with naming_structures([*train_s, *test_s], run.descriptor.featurize):
        result = committee.train(
            train_dataset=train_dataset,
            test_dataset=test_dataset,
            config=run.training,
            committee_config=run.committee,
        )
    return committee, train_s, test_s, result.trainouts


def _write_results(
    run: RunConfig,
    potential: Potential,
    train_s: list[Structure],
    test_s: list[Structure],
    trainouts: list[TrainOut],
) -> tuple[list[Path], dict[str, dict[str, float]]]:
    """Model, history, energies files, metrics and plots into ``run.output``; returns the
    files written and the metrics per split (see :func:`error_metrics`)."""
    out = run.output
    out.mkdir(parents=True, exist_ok=True)
    files = []
    if isinstance(potential, TorchANNPotential):
        potential.save(out / "model.pt", {"config_source": run.source})
        files += [out / "model.pt", *write_history(potential.history, out)]
        figure = trainouts[0].plot_training_summary()
    else:
        files.append(out / "committee_metadata.json")
        figure = committee_training_summary(trainouts)
    files.append(save_figure(figure, out / "training_summary.png"))
    with_forces = all(s.forces is not None for s in [*train_s, *test_s])
    metrics, energies = {}, {}
    for split, structures in (("train", train_s), ("test", test_s)):
        if not structures:
            continue
        predictions = predict_structures(potential, structures, with_forces)
        metrics[split] = error_metrics(predictions)
        energies[split] = out / f"energies.{split}.0"
        files.append(_write_energies(energies[split], predictions, potential))
    title = "Energies"
    if isinstance(potential, TorchCommitteePotential):
        title += f": mean of {len(potential.members)} committee members"
    figure = parity_figure(energies["train"], energies.get("test"), title)
    files.append(save_figure(figure, out / "parity.png"))
    metrics_path = out / "metrics.json"
    atomic_write_text(metrics_path, json.dumps(_json_ready(metrics), indent=2) + "\n")
    return [*files, metrics_path], metrics


def _models(potential: Potential) -> list[Any]:
    if isinstance(potential, TorchCommitteePotential):
        return [m.model for m in potential.members]
    return [potential.model]


def _write_energies(path: Path, predictions: Sequence[Prediction], potential: Potential) -> Path:
    """An ``energies.*.0`` file of reference vs predicted (committee mean) energies."""
    model = _models(potential)[0]
    species = list(model.descriptor.species)
    scaling = float(model.normalization.energy_scaling)
    rows = [
        {
            "ref_energy": p.reference_energy,
            "ann_energy": p.energy,
            "n_atoms": p.n_atoms,
            "species_counts": {s: p.species.count(s) for s in species},
            "name": p.name,
            "cost": (p.reference_energy - p.energy) / p.n_atoms * scaling,
        }
        for p in predictions
    ]
    return write_energies(path, rows, species)


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


def _cmd_train(args: argparse.Namespace) -> int:
    run = load_config(args.config, args.output)
    if args.device is not None:
        run.training.device = args.device
        try:
            run.training.validate()
        except ValueError as error:
            raise ConfigError(f"--device: {error}") from error
    if args.check:
        check_output(run.output, args.overwrite)
        kind = "single potential"
        if run.committee is not None:
            kind = f"committee of {run.committee.num_members}"
        files = len(run.paths) + len(run.test_paths or [])
        print(f"{args.config}: valid ({kind}, {files} data path(s)); output: {run.output}")
        return 0
    result = run_training(run, args.overwrite, False if args.no_progress else None)
    print(format_summary(result.metrics))
    print(f"wrote {run.output} in {result.seconds:.1f} s")
    return 0


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


# ---------------------------------------------------------------------------------------------
# export-ascii / import-ascii


def _cmd_export_ascii(args: argparse.Namespace) -> int:
    out = Path(args.outdir)
    if out.exists() and not out.is_dir():
        raise CLIError(f"OUTDIR {out} exists and is not a folder")
    potential = load_potential(args.model)
    models = _models(potential)
    committee = isinstance(potential, TorchCommitteePotential)
    directories = [out / f"member_{i:03d}" if committee else out for i in range(len(models))]
    inputs = input_files([args.model]) | input_files(args.structures or [], ".xsf")
    for directory in directories:
        for symbol in models[0].descriptor.species:
            target = directory / f"{args.prefix}.{symbol}.nn.ascii"
            check_output_file(target, inputs, args.overwrite, "OUTDIR file")
    info = None
    if args.structures:
        structures = read_structure_files([Path(p) for p in args.structures])
        reference = dict(
            zip(models[0].descriptor.species, models[0].normalization.atomic_energies.tolist())
        )
        try:
            info = training_info(structures, reference)
        except ValueError as error:
            raise CLIError(f"--structures: {error}") from error
    try:
        for model, directory in zip(models, directories):
            for path in write_aenet_ascii(model, directory, args.prefix, info):
                print(path)
    except ValueError as error:
        raise CLIError(str(error)) from error
    return 0


def _cmd_import_ascii(args: argparse.Namespace) -> int:
    check_output_file(Path(args.output), input_files(args.files, ".nn.ascii"), args.overwrite)
    files = args.files[0] if len(args.files) == 1 else args.files
    try:
        model = read_aenet_ascii(files)
    except (OSError, ValueError) as error:
        raise CLIError(str(error)) from error
    descriptor = ChebyshevDescriptor.from_params(model.descriptor)
    potential = TorchANNPotential(model.network.architecture(), descriptor)
    potential.model = model
    potential.save(args.output, {"imported_from": [str(f) for f in args.files]})
    print(f"wrote {args.output} ({', '.join(descriptor.species)})")
    return 0


# ---------------------------------------------------------------------------------------------
# featurize


def _cmd_featurize(args: argparse.Namespace) -> int:
    from aenet_fn.database import build_database

    inputs = input_files(args.files, ".xsf")
    if args.descriptor is not None:
        inputs |= input_files([args.descriptor])
    check_output_file(Path(args.output), inputs, args.overwrite)
    params = None
    if args.descriptor is not None:
        raw = read_config_file(args.descriptor)
        if "descriptor" not in raw:
            raise ConfigError(f"{args.descriptor}: the section [descriptor] is required")
        params = _descriptor(raw["descriptor"], str(args.descriptor)).params
    elif args.forces:
        raise ConfigError("--forces needs --descriptor (the features' descriptor)")

    def featurize_file(path: Path) -> None:
        if params is not None:
            descriptor = ChebyshevDescriptor.from_params(params)
            for structure in read_structure_files([path]):
                descriptor.featurize(structure)

    files = [Path(f) for f in args.files]
    try:
        with naming_structures(files, featurize_file, str):
            summary = build_database(
                args.output,
                files,
                descriptor_params=params,
                persist_features=params is not None,
                persist_force_derivatives=args.forces,
                build_workers=args.workers,
                show_progress=not args.no_progress,
            )
    except (OSError, RuntimeError) as error:
        raise CLIError(str(error)) from error
    what = (
        "structures"
        if params is None
        else ("structures, features" + (" and force derivatives" if args.forces else ""))
    )
    print(
        f"wrote {summary.path}: {summary.n_structures} structures, {summary.n_atoms} atoms ({what})"
    )
    return 0


# ---------------------------------------------------------------------------------------------
# demo


def _cmd_demo(args: argparse.Namespace) -> int:
    from aenet_fn.demo import run_demo

    threads = 1 if args.threads is None else args.threads
    run_demo(args.fast, not args.no_progress, args.output, threads=threads)
    return 0


# ---------------------------------------------------------------------------------------------
# entry point


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``aenet-fn``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="ænet-type machine-learning interatomic potentials with torch.func",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch intra-op threads (default: torch's own; the demo uses 1)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train a potential or committee from a TOML/JSON configuration",
        description="Train from a configuration file. Example configuration:\n\n" + CONFIG_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("config", help="configuration file (.toml, or .json)")
    train.add_argument("--output", help="output folder (overrides [output] directory)")
    train.add_argument("--overwrite", action="store_true", help="replace a trained model there")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument("--check", action="store_true", help="validate the configuration only")
    train.add_argument(
        "--device", help="train there, e.g. cuda or cpu (overrides [training] device)"
    )
    train.set_defaults(handler=_cmd_train)

    predict = commands.add_parser("predict", help="energies (and forces) of structures")
    predict.add_argument("model", help="model file (model.pt) or committee directory")
    predict.add_argument("files", nargs="+", help="structure files (any ASE format, XSF)")
    predict.add_argument("--forces", action="store_true", help="also predict forces")
    predict.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        default="table",
        help="table (default), csv (with --forces one row per atom) or json",
    )
    predict.add_argument("--output", help="write to this file instead of the standard output")
    predict.add_argument("--input-format", help="ASE format of the structure files")
    predict.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    predict.add_argument("--device", help="evaluate there, e.g. cuda (default cpu)")
    predict.set_defaults(handler=_cmd_predict)

    export = commands.add_parser("export-ascii", help="write ænet Fortran .nn.ascii files")
    export.add_argument("model", help="model file or committee directory")
    export.add_argument("outdir", help="output folder (member_XXX/ per committee member)")
    export.add_argument("--prefix", default="potential", help="file prefix (default potential)")
    export.add_argument(
        "--structures",
        nargs="+",
        metavar="FILE",
        help="training structures for the files' training-set summary",
    )
    export.add_argument("--overwrite", action="store_true", help="replace existing .nn.ascii files")
    export.set_defaults(handler=_cmd_export_ascii)

    imp = commands.add_parser("import-ascii", help="ænet .nn.ascii files to a model file")
    imp.add_argument("files", nargs="+", help="one .nn.ascii file per species, or their folder")
    imp.add_argument("--output", required=True, help="model file to write (model.pt)")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    imp.set_defaults(handler=_cmd_import_ascii)

    featurize = commands.add_parser("featurize", help="write an HDF5 structure database")
    featurize.add_argument("files", nargs="+", help="structure files or folders of XSF files")
    featurize.add_argument("--output", required=True, help="database file (DB.h5)")
    featurize.add_argument(
        "--descriptor",
        metavar="CONFIG",
        help="a .toml/.json file whose [descriptor] section gives the features to store",
    )
    featurize.add_argument(
        "--forces", action="store_true", help="also store the local feature derivatives"
    )
    featurize.add_argument("--workers", type=int, default=0, help="build processes (default 0)")
    featurize.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    featurize.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    featurize.set_defaults(handler=_cmd_featurize)

    demo = commands.add_parser(
        "demo", help="train a committee on the built-in EMT Cu/Ni/Au data set (the main job)"
    )
    demo.add_argument("--fast", action="store_true", help="a tiny run (seconds), for tests")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    demo.add_argument("--output", default="aenet-fn-output", help="output folder")
    demo.set_defaults(handler=_cmd_demo)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``aenet-fn`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        if args.command != "demo":
            torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return args.handler(args)
        except (CLIError, ValueError, OSError) as error:
            # ValueError and OSError (UnicodeDecodeError included): the library's messages name
            # the problem; only a program error (anything else) shows a traceback.
            if args.debug:
                raise
            message = " ".join(str(error).splitlines())
            print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
            return error.status if isinstance(error, CLIError) else 1
