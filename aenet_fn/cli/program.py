"""``aenet-fn export-program``: a model file or committee as self-contained ``torch.export``
programs (``.pt2``) that run without aenet_fn."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from aenet_fn.cli.errors import CLIError
from aenet_fn.cli.files import check_output_file, input_files
from aenet_fn.cli.predict import _models, load_potential
from aenet_fn.io.program import save_program
from aenet_fn.torch_training import TorchCommitteePotential

PROGRAM_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _cmd_export_program(args: argparse.Namespace) -> int:
    output = Path(args.output)
    potential = load_potential(args.model)
    models = _models(potential)
    if isinstance(potential, TorchCommitteePotential):
        if output.exists() and not output.is_dir():
            raise CLIError(f"OUTPUT {output} exists and is not a folder (a committee's programs)")
        targets = [output / f"member_{i:03d}.pt2" for i in range(len(models))]
    else:
        targets = [output]
    inputs = input_files([args.model])
    for target in targets:
        check_output_file(target, inputs, args.overwrite, "OUTPUT")
    dtype = PROGRAM_DTYPES[args.dtype] if args.dtype else None
    for model, target in zip(models, targets):
        target.parent.mkdir(parents=True, exist_ok=True)
        save_program(model, target, dtype)
        print(target)
    return 0
