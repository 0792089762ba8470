"""``aenet_fn.torch_training``: the ænet Python tools' training API over the functional core.

Change ``aenet`` to ``aenet_fn`` in the imports of existing scripts.
"""

from aenet_fn.core.structure import Structure
from aenet_fn.io.ase_io import convert_to_structures
from aenet_fn.io.train import TrainOut
from aenet_fn.torch_training.committee import (
    TorchCommitteeConfig,
    TorchCommitteeMemberResult,
    TorchCommitteePotential,
    TorchCommitteePredictResult,
    TorchCommitteeTrainResult,
)
from aenet_fn.torch_training.config import SGD, Adam, TorchTrainingConfig, TrainingMethod
from aenet_fn.torch_training.dataset import (
    CachedStructureDataset,
    StructureDataset,
    train_test_split,
    train_test_split_dataset,
)
from aenet_fn.torch_training.hdf5_dataset import HDF5StructureDataset
from aenet_fn.torch_training.trainer import TorchANNPotential

__all__ = [
    "SGD",
    "Adam",
    "CachedStructureDataset",
    "HDF5StructureDataset",
    "Structure",
    "StructureDataset",
    "TorchANNPotential",
    "TorchCommitteeConfig",
    "TorchCommitteeMemberResult",
    "TorchCommitteePotential",
    "TorchCommitteePredictResult",
    "TorchCommitteeTrainResult",
    "TorchTrainingConfig",
    "TrainOut",
    "TrainingMethod",
    "convert_to_structures",
    "train_test_split",
    "train_test_split_dataset",
]
