"""Records ↔ plain trees of tensors, numbers, strings, lists and dicts.

:func:`to_tree` turns any nesting of ``aenet_fn`` records (frozen attrs classes), tuples, lists,
dicts, tensors and plain values into a tree that ``torch.save`` stores and
``torch.load(..., weights_only=True)`` reads back without unpickling code. :func:`from_tree`
rebuilds the records, accepting only the record classes of ``aenet_fn`` (those made with
``pytree_record``), by name: a file can never make the
loader import or run anything else.

Records are saved under stable names (``aenet_fn.TrainConfig``,
:func:`~aenet_fn.core.records.saved_name`) that do not depend on the module defining the class.
Files written before that (up to commit 90a819d) named records by module path; those names
are read through :data:`MODULE_PATH_NAMES`, which stays as it is when modules move.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from aenet_fn.core.records import RECORD_TYPES as _REGISTRY
from aenet_fn.core.records import saved_name

MODULE_PATH_NAMES = {
    f"aenet_fn.{module}.{name}": f"aenet_fn.{name}"
    for module, names in {
        "batch": ("Batch",),
        "descriptor": ("ChebyshevParams", "DescriptorGraph"),
        "energy_gradient": ("EnergyPlan", "EnergyTable"),
        "featurized": ("FeaturizedSet", "HostLayout", "MiniBatch"),
        "force_jacobian": ("BatchJacobian", "SetJacobian", "StackedJacobians"),
        "forces": ("EnergyForces",),
        "local_derivatives": ("LocalDerivatives",),
        "loss": ("ErrorSums",),
        "neighbors": ("Neighbors",),
        "network": ("NetworkParams",),
        "normalization": ("Normalization",),
        "optim": (
            "AdamConfig",
            "AdamState",
            "PlateauConfig",
            "PlateauState",
            "SGDConfig",
            "SGDState",
        ),
        "position_jacobian": ("PairBlocks", "PositionJacobian"),
        "potential": ("Model",),
        "sampling": ("SamplerState",),
        "structure": ("Structure",),
        "structure_jacobian": ("StructureBlocks", "StructureJacobian"),
        "train": ("TrainConfig", "TrainState"),
    }.items()
    for name in names
}
"""The record names of files written up to commit 90a819d (``module.class``), and the stable
names they stand for. A fixed table: it must not follow later moves of the classes."""

_RECORD = "__record__"
_TUPLE = "__tuple__"


def to_tree(value: Any) -> Any:
    """A plain tree (dicts, lists, tensors, str/int/float/bool/None) describing ``value``."""
    if attrs.has(type(value)):
        name = saved_name(type(value))
        if name not in _REGISTRY:
            raise TypeError(f"to_tree: record type {name} is not registered for serialization")
        fields = {f.name: to_tree(getattr(value, f.name)) for f in attrs.fields(type(value))}
        return {_RECORD: name, "fields": fields}
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, tuple):
        return {_TUPLE: [to_tree(v) for v in value]}
    if isinstance(value, list):
        return [to_tree(v) for v in value]
    if isinstance(value, dict):
        if any(not isinstance(k, str) for k in value):
            raise TypeError("to_tree: dictionary keys must be strings")
        return {k: to_tree(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"to_tree: cannot serialise a {type(value).__name__}")


def from_tree(tree: Any) -> Any:
    """Rebuild what :func:`to_tree` described. Unknown record names raise ``ValueError``."""
    if isinstance(tree, dict):
        if _RECORD in tree:
            name = tree[_RECORD]
            cls = _REGISTRY.get(MODULE_PATH_NAMES.get(name, name))
            if cls is None:
                raise ValueError(f"from_tree: unknown record type {name!r} in the file")
            return cls(**{k: from_tree(v) for k, v in tree["fields"].items()})
        if _TUPLE in tree:
            return tuple(from_tree(v) for v in tree[_TUPLE])
        return {k: from_tree(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [from_tree(v) for v in tree]
    return tree
