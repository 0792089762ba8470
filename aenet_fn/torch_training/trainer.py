"""``TorchANNPotential``: the ænet tools' stateful trainer, as a thin shell over the driver.

Every number comes from the functional core (:mod:`aenet_fn.train`, :mod:`aenet_fn.potential`);
this class only converts inputs, keeps the model between calls, writes files and wraps results.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import ase
import numpy as np
import torch

from aenet_fn.batch import collate
from aenet_fn.checkpoint import (
    CheckpointWriter,
    atomic_torch_save,
    load_checkpoint,
    safe_torch_load,
)
from aenet_fn.data import filter_structures, split_structures
from aenet_fn.featurized import featurize_structures
from aenet_fn.io.ase_io import from_ase, read_structures
from aenet_fn.io.predict import PredictOut
from aenet_fn.io.train import TrainOut, write_energies, write_history
from aenet_fn.network import check_architecture
from aenet_fn.potential import Model, atomic_energies, energy_forces_stress
from aenet_fn.progress import EpochProgress
from aenet_fn.serialization import from_tree, to_tree
from aenet_fn.structure import Structure
from aenet_fn.torch_featurize.chebyshev import ChebyshevDescriptor
from aenet_fn.torch_training.config import TorchTrainingConfig
from aenet_fn.train import fit, init_model, init_train_state

MODEL_FORMAT = "aenet_fn-model"
MODEL_VERSION = 1


def convert_to_structures(inputs: Any) -> list[Structure]:
    """Structures from :class:`Structure` records, ASE ``Atoms``, file paths (every frame; any
    format ASE reads, XSF by aenet_fn's reader) or a list mixing them. Unnamed structures are
    named ``structure_{index:06d}``."""
    if isinstance(inputs, (str, os.PathLike, Structure, ase.Atoms)):
        inputs = [inputs]
    structures: list[Structure] = []
    for item in inputs:
        if isinstance(item, Structure):
            structures.append(item)
        elif isinstance(item, ase.Atoms):
            structures.append(from_ase(item))
        elif isinstance(item, (str, os.PathLike)):
            structures.extend(read_structures(item))
        else:
            raise TypeError(f"cannot use a {type(item).__name__} as a structure")
    return [
        s if s.name else _renamed(s, f"structure_{index:06d}") for index, s in enumerate(structures)
    ]


def _renamed(structure: Structure, name: str) -> Structure:
    import attrs

    return attrs.evolve(structure, name=name)


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
        """Train on ``structures`` (records, ASE Atoms or file paths); returns a
        :class:`~aenet_fn.io.train.TrainOut`. With ``resume_from`` a checkpoint continues for
        ``config.iterations`` more epochs, exactly as the uninterrupted run would have. With a
        ``checkpoint_dir`` the history is also written there as ``history.json`` and
        ``history.csv``."""
        config = TorchTrainingConfig() if config is None else config
        config.validate()
        if dataset is not None or train_dataset is not None:
            raise NotImplementedError(
                "dataset inputs arrive with the dataset classes; pass structures="
            )
        if structures is None:
            raise ValueError("train() needs structures=, dataset= or train_dataset=")
        structures = convert_to_structures(structures)
        if not structures:
            raise ValueError("train(): no structures given")
        missing = [s.name for s in structures if s.energy is None]
        if missing:
            raise ValueError(f"structures without an energy cannot be trained on: {missing[:5]}")
        if not config.atomic_energies:
            warnings.warn("No atomic_energies provided: training on total energies", stacklevel=2)
        kept, _ = filter_structures(
            structures, config.atomic_energies, config.max_energy, config.max_forces
        )
        if not kept:
            raise ValueError("every structure was removed by max_energy / max_forces")
        split_seed = config.split_seed
        train_structures, test_structures = split_structures(kept, config.testpercent, split_seed)
        dtype = _training_dtype(config, self.dtype)
        with_forces = config.force_weight > 0
        params = self.descriptor.params
        train = featurize_structures(
            params, train_structures, with_derivatives=with_forces, dtype=dtype
        )
        test = (
            featurize_structures(params, test_structures, with_derivatives=with_forces, dtype=dtype)
            if test_structures
            else None
        )
        if config.seed is None:
            config.seed = int(torch.Generator().seed() % 2**31)
        core = config.to_train_config()
        if resume_from is not None:
            try:
                state, _ = load_checkpoint(resume_from)
            except (OSError, ValueError) as error:
                raise RuntimeError(f"Failed to load checkpoint {resume_from}: {error}") from error
        else:
            model = init_model(
                params,
                self.arch,
                train,
                seed=config.seed,
                atomic_energies=config.atomic_energies,
                normalize_features=config.normalize_features,
                normalize_energy=config.normalize_energy,
                feature_stats=config.feature_stats,
                energy_shift=config.E_shift,
                energy_scaling=config.E_scaling,
            )
            state = init_train_state(model, train, core)
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
                    max_checkpoints=config.max_checkpoints
                    if (config.max_checkpoints or 0) > 0
                    else None,
                    save_best=config.save_best and test is not None,
                )
            )
        try:
            state = fit(
                state, train, test, core, callbacks, progress.on_batch if progress else None
            )
        finally:
            if progress is not None:
                progress.close()
        self.model, self.history = state.model, state.history
        if config.checkpoint_dir is not None:
            write_history(self.history, config.checkpoint_dir)
        self.best_val = None if state.best_epoch < 0 else state.best_monitor
        self._training_config = config
        files = (
            self._save_energies(train_structures, test_structures)
            if config.save_energies
            else (None, None)
        )
        return TrainOut.from_torch_history(
            self.history, config=config, energies_train_files=files[0], energies_test_files=files[1]
        )

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
        batch_size = int(getattr(config, "batch_size", 32) or 32)
        reference = dict(
            zip(model.descriptor.species, model.normalization.atomic_energies.tolist())
        )
        out: dict[str, list] = {k: [] for k in ("coords", "forces", "types", "atomic", "total")}
        for first in range(0, len(structures), batch_size):
            chunk = structures[first : first + batch_size]
            batch = collate(chunk, species=model.descriptor.species, dtype=self.dtype)
            if eval_forces:
                result = energy_forces_stress(model, batch)
                forces = result.forces.detach()
            with torch.no_grad():
                atomic = atomic_energies(model, batch)
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
        dtype = getattr(torch, config.get("dtype", "float64"))
        descriptor = ChebyshevDescriptor.from_params(model.descriptor, device or "cpu", dtype)
        potential = cls(
            {s: [tuple(layer) for layer in layers] for s, layers in arch.items()}, descriptor
        )
        potential.model = model
        potential.history = tuple(payload.get("training_history") or ())
        potential.best_val = payload.get("best_val_loss")
        potential._metadata = {k: v for k, v in payload.items() if k != "model"}
        return potential


def _training_dtype(config: TorchTrainingConfig, descriptor_dtype: torch.dtype) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}.get(
        config.precision, descriptor_dtype
    )


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
