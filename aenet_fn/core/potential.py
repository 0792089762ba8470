"""The energy model: descriptor + per-species networks + normalisation, as pure functions.

``E_b = Σ_{a ∈ b} [ NN_{s(a)}(Ĝ_a) / E_scaling + E_shift + E_atom(s(a)) ]`` (eV), forces
``F = −∂E/∂r`` (eV/Å) by ``torch.func`` (spec §4.4).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch
from torch.func import grad

from aenet_fn.core.batch import Batch
from aenet_fn.core.descriptor import (
    ChebyshevParams,
    DescriptorGraph,
    build_graph,
    features_from_graph,
)
from aenet_fn.core.forces import EnergyForces, symmetric_stress, value_and_forces
from aenet_fn.core.local_derivatives import PositionMap
from aenet_fn.core.network import NetworkParams, atomic_outputs, parameter_count
from aenet_fn.core.normalization import Normalization
from aenet_fn.core.records import pytree_record


@pytree_record
@attrs.frozen(eq=False)
class Model:
    """A complete potential.

    Attributes:
        descriptor: the Chebyshev descriptor (its species order is the model's).
        network: one MLP per species (``network.species == descriptor.species``).
        normalization: feature and energy normalisation, atomic reference energies.
    """

    descriptor: ChebyshevParams
    network: NetworkParams
    normalization: Normalization

    def __attrs_post_init__(self) -> None:
        if self.network.species != self.descriptor.species:
            raise ValueError(
                f"network species {list(self.network.species)} differ from the descriptor's "
                f"{list(self.descriptor.species)}"
            )
        if self.network.n_inputs != self.descriptor.n_features:
            raise ValueError(
                f"networks take {self.network.n_inputs} inputs; the descriptor gives "
                f"{self.descriptor.n_features} features"
            )


def with_values(model: Model, values: torch.Tensor) -> Model:
    """``model`` with network parameters ``values`` ``[P]``."""
    return attrs.evolve(model, network=attrs.evolve(model.network, values=values))


TRAINABLE_NORMALIZATION = ("feature_mean", "feature_std", "energy_shift", "energy_scaling")
"""The normalisation's tensors :func:`trainable` hands out when asked."""


def trainable(
    model: Model, normalization: bool = False
) -> tuple[dict[str, torch.Tensor], Callable[[dict[str, torch.Tensor]], Model]]:
    """Split ``model`` into what a custom loop trains and the rest (optax ``masked`` style):
    ``(parameters, rebuild)``, where ``parameters`` is ``{"network": values [P]}`` and, with
    ``normalization``, the feature mean and std ``[M, F]`` (per species) and the energy shift
    and scaling;
    ``rebuild(parameters)`` is ``model`` with them put back. Everything not handed out (the
    normalisation by default, the atomic reference energies, the descriptor) stays frozen:
    ``torch.func.grad`` of ``loss(rebuild(p))`` over ``p`` never trains it by accident."""
    parameters = {"network": model.network.values}
    if normalization:
        norm = model.normalization
        parameters.update({name: getattr(norm, name) for name in TRAINABLE_NORMALIZATION})

    def rebuild(values: dict[str, torch.Tensor]) -> Model:
        rebuilt = with_values(model, values["network"])
        changed = {k: v for k, v in values.items() if k in TRAINABLE_NORMALIZATION}
        if changed:
            scaled = attrs.evolve(rebuilt.normalization, **changed)
            rebuilt = attrs.evolve(rebuilt, normalization=scaled)
        return rebuilt

    return parameters, rebuild


def check_model_values(model: Model, source: str) -> None:
    """Refuse a (loaded) ``model`` whose flat parameters do not fit its architecture or whose
    parameters or normalisation are not finite (``feature_std`` may be ``+inf``: a feature
    switched off, as ænet files mark constant features), or whose ``feature_std`` is negative;
    ``source`` (a file) names it in the message."""
    expected = sum(parameter_count(sizes) for sizes in model.network.sizes)
    values = model.network.values
    if values.ndim != 1 or values.numel() != expected:
        raise ValueError(
            f"{source}: the networks need {expected} parameters, found a tensor of shape "
            f"{tuple(values.shape)}"
        )
    norm = model.normalization
    tensors = {"network parameters": values}
    tensors.update({f.name: getattr(norm, f.name) for f in attrs.fields(type(norm))})
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        allowed = torch.isfinite(tensor)
        if name == "feature_std":
            allowed = (allowed | (tensor == math.inf)) & ~(tensor < 0)
        if not bool(allowed.all()):
            rule = " (or +inf: switched off) and >= 0" if name == "feature_std" else ""
            raise ValueError(f"{source}: the model's {name} are not all finite{rule}")


def atomic_energies_from_features(
    model: Model,
    features: torch.Tensor,
    species_index: torch.Tensor,
    species_blocks: Sequence[int] | None = None,
) -> torch.Tensor:
    """``[N]`` atomic energies (eV, float64) from raw features ``[N, F]``; ``species_index`` in
    model order (``species_blocks``: see :func:`~aenet_fn.core.network.atomic_outputs`). Includes
    the energy shift and the atomic reference energy of each atom. The networks run in the
    features' dtype; their outputs are scaled and referenced in float64."""
    norm = model.normalization
    normalized = norm.normalize_features(features, species_index)
    outputs = atomic_outputs(model.network, normalized, species_index, species_blocks)
    outputs = outputs.to(norm.atomic_energies.dtype)
    return outputs / norm.energy_scaling + norm.energy_shift + norm.atomic_energies[species_index]


def graph_atomic_energies(
    model: Model, features: torch.Tensor, graph: DescriptorGraph
) -> torch.Tensor:
    """``[N]`` atomic energies (eV) of the atoms of ``graph`` (built for ``model.descriptor``)
    from their raw features ``[N, F]``; each species' network runs on the static slice of the
    graph's species grouping, so the step has no data-dependent shapes."""
    if graph.species_blocks is None:
        return atomic_energies_from_features(model, features, graph.species)
    order = graph.by_species
    grouped = atomic_energies_from_features(
        model, features[order], graph.species[order], graph.species_blocks
    )
    return grouped[..., torch.argsort(order)]


def sum_by_structure(
    atomic: torch.Tensor, structure_index: torch.Tensor, n_structures: int
) -> torch.Tensor:
    """``[B]`` sums of per-atom values ``[N]`` over the atoms of each structure (``[..., B]``
    from ``[..., N]``: members; ``structure_index`` ``[N]``, or ``[M, N]`` for stacked
    batches)."""
    sums = atomic.new_zeros(*atomic.shape[:-1], n_structures)
    if structure_index.ndim > 1:  # stacked batches: one index row per member
        index = structure_index.reshape(
            structure_index.shape[0], *([1] * (atomic.ndim - 2)), -1
        ).expand(atomic.shape)
        return sums.scatter_add(-1, index, atomic)
    return sums.index_add(-1, structure_index, atomic)


def atomic_energies(
    model: Model, batch: Batch, graph: DescriptorGraph | None = None
) -> torch.Tensor:
    """``[N]`` energy of each atom (eV); they sum to the structure energies. ``graph``: from
    ``build_graph(model.descriptor, batch)`` (built when not given)."""
    graph = build_graph(model.descriptor, batch) if graph is None else graph
    features = features_from_graph(
        model.descriptor, batch.positions, batch.cells, batch.structure_index, graph
    )
    return graph_atomic_energies(model, features, graph)


def energy(model: Model, batch: Batch, graph: DescriptorGraph | None = None) -> torch.Tensor:
    """``[B]`` total energy of each structure (eV)."""
    atomic = atomic_energies(model, batch, graph)
    return sum_by_structure(atomic, batch.structure_index, batch.n_structures)


def energy_forces_stress(
    model: Model,
    batch: Batch,
    graph: DescriptorGraph | None = None,
    *,
    compute_stress: bool = False,
) -> EnergyForces:
    """Energies ``[B]`` (eV), forces ``[N, 3]`` (eV/Å) and optionally the stress ``[B, 3, 3]``
    (eV/Å³, NaN for non-periodic structures), by ``torch.func`` through the descriptor.

    ``graph`` (from ``build_graph(model.descriptor, batch)``; built when not given) holds
    everything data-dependent: with it given, the evaluation reads nothing back to the host
    and makes no data-dependent shape (an MD step that reuses its graph runs on a GPU without
    stalls)."""
    graph = build_graph(model.descriptor, batch) if graph is None else graph

    def energies(positions: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        features = features_from_graph(
            model.descriptor, positions, cells, batch.structure_index, graph
        )
        atomic = graph_atomic_energies(model, features, graph)
        return sum_by_structure(atomic, batch.structure_index, batch.n_structures)

    return value_and_forces(
        energies,
        batch.positions,
        batch.cells,
        batch.structure_index,
        batch.pbc,
        compute_stress=compute_stress,
    )


def energy_and_forces(
    model: Model, batch: Batch, graph: DescriptorGraph | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Total energies ``[B]`` (eV) and forces ``[N, 3]`` (eV/Å)."""
    result = energy_forces_stress(model, batch, graph)
    return result.energy, result.forces


def energy_and_forces_from_derivatives(
    model: Model,
    features: torch.Tensor,
    species_index: torch.Tensor,
    structure_index: torch.Tensor,
    n_structures: int,
    local: PositionMap,
    species_blocks: Sequence[int] | None = None,
    by_autograd: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Energies ``[B]`` and forces ``[N, 3]`` from precomputed raw features and local
    descriptor derivatives (fixed positions, e.g. training data; ``local``: their
    :class:`~aenet_fn.core.local_derivatives.PositionMap`, the entries or a form a speed-up
    assembled from them). Only the network is
    differentiated (``∂E/∂G`` by ``torch.func.grad``), so gradients of a force loss with respect
    to the network parameters never pass through the descriptor. Stacked members' network
    values ``[M, P]`` give ``[M, B]`` and ``[M, N, 3]`` (each member's ``∂E/∂G`` its own).
    ``by_autograd``: ``∂E/∂G`` by ``torch.autograd.grad`` instead (its graph kept where
    gradients are recorded): the same numbers at less overhead, not inside ``torch.func``
    transforms."""
    energies, feature_gradient = energy_and_feature_gradient(
        model, features, species_index, structure_index, n_structures, species_blocks, by_autograd
    )
    return energies, -local.position_gradient(model.descriptor, feature_gradient)


def energy_and_feature_gradient(
    model: Model,
    features: torch.Tensor,
    species_index: torch.Tensor,
    structure_index: torch.Tensor,
    n_structures: int,
    species_blocks: Sequence[int] | None = None,
    by_autograd: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Energies ``[B]`` and ``∂E/∂G`` ``[N, F]`` of raw ``features``: what forces
    (:func:`energy_and_forces_from_derivatives`) and stresses
    (:func:`stress_from_feature_gradient`) of fixed structures are made of. Stacked members'
    values ``[M, P]`` give ``[M, B]`` and ``[M, N, F]``; ``by_autograd`` as there."""

    def total(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        atomic = atomic_energies_from_features(model, raw, species_index, species_blocks)
        return atomic.sum(), atomic

    members = model.network.values.shape[:-1]
    # a view of the inputs per member, so that each member's ∂E/∂G is its own
    features = features.expand(*members, *features.shape[-2:])
    if by_autograd:
        recording = torch.is_grad_enabled()  # the force loss is differentiated further
        feature_gradient, atomic = autograd_with_aux(total, features, create_graph=recording)
    else:
        feature_gradient, atomic = grad(total, has_aux=True)(features)
    return sum_by_structure(atomic, structure_index, n_structures), feature_gradient


def stress_from_feature_gradient(
    feature_gradient: torch.Tensor,
    strain_derivatives: torch.Tensor,
    structure_index: torch.Tensor,
    n_structures: int,
    volumes: torch.Tensor,
) -> torch.Tensor:
    """Stresses ``[B, 3, 3]`` (eV/Å³, ``σ = (1/V) ∂E/∂ε`` symmetrised) of the first ``B``
    (``volumes`` ``[B]``, Å³) of ``n_structures`` fixed structures (the others: padding
    slots), from ``∂E/∂G`` ``[N, F]`` and the features' strain derivatives ``[N, F, 3, 3]``
    (:func:`~aenet_fn.core.featurized.strain_derivatives`). Leading member axes of
    ``feature_gradient`` (and of stacked batches' inputs) carry through."""
    per_atom = torch.einsum("...nf,...nfij->...nij", feature_gradient, strain_derivatives)
    flat = per_atom.flatten(-2).movedim(-1, -2)  # [..., 9, N]
    sums = sum_by_structure(flat, structure_index, n_structures)[..., : volumes.shape[-1]]
    return symmetric_stress(sums.movedim(-2, -1).unflatten(-1, (3, 3)), volumes)


def autograd_with_aux(
    function: Callable[[torch.Tensor], tuple[torch.Tensor, Any]],
    x: torch.Tensor,
    create_graph: bool = False,
) -> tuple[torch.Tensor, Any]:
    """``(∂value/∂x, aux)`` of ``function(x) -> (value, aux)`` (``value`` a scalar) by
    ``torch.autograd.grad`` on a leaf copy of ``x`` (gradients recorded inside, whatever the
    caller's mode; ``create_graph``: the gradient's graph kept, to differentiate it further).
    Fewer per-operation costs than ``torch.func.grad``, the same numbers; not inside
    ``torch.func`` transforms."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        value, aux = function(leaf)
        (gradient,) = torch.autograd.grad(value, leaf, create_graph=create_graph)
    return gradient, aux
