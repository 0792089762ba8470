"""``TorchANNPotential``: the ænet tools' stateful trainer, as a thin shell over the driver.

Every number comes from the functional core (:mod:`aenet_fn.driver.train`,
:mod:`aenet_fn.core.potential`); this class only converts inputs, keeps the model between calls,
writes files and wraps results.
"""

from __future__ import annotations

import numbers
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aenet_fn.core.batch import collate
from aenet_fn.core.descriptor import build_graph
from aenet_fn.core.network import check_architecture
from aenet_fn.core.potential import (
    Model,
    atomic_energies,
    atomic_energies_from_features,
    check_model_values,
    energy_forces_stress,
)
from aenet_fn.core.records import to
from aenet_fn.core.serialization import from_tree, to_tree
from aenet_fn.core.structure import Structure
from aenet_fn.driver.checkpoint import (
    CheckpointWriter,
    atomic_torch_save,
    load_checkpoint,
    safe_torch_load,
)
from aenet_fn.driver.distributed import agreed_seed, current_world
from aenet_fn.driver.progress import EpochProgress
from aenet_fn.driver.state import init_model, init_train_state
from aenet_fn.driver.train import fit
from aenet_fn.io.ascii_potential import read_aenet_ascii, training_info, write_aenet_ascii
from aenet_fn.io.ase_io import convert_to_structures
from aenet_fn.io.predict import PredictOut
from aenet_fn.io.program import save_program
from aenet_fn.io.train import TrainOut, write_energies, write_history
from aenet_fn.torch_featurize.chebyshev import ChebyshevDescriptor
from aenet_fn.torch_training.config import TorchTrainingConfig
from aenet_fn.torch_training.dataset import (
    dataset_descriptor,
    featurized_of,
    structures_of,
)
from aenet_fn.torch_training.sources import (
    TrainingData,
    TrainingSources,
    check_reference_species,
    training_dtype,
)

MODEL_FORMAT = "aenet_fn-model"
MODEL_VERSION = 1


class TorchANNPotential:
    """An ænet-type potential: one network per species over a Chebyshev descriptor.

    Args:
        arch: per species a list of hidden layers ``(nodes, activation)``.
        descriptor: a :class:`~aenet_fn.torch_featurize.ChebyshevDescriptor`.
    """

    def __init__(
        self, arch: Mapping[str, Sequence[tuple[int, str]]], descriptor: ChebyshevDescriptor
    ):
        if not isinstance(descriptor, ChebyshevDescriptor):
            raise TypeError(
                f"descriptor must be a ChebyshevDescriptor, got {type(descriptor).__name__}"
            )
        check_architecture(arch, descriptor.params.species)
        self.arch = {s: list(layers) for s, layers in arch.items()}
        self.descriptor = descriptor
        self.model: Model | None = None
        self.history: tuple[dict[str, float], ...] = ()
        self.best_val: float | None = None
        self._training_config: TorchTrainingConfig | None = None
        self._metadata: dict[str, Any] | None = None

    @property
    def device(self) -> torch.device:
        """Device of the descriptor (and model)."""
        return self.descriptor.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the descriptor (and model)."""
        return self.descriptor.dtype

    @property
    def metadata(self) -> dict[str, Any] | None:
        """What :meth:`from_file` read besides the weights, else None."""
        return self._metadata

    def train(
        self,
        structures: Any = None,
        dataset: Any = None,
        train_dataset: Any = None,
        test_dataset: Any = None,
        config: TorchTrainingConfig | None = None,
        resume_from: str | os.PathLike | None = None,
    ) -> TrainOut:
        """Train and return a :class:`~aenet_fn.io.train.TrainOut`.

        Data sources, in priority order: (a) ``train_dataset`` (+ optional ``test_dataset``;
        ``testpercent`` ignored); (b) ``dataset``, split by ``testpercent``/``split_seed`` unless
        ``test_dataset`` is given; (c) ``structures`` (records, ASE Atoms or file paths), filtered
        by ``max_energy``/``max_forces`` and split. Prebuilt datasets own their
        ``atomic_energies`` (a conflicting ``config.atomic_energies`` raises ``ValueError``).
        With ``resume_from`` a checkpoint continues for ``config.iterations`` more epochs, exactly
        as the uninterrupted run would have. With a ``checkpoint_dir`` the history is also
        written there as ``history.json`` and ``history.csv``."""
        config = TorchTrainingConfig() if config is None else config
        config.validate()
        check_reference_species(
            config.atomic_energies, self.descriptor.species, "TorchTrainingConfig.atomic_energies"
        )
        world = current_world()
        if world.size > 1:  # every process must draw the same split (rank 0's seed)
            config.split_seed = agreed_seed(config.split_seed, world)
        dtype = training_dtype(config, self.dtype)
        with_forces = config.force_weight > 0
        data = TrainingSources(self.descriptor).training_data(
            (structures, dataset, train_dataset, test_dataset),
            config,
            dtype,
            with_forces,
            "train()",
        )
        config.seed = agreed_seed(config.seed, world)
        core = config.to_train_config()
        try:
            state = self._initial_state(data, config, core, resume_from)
            state = self._run_fit(state, data, config, core)
        finally:
            data.close()
        self.model, self.history = to(state.model, self.device), state.history
        if config.checkpoint_dir is not None and world.is_main:
            write_history(self.history, config.checkpoint_dir)
        self.best_val = None if state.best_epoch < 0 else state.best_monitor
        self._training_config = config
        files = self._energies_files(data) if config.save_energies else (None, None)
        return TrainOut.from_torch_history(
            self.history, config=config, energies_train_files=files[0], energies_test_files=files[1]
        )

    def _initial_state(
        self,
        data: TrainingData,
        config: TorchTrainingConfig,
        core: Any,
        resume_from: str | os.PathLike | None,
    ) -> Any:
        """The state to train from: a loaded checkpoint, or a fresh model fitted to the
        training split's statistics."""
        if resume_from is not None:
            try:
                state, _ = load_checkpoint(resume_from)
            except (OSError, ValueError) as error:
                raise RuntimeError(f"Failed to load checkpoint {resume_from}: {error}") from error
            self._check_resumable(state.model, resume_from)
            return to(state, data.train.device)
        model = init_model(
            self.descriptor.params,
            self.arch,
            data.train,
            seed=config.seed,
            atomic_energies=data.atomic_energies,
            normalize_features=config.normalize_features,
            normalize_energy=config.normalize_energy,
            feature_stats=config.feature_stats,
            energy_shift=config.E_shift,
            energy_scaling=config.E_scaling,
        )
        return init_train_state(model, data.train, core)

    def _check_resumable(self, model: Model, path: str | os.PathLike) -> None:
        """Raise ``RuntimeError`` when a checkpoint's model does not belong to this potential
        (other descriptor or architecture): training on would silently replace the model."""
        wanted = check_architecture(self.arch, self.descriptor.species)
        found = check_architecture(model.network.architecture(), model.descriptor.species)
        if model.descriptor != self.descriptor.params:
            problem = (
                f"its descriptor {model.descriptor} differs from the potential's "
                f"{self.descriptor.params}"
            )
        elif found != wanted:
            problem = f"its architecture {found} differs from the potential's {wanted}"
        else:
            return
        raise RuntimeError(f"Failed to load checkpoint {path}: {problem}")

    def _run_fit(
        self, state: Any, data: TrainingData, config: TorchTrainingConfig, core: Any
    ) -> Any:
        """Run the core training loop with the progress bar and checkpoint callbacks."""
        callbacks, progress = [], None
        if config.show_progress:
            progress = EpochProgress(core.epochs, show_batches=config.show_batch_progress)
            callbacks.append(progress)
        if config.checkpoint_dir is not None:
            callbacks.append(
                CheckpointWriter(
                    config.checkpoint_dir,
                    core,
                    interval=config.checkpoint_interval,
                    max_checkpoints=config.max_checkpoints,
                    save_best=config.save_best and data.test is not None,
                )
            )
        try:
            return fit(
                state,
                data.train,
                data.test,
                core,
                callbacks,
                progress.on_batch if progress else None,
            )
        finally:
            if progress is not None:
                progress.close()

    def _energies_files(self, data: TrainingData):
        """``save_energies``: the energies files of both splits, or ``(None, None)`` with a
        warning when a dataset cannot expose its structures."""
        splits = []
        for source in (data.train_source, data.test_source):
            if source is None or isinstance(source, list):
                splits.append(source or [])
                continue
            structures = structures_of(source)
            if structures is None:
                warnings.warn(
                    "save_energies: the dataset cannot expose its structures; no energies "
                    "files written",
                    UserWarning,
                    stacklevel=3,
                )
                return None, None
            splits.append(structures)
        return self._save_energies(splits[0], splits[1])

    def _require_model(self) -> Model:
        if self.model is None:
            raise RuntimeError("the potential has not been trained or loaded yet")
        return self.model

    def _save_energies(self, train: list[Structure], test: list[Structure]):
        """Write ``energies.train.0`` / ``energies.test.0`` into the working directory."""
        model = self._require_model()
        species = list(model.descriptor.species)
        cost_scale = float(model.normalization.energy_scaling)
        names = []
        for label, structures in (("train", train), ("test", test)):
            if not structures:
                names.append(None)
                continue
            prediction = self.predict(structures)
            rows = [
                {
                    "ref_energy": structure.energy,
                    "ann_energy": predicted,
                    "n_atoms": structure.n_atoms,
                    "species_counts": {s: structure.species.count(s) for s in species},
                    "name": structure.name,
                    "cost": (structure.energy - predicted) / structure.n_atoms * cost_scale,
                }
                for structure, predicted in zip(structures, prediction.total_energy)
            ]
            names.append([str(write_energies(Path(f"energies.{label}.0"), rows, species))])
        return names

    def predict(self, structures: Any, eval_forces: bool = False, config: Any = None) -> PredictOut:
        """Total and cohesive energies (eV), atomic energies (eV, summing to the total) and,
        with ``eval_forces``, forces (eV/Å) of ``structures`` (records, ASE Atoms or paths)."""
        model = self._require_model()
        structures = convert_to_structures(structures)
        if not structures:
            raise ValueError("predict(): no structures given")
        batch_size = _prediction_batch_size(config)
        reference = dict(
            zip(model.descriptor.species, model.normalization.atomic_energies.tolist())
        )
        out: dict[str, list] = {k: [] for k in ("coords", "forces", "types", "atomic", "total")}
        for first in range(0, len(structures), batch_size):
            chunk = structures[first : first + batch_size]
            batch = collate(chunk, species=model.descriptor.species, dtype=self.dtype)
            graph = build_graph(model.descriptor, batch)  # shared by forces and atomic energies
            if eval_forces:
                forces = energy_forces_stress(model, batch, graph).forces.detach()
            with torch.no_grad():
                atomic = atomic_energies(model, batch, graph)
            totals = torch.zeros(len(chunk), dtype=atomic.dtype).index_add(
                0, batch.structure_index, atomic
            )
            for k, structure in enumerate(chunk):
                mine = batch.structure_index == k
                out["coords"].append(structure.positions.numpy().copy())
                out["types"].append(list(structure.species))
                out["atomic"].append(atomic[mine].numpy().copy())
                out["forces"].append(forces[mine].numpy().copy() if eval_forces else None)
                out["total"].append(float(totals[k]))
        cohesive = [
            total - sum(reference[s] for s in types)
            for total, types in zip(out["total"], out["types"])
        ]
        paths = [s.name for s in structures] if all(s.name for s in structures) else None
        return PredictOut(
            coords=out["coords"],
            forces=out["forces"],
            atom_types=out["types"],
            atom_energies=out["atomic"],
            cohesive_energy=cohesive,
            total_energy=out["total"],
            structure_paths=paths,
        )

    def to_aenet_ascii(
        self,
        output_dir: str | os.PathLike,
        prefix: str = "potential",
        descriptor_stats: Mapping[str, Any] | None = None,
        structures: Any = None,
        compute_stats: bool = True,
    ) -> list[Path]:
        """Write the model as ænet Fortran ``{prefix}.{SPECIES}.nn.ascii`` files (one per
        species) into ``output_dir``; returns their paths. The feature statistics written are
        the model's own (fitted on its training split), so the Fortran potential computes the
        same energies; ``structures`` (with ``compute_stats``) fill the training-set section
        (atoms, structures, referenced energy range per atom). ``descriptor_stats`` is refused:
        other statistics would make the Fortran potential differ from this one."""
        if descriptor_stats is not None:
            raise ValueError(
                "to_aenet_ascii: descriptor_stats cannot be written: the files carry the model's "
                "own feature statistics (pass structures= for the training-set section)"
            )
        model = self._require_model()
        return write_aenet_ascii(
            model, output_dir, prefix, _ascii_info(model, structures, compute_stats)
        )

    def predict_dataset(
        self, dataset: Any, eval_forces: bool = False, config: Any = None
    ) -> PredictOut:
        """:meth:`predict` for a dataset (``StructureDataset``, ``CachedStructureDataset``,
        their subsets, or a dataset whose samples carry ``features``). Energy-only prediction
        reuses the dataset's cached features; ``eval_forces`` materialises the structures
        (``get_structure``, ``structures`` or a Subset of such a dataset) and calls
        :meth:`predict`. Raises ``ValueError`` when the structures or coordinates needed cannot
        be obtained."""
        model = self._require_model()
        if len(dataset) == 0:
            raise ValueError("predict_dataset(): the dataset is empty")
        structures = structures_of(dataset)
        if eval_forces:
            if structures is None:
                raise ValueError(
                    "predict_dataset(eval_forces=True) needs a dataset exposing its structures "
                    "(get_structure(), structures, or a Subset of such a dataset)"
                )
            return self.predict(structures, eval_forces=True, config=config)
        if structures is not None or dataset_descriptor(dataset) is not None:
            data = featurized_of(dataset, self.descriptor, False, self.dtype)
            features, species_index, n_atoms = data.features, data.species_index, data.n_atoms
            if structures is None:
                structures = [None] * len(dataset)
            coords = [None if s is None else s.positions.numpy().copy() for s in structures]
            types = [None if s is None else list(s.species) for s in structures]
            names = list(data.names)
        else:
            features, species_index, n_atoms, coords, types, names = _features_from_samples(
                dataset, list(model.descriptor.species), self.dtype
            )
        if any(c is None for c in coords):
            raise ValueError("predict_dataset(): the dataset does not give atomic coordinates")
        batch_size = _prediction_batch_size(config)
        atom_start = torch.cumsum(n_atoms, 0) - n_atoms
        atomic: list[torch.Tensor] = []
        with torch.no_grad():
            for first in range(0, len(n_atoms), batch_size):
                last = min(first + batch_size, len(n_atoms)) - 1
                lo, hi = int(atom_start[first]), int(atom_start[last] + n_atoms[last])
                atomic.append(
                    atomic_energies_from_features(
                        model, features[lo:hi].to(self.dtype), species_index[lo:hi]
                    )
                )
        per_atom = torch.cat(atomic).split(n_atoms.tolist())
        reference = dict(
            zip(model.descriptor.species, model.normalization.atomic_energies.tolist())
        )
        totals = [float(a.sum()) for a in per_atom]
        cohesive = [
            total - sum(reference[s] for s in symbols) for total, symbols in zip(totals, types)
        ]
        return PredictOut(
            coords=coords,
            forces=[None] * len(totals),
            atom_types=types,
            atom_energies=[a.numpy().copy() for a in per_atom],
            cohesive_energy=cohesive,
            total_energy=totals,
            structure_paths=names if all(names) else None,
        )

    def cohesive_energy(
        self, structure: Structure, atomic_energies: Mapping[str, float] | None = None
    ) -> float:
        """``structure.energy`` minus the atomic reference energies (eV)."""
        if atomic_energies is None:
            if self.model is None:
                raise ValueError("no atomic energies: train or load the potential, or pass them")
            atomic_energies = dict(
                zip(
                    self.model.descriptor.species, self.model.normalization.atomic_energies.tolist()
                )
            )
        if structure.energy is None:
            raise ValueError(f"structure {structure.name!r} has no energy")
        return structure.energy - sum(atomic_energies.get(s, 0.0) for s in structure.species)

    def save(
        self, path: str | os.PathLike, extra_metadata: Mapping[str, Any] | None = None
    ) -> None:
        """Write the model (not a checkpoint: no optimiser state) to ``path`` atomically; loading
        it never runs code."""
        model = self._require_model()
        config = self._training_config
        payload = {
            "format": MODEL_FORMAT,
            "version": MODEL_VERSION,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "torch_version": str(torch.__version__),
            "architecture": to_tree(
                {s: [list(layer) for layer in layers] for s, layers in self.arch.items()}
            ),
            "descriptor_config": {
                "species": list(self.descriptor.species),
                "rad_order": self.descriptor.rad_order,
                "rad_cutoff": self.descriptor.rad_cutoff,
                "ang_order": self.descriptor.ang_order,
                "ang_cutoff": self.descriptor.ang_cutoff,
                "min_cutoff": self.descriptor.min_cutoff,
                "dtype": str(self.dtype).removeprefix("torch."),
                "device": str(self.device),
                "n_features": self.descriptor.n_features,
            },
            "model": to_tree(model),
            "training_history": [dict(row) for row in self.history],
            "best_val_loss": self.best_val,
            "training_config": None if config is None else _config_tree(config),
            "extra_metadata": to_tree(dict(extra_metadata or {})),
        }
        atomic_torch_save(payload, path)

    def save_program(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write the potential as a self-contained ``torch.export`` program (``.pt2``) that
        computes energy, forces and stress from positions, cell, species and a neighbour list,
        loadable with plain ``torch.export.load`` (see :mod:`aenet_fn.io.program`); ``dtype``:
        its float type (default the model's). Returns the path."""
        return save_program(self._require_model(), path, dtype)

    @classmethod
    def from_aenet_ascii(
        cls,
        paths: Any,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> TorchANNPotential:
        """A potential from ænet ``.nn.ascii`` files, ready to predict (or to train on):
        ``paths`` a folder of them, one file per species, or a mapping species → file (see
        :func:`~aenet_fn.io.ascii_potential.read_aenet_ascii`); on ``device`` (None: the CPU)."""
        model = read_aenet_ascii(paths, dtype=dtype)
        descriptor = ChebyshevDescriptor.from_params(model.descriptor, device or "cpu", dtype)
        potential = cls(model.network.architecture(), descriptor)
        potential.model = to(model, descriptor.device)
        return potential

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, device: str | torch.device | None = None
    ) -> TorchANNPotential:
        """Load a model written by :meth:`save` (``torch.load(weights_only=True)``)."""
        payload = safe_torch_load(path, MODEL_FORMAT)
        try:
            model = from_tree(payload["model"])
            arch = payload["architecture"]
            config = payload["descriptor_config"]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: corrupt model file ({error})") from error
        if not isinstance(model, Model):
            raise ValueError(f"{path}: corrupt model file (no model record)")
        check_model_values(model, str(path))
        dtype = getattr(torch, config.get("dtype", "float64"))
        descriptor = ChebyshevDescriptor.from_params(model.descriptor, device or "cpu", dtype)
        potential = cls(
            {s: [tuple(layer) for layer in layers] for s, layers in arch.items()}, descriptor
        )
        potential.model = to(model, descriptor.device)
        potential.history = tuple(payload.get("training_history") or ())
        potential.best_val = payload.get("best_val_loss")
        potential._metadata = {k: v for k, v in payload.items() if k != "model"}
        return potential


def _ascii_info(model: Model, structures: Any, compute_stats: bool) -> dict[str, Any] | None:
    """The ``.nn.ascii`` training-set section of ``structures`` for ``model`` (None: none)."""
    if structures is None or not compute_stats:
        return None
    references = dict(zip(model.descriptor.species, model.normalization.atomic_energies.tolist()))
    return training_info(convert_to_structures(structures), references)


def _features_from_samples(dataset: Any, species: list[str], dtype: torch.dtype):
    """Features, species indices, atom counts, coordinates, symbols and names from the samples
    of a dataset without structures; samples must carry ``features`` and ``species``."""
    features, species_index, n_atoms, coords, types, names = [], [], [], [], [], []
    for i in range(len(dataset)):
        sample = dataset[i]
        structure = sample.get("structure")
        symbols = sample.get("species")
        if symbols is None and structure is not None:
            symbols = list(structure.species)
        if sample.get("features") is None or symbols is None:
            raise ValueError(
                f"predict_dataset(): sample {i} carries no features or species; give a dataset "
                "exposing its structures"
            )
        unknown = sorted(set(symbols) - set(species))
        if unknown:
            raise ValueError(f"species {unknown} are not in the descriptor's species {species}")
        positions = sample.get("positions")
        if positions is None and structure is not None:
            positions = structure.positions
        features.append(torch.as_tensor(sample["features"], dtype=dtype))
        species_index.append(torch.tensor([species.index(s) for s in symbols]))
        n_atoms.append(len(symbols))
        coords.append(None if positions is None else np.asarray(positions, dtype=float).copy())
        types.append(list(symbols))
        names.append(sample.get("name") or (structure.name if structure is not None else None))
    return (
        torch.cat(features),
        torch.cat(species_index),
        torch.tensor(n_atoms),
        coords,
        types,
        names,
    )


def _prediction_batch_size(config: Any) -> int:
    """``config.batch_size`` (default 32) checked to be an integer >= 1."""
    batch_size = getattr(config, "batch_size", 32)
    integral = isinstance(batch_size, numbers.Integral) and not isinstance(batch_size, bool)
    if not integral or batch_size < 1:
        raise ValueError(f"prediction batch_size must be an integer >= 1, got {batch_size!r}")
    return int(batch_size)


def _config_tree(config: TorchTrainingConfig) -> dict[str, Any]:
    values = {k: v for k, v in asdict(config).items() if not k.startswith("_")}
    values["method"] = {"name": config.method.method_name, **config.method.to_params_dict()}
    return to_tree(_plain(values))


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
