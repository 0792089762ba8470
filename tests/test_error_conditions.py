"""Every error condition of reference-api.md §2, and the inputs the reference lets through.

Each case names its §2 condition (``U…``: an input the reference does not check) and asserts
the exception type and a message fragment. Where aenet_fn raises another type than the
reference, or checks something the reference cannot reach, the case says so in ``note``.
Conditions 109–120 (reference energies) are cases of
``tests/test_reference_energies.py::test_invalid_input_is_rejected``; conditions of features
aenet_fn does not have, or not yet, are listed with the reason in ``NOT_APPLICABLE`` and
``NOT_YET``; HDF5 conditions are tested in tests/test_database.py (``TESTED_IN_DATABASE_TESTS``),
committee member failures in tests/test_torch_committee.py (``TESTED_IN_COMMITTEE_TESTS``).
:func:`test_every_condition_is_accounted_for` keeps the lists complete.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import numpy as np
import pytest
import torch

import aenet_fn as af
from aenet_fn.io.predict import PredictOutAnalyzer
from aenet_fn.mlip.ensemble import AenetEnsembleResult, normalize_ensemble_members
from aenet_fn.torch_featurize import ChebyshevDescriptor
from aenet_fn.torch_training import (
    Structure,
    StructureDataset,
    TorchANNPotential,
    TorchCommitteeConfig,
    TorchCommitteePotential,
    TorchTrainingConfig,
    TrainingMethod,
    TrainOut,
)
from tests.test_reference_energies import INVALID_INPUTS as REFERENCE_ENERGY_CASES

ARCH = {"H": [(3, "tanh")]}
ARCH_HO = {"H": [(3, "tanh")], "O": [(3, "tanh")]}


def _descriptor(rad_order: int = 1, species: tuple[str, ...] = ("H",)) -> ChebyshevDescriptor:
    return ChebyshevDescriptor(list(species), rad_order, 2.0, 0, 2.0, min_cutoff=0.1)


def _triangle(k: int, symbol: str = "H", energy: float | None = 0.0) -> Structure:
    """Three atoms, stretched by ``k``, with zero forces."""
    positions = [[0.0, 0.0, 0.0], [0.9 + 0.05 * k, 0.0, 0.0], [0.0, 0.9, 0.0]]
    return Structure(
        positions,
        [symbol] * 3,
        energy=None if energy is None else energy + 0.1 * k,
        forces=np.zeros((3, 3)),
        name=f"triangle-{k}",
    )


def _config(**options: Any) -> TorchTrainingConfig:
    """A quick, quiet one-epoch config."""
    defaults = {
        "iterations": 1,
        "testpercent": 0,
        "checkpoint_dir": None,
        "show_progress": False,
        "atomic_energies": {"H": 0.0},
    }
    return TorchTrainingConfig(**{**defaults, **options})


def _changed(**changes: Any) -> TorchTrainingConfig:
    """A valid config whose options are then set to ``changes`` (bypassing construction)."""
    config = _config()
    for name, value in changes.items():
        setattr(config, name, value)
    return config


@dataclass
class Context:
    """What the cases act on: a trained potential, its checkpoint and model files."""

    descriptor: ChebyshevDescriptor
    structures: list[Structure]
    potential: TorchANNPotential
    checkpoint: Path
    model_path: Path
    other_model_path: Path
    folder: Path


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Context:
    folder = tmp_path_factory.mktemp("errors")
    descriptor = _descriptor()
    structures = [_triangle(k) for k in range(6)]
    potential = TorchANNPotential(ARCH, descriptor)
    potential.train(structures=structures, config=_config(checkpoint_dir=str(folder / "run")))
    potential.save(folder / "model.pt")
    other = TorchANNPotential({"H": [(4, "tanh")]}, descriptor)
    other.train(structures=structures, config=_config())
    other.save(folder / "other.pt")
    return Context(
        descriptor,
        structures,
        potential,
        folder / "run" / "checkpoint_epoch_0000.pt",
        folder / "model.pt",
        folder / "other.pt",
        folder,
    )


class _SamplesOnly:
    """A foreign dataset: samples with features and species but no structures or positions."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"features": torch.zeros(3, 3, dtype=torch.float64), "species": ["H"] * 3}


def _train(context: Context, **arguments: Any) -> None:
    """Train a fresh potential over the context's descriptor (structures by default)."""
    arguments.setdefault("config", _config())
    if not {"structures", "dataset", "train_dataset"} & set(arguments):
        arguments["structures"] = context.structures
    TorchANNPotential(ARCH, context.descriptor).train(**arguments)


def _resume(context: Context, potential: TorchANNPotential, checkpoint: Path) -> None:
    potential.train(structures=context.structures, config=_config(), resume_from=checkpoint)


def _force_batch_without_derivatives(context: Context) -> None:
    data = af.featurize_structures(
        context.descriptor.params, context.structures, with_derivatives=False
    )
    every = torch.ones(data.n_structures, dtype=torch.bool)
    af.take_structures(data, torch.arange(2), every)


def _export_relu(context: Context) -> None:
    model = context.potential.model
    network = attrs.evolve(model.network, activations=(("relu",),))
    af.write_aenet_ascii(attrs.evolve(model, network=network), context.folder / "ascii")


def _corrupt_model(context: Context) -> None:
    payload = torch.load(context.model_path, weights_only=True)
    payload["model"]["fields"]["descriptor"]["__record__"] = "aenet_fn.core.descriptor.Unknown"
    path = context.folder / "unknown-descriptor.pt"
    torch.save(payload, path)
    TorchANNPotential.from_file(path)


def _committee_folder(context: Context, members: list[dict[str, Any]]) -> None:
    folder = context.folder / f"committee-{len(members)}"
    folder.mkdir(exist_ok=True)
    (folder / "committee_metadata.json").write_text(json.dumps({"members": members}))
    TorchCommitteePotential.from_directory(folder)


def _committee_predict(context: Context, **options: Any) -> None:
    committee = TorchCommitteePotential.from_files([context.model_path, context.model_path])
    committee.predict(context.structures, **options)


@dataclass(frozen=True)
class Case:
    """One error condition: §2 number (or ``U…``), what must be raised, what triggers it."""

    condition: int | str
    label: str
    error: type[BaseException]
    message: str
    trigger: Callable[[Context], Any]
    note: str = ""


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


WATER = np.zeros((3, 3))
_POTENTIAL_HO = (ARCH_HO, _descriptor(species=("H", "O")))
_KEY_ERROR = "ValueError naming the species (reference: KeyError)"
_QUIRK_13 = "the reference's intended ValueError (it raises TypeError, §6 quirk 13)"

# fmt: off
CASES = [
    # -- Structure / config ------------------------------------------------------------------
    Case(1, "positions", ValueError, r"positions must have shape \[n_atoms, 3\]",
         lambda c: Structure(np.zeros((3, 2)), ["H"] * 3)),
    Case(2, "species", ValueError, "2 species for 3 positions",
         lambda c: Structure(WATER, ["H"] * 2)),
    Case(3, "forces", ValueError, r"forces have shape \(2, 3\)",
         lambda c: Structure(WATER, ["H"] * 3, forces=np.zeros((2, 3)))),
    Case(4, "cell", ValueError, r"cell must have shape \[3, 3\]",
         lambda c: Structure(WATER, ["H"] * 3, cell=np.eye(2))),
    Case(5, "pbc", ValueError, "pbc must be three booleans",
         lambda c: Structure(WATER, ["H"] * 3, cell=5 * np.eye(3), pbc=(True, True))),
    Case(6, "method-name", NotImplementedError, "TrainingMethod is abstract",
         lambda c: TrainingMethod().method_name),
    Case(7, "testpercent", ValueError, r"testpercent must lie in \[0, 100\]",
         lambda c: _config(testpercent=-1)),
    Case(8, "seed", ValueError, "seed must be an integer",
         lambda c: _config(seed=True)),
    Case(8, "split-seed", ValueError, "split_seed must be an integer",
         lambda c: _config(split_seed=2.5)),
    Case(9, "force-weight", ValueError, r"force_weight must lie in \[0, 1\]",
         lambda c: _config(force_weight=1.5)),
    Case(10, "force-fraction", ValueError, r"force_fraction must lie in \[0, 1\]",
         lambda c: _config(force_fraction=-0.1)),
    Case(11, "force-sampling", ValueError, "force_sampling must be one of",
         lambda c: _config(force_sampling="often")),
    Case(12, "sampling-policy", ValueError, "sampling_policy must be one of",
         lambda c: _config(sampling_policy="best")),
    Case(12, "sampling-policy-changed", ValueError, "sampling_policy must be one of",
         lambda c: _train(c, config=_changed(sampling_policy="best"))),
    Case(12, "sampling-policy-core", ValueError, "TrainConfig: sampling_policy must be one of",
         lambda c: af.TrainConfig(sampling_policy="best")),
    Case(13, "force-min-structures", ValueError, "force_min_structures_per_epoch must be >= 0",
         lambda c: _config(force_min_structures_per_epoch=-1)),
    Case(14, "memory-mode", ValueError, "memory_mode must be one of",
         lambda c: _config(memory_mode="disk")),
    Case(14, "memory-mode-changed", ValueError, "memory_mode must be one of",
         lambda c: _train(c, config=_changed(memory_mode="disk"))),
    Case(15, "memory-mode-mixed", NotImplementedError, "memory_mode='mixed' is not implemented",
         lambda c: _config(memory_mode="mixed")),
    Case(15, "memory-mode-mixed-changed", NotImplementedError, "'mixed' is not implemented",
         lambda c: _train(c, config=_changed(memory_mode="mixed"))),
    Case(16, "cache-scope", ValueError, "cache_scope must be one of",
         lambda c: _config(cache_scope="some")),
    Case(17, "cache-features", ValueError, "cache_feature_max_entries must be >= 0",
         lambda c: _config(cache_feature_max_entries=-1)),
    Case(17, "cache-neighbors", ValueError, "cache_neighbor_max_entries must be >= 0",
         lambda c: _config(cache_neighbor_max_entries=-1)),
    Case(17, "cache-triplets", ValueError, "cache_force_triplet_max_entries must be >= 0",
         lambda c: _config(cache_force_triplet_max_entries=-1)),
    Case(18, "force-resample", ValueError, "force_resample_num_epochs must be >= 0",
         lambda c: _config(force_resample_num_epochs=-1)),
    Case(19, "precision", ValueError, "precision must be one of",
         lambda c: _config(precision="half")),
    Case(20, "iterations", ValueError, "iterations must be >= 0",
         lambda c: _config(iterations=-1)),
    Case(21, "num-workers", ValueError, "num_workers must be >= 0",
         lambda c: _config(num_workers=-1)),
    Case(22, "prefetch-factor", ValueError, "prefetch_factor must be >= 1",
         lambda c: _config(prefetch_factor=0)),
    Case(23, "force-resample-each-epoch", ValueError, "replaced by force_resample_num_epochs",
         lambda c: _config(force_resample_each_epoch=True), note=_QUIRK_13),
    Case(23, "epochs-per-force-window", ValueError, "replaced by force_resample_num_epochs",
         lambda c: _config(epochs_per_force_window=2), note=_QUIRK_13),
    # -- Trainer ------------------------------------------------------------------------------
    Case(24, "no-data", ValueError, "needs structures=, dataset= or train_dataset=",
         lambda c: TorchANNPotential(ARCH, c.descriptor).train(config=_config())),
    Case(25, "dataset-vs-config-references", ValueError,
         "conflict with the dataset's atomic_energies",
         lambda c: _train(c, dataset=StructureDataset(c.structures, c.descriptor,
                                                      atomic_energies={"H": 0.0}),
                          config=_config(atomic_energies={"H": -1.0}))),
    Case(26, "train-vs-test-references", ValueError, "conflicting atomic_energies",
         lambda c: _train(c, train_dataset=StructureDataset(c.structures[:4], c.descriptor,
                                                            atomic_energies={"H": 0.0}),
                          test_dataset=StructureDataset(c.structures[4:], c.descriptor,
                                                        atomic_energies={"H": -1.0}))),
    Case(27, "unfeaturizable-dataset", TypeError, "cannot featurize a _SamplesOnly",
         lambda c: _train(c, train_dataset=_SamplesOnly(),
                          config=_config(sampling_policy="energy_weighted")),
         note="energy weights need no get_structure (they come from the featurized set); a "
              "dataset aenet_fn cannot featurize fails for any policy"),
    Case(28, "zero-atoms", ValueError, "the structure has no atoms",
         lambda c: Structure(np.zeros((0, 3)), []), note="rejected when the Structure is made"),
    Case(28, "non-numeric-energy", ValueError, "energy 'low' is not a number",
         lambda c: Structure(WATER, ["H"] * 3, energy="low"),
         note="rejected when the Structure is made"),
    Case(28, "max-energy-without-energy", ValueError, "without an energy cannot be trained on",
         lambda c: _train(c, structures=[_triangle(0, energy=None)],
                          config=_config(max_energy=1.0))),
    Case(29, "error-weighted-empty", ValueError, "no structures given",
         lambda c: _train(c, structures=[], config=_config(sampling_policy="error_weighted"))),
    Case(29, "energy-weighted-empty-dataset", ValueError, "the training dataset is empty",
         lambda c: _train(c, dataset=StructureDataset([], c.descriptor),
                          config=_config(sampling_policy="energy_weighted"))),
    Case(30, "all-filtered", ValueError, "every structure was removed by max_energy / max_f",
         lambda c: _train(c, config=_config(max_energy=-5.0)),
         note="an explicit check (the reference's error comes from RandomSampler)"),
    Case(30, "empty-training-split", ValueError, r"testpercent must lie in \[0, 100\)",
         lambda c: _train(c, config=_config(testpercent=100))),
    Case(31, "checkpoint-missing", RuntimeError, "Failed to load checkpoint .*no such file",
         lambda c: _resume(c, TorchANNPotential(ARCH, c.descriptor), c.folder / "none.pt")),
    Case(31, "checkpoint-is-a-model", RuntimeError,
         "Failed to load checkpoint .*not an aenet_fn-checkpoint file",
         lambda c: _resume(c, TorchANNPotential(ARCH, c.descriptor), c.model_path)),
    Case(31, "checkpoint-other-descriptor", RuntimeError,
         "Failed to load checkpoint .*its descriptor .* differs",
         lambda c: _resume(c, TorchANNPotential(ARCH, _descriptor(rad_order=2)), c.checkpoint)),
    Case(31, "checkpoint-other-architecture", RuntimeError,
         "Failed to load checkpoint .*its architecture .* differs",
         lambda c: _resume(c, TorchANNPotential({"H": [(5, "tanh")]}, c.descriptor),
                           c.checkpoint)),
    Case(32, "force-batch-without-derivatives", ValueError,
         "forces requested but the set has no derivatives", _force_batch_without_derivatives,
         note="ValueError (reference: RuntimeError); the trainer always featurizes with "
              "derivatives when forces are trained"),
    Case(34, "not-a-chebyshev-descriptor", TypeError, "descriptor must be a ChebyshevDescriptor",
         lambda c: TorchANNPotential(ARCH, object()),
         note="one descriptor type, checked when the potential is made"),
    Case(35, "unknown-species-train", ValueError, r"\['O'\] are not in the descriptor's species",
         lambda c: _train(c, structures=[_triangle(0, "O")]), note=_KEY_ERROR),
    Case(35, "unknown-species-dataset", ValueError,
         r"\['O'\] are not in the descriptor's species .*'triangle-0'",
         lambda c: StructureDataset([_triangle(0, "O")], c.descriptor), note=_KEY_ERROR),
    Case(35, "unknown-species-predict", ValueError, r"contains species \['O'\] not in the spec",
         lambda c: c.potential.predict([_triangle(0, "O")]), note=_KEY_ERROR),
    Case(36, "predict-nothing", ValueError, "no structures given",
         lambda c: c.potential.predict([]), note="ValueError (reference: IndexError)"),
    Case(37, "predict-dataset-forces-without-structures", ValueError,
         "needs a dataset exposing its structures",
         lambda c: c.potential.predict_dataset(_SamplesOnly(), eval_forces=True)),
    Case(38, "predict-dataset-without-coordinates", ValueError,
         "does not give atomic coordinates",
         lambda c: c.potential.predict_dataset(_SamplesOnly())),
    Case(40, "cohesive-energy-without-references", ValueError, "no atomic energies",
         lambda c: TorchANNPotential(ARCH, c.descriptor).cohesive_energy(c.structures[0])),
    # -- Network, loss -----------------------------------------------------------------------
    Case(41, "arch-missing-species", ValueError, r"no network for species \['H'\]",
         lambda c: TorchANNPotential({"O": [(3, "tanh")]}, c.descriptor)),
    Case(42, "activation", ValueError, "unknown activation 'swish'",
         lambda c: TorchANNPotential({"H": [(3, "swish")]}, c.descriptor)),
    Case(43, "empty-layers", ValueError, "must be a non-empty list",
         lambda c: TorchANNPotential({"H": []}, c.descriptor)),
    Case(49, "force-loss-without-derivatives", ValueError,
         "forces requested but the set has no derivatives", _force_batch_without_derivatives,
         note="the same check as 32: a force mini-batch always carries its derivatives"),
    # -- Model I/O and ASCII export -----------------------------------------------------------
    Case(51, "save-untrained", RuntimeError, "has not been trained or loaded yet",
         lambda c: TorchANNPotential(ARCH, c.descriptor).save(c.folder / "never.pt"),
         note="file-system failures pass through as the OSError naming the path"),
    Case(52, "load-missing", FileNotFoundError, "missing.pt: no such file",
         lambda c: TorchANNPotential.from_file(c.folder / "missing.pt")),
    Case(53, "load-unreadable", ValueError, "not a readable aenet_fn-model file",
         lambda c: TorchANNPotential.from_file(_write(c.folder / "garbage.pt", b"garbage")),
         note="ValueError (reference: RuntimeError)"),
    Case(54, "load-unknown-descriptor-class", ValueError,
         "unknown record type 'aenet_fn.core.descriptor.Unknown'", _corrupt_model,
         note="ValueError (reference: RuntimeError); loading never imports a named class"),
    Case(56, "ascii-unknown-activation", ValueError, "'relu' of species 'H'", _export_relu,
         note="ValueError (reference: NotImplementedError)"),
    # -- Committee and ensemble ---------------------------------------------------------------
    Case(84, "num-members", ValueError, "num_members must be an integer >= 1",
         lambda c: TorchCommitteeConfig(num_members=0)),
    Case(85, "base-seed", ValueError, "base_seed must be an integer",
         lambda c: TorchCommitteeConfig(num_members=2, base_seed="1")),
    Case(86, "member-seeds", ValueError, "1 member seeds given for 2 members",
         lambda c: TorchCommitteeConfig(num_members=2, member_seeds=[1])),
    Case(87, "max-parallel", ValueError, "max_parallel must be >= 1",
         lambda c: TorchCommitteeConfig(num_members=2, max_parallel=0)),
    Case(88, "devices", ValueError, "devices must not be an empty list",
         lambda c: TorchCommitteeConfig(num_members=2, devices=[])),
    Case(92, "committee-metadata-missing", FileNotFoundError, r"committee_metadata\.json",
         lambda c: TorchCommitteePotential.from_directory(c.folder / "nowhere")),
    Case(93, "committee-without-members", ValueError, "no member model files given",
         lambda c: _committee_folder(c, [])),
    Case(93, "committee-member-without-index", ValueError, "corrupt committee metadata",
         lambda c: _committee_folder(c, [{}]),
         note="model paths follow from the member indices (member_XXX/model.pt)"),
    Case(94, "from-files-empty", ValueError, "no member model files given",
         lambda c: TorchCommitteePotential.from_files([])),
    Case(95, "members-differ", ValueError, r"other\.pt: its architecture or descriptor differs",
         lambda c: TorchCommitteePotential.from_files([c.model_path, c.other_model_path])),
    Case(99, "ensemble-empty", ValueError, "an ensemble needs at least one member",
         lambda c: normalize_ensemble_members([])),
    Case(99, "ensemble-no-types", ValueError, "ensemble member 1 names no atom types",
         lambda c: normalize_ensemble_members([{"Ti": "a", "O": "b"}, {}])),
    Case(99, "ensemble-not-a-mapping", ValueError, "member 0 must map atom types .* got list",
         lambda c: normalize_ensemble_members([["Ti.nn.ascii"]])),
    Case(99, "ensemble-types-differ", ValueError,
         r"ensemble member 1 has atom types \['O'\], member 0 has \['O', 'Ti'\]",
         lambda c: normalize_ensemble_members([{"Ti": "a", "O": "b"}, {"O": "c"}])),
    Case(100, "aggregation", ValueError, "aggregation must be one of",
         lambda c: _committee_predict(c, aggregation="median")),
    Case(100, "reference-member", ValueError, r"reference_member 2 is not in 0\.\.1",
         lambda c: _committee_predict(c, aggregation="reference", reference_member=2)),
    Case(101, "member-energies-2d", ValueError, "member_energies must be 1-D",
         lambda c: AenetEnsembleResult.from_member_predictions(np.zeros((2, 2)))),
    Case(101, "member-forces-2d", ValueError, r"member_forces must have shape \[M, n, 3\]",
         lambda c: AenetEnsembleResult.from_member_predictions(np.zeros(2), np.zeros((2, 3)))),
    Case(101, "member-counts-differ", ValueError, "3 members' forces for 2 members' energies",
         lambda c: AenetEnsembleResult.from_member_predictions(np.zeros(2),
                                                               np.zeros((3, 4, 3)))),
    # -- I/O results --------------------------------------------------------------------------
    Case(102, "trainout-neither", ValueError, "exactly one of",
         lambda c: TrainOut()),
    Case(102, "trainout-both", ValueError, "exactly one of",
         lambda c: TrainOut(path="train.out", history_data={})),
    Case(103, "trainout-missing-file", FileNotFoundError, "train.x output .* does not exist",
         lambda c: TrainOut(path=c.folder / "train.out")),
    Case(104, "plot-force-errors-energy-only", ValueError, "has no force errors",
         lambda c: TrainOut.from_torch_history(c.potential.history).plot_force_errors(),
         note="an energy-only run has no force data (reference: NaN columns, §6 quirk 7)"),
    Case(105, "to-structures-without-files", ValueError, "'triangle-0' is not a structure file",
         lambda c: c.potential.predict(c.structures).to_structures()),
    Case(107, "analyzer-structure-counts", ValueError, "prediction 1 has 1 structures",
         lambda c: PredictOutAnalyzer(
             [c.potential.predict(c.structures[:2]), c.potential.predict(c.structures[:1])]
         )),
    Case(107, "analyzer-different-structures", ValueError, "structure 0 of prediction 1 differs",
         lambda c: PredictOutAnalyzer(
             [c.potential.predict(c.structures[:1]), c.potential.predict(c.structures[1:2])]
         )),
    Case(107, "analyzer-empty", ValueError, "no predictions given",
         lambda c: PredictOutAnalyzer([])),
    Case(107, "analyzer-forces-missing", ValueError, "predicted without forces",
         lambda c: PredictOutAnalyzer([c.potential.predict(c.structures[:1])]).force_stats(0)),
    Case(108, "prediction-batch-size", ValueError, "batch_size must be an integer >= 1",
         lambda c: c.potential.predict(c.structures, config=SimpleNamespace(batch_size=0)),
         note="no PredictionConfig yet; predict checks the batch_size it uses"),
    Case(126, "missing-structure-file", FileNotFoundError, r"missing\.xsf",
         lambda c: c.potential.predict([str(c.folder / "missing.xsf")]),
         note="no TorchAUCFeaturizer; every file input raises FileNotFoundError naming it"),
    # -- Inputs the reference does not check --------------------------------------------------
    Case("U1", "nan-energy", ValueError, "energy is nan",
         lambda c: Structure(WATER, ["H"] * 3, energy=float("nan"))),
    Case("U1", "inf-forces", ValueError, "forces contain NaN or inf",
         lambda c: Structure(WATER, ["H"] * 3, forces=np.full((3, 3), np.inf))),
    Case("U1", "nan-positions", ValueError, "positions contain NaN or inf",
         lambda c: Structure(np.full((3, 3), np.nan), ["H"] * 3)),
    Case("U2", "missing-energy", ValueError,
         r"without an energy cannot be trained on: \['triangle-0'\]",
         lambda c: _train(c, structures=[_triangle(0, energy=None)])),
    Case("U2", "missing-energy-dataset", ValueError,
         "training structures without an energy cannot be trained on",
         lambda c: _train(c, dataset=StructureDataset([_triangle(0, energy=None)] * 2,
                                                      c.descriptor))),
    Case("U3", "unknown-chemical-symbol", ValueError,
         r"species\[2\] = 'Xx' is not a chemical element symbol",
         lambda c: Structure(WATER, ["H", "H", "Xx"])),
    Case("U4", "empty-featurization", ValueError, "no structures",
         lambda c: af.featurize_structures(c.descriptor.params, [], with_derivatives=False)),
    Case("U5", "descriptor-order", ValueError, "rad_order must be an integer >= 0",
         lambda c: ChebyshevDescriptor(["H"], -1, 2.0, 0, 2.0)),
    Case("U5", "descriptor-min-cutoff", ValueError, "must be below both cutoffs",
         lambda c: ChebyshevDescriptor(["H"], 1, 2.0, 0, 2.0, min_cutoff=2.5)),
    Case("U5", "descriptor-dtype", ValueError, "dtype must be torch.float32",
         lambda c: ChebyshevDescriptor(["H"], 1, 2.0, 0, 2.0, dtype=torch.int32)),
    Case("U5", "descriptor-device", ValueError, "ChebyshevDescriptor: device must be a torch",
         lambda c: ChebyshevDescriptor(["H"], 1, 2.0, 0, 2.0, device="abacus")),
    Case("U5", "config-device", ValueError, "device must be a torch device",
         lambda c: _config(device="abacus")),
    Case("U6", "partial-config-references", ValueError,
         r"TorchTrainingConfig.atomic_energies has no reference energy for species \['O'\]",
         lambda c: TorchANNPotential(*_POTENTIAL_HO).train(structures=c.structures,
                                                           config=_config()),
         note="the reference counts a missing species as 0 eV"),
    Case("U6", "partial-dataset-references", ValueError,
         r"the dataset's atomic_energies has no reference energy for species \['O'\]",
         lambda c: TorchANNPotential(*_POTENTIAL_HO).train(
             dataset=StructureDataset(c.structures, _POTENTIAL_HO[1],
                                      atomic_energies={"H": 0.0}),
             config=_config(atomic_energies=None))),
    Case("U6", "partial-committee-references", ValueError,
         r"has no reference energy for species \['O'\]",
         lambda c: TorchCommitteePotential(*_POTENTIAL_HO).train(structures=c.structures,
                                                                 config=_config())),
    Case("U7", "non-finite-config-value", ValueError, "max_energy must be a finite number",
         lambda c: _config(max_energy=float("inf"))),
]
# fmt: on


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    "case",
    CASES,
    ids=[f"{c.condition:03}-{c.label}" if isinstance(c.condition, int) else c.label for c in CASES],
)
def test_error_condition(case: Case, context: Context) -> None:
    with pytest.raises(case.error, match=case.message):
        case.trigger(context)


DATABASE = "tests/test_database.py::"
TESTED_IN_DATABASE_TESTS = {
    59: DATABASE + "test_bad_arguments (unknown mode)",
    60: DATABASE + "test_missing_foreign_truncated_and_non_hdf5_files (FileNotFoundError)",
    61: DATABASE + "test_bad_arguments (no sources given / created without sources)",
    62: DATABASE + "test_bad_arguments (negative build_workers)",
    64: DATABASE + "test_bad_arguments (persisting without a descriptor)",
    66: DATABASE + "test_a_failing_build_leaves_the_old_database (names the source file)",
    68: DATABASE + "test_a_failing_build_leaves_the_old_database[2 workers] (old database kept)",
    71: DATABASE + "test_missing_foreign_truncated_and_non_hdf5_files (missing dataset)",
    73: DATABASE + "test_missing_foreign_truncated_and_non_hdf5_files (unknown schema)",
    74: DATABASE + "test_another_descriptor_is_refused (at load)",
    76: DATABASE + "test_another_descriptor_is_refused (on a features read)",
    78: DATABASE + "test_bad_arguments (requires a descriptor)",
    81: DATABASE + "test_bad_arguments (unsupported source type)",
}

TESTED_IN_COMMITTEE_TESTS = {
    91: "test_torch_committee.py::test_a_failing_sequential_member_keeps_the_others "
    "(sequential members; a vmapped committee fails as a whole)",
}

NOT_YET = {
    89: "parallel (process) committee training: members train together by vmap on one device",
    90: "parallel (process) committee training with custom datasets",
    106: "PredictOut.from_file (predict.x output) is not built yet",
}

NOT_APPLICABLE = {
    63: "every build source supports parallel builds (paths, records, Atoms; no tar streams)",
    65: "the one descriptor always has local derivatives",
    67: "payloads are typed arrays written by the parent; a failing source is 66",
    69: "HDF5 variable-length strings: no byte limits on names",
    70: "persisted values are always float64 (cast on reading)",
    72: "the energy filter is stored as typed attributes; malformed files fail the schema (73)",
    75: "no separate torch cache group: features/derivatives carry their descriptor hash (76)",
    77: "derivatives carry their descriptor hash and are checked on open (71, 76)",
    79: "feature shapes come from the descriptor record, not from metadata",
    80: "sources are paths, records or Atoms: no user loader that could return a non-Structure",
    82: "no chunked record iterators (sources are read per task of 16)",
    83: "no tar sources",
    97: "to_aenet_ascii names files {prefix}.{species}.nn.ascii from the model's species",
    33: "no CSR collate: feature sets and mini-batches are built internally",
    39: "no Predictor class (TorchANNPotential.predict_dataset with forces works, see 37)",
    44: "no EnergyModelAdapter: networks are pure functions of the model record",
    45: "no compute_combined_loss: a force mini-batch always carries its derivatives (32)",
    46: "no compute_combined_loss and no optional descriptor",
    47: "one descriptor implementation with sparse local derivatives; no dense-path switch",
    48: "one descriptor implementation with sparse local derivatives; no graph-path switch",
    50: "no MetricsTracker: the history is a tuple of dicts",
    55: "the model always carries its feature statistics; export needs no other source",
    57: "write_aenet_ascii takes no descriptor_stats dict",
    58: "the input size is a property of the descriptor record",
    96: "member_model_paths(directory) reads a committee directory (no untrained state; 92)",
    98: "members predict in one vmapped pass, so their counts cannot differ",
    121: "torch is a hard dependency",
    122: "aenet_fn's own neighbour list needs no torch_cluster",
    123: "aenet_fn's neighbour list has no neighbour limit, so nothing is truncated",
    124: "no TorchNeighborList backends",
    125: "no TorchNeighborList cutoff_dict",
}


def test_every_condition_is_accounted_for() -> None:
    tested = {c.condition for c in CASES if isinstance(c.condition, int)}
    tested_elsewhere = {number for number, *_ in REFERENCE_ENERGY_CASES if number is not None}
    groups = [
        tested,
        tested_elsewhere,
        set(TESTED_IN_DATABASE_TESTS),
        set(TESTED_IN_COMMITTEE_TESTS),
        set(NOT_YET),
        set(NOT_APPLICABLE),
    ]
    assert set().union(*groups) == set(range(1, 127))
    assert sum(len(g) for g in groups) == 126, "a condition is listed twice"
