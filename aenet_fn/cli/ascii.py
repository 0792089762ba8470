"""``aenet-fn export-ascii`` and ``aenet-fn import-ascii``: a model file or committee to
ænet Fortran ``.nn.ascii`` files and back."""

from __future__ import annotations

import argparse
from pathlib import Path

from aenet_fn.cli.errors import CLIError
from aenet_fn.cli.files import check_output_file, input_files, read_structure_files
from aenet_fn.cli.predict import _models, load_potential
from aenet_fn.io.ascii_potential import training_info, write_aenet_ascii
from aenet_fn.torch_training import TorchANNPotential, TorchCommitteePotential


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
        potential = TorchANNPotential.from_aenet_ascii(files)
    except (OSError, ValueError) as error:
        raise CLIError(str(error)) from error
    potential.save(args.output, {"imported_from": [str(f) for f in args.files]})
    print(f"wrote {args.output} ({', '.join(potential.descriptor.species)})")
    return 0
