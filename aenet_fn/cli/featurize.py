"""``aenet-fn featurize``: structure files to an HDF5 structure database, with the features
(and their local derivatives) of a configuration's ``[descriptor]`` section."""

from __future__ import annotations

import argparse
from pathlib import Path

from aenet_fn.cli.config import _descriptor, read_config_file
from aenet_fn.cli.errors import CLIError, ConfigError
from aenet_fn.cli.files import (
    check_output_file,
    input_files,
    naming_structures,
    read_structure_files,
)
from aenet_fn.torch_featurize import ChebyshevDescriptor


def _cmd_featurize(args: argparse.Namespace) -> int:
    from aenet_fn.io.database import build_database

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
    except RuntimeError as error:  # h5py and torch internals; OS errors name their file
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
