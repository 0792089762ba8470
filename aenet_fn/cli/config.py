"""Training configurations of ``aenet-fn train``: the schema (:class:`_Kind`/:class:`_Key`
of every section's keys), the example :data:`CONFIG_EXAMPLE`, reading TOML/JSON files
(:func:`read_config_file`, :func:`load_config`) and validating their tables into a
:class:`RunConfig` (:func:`parse_config` and the section parsers)."""

from __future__ import annotations

import difflib
import glob
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from aenet_fn.cli.errors import ConfigError
from aenet_fn.core.network import check_architecture
from aenet_fn.io.strict_json import strict_json_loads
from aenet_fn.torch_featurize import ChebyshevDescriptor
from aenet_fn.torch_training import SGD, Adam, TorchCommitteeConfig, TorchTrainingConfig
from aenet_fn.torch_training.trainer import check_reference_species

DEFAULT_OUTPUT = "aenet-fn-run"

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
            raw = strict_json_loads(text)
        except ValueError as error:  # json.JSONDecodeError is one
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
