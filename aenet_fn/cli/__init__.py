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
unreadable file, a model that cannot be exported, ...), 2 for a usage or configuration error, 3
for anything unexpected (an error inside a library, memory exhausted, ...); the message names
the problem on one line and is printed without a traceback (``--debug`` shows it). No command
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

The package holds one module per job, each importing only its siblings below it:
:mod:`~aenet_fn.cli.errors`, :mod:`~aenet_fn.cli.config` (the schema), :mod:`~aenet_fn.cli.files`
(inputs and outputs), :mod:`~aenet_fn.cli.predict`, :mod:`~aenet_fn.cli.train`,
:mod:`~aenet_fn.cli.ascii`, :mod:`~aenet_fn.cli.featurize` and :mod:`~aenet_fn.cli.demo`; this
module builds the parser and runs :func:`main`.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

import torch

from aenet_fn.cli.ascii import _cmd_export_ascii, _cmd_import_ascii
from aenet_fn.cli.config import (
    CONFIG_EXAMPLE,
    RunConfig,
    load_config,
    parse_config,
    read_config_file,
)
from aenet_fn.cli.demo import _cmd_demo
from aenet_fn.cli.errors import CLIError, ConfigError
from aenet_fn.cli.featurize import _cmd_featurize
from aenet_fn.cli.predict import Prediction, _cmd_predict, load_potential, predict_structures
from aenet_fn.cli.program import PROGRAM_DTYPES, _cmd_export_program
from aenet_fn.cli.train import (
    TrainingRun,
    _cmd_train,
    error_metrics,
    format_summary,
    run_training,
)

__all__ = [
    "CONFIG_EXAMPLE",
    "PROG",
    "CLIError",
    "ConfigError",
    "Prediction",
    "RunConfig",
    "TrainingRun",
    "build_parser",
    "error_metrics",
    "format_summary",
    "load_config",
    "load_potential",
    "main",
    "parse_config",
    "predict_structures",
    "read_config_file",
    "run_training",
]

PROG = "aenet-fn"


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
    train.add_argument(
        "--overwrite", action="store_true", help="replace the run already in the output folder"
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the output folder's run from its newest checkpoint",
    )
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument(
        "--check",
        action="store_true",
        help="validate the configuration, output folders and memory estimate; do not train",
    )
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

    program = commands.add_parser(
        "export-program",
        help="a self-contained torch.export program (.pt2) for MD codes, no aenet_fn needed",
    )
    program.add_argument("model", help="model file or committee directory")
    program.add_argument("output", help="program file (.pt2); a folder for a committee")
    program.add_argument(
        "--dtype",
        choices=sorted(PROGRAM_DTYPES),
        help="the program's float type (default: the model's)",
    )
    program.add_argument("--overwrite", action="store_true", help="replace existing programs")
    program.set_defaults(handler=_cmd_export_program)

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


UNEXPECTED = 3
"""The exit status of an unexpected error (one that names no input or option)."""


def _report(command: str, message: str) -> None:
    """Print ``message`` as one line of standard error."""
    print(f"{PROG} {command}: error: {' '.join(message.splitlines())}", file=sys.stderr)


def _message(error: Exception) -> str:
    """What the user reads: an OS error as ``path: what happened``, others as they are."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error)


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
            # the problem
            if args.debug:
                raise
            _report(args.command, _message(error))
            return error.status if isinstance(error, CLIError) else 1
        except Exception as error:  # anything else: named on one line, never a traceback
            if args.debug:
                raise
            detail = str(error) or "no message"
            _report(
                args.command,
                f"unexpected {type(error).__name__}: {detail} (run with --debug for the traceback)",
            )
            return UNEXPECTED
