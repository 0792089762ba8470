"""Property-based testing of potentials: valid random structures, symmetry operations, and
checks of the physics any potential must obey.

- :mod:`~aenet_fn.testing.strategies` (needs hypothesis: ``pip install aenet_fn[testing]``):
  ``structures`` (bulk, slab, wire, molecule; several species; a minimum distance guaranteed by
  construction), ``rotations``, ``translations``, ``lattice_shifts``, ``supercells``,
  ``strains``, ``permutations_of``.
- Checks, each raising an ``AssertionError`` with the worst case: ``check_rotation_invariance``,
  ``check_translation_invariance``, ``check_permutation_invariance``,
  ``check_rewrapping_invariance``, ``check_extensivity``, ``check_forces`` (finite
  differences), ``check_stress`` (strain derivative), ``check_energy_conservation`` (short NVE).
  They take an ASE calculator, a ``Model``, ``TorchANNPotential``, ``TorchCommitteePotential``,
  a saved model's path or a function of a :class:`~aenet_fn.core.structure.Structure`.
- :mod:`~aenet_fn.testing.devices`: ``forbid_host_sync`` and ``count_host_syncs``, a check
  without a GPU that a step never reads device data on the host, never makes data-dependent
  shapes and never mixes devices.
- :mod:`~aenet_fn.testing.transforms`: the operations themselves (``rotate``, ``translate``,
  ``permute``, ``shift_images``, ``repeat``, ``strain``) and :func:`random_structure` for
  deterministic structures without hypothesis.
"""

from aenet_fn.testing.checks import (
    check_energy_conservation,
    check_extensivity,
    check_forces,
    check_permutation_invariance,
    check_rewrapping_invariance,
    check_rotation_invariance,
    check_stress,
    check_translation_invariance,
)
from aenet_fn.testing.construction import PERIODICITIES, random_structure
from aenet_fn.testing.devices import HostSyncError, count_host_syncs, forbid_host_sync
from aenet_fn.testing.evaluation import Evaluation, as_evaluator

_STRATEGIES = (
    "lattice_shifts",
    "permutations_of",
    "rotations",
    "strains",
    "structures",
    "supercells",
    "translations",
)


def __getattr__(name: str):
    """The strategies, imported on first use (hypothesis is an optional dependency)."""
    if name in _STRATEGIES:
        try:
            from aenet_fn.testing import strategies
        except ModuleNotFoundError as error:
            raise ImportError(
                f"aenet_fn.testing.{name} needs hypothesis: pip install 'aenet_fn[testing]'"
            ) from error
        return getattr(strategies, name)
    raise AttributeError(f"module 'aenet_fn.testing' has no attribute {name!r}")


__all__ = [
    "PERIODICITIES",
    "Evaluation",
    "HostSyncError",
    "as_evaluator",
    "check_energy_conservation",
    "check_extensivity",
    "check_forces",
    "check_permutation_invariance",
    "check_rewrapping_invariance",
    "check_rotation_invariance",
    "check_stress",
    "check_translation_invariance",
    "count_host_syncs",
    "forbid_host_sync",
    "random_structure",
    *_STRATEGIES,
]
