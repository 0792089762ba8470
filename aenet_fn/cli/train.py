"""``aenet-fn train``: training the potential or committee of a :class:`RunConfig`
(:func:`run_training`, :class:`TrainingRun`), writing the output folder (model, history,
energies files, metrics, plots) and the final-errors table (:func:`error_metrics`,
:func:`format_summary`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aenet_fn.cli.config import RunConfig, load_config
from aenet_fn.cli.errors import CLIError, ConfigError
from aenet_fn.cli.files import check_species, naming_structures, read_structure_files
from aenet_fn.cli.memory import check_memory
from aenet_fn.cli.predict import (
    Potential,
    Prediction,
    _aligned,
    _json_ready,
    _models,
    predict_structures,
)
from aenet_fn.cli.run_folder import (
    locked,
    read_record,
    replacing_run,
    run_outputs,
    write_record,
)
from aenet_fn.core.structure import Structure
from aenet_fn.driver.checkpoint import load_checkpoint, newest_checkpoint
from aenet_fn.io.atomic import atomic_write_text
from aenet_fn.io.train import TrainOut, write_energies, write_history
from aenet_fn.plots import committee_training_summary, parity_figure, save_figure
from aenet_fn.torch_featurize import ChebyshevDescriptor
from aenet_fn.torch_training import (
    StructureDataset,
    TorchANNPotential,
    TorchCommitteePotential,
    train_test_split,
)

# ---------------------------------------------------------------------------------------------
# final errors


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


def _number(value: float, digits: int) -> str:
    return "-" if not math.isfinite(value) else f"{value:.{digits}f}"


# ---------------------------------------------------------------------------------------------
# training


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


def _checkpoints(run: RunConfig) -> Path | None:
    directory = run.training.checkpoint_dir
    return None if directory is None else Path(directory)


def _check_writable_folder(folder: Path, what: str) -> None:
    """Refuse a folder a run could not write into: a file in its place (or in place of one of
    its parents), or a first existing ancestor that is not writable."""
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise CLIError(f"{what} {folder}: {existing} is a file, not a folder")
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(f"{what} {folder}: {existing} is not writable")


def check_output(run: RunConfig, overwrite: bool, resume: bool = False) -> list[Path]:
    """The outputs another run left in ``run.output`` (see
    :func:`~aenet_fn.cli.run_folder.run_outputs`); refuses them unless ``overwrite`` (they
    will be replaced as a whole) or ``resume`` (a single potential's run continued from its
    newest checkpoint), and refuses output or checkpoint folders a run could not write
    (``--check`` runs it too)."""
    if overwrite and resume:
        raise ConfigError(
            "--resume continues the folder's run and --overwrite replaces it: give one"
        )
    for what, folder in (("[output] directory", run.output), ("checkpoint_dir", _checkpoints(run))):
        if folder is not None:
            _check_writable_folder(folder, what)
    previous = run_outputs(run.output, _checkpoints(run))
    if resume:
        if run.committee is not None:
            raise CLIError("--resume continues single potentials (committees keep no checkpoints)")
        if newest_checkpoint(_checkpoints(run)) is None:
            raise CLIError(
                f"{run.output}: no checkpoint to resume from (checkpoint_dir "
                f"{run.training.checkpoint_dir})"
            )
    elif previous and not overwrite:
        names = ", ".join(sorted(p.name for p in previous)[:4])
        raise CLIError(
            f"{run.output} already holds a training run's outputs ({names}); pass --resume to "
            "continue it or --overwrite to replace it, or choose another [output] directory"
        )
    return previous


def _check_labels(structures: Sequence[Structure], descriptor: ChebyshevDescriptor, what: str):
    if not structures:
        raise CLIError(f"{what}: no structures")
    check_species(structures, descriptor.species, what, "[descriptor]")
    unlabelled = [s.name for s in structures if s.energy is None]
    if unlabelled:
        raise CLIError(f"{what}: structures without an energy: {unlabelled[:5]}")


def run_training(
    run: RunConfig,
    overwrite: bool = False,
    show_progress: bool | None = None,
    resume: bool = False,
) -> TrainingRun:
    """Train the potential or committee of ``run`` and write the output folder: the model
    (``model.pt``, or the committee layout), ``history.json``/``.csv``, ``energies.train.0`` /
    ``energies.test.0``, ``metrics.json``, ``training_summary.png``, ``parity.png`` and
    ``run.json`` (the split seed). The folder is locked for the run (:mod:`~aenet_fn.cli.
    run_folder`); another run's outputs there are refused, replaced as a whole
    (``overwrite``) or continued from their newest checkpoint to the configured number of
    epochs, as the uninterrupted run would have gone (``resume``)."""
    start = time.perf_counter()
    config = run.training
    if show_progress is not None:
        config.show_progress = show_progress
    config.save_energies = False  # written below, into the output folder
    with locked(run.output):
        previous = check_output(run, overwrite, resume)
        checkpoint = None
        if resume:
            checkpoint = newest_checkpoint(_checkpoints(run))
            config.split_seed = int(read_record(run.output)["split_seed"])
            done = load_checkpoint(checkpoint)[0].epoch
            if done >= config.iterations:
                raise CLIError(
                    f"{run.output}: the run is complete ({done} of {config.iterations} epochs); "
                    "nothing to resume"
                )
            config.iterations -= done
        if config.split_seed is None:  # drawn once, so that the split can be reported
            config.split_seed = int(torch.Generator().seed() % 2**31)
        replacing = overwrite and previous
        context = replacing_run(run.output, previous, _checkpoints(run)) if replacing else None
        with context or contextlib.nullcontext():
            write_record(run.output, config.split_seed)
            if run.committee is None:
                potential, train_s, test_s, trainouts = _train_single(run, checkpoint)
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


def _train_single(run: RunConfig, resume_from: Path | None = None):
    """A single potential trained on the datasets of ``run`` (continuing ``resume_from``)."""
    train_dataset, test_dataset, train_s, test_s = _datasets(run)
    potential = TorchANNPotential(run.arch, run.descriptor)
    with naming_structures([*train_s, *test_s], run.descriptor.featurize):
        potential.train(
            train_dataset=train_dataset,
            test_dataset=test_dataset,
            config=run.training,
            resume_from=resume_from,
        )
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


def _cmd_train(args: argparse.Namespace) -> int:
    run = load_config(args.config, args.output)
    if args.device is not None:
        run.training.device = args.device
        try:
            run.training.validate()
        except ValueError as error:
            raise ConfigError(f"--device: {error}") from error
    if args.check:
        check_output(run, args.overwrite, args.resume)
        kind = "single potential"
        if run.committee is not None:
            kind = f"committee of {run.committee.num_members}"
        files = len(run.paths) + len(run.test_paths or [])
        memory = check_memory(run)
        print(f"{args.config}: valid ({kind}, {files} data path(s)); output: {run.output}")
        print(memory)
        return 0
    result = run_training(run, args.overwrite, False if args.no_progress else None, args.resume)
    print(format_summary(result.metrics))
    print(f"wrote {run.output} in {result.seconds:.1f} s")
    return 0
