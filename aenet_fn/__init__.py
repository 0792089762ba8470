"""aenet_fn: functional, torch.func-based ænet-type machine-learning interatomic potentials.

The core is pure functions over frozen ``attrs`` records (registered as pytrees):

>>> import aenet_fn as af
>>> params = af.ChebyshevParams(species=["Ti", "O"], rad_order=10, rad_cutoff=6.0,
...                             ang_order=3, ang_cutoff=3.5, min_cutoff=0.5)
"""

from aenet_fn.core.batch import Batch, collate
from aenet_fn.core.descriptor import (
    ChebyshevParams,
    DescriptorGraph,
    build_graph,
    features_from_graph,
    featurize,
)
from aenet_fn.core.featurized import FeaturizedSet, featurize_structures
from aenet_fn.core.forces import EnergyForces, value_and_forces
from aenet_fn.core.minibatch import MiniBatch, take_structures
from aenet_fn.core.neighbors import Neighbors, batch_neighbor_list, neighbor_list, pair_vectors
from aenet_fn.core.network import NetworkParams, init_network
from aenet_fn.core.normalization import Normalization, fit_normalization
from aenet_fn.core.optim import AdamConfig, PlateauConfig, SGDConfig
from aenet_fn.core.potential import (
    Model,
    atomic_energies,
    energy,
    energy_and_forces,
    energy_forces_stress,
)
from aenet_fn.core.records import to
from aenet_fn.core.sampling import split_indices
from aenet_fn.core.structure import Structure
from aenet_fn.driver.checkpoint import CheckpointWriter, load_checkpoint, save_checkpoint
from aenet_fn.driver.seam import Speedups, prepare_speedups
from aenet_fn.driver.state import TrainConfig, TrainState, init_model, init_train_state
from aenet_fn.driver.step import evaluate, train_step
from aenet_fn.driver.train import TrainingDiverged, fit, run_epoch
from aenet_fn.io import read_structures, write_xsf
from aenet_fn.io.ascii_potential import read_aenet_ascii, write_aenet_ascii
from aenet_fn.io.program import export_program, save_program
from aenet_fn.speedups.force_jacobian import set_jacobian

__version__ = "0.1.0"

__all__ = [
    "AdamConfig",
    "Batch",
    "ChebyshevParams",
    "CheckpointWriter",
    "DescriptorGraph",
    "EnergyForces",
    "FeaturizedSet",
    "MiniBatch",
    "Model",
    "Neighbors",
    "NetworkParams",
    "Normalization",
    "PlateauConfig",
    "SGDConfig",
    "Speedups",
    "Structure",
    "TrainConfig",
    "TrainState",
    "TrainingDiverged",
    "__version__",
    "atomic_energies",
    "batch_neighbor_list",
    "build_graph",
    "collate",
    "energy",
    "energy_and_forces",
    "energy_forces_stress",
    "evaluate",
    "export_program",
    "features_from_graph",
    "featurize",
    "featurize_structures",
    "fit",
    "fit_normalization",
    "init_model",
    "init_network",
    "init_train_state",
    "load_checkpoint",
    "neighbor_list",
    "pair_vectors",
    "prepare_speedups",
    "read_aenet_ascii",
    "read_structures",
    "run_epoch",
    "save_checkpoint",
    "save_program",
    "set_jacobian",
    "split_indices",
    "take_structures",
    "to",
    "train_step",
    "value_and_forces",
    "write_aenet_ascii",
    "write_xsf",
]
