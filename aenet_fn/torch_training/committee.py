"""Committee facade with the ænet tools' names, over :mod:`aenet_fn.driver.committee`.

``TorchCommitteePotential.train`` resolves the split once, featurizes once, and trains every
member together with ``vmap`` (``execution="vmap"``, the default) or one after another
(``"sequential"``); either way each member gets its own seed (``base_seed + i`` or
``member_seeds``) and ends in the stable output layout::

    output_dir/committee_metadata.json
    output_dir/member_000/{model.pt, history.json, history.csv, summary.json}

Why one module of about 700 lines: the reference's ``TorchCommitteePotential`` is one class
(train, predict, save, load) with its configuration and result records; this module offers
exactly that, the work itself being the driver's.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pandas as pd
import torch

from aenet_fn.core.batch import collate
from aenet_fn.core.records import to
from aenet_fn.driver.committee import (
    check_shared_parts,
    committee_fit,
    committee_predict,
    init_committee,
    member_seeds,
)
from aenet_fn.driver.distributed import (
    World,
    agreed_seed,
    all_gather_objects,
    current_world,
    members_of,
)
from aenet_fn.driver.progress import EpochProgress
from aenet_fn.driver.seam import prepare_speedups
from aenet_fn.driver.train import fit
from aenet_fn.io.ase_io import convert_to_structures
from aenet_fn.io.atomic import atomic_write_text
from aenet_fn.io.predict import PredictOut
from aenet_fn.io.strict_json import strict_json_loads
from aenet_fn.io.train import TrainOut, read_history, write_history
from aenet_fn.mlip.ensemble import (
    AenetEnsembleResult,
    normalize_ensemble_members,
    validate_aggregation_mode,
)
from aenet_fn.torch_featurize.chebyshev import ChebyshevDescriptor
from aenet_fn.torch_training.config import TorchTrainingConfig
from aenet_fn.torch_training.sources import (
    TrainingSources,
    check_reference_species,
    training_dtype,
)
from aenet_fn.torch_training.trainer import TorchANNPotential

EXECUTION_MODES = ("vmap", "sequential")


@dataclass
class TorchCommitteeConfig:
    """How to train a committee.

    Attributes:
        num_members: number of members (>= 1).
        base_seed: member ``i`` uses seed ``base_seed + i`` (default: the training seed, else 0).
        member_seeds: explicit distinct seeds, one per member (overrides base_seed).
        max_parallel: accepted for compatibility (members train together by vmap instead).
        devices: accepted for compatibility; all members train on one device.
        output_dir: where the committee is written (default ``./committee_run``).
        execution: ``"vmap"`` (members stacked, one vmapped step) or ``"sequential"``.
        shared_batches: with vmap, let every member see the same batches (faster with forces;
            members still differ by initialisation).
    """

    num_members: int
    base_seed: int | None = None
    member_seeds: Sequence[int] | None = None
    max_parallel: int = 1
    devices: Sequence[str] | None = None
    output_dir: str | os.PathLike | None = None
    execution: str = "vmap"
    shared_batches: bool = False

    def __post_init__(self) -> None:
        if (
            isinstance(self.num_members, bool)
            or not isinstance(self.num_members, int)
            or self.num_members < 1
        ):
            raise ValueError(f"num_members must be an integer >= 1, got {self.num_members!r}")
        if self.base_seed is not None and (
            isinstance(self.base_seed, bool) or not isinstance(self.base_seed, int)
        ):
            raise ValueError(f"base_seed must be an integer, got {self.base_seed!r}")
        if self.member_seeds is not None:
            member_seeds(self.num_members, seeds=self.member_seeds)
        if self.max_parallel < 1:
            raise ValueError(f"max_parallel must be >= 1, got {self.max_parallel}")
        if self.devices is not None and len(self.devices) == 0:
            raise ValueError("devices must not be an empty list")
        if self.execution not in EXECUTION_MODES:
            raise ValueError(f"execution must be one of {EXECUTION_MODES}, got {self.execution!r}")
        self.output_dir = Path("committee_run" if self.output_dir is None else self.output_dir)

    def seeds(self, training_seed: int | None) -> list[int]:
        """The members' seeds."""
        base = self.base_seed if self.base_seed is not None else (training_seed or 0)
        return member_seeds(self.num_members, base, self.member_seeds)


@dataclass
class TorchCommitteeMemberResult:
    """One trained member: where its files are and its final metrics."""

    member_index: int
    seed: int
    split_seed: int | None
    member_dir: Path
    model_path: Path
    history_json_path: Path
    history_csv_path: Path
    summary_path: Path
    metrics: dict[str, float]
    status: str = "completed"
    error: str | None = None

    @property
    def stats(self) -> dict[str, float]:
        """Finite metrics."""
        return {
            k: v
            for k, v in self.metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(v)
        }

    @property
    def trainout(self) -> TrainOut | None:
        """The member's TrainOut, rebuilt from its history.json."""
        if not self.history_json_path.is_file():
            return None
        return TrainOut.from_torch_history(read_history(self.history_json_path))

    def to_metadata(self) -> dict[str, Any]:
        """A JSON-ready description."""
        return {
            "member_index": self.member_index,
            "seed": self.seed,
            "split_seed": self.split_seed,
            "member_dir": str(self.member_dir),
            "model_path": str(self.model_path),
            "history_json_path": str(self.history_json_path),
            "history_csv_path": str(self.history_csv_path),
            "summary_path": str(self.summary_path),
            "status": self.status,
            "metrics": _json_ready(self.metrics),
            "error": self.error,
        }


@dataclass
class TorchCommitteeTrainResult:
    """Result of :meth:`TorchCommitteePotential.train`."""

    output_dir: Path
    metadata_path: Path
    members: list[TorchCommitteeMemberResult]
    execution_mode: str

    @property
    def completed_members(self) -> list[TorchCommitteeMemberResult]:
        """Members that finished."""
        return [m for m in self.members if m.status == "completed"]

    @property
    def failed_members(self) -> list[TorchCommitteeMemberResult]:
        """Members that failed."""
        return [m for m in self.members if m.status != "completed"]

    @property
    def trainouts(self) -> list[TrainOut | None]:
        """Each member's TrainOut."""
        return [m.trainout for m in self.members]

    @property
    def stats(self) -> dict[str, dict[str, float]]:
        """Per metric over completed members: mean, std (population), min, max, n."""
        table: dict[str, list[float]] = {}
        for member in self.completed_members:
            for key, value in member.stats.items():
                table.setdefault(key, []).append(float(value))
        return {
            key: {
                "mean": float(np.mean(v)),
                "std": float(np.std(v)),
                "min": float(np.min(v)),
                "max": float(np.max(v)),
                "n": len(v),
            }
            for key, v in table.items()
        }

    def to_dataframe(self) -> pd.DataFrame:
        """One row per member."""
        return pd.DataFrame(
            [
                {
                    "member_index": m.member_index,
                    "seed": m.seed,
                    "status": m.status,
                    "model_path": str(m.model_path),
                    "error": m.error,
                    **m.metrics,
                }
                for m in self.members
            ]
        )

    def __str__(self) -> str:
        lines = ["Training statistics:"]
        lines += [f"{k}: {v['mean']:.6g} ± {v['std']:.3g}" for k, v in self.stats.items()]
        lines += [
            f"completed members: {len(self.completed_members)}",
            f"failed members: {len(self.failed_members)}",
            f"execution_mode: {self.execution_mode}",
            f"output_dir: {self.output_dir}",
        ]
        return "\n".join(lines)


@dataclass
class TorchCommitteePredictResult:
    """List-like committee predictions: one :class:`AenetEnsembleResult` per structure, plus
    each member's :class:`PredictOut` in ``member_outputs``."""

    predictions: list[AenetEnsembleResult]
    member_outputs: list[PredictOut]
    identifiers: list[str | None] = field(default_factory=list)
    source_indices: list[int] | None = None

    def __len__(self) -> int:
        return len(self.predictions)

    def __iter__(self) -> Iterator[AenetEnsembleResult]:
        return iter(self.predictions)

    def __getitem__(self, index: int) -> AenetEnsembleResult:
        return self.predictions[index]

    @property
    def energy_mean(self) -> np.ndarray:
        """Mean energies (eV)."""
        return np.array([p.energy_mean for p in self.predictions])

    @property
    def energy_std(self) -> np.ndarray:
        """Energy standard deviations over members (eV)."""
        return np.array([p.energy_std for p in self.predictions])

    @property
    def max_force_uncertainty(self) -> np.ndarray:
        """Per structure, the largest atomic force uncertainty (eV/Å; NaN without forces)."""
        return np.array(
            [
                np.nan if p.force_uncertainty is None else p.force_uncertainty.max()
                for p in self.predictions
            ]
        )

    def to_dataframe(self) -> pd.DataFrame:
        """One row per structure with energies and uncertainties."""
        return pd.DataFrame(
            {
                "index": range(len(self)),
                "source_index": self.source_indices or list(range(len(self))),
                "identifier": self.identifiers or [None] * len(self),
                "energy": [p.energy for p in self.predictions],
                "energy_mean": self.energy_mean,
                "energy_std": self.energy_std,
                "member_energies": [p.member_energies.tolist() for p in self.predictions],
                "max_force_uncertainty": self.max_force_uncertainty,
                "num_members": [p.num_members for p in self.predictions],
            }
        )

    def sort_by(self, column: str = "energy_std", *, ascending: bool = False) -> pd.DataFrame:
        """The table sorted by ``column``."""
        return self.to_dataframe().sort_values(column, ascending=ascending)

    def top_uncertain(self, n: int = 10, *, metric: str = "energy_std") -> pd.DataFrame:
        """The ``n`` most uncertain structures by ``metric``."""
        return self.sort_by(metric).head(n)


class TorchCommitteePotential:
    """A committee of :class:`TorchANNPotential` members sharing descriptor and split."""

    def __init__(
        self, arch: Mapping[str, Sequence[tuple[int, str]]], descriptor: ChebyshevDescriptor
    ):
        TorchANNPotential(arch, descriptor)  # validates arch against the descriptor
        self.arch = {s: list(layers) for s, layers in arch.items()}
        self.descriptor = descriptor
        self.members: list[TorchANNPotential] = []

    def train(
        self,
        structures: Any = None,
        dataset: Any = None,
        train_dataset: Any = None,
        test_dataset: Any = None,
        config: TorchTrainingConfig | None = None,
        committee_config: TorchCommitteeConfig | None = None,
    ) -> TorchCommitteeTrainResult:
        """Train the committee and write the output layout. Data sources as
        :meth:`TorchANNPotential.train`: ``train_dataset`` (+ ``test_dataset``), ``dataset``
        (split by ``testpercent``/``split_seed`` unless ``test_dataset`` is given) or
        ``structures``; the split is resolved once and shared by every member, and prebuilt
        datasets own their ``atomic_energies``."""
        config = TorchTrainingConfig() if config is None else config
        committee_config = committee_config or TorchCommitteeConfig(num_members=2)
        config.validate()
        check_reference_species(
            config.atomic_energies, self.descriptor.species, "TorchTrainingConfig.atomic_energies"
        )
        world = current_world()
        split_seed = agreed_seed(config.split_seed, world)
        config = copy.copy(config)  # the caller's config keeps its own split_seed
        config.split_seed = split_seed
        dtype, forces = training_dtype(config, self.descriptor.dtype), config.force_weight > 0
        sources = (structures, dataset, train_dataset, test_dataset)
        data = TrainingSources(self.descriptor).training_data(
            sources, config, dtype, forces, "TorchCommitteePotential.train"
        )
        train, test = data.train, data.test
        params = self.descriptor.params
        seeds = committee_config.seeds(agreed_seed(config.seed, world))
        mine = members_of(len(seeds), world)
        core = config.to_train_config()
        options = {
            "atomic_energies": data.atomic_energies,
            "normalize_features": config.normalize_features,
            "normalize_energy": config.normalize_energy,
            "feature_stats": config.feature_stats,
            "energy_shift": config.E_shift,
            "energy_scaling": config.E_scaling,
        }
        my_seeds = [seeds[i] for i in mine]
        states = (
            init_committee(
                params, self.arch, train, core, my_seeds, committee_config.shared_batches, **options
            )
            if my_seeds
            else ()
        )
        progress = EpochProgress(core.epochs, disable=not config.show_progress or not world.is_main)
        try:
            if committee_config.execution == "vmap" and states:
                states = committee_fit(
                    states, train, test, core, [lambda members: progress(members[0])]
                )
            else:  # the members share the splits: their speed-ups are prepared once
                speedups = (
                    prepare_speedups(states[0], train, test, core, World()) if states else None
                )
                states = tuple(
                    _member_outcome(
                        state, train, test, attrs.evolve(core, seed=state_seed), speedups
                    )
                    for state, state_seed in zip(states, my_seeds)
                )
        finally:
            progress.close()
            data.close()
        return self._write(states, mine, seeds, split_seed, config, committee_config, world)

    def _write(
        self, states, mine, seeds, split_seed, config, committee_config, world
    ) -> TorchCommitteeTrainResult:
        """Write this process's members (``mine``: their indices), then, on rank 0, the
        committee metadata over every process's members."""
        output = Path(committee_config.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        written, results = {}, []
        for index, state in zip(mine, states):
            seed = seeds[index]
            member_dir = _member_dir(output, index)
            paths = [member_dir / name for name in _MEMBER_FILES]
            if isinstance(state, Exception):  # recorded, not written: the others are kept
                failure = ({}, "failed", repr(state))
                results.append(
                    TorchCommitteeMemberResult(
                        index, seed, split_seed, member_dir, *paths, *failure
                    )
                )
                continue
            member = TorchANNPotential(self.arch, self.descriptor)
            member.model, member.history, member._training_config = (
                to(state.model, self.descriptor.device),
                state.history,
                config,
            )
            member.best_val = None if state.best_epoch < 0 else state.best_monitor
            model_path, _, _, summary_path = paths
            member_dir.mkdir(parents=True, exist_ok=True)
            member.save(
                model_path,
                {
                    "committee_member_index": index,
                    "committee_seed": seed,
                    "committee_split_seed": split_seed,
                },
            )
            write_history(state.history, member_dir)  # history.json, history.csv
            metrics = dict(TrainOut.from_torch_history(state.history).stats)
            metrics["best_val_loss"] = member.best_val if member.best_val is not None else math.nan
            metrics["epochs_recorded"] = len(state.history)
            atomic_write_text(summary_path, json.dumps(_json_ready(metrics), indent=2))
            written[index] = member
            results.append(
                TorchCommitteeMemberResult(index, seed, split_seed, member_dir, *paths, metrics)
            )
        results = sorted(all_gather_objects(results, world), key=lambda r: r.member_index)
        completed = [r.member_index for r in results if r.status == "completed"]
        self.members = [
            written[r.member_index]
            if r.member_index in written
            else TorchANNPotential.from_file(r.model_path)
            for r in results
            if r.status == "completed"
        ]
        failures = [
            {"member_index": r.member_index, "seed": r.seed, "error": r.error}
            for r in results
            if r.status != "completed"
        ]
        metadata_path = output / "committee_metadata.json"
        metadata = {
            "schema_version": "1.0",
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "execution_mode": committee_config.execution,
            "output_dir": str(output),
            "committee_config": {
                "num_members": committee_config.num_members,
                "base_seed": committee_config.base_seed,
                "member_seeds": seeds,
                "execution": committee_config.execution,
                "shared_batches": committee_config.shared_batches,
            },
            "architecture": {
                s: [list(layer) for layer in layers] for s, layers in self.arch.items()
            },
            "descriptor_config": repr(self.descriptor),
            "members": [r.to_metadata() for r in results],
            "failures": failures,
        }
        if world.is_main:
            atomic_write_text(metadata_path, json.dumps(_json_ready(metadata), indent=2))
        if world.size > 1:
            torch.distributed.barrier()
        if failures:
            described = "; ".join(f"member {f['member_index']}: {f['error']}" for f in failures)
            raise RuntimeError(
                f"{len(failures)} of {len(results)} committee members failed ({described}); "
                f"the {len(completed)} completed members and {metadata_path.name} are in {output}"
            )
        return TorchCommitteeTrainResult(output, metadata_path, results, committee_config.execution)

    @staticmethod
    def member_model_paths(directory: str | os.PathLike) -> list[Path]:
        """The members' model files of a committee directory (from its
        committee_metadata.json: ``member_XXX/model.pt`` for each listed member)."""
        metadata_path = Path(directory) / "committee_metadata.json"
        if not metadata_path.is_file():
            raise FileNotFoundError(f"{metadata_path}: no committee metadata")
        try:
            members = strict_json_loads(metadata_path.read_text())["members"]
            indices = [
                int(m["member_index"])
                for m in members
                if m.get("status", "completed") == "completed"
            ]
        except (KeyError, ValueError, TypeError, AttributeError) as error:
            raise ValueError(f"{metadata_path}: corrupt committee metadata ({error})") from error
        repeated = sorted({i for i in indices if indices.count(i) > 1})
        if repeated:
            raise ValueError(f"{metadata_path}: member {repeated[0]} is listed more than once")
        return [_member_dir(Path(directory), i) / _MEMBER_FILES[0] for i in indices]

    @classmethod
    def from_files(
        cls, model_paths: Sequence[str | os.PathLike], device: Any = None
    ) -> TorchCommitteePotential:
        """A committee from member model files; they must share architecture, descriptor and
        normalisation (a missing or corrupt file raises an error naming it)."""
        members = [TorchANNPotential.from_file(path, device) for path in model_paths]
        return cls._of_members(members, model_paths, "no member model files given")

    @classmethod
    def from_aenet_ascii(
        cls,
        member_paths: Sequence[Any],
        device: Any = None,
        dtype: torch.dtype = torch.float64,
    ) -> TorchCommitteePotential:
        """A committee from ænet ``.nn.ascii`` potentials, one entry of ``member_paths`` per
        member (a folder, its files or a species → file mapping, as
        :meth:`TorchANNPotential.from_aenet_ascii` takes); the members must share
        architecture, descriptor and normalisation."""
        members = [TorchANNPotential.from_aenet_ascii(p, device, dtype) for p in member_paths]
        return cls._of_members(members, member_paths, "no member potentials given")

    @classmethod
    def _of_members(
        cls, members: list[TorchANNPotential], sources: Sequence[Any], empty: str
    ) -> TorchCommitteePotential:
        """The committee of loaded ``members`` (read from ``sources``, named in errors)."""
        if not members:
            raise ValueError(empty)
        first = members[0]
        for source, member in zip(sources, members):
            if member.arch != first.arch or member.descriptor.params != first.descriptor.params:
                raise ValueError(
                    f"{source}: its architecture or descriptor differs from the first member's"
                )
        check_shared_parts([m.model for m in members])
        committee = cls(first.arch, first.descriptor)
        committee.members = members
        return committee

    @classmethod
    def from_directory(cls, path: str | os.PathLike, device: Any = None) -> TorchCommitteePotential:
        """A committee from an output directory written by :meth:`train`."""
        return cls.from_files(cls.member_model_paths(path), device)

    def predict(
        self,
        structures: Any,
        eval_forces: bool = False,
        config: Any = None,
        aggregation: str = "mean",
        reference_member: int = 0,
    ) -> TorchCommitteePredictResult:
        """Committee predictions: all members in one vmapped pass per batch."""
        if not self.members:
            raise RuntimeError("the committee has not been trained or loaded")
        validate_aggregation_mode(aggregation, reference_member, len(self.members))
        structures = convert_to_structures(structures)
        models = [m.model for m in self.members]
        batch = collate(
            structures, species=models[0].descriptor.species, dtype=self.descriptor.dtype
        )
        prediction = committee_predict(models, batch, eval_forces=eval_forces)
        energies = prediction.member_energies.detach().numpy()
        forces = (
            None if prediction.member_forces is None else prediction.member_forces.detach().numpy()
        )
        index = batch.structure_index.numpy()
        results = [
            AenetEnsembleResult.from_member_predictions(
                energies[:, k],
                None if forces is None else forces[:, index == k],
                aggregation,
                reference_member,
            )
            for k in range(len(structures))
        ]
        reference = models[0].normalization.atomic_energies  # batch species = model species
        offsets = torch.zeros(len(structures), dtype=reference.dtype)
        offsets = offsets.index_add(
            0, batch.structure_index, reference[batch.species_index]
        ).numpy()
        member_outputs = [
            PredictOut(
                coords=[s.positions.numpy().copy() for s in structures],
                forces=[None] * len(structures)
                if forces is None
                else [forces[m, index == k] for k in range(len(structures))],
                atom_types=[list(s.species) for s in structures],
                atom_energies=[None] * len(structures),
                cohesive_energy=(energies[m] - offsets).tolist(),
                total_energy=energies[m].tolist(),
                structure_paths=[s.name for s in structures],
            )
            for m in range(len(models))
        ]
        return TorchCommitteePredictResult(results, member_outputs, [s.name for s in structures])

    def predict_dataset(
        self,
        dataset: Any,
        eval_forces: bool = False,
        config: Any = None,
        aggregation: str = "mean",
        reference_member: int = 0,
    ) -> TorchCommitteePredictResult:
        """:meth:`predict` for a dataset: each member's
        :meth:`TorchANNPotential.predict_dataset` (cached features for energies), combined per
        structure. ``source_indices`` give each structure's index in the root dataset of
        torch ``Subset`` chains."""
        if not self.members:
            raise RuntimeError("the committee has not been trained or loaded")
        validate_aggregation_mode(aggregation, reference_member, len(self.members))
        outputs = [m.predict_dataset(dataset, eval_forces, config) for m in self.members]
        energies = np.array([out.total_energy for out in outputs])
        results = [
            AenetEnsembleResult.from_member_predictions(
                energies[:, k],
                np.stack([out.forces[k] for out in outputs]) if eval_forces else None,
                aggregation,
                reference_member,
            )
            for k in range(energies.shape[1])
        ]
        return TorchCommitteePredictResult(
            results, outputs, list(outputs[0].structure_paths), _source_indices(dataset)
        )

    def to_aenet_ascii(
        self,
        output_dir: str | os.PathLike,
        prefix: str = "potential",
        descriptor_stats: Mapping[str, Any] | None = None,
        structures: Any = None,
        compute_stats: bool = True,
    ) -> list[dict[str, str]]:
        """Write every member as ``output_dir/member_XXX/{prefix}.{SPECIES}.nn.ascii`` (see
        :meth:`TorchANNPotential.to_aenet_ascii`); returns one ``{species: path}`` manifest
        per member."""
        if not self.members:
            raise RuntimeError("the committee has not been trained or loaded")
        output = Path(output_dir)
        manifests = []
        for index, member in enumerate(self.members):
            paths = member.to_aenet_ascii(
                _member_dir(output, index), prefix, descriptor_stats, structures, compute_stats
            )
            manifests.append(dict(zip(member.descriptor.species, map(str, paths))))
        return normalize_ensemble_members(manifests)


def _member_dir(output: Path, index: int) -> Path:
    """Member ``index``'s folder of a committee's output directory."""
    return output / f"member_{index:03d}"


_MEMBER_FILES = ("model.pt", "history.json", "history.csv", "summary.json")
"""A member folder's files, in the order of :class:`TorchCommitteeMemberResult`'s paths (the
history files are those :func:`~aenet_fn.io.train.write_history` names)."""


def _member_outcome(state, train, test, config, speedups) -> Any:
    """One sequential member's trained state, or the exception that stopped it (so that one
    failing member does not lose the others; :meth:`TorchCommitteePotential.train` reports
    the failures after writing everything else)."""
    try:
        return fit(state, train, test, config, world=World(), speedups=speedups)
    except Exception as error:  # any failure of one member is recorded
        return error


def _source_indices(dataset: Any) -> list[int]:
    """Index of each of ``dataset``'s items in the root dataset of a ``Subset`` chain."""
    indices = list(range(len(dataset)))
    while isinstance(dataset, torch.utils.data.Subset):
        indices = [int(dataset.indices[i]) for i in indices]
        dataset = dataset.dataset
    return indices


def _json_ready(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return _json_ready(value.item())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value
