"""The energy-only training loss and its gradient, derived by hand for speed.

An energy-only training step on small networks is bound by per-operation overhead, not by
arithmetic. This module computes the loss of :func:`aenet_fn.train.batch_loss` (per-atom energy
RMSE, times ``1 − α``) and its gradient with respect to the flat network parameters by explicit
back-propagation, with no autograd graph, and with as few operations as it can:

* an :class:`EnergyPlan` lays out ``K`` consecutive mini-batches at once (one gather for a
  whole epoch), with normalised features and every per-structure constant precomputed;
* species whose networks share an architecture (and sit next to each other in the species
  order) are evaluated together, as one batched matrix product per layer, on features padded
  to the same number of atoms per species; the weights of such a group are strided views of
  the flat parameter vector, so nothing is copied;
* a structure's energy is ``Σ outputs / E_scaling + (constant of its atoms)``, so the
  normalisation costs one fused multiply-add per batch.

It is checked against ``torch.func.grad`` of :func:`~aenet_fn.train.batch_loss` in the tests;
force training and committees (``vmap``) keep autodiff.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs
import torch

from aenet_fn._records import pytree_record, static_field
from aenet_fn.featurized import FeaturizedSet, MiniBatch, ranges
from aenet_fn.network import _MTANH_A, _MTANH_B, _TWIST_C, ACTIVATIONS, NetworkParams
from aenet_fn.potential import Model

# ∂L/∂input of an activation from ∂L/∂output ``g``, its input ``z`` and its output ``a``
_BACKWARD: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "linear": lambda g, z, a: g,
    "tanh": lambda g, z, a: torch.ops.aten.tanh_backward(g, a),
    "sigmoid": lambda g, z, a: torch.ops.aten.sigmoid_backward(g, a),
    "mtanh": lambda g, z, a: g * (_MTANH_B * (_MTANH_A - a * a / _MTANH_A)),
    "twist": lambda g, z, a: (
        g * (_MTANH_B * (_MTANH_A - (a - _TWIST_C * z) ** 2 / _MTANH_A) + _TWIST_C)
    ),
    "relu": lambda g, z, a: g * (z > 0).to(z.dtype),
    "silu": lambda g, z, a: g * torch.sigmoid(z) * (1.0 + z * (1.0 - torch.sigmoid(z))),
}
assert _BACKWARD.keys() == ACTIVATIONS.keys(), "every activation needs its derivative"

_MAX_PADDING = 2.0
"""Species of one architecture are stacked only while padding at most doubles their atoms."""


@pytree_record
@attrs.frozen(eq=False)
class EnergyPlan:
    """``K`` consecutive energy-only mini-batches of ``batch_size`` structures (the last may
    be shorter), laid out for :func:`plan_gradient`; for ``W`` committee members with their own
    orders at once, or for one order (``W = 1``) that any number of members share.

    Attributes:
        inputs: per species group, normalised features with a trailing 1 (the bias input),
            ``[K, W·S_g, n_max, F + 1]`` (member-major); rows of zero features pad each
            species of each batch to ``n_max`` atoms.
        slots: per group, ``[K, W·S_g, n_max]`` position of each atom's structure in its batch
            (``batch_size`` for padding).
        output_scale: ``[K, W, batch_size]`` ``1 / (E_scaling N)`` of each structure (1/atom).
        offset: ``[K, W, batch_size]`` ``(Σ_atoms (E_shift + E_atomic) − E_ref) / N`` (eV/atom).
        groups: ``(first species, number of species)`` of each group (static).
        sizes: structures in each batch (static).
    """

    inputs: tuple[torch.Tensor, ...]
    slots: tuple[torch.Tensor, ...]
    output_scale: torch.Tensor
    offset: torch.Tensor
    groups: tuple[tuple[int, int], ...] = static_field()
    sizes: tuple[int, ...] = static_field()

    @property
    def batch_size(self) -> int:
        """Structures per (full) batch."""
        return int(self.output_scale.shape[-1])

    @property
    def n_orders(self) -> int:
        """``W``: member orders laid out (1: one order for every member)."""
        return int(self.output_scale.shape[1])


def _architecture_runs(network: NetworkParams) -> list[tuple[int, int]]:
    """Runs ``(first, count)`` of consecutive species whose networks have one architecture."""
    runs: list[tuple[int, int]] = []
    for s, signature in enumerate(zip(network.sizes, network.activations)):
        previous = runs[-1][0] if runs else None
        same = previous is not None and signature == (
            network.sizes[previous],
            network.activations[previous],
        )
        runs[-1:] = [(previous, runs[-1][1] + 1)] if same else [*runs[-1:], (s, 1)]
    return runs


@pytree_record
@attrs.frozen(eq=False)
class EnergyTable:
    """What energy-only steps need of a set of ``B`` structures (``N`` atoms) for one
    normalisation, computed once: the plans of every epoch gather from it.

    Attributes:
        rows: ``[N + 1, F + 1]`` normalised features with a trailing 1 (the bias input), atoms
            sorted by species, then structure; the last row (zero features) pads batches.
        species_start: ``[B, M]`` row of the first atom of each species of each structure.
        species_counts: ``[B, M]`` atoms of each species of each structure.
        output_scale: ``[B]`` ``1 / (E_scaling N)`` of each structure (1/atom).
        offset: ``[B]`` ``(Σ_atoms (E_shift + E_atomic) − E_ref) / N`` (eV/atom).
    """

    rows: torch.Tensor
    species_start: torch.Tensor
    species_counts: torch.Tensor
    output_scale: torch.Tensor
    offset: torch.Tensor


def energy_table(model: Model, data: FeaturizedSet | MiniBatch) -> EnergyTable:
    """The :class:`EnergyTable` of the structures of ``data`` (raw features, species, atom
    counts and total energies in eV) under ``model``'s normalisation."""
    features, species_index = data.features, data.species_index
    structure_index, n_atoms, energies = data.structure_index, data.n_atoms, data.energies
    norm = model.normalization
    n_structures, n_species = n_atoms.shape[0], norm.atomic_energies.shape[0]
    order = torch.argsort(species_index * n_structures + structure_index, stable=True)
    rows = features.new_ones(features.shape[0] + 1, features.shape[1] + 1)
    rows[:-1, :-1] = norm.normalize_features(features[order], species_index[order])
    rows[-1, :-1] = 0.0
    counts = torch.bincount(
        structure_index * n_species + species_index, minlength=n_structures * n_species
    ).view(n_structures, n_species)
    block_start = torch.cumsum(counts.sum(0), 0) - counts.sum(0)
    species_start = block_start + torch.cumsum(counts, 0) - counts
    # The constants are differences of large total energies: formed in float64, then rounded.
    wide = torch.float64
    atomic_references = torch.zeros(n_structures, dtype=wide, device=features.device).index_add(
        0, structure_index, norm.atomic_energies.to(wide).index_select(0, species_index)
    )
    n = n_atoms.to(wide)
    constant = n * norm.energy_shift.to(wide) + atomic_references - energies.to(wide)
    return EnergyTable(
        rows=rows,
        species_start=species_start,
        species_counts=counts,
        output_scale=(1.0 / (norm.energy_scaling.to(wide) * n)).to(features.dtype),
        offset=(constant / n).to(features.dtype),
    )


def energy_plan(
    table: EnergyTable, network: NetworkParams, draws: torch.Tensor, batch_size: int
) -> EnergyPlan:
    """Lay out the structures ``draws`` (indices into ``table``, repeats allowed; ``[D]``, or
    ``[W, D]``: one order per committee member) as ``ceil(D / batch_size)`` consecutive
    mini-batches of ``batch_size`` structures for :func:`plan_gradient`; each batch's atoms in
    the order of :func:`~aenet_fn.featurized.take_structures`."""
    orders = draws.reshape(-1, draws.shape[-1])
    n_orders, n_draws = orders.shape
    n_batches = math.ceil(n_draws / batch_size)
    padding = n_batches * batch_size - n_draws
    counts = table.species_counts[orders]  # [W, D, M]
    per_batch = torch.cat([counts, counts.new_zeros(n_orders, padding, counts.shape[2])], 1)
    per_batch = per_batch.view(n_orders, n_batches, batch_size, -1).sum(2)  # [W, K, M]
    most, totals = per_batch.amax((0, 1)).tolist(), counts.sum((0, 1)).tolist()

    groups = []
    for first, count in _architecture_runs(network):
        members = range(first, first + count)
        padded = n_orders * n_batches * count * max(most[s] for s in members)
        if count > 1 and padded > _MAX_PADDING * sum(totals[s] for s in members):
            groups += [(s, 1) for s in members]
        else:
            groups.append((first, count))

    draw_ids = torch.arange(n_draws, device=draws.device)
    starts = table.species_start[orders]
    pad_row = table.rows.shape[0] - 1
    inputs, slots = [], []
    for first, count in groups:
        width = max(most[s] for s in range(first, first + count))
        stack = n_orders * count
        rows = draws.new_full((n_batches * stack * width,), pad_row)
        where = draws.new_full((n_batches * stack * width,), batch_size)
        for w in range(n_orders):
            for local, s in enumerate(range(first, first + count)):
                draw = torch.repeat_interleave(draw_ids, counts[w, :, s])
                k = draw // batch_size
                first_of_batch = torch.cumsum(per_batch[w, :, s], 0) - per_batch[w, :, s]
                position = torch.arange(draw.shape[0], device=draws.device) - first_of_batch[k]
                target = (k * stack + w * count + local) * width + position
                rows[target] = ranges(starts[w, :, s], counts[w, :, s])
                where[target] = draw % batch_size
        inputs.append(table.rows.index_select(0, rows).view(n_batches, stack, width, -1))
        slots.append(where.view(n_batches, stack, width))

    def per_draw(values: torch.Tensor, fill: float) -> torch.Tensor:
        padded = torch.cat([values[orders], values.new_full((n_orders, padding), fill)], 1)
        return padded.view(n_orders, n_batches, batch_size).transpose(0, 1)

    return EnergyPlan(
        inputs=tuple(inputs),
        slots=tuple(slots),
        output_scale=per_draw(table.output_scale, 1.0),
        offset=per_draw(table.offset, 0.0),
        groups=tuple(groups),
        sizes=tuple(min(batch_size, n_draws - k * batch_size) for k in range(n_batches)),
    )


_PLAN_ATOMS = 1 << 16
"""Atoms (per member order) laid out by one plan: bounds the copy of their features."""


def plan_chunks(
    table: EnergyTable, draws: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, ...]:
    """``draws`` (``[D]`` or ``[W, D]``) split along the draws into whole batches of about
    2¹⁶ atoms each, one :func:`energy_plan` apiece."""
    atoms_per_structure = table.rows.shape[0] / table.species_counts.shape[0]
    per_plan = max(1, int(_PLAN_ATOMS / (atoms_per_structure * batch_size)))
    return draws.split(per_plan * batch_size, dim=-1)


def _group_layers(network: NetworkParams, first: int, count: int) -> list[torch.Tensor]:
    """Augmented weights ``[W·S, in + 1, out]`` (the bias is the last row) of each layer of
    species ``first .. first + count - 1`` (one architecture), for values ``[P]`` (``W = 1``)
    or stacked committee values ``[W, P]``. The flat layout stores each weight ``[in, out]``
    row-major followed by its bias, so these are strided views of ``network.values`` (copied
    only where the member and species axes cannot merge)."""
    values = network.values.contiguous()
    lead, lead_strides = values.shape[:-1], values.stride()[:-1]
    per_species = [sum(i * o + o for i, o in zip(sizes[:-1], sizes[1:])) for sizes in network.sizes]
    offset = values.storage_offset() + sum(per_species[:first])
    layers = []
    for fan_in, fan_out in zip(network.sizes[first][:-1], network.sizes[first][1:]):
        shape = (*lead, count, fan_in + 1, fan_out)
        strides = (*lead_strides, per_species[first], fan_out, 1)
        layers.append(values.as_strided(shape, strides, offset).reshape(-1, fan_in + 1, fan_out))
        offset += (fan_in + 1) * fan_out
    return layers


def plan_gradient(
    network: NetworkParams, plan: EnergyPlan, k: int, force_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the energy-only loss ``(1 − α)·RMSE_E`` of batch ``k`` of ``plan`` with
    respect to ``network.values`` (``[P]``, or ``[W, P]`` for committee members, each with its
    own loss), and the batch's per-atom energy errors ``[b_k]`` (``[W, b_k]``; eV/atom, before
    the step)."""
    values = network.values
    n_members = values.shape[0] if values.ndim == 2 else 1
    size, slots_per_batch = plan.sizes[k], plan.batch_size + 1
    member_offset = torch.arange(n_members, device=values.device)[:, None] * slots_per_batch
    sums = plan.offset.new_zeros(n_members * slots_per_batch)
    passes = []
    for g, (first, count) in enumerate(plan.groups):
        layers = _group_layers(network, first, count)
        activations = network.activations[first]
        x = plan.inputs[g][k]  # each layer input with a trailing column of ones (the bias input)
        if plan.n_orders != n_members:  # one order shared by every member
            x = x.expand(n_members, *x.shape).reshape(-1, *x.shape[1:])
        inputs, preactivations = [x], []
        for weight, name in zip(layers[:-1], activations):
            z = torch.bmm(inputs[-1], weight)
            preactivations.append(z)
            augmented = z.new_ones(*z.shape[:-1], z.shape[-1] + 1)
            augmented[..., :-1] = ACTIVATIONS[name](z)
            inputs.append(augmented)
        outputs = torch.bmm(inputs[-1], layers[-1])
        slots = (plan.slots[g][k].view(plan.n_orders, -1) + member_offset).flatten()
        sums.index_add_(0, slots, outputs.flatten())
        passes.append((layers, activations, inputs, preactivations, slots))

    sums = sums.view(n_members, slots_per_batch)
    scale = plan.output_scale[k, :, :size]
    errors = torch.addcmul(plan.offset[k, :, :size], sums[:, :size], scale)  # [W, b_k]
    mean_square = (errors * errors).mean(1, keepdim=True)
    # d[(1 − α) rmse]/d errors; zero where autograd's clamp_min(tiny) would be active
    tiny = torch.finfo(errors.dtype).tiny
    factor = (1.0 - force_weight) / size * (mean_square >= tiny).to(errors.dtype)
    factor = factor * torch.rsqrt(mean_square.clamp_min(tiny))
    output_grad = sums.new_zeros(n_members, slots_per_batch)
    output_grad[:, :size] = errors * scale * factor

    pieces = []
    for layers, activations, inputs, preactivations, slots in passes:
        delta = output_grad.view(-1)[slots].view(inputs[0].shape[0], -1, 1)  # [W·S, n, 1]
        grads = []
        for layer in reversed(range(len(layers))):
            if layer < len(activations):
                delta = _BACKWARD[activations[layer]](
                    delta, preactivations[layer], inputs[layer + 1][..., :-1]
                )
            grads.append(torch.bmm(inputs[layer].transpose(1, 2), delta))
            if layer > 0:
                delta = torch.bmm(delta, layers[layer][:, :-1].transpose(1, 2))
        count = inputs[0].shape[0] // n_members
        per_species = [grad.reshape(n_members, count, -1) for grad in reversed(grads)]
        pieces.append(torch.cat(per_species, 2).reshape(n_members, -1))
    gradient = torch.cat(pieces, 1).view(values.shape)
    return gradient, errors.view(*values.shape[:-1], size)


def energy_loss_gradient(
    model: Model, values: torch.Tensor, batch: MiniBatch, force_weight: float
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Gradient ``[P]`` of the energy-only loss ``(1 − α)·RMSE_E`` of ``batch`` with respect
    to the network parameters ``values`` ``[P]``, with the auxiliary output of
    :func:`aenet_fn.train.batch_loss`: per-atom energy errors ``[b]`` (eV/atom, before the step)
    and zero force differences ``[n, 3]``. ``batch`` must carry no force supervision."""
    if batch.local is not None:
        raise ValueError("energy_loss_gradient: the batch supervises forces; use batch_loss")
    table = energy_table(model, batch)
    network = attrs.evolve(model.network, values=values)
    draws = torch.arange(batch.n_structures, device=values.device)
    plan = energy_plan(table, network, draws, batch.n_structures)
    gradient, errors = plan_gradient(network, plan, 0, force_weight)
    return gradient, (errors, batch.forces.new_zeros(batch.forces.shape[0], 3))
