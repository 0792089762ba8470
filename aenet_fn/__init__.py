"""aenet_fn: functional, torch.func-based ænet-type machine-learning interatomic potentials.

The core is pure functions over frozen ``attrs`` records (registered as pytrees):

>>> import aenet_fn as af
>>> params = af.ChebyshevParams(species=["Ti", "O"], rad_order=10, rad_cutoff=6.0,
...                             ang_order=3, ang_cutoff=3.5, min_cutoff=0.5)
"""

from aenet_fn.batch import Batch, collate
from aenet_fn.descriptor import (
    ChebyshevParams,
    DescriptorGraph,
    build_graph,
    features_from_graph,
    featurize,
)
from aenet_fn.neighbors import Neighbors, batch_neighbor_list, neighbor_list, pair_vectors
from aenet_fn.structure import Structure

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "ChebyshevParams",
    "DescriptorGraph",
    "Neighbors",
    "Structure",
    "__version__",
    "batch_neighbor_list",
    "build_graph",
    "collate",
    "features_from_graph",
    "featurize",
    "neighbor_list",
    "pair_vectors",
]
