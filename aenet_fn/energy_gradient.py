"""The energy-only training loss and its gradient, derived by hand for speed.

An energy-only training step on small networks is bound by per-operation overhead, not by
arithmetic. This module computes the loss of :func:`aenet_fn.train.batch_loss` (per-atom energy
RMSE, times ``1 − α``) and its gradient with respect to the flat network parameters by explicit
back-propagation, with no autograd graph, and with as few operations as it can:

* an :class:`EnergyPlan` lays out ``K`` consecutive mini-batches at once (one gather for a
  whole epoch), with normalised features and every per-structure constant precomputed;
* atoms are columns, so each layer is one batched product ``Wᵀ @ X`` along the long axis;
  species whose networks share an architecture (and sit next to each other in the species
  order) are stacked in that product, each batch padded to its own widest species; the
  weights are strided views of the flat parameter vector, so nothing is copied;
* a structure's energy is ``Σ outputs / E_scaling + (constant of its atoms)``: one product
  with a 0/1 assignment matrix and one fused multiply-add per batch;
* :class:`EnergySteps` runs the steps of a plan with the weight views, activation buffers and
  gradient buffer of an :class:`EnergyWorkspace` (kept by ``fit`` for a whole run), for
  parameters that the caller updates in place between steps (:func:`plan_gradient` is the
  pure form of one step).

It is checked against ``torch.func.grad`` of :func:`~aenet_fn.train.batch_loss` in the tests;
force training and committees with forces (``vmap``) keep autodiff.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import attrs
import torch

from aenet_fn._records import pytree_record, static_field
from aenet_fn.featurized import FeaturizedSet, MiniBatch
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
    be shorter), laid out for :class:`EnergySteps`; for ``W`` committee members with their own
    orders at once, or for one order (``W = 1``) that any number of members share.

    Atoms are columns: every layer is one batched product ``weightsᵀ @ inputs`` with the atoms
    along the long, contiguous axis (about twice as fast as atoms-as-rows for these narrow
    layers on CPU BLAS). Batch ``k`` of group ``g`` holds ``W·S_g`` blocks (member-major) of
    ``widths[g][k]`` columns, one block per species: the batch's atoms of that species, then
    padding columns (zero features) up to the widest species of the group in that batch.

    Attributes:
        features: per species group, ``[Σ_k W·S_g·widths[g][k], F + 1]`` normalised features
            with a trailing 1 (the bias input) of every column of every batch, batch after
            batch (gathered as rows; each batch is used through a transposed view).
        assign: per group, the 0/1 matrices ``[W, S_g·widths[g][k], batch_size]`` of every
            batch, flat and batch after batch, that sum atom outputs into their structure
            (padding rows are zero).
        output_scale: ``[K, W, batch_size]`` ``1 / (E_scaling N)`` of each structure (1/atom).
        offset: ``[K, W, batch_size]`` ``(Σ_atoms (E_shift + E_atomic) − E_ref) / N`` (eV/atom).
        groups: ``(first species, number of species)`` of each group (static).
        widths: per group, the block width of each batch (static).
        sizes: structures in each batch (static).
    """

    features: tuple[torch.Tensor, ...]
    assign: tuple[torch.Tensor, ...]
    output_scale: torch.Tensor
    offset: torch.Tensor
    groups: tuple[tuple[int, int], ...] = static_field()
    widths: tuple[tuple[int, ...], ...] = static_field()
    sizes: tuple[int, ...] = static_field()

    @property
    def batch_size(self) -> int:
        """Structures per (full) batch."""
        return int(self.output_scale.shape[-1])

    @property
    def n_orders(self) -> int:
        """``W``: member orders laid out (1: one order for every member)."""
        return int(self.output_scale.shape[1])

    def batch_inputs(self, g: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``k`` of group ``g``: its inputs ``[W·S_g, F + 1, n_k]`` (a strided view of
        :attr:`features`) and its assignment matrices ``[W, S_g·n_k, batch_size]``."""
        width, stack = self.widths[g][k], self.n_orders * self.groups[g][1]
        start = stack * sum(self.widths[g][:k])
        block = self.features[g][start : start + stack * width]
        inputs = block.view(stack, width, block.shape[1]).transpose(1, 2)
        assign = self.assign[g][start * self.batch_size : (start + stack * width) * self.batch_size]
        return inputs, assign.view(self.n_orders, -1, self.batch_size)


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
    mini-batches of ``batch_size`` structures for :class:`EnergySteps`; each batch's atoms of
    a species in the order of :func:`~aenet_fn.featurized.take_structures`."""
    orders = draws.reshape(-1, draws.shape[-1])
    n_orders, n_draws = orders.shape
    n_batches = math.ceil(n_draws / batch_size)
    slots = n_batches * batch_size  # draw slots, the last batch padded with empty draws

    def per_slot(values: torch.Tensor) -> torch.Tensor:
        """``values[orders]`` ``[W, D, M]`` as ``[W, M, K·batch_size]`` (zero for padding)."""
        padded = values.new_zeros(n_orders, values.shape[1], slots)
        drawn = values.index_select(0, orders.flatten()).view(n_orders, n_draws, -1)
        padded[:, :, :n_draws] = drawn.transpose(1, 2)
        return padded

    counts, starts = per_slot(table.species_counts), per_slot(table.species_start)
    per_batch = counts.view(n_orders, -1, n_batches, batch_size).sum(3)  # [W, M, K]
    most, totals = per_batch.amax(0).tolist(), per_batch.sum((0, 2)).tolist()

    def widths_of(first: int, count: int) -> list[int]:
        return [max(column) for column in zip(*most[first : first + count])]

    groups = []
    for first, count in _architecture_runs(network):
        padded = n_orders * count * sum(widths_of(first, count))
        if count > 1 and padded > _MAX_PADDING * sum(totals[first : first + count]):
            groups += [(s, 1) for s in range(first, first + count)]
        else:
            groups.append((first, count))

    pad_row = table.rows.shape[0] - 1
    slot_in_batch = torch.arange(batch_size, device=draws.device)
    features, assign, widths = [], [], []
    for first, count in groups:
        width = widths_of(first, count)
        stack = n_orders * count
        width_of = torch.tensor(width, dtype=draws.dtype, device=draws.device)
        batch_start = torch.cumsum(width_of, 0) * stack - width_of * stack
        # per (member order · S_g + species, batch, slot): its atoms, and, less the index of
        # its first atom among all the group's atoms, that atom's column and table row; its
        # slot in the batch
        atoms = counts[:, first : first + count].reshape(stack, n_batches, batch_size)
        first_atom = (torch.cumsum(atoms.flatten(), 0) - atoms.flatten()).view(atoms.shape)
        block_start = batch_start + torch.arange(stack, device=draws.device)[:, None] * width_of
        column = (block_start[:, :, None] - first_atom[:, :, :1]).expand(atoms.shape)
        row = starts[:, first : first + count].reshape(atoms.shape) - first_atom
        per_slot_bases = torch.stack([column, row, slot_in_batch.expand(atoms.shape)], -1)
        bases = torch.repeat_interleave(per_slot_bases.view(-1, 3), atoms.flatten(), dim=0)
        index = torch.arange(bases.shape[0], device=draws.device)
        target = bases[:, 0] + index
        rows = draws.new_full((stack * sum(width),), pad_row)
        rows.index_copy_(0, target, bases[:, 1] + index)
        features.append(table.rows.index_select(0, rows))
        ones = table.rows.new_zeros(rows.numel() * batch_size)
        ones.index_fill_(0, target * batch_size + bases[:, 2], 1.0)
        assign.append(ones)
        widths.append(tuple(width))

    def per_draw(values: torch.Tensor, fill: float) -> torch.Tensor:
        drawn = values.index_select(0, orders.flatten()).view(n_orders, n_draws)
        padded = torch.cat([drawn, values.new_full((n_orders, slots - n_draws), fill)], 1)
        return padded.view(n_orders, n_batches, batch_size).transpose(0, 1)

    return EnergyPlan(
        features=tuple(features),
        assign=tuple(assign),
        output_scale=per_draw(table.output_scale, 1.0),
        offset=per_draw(table.offset, 0.0),
        groups=tuple(groups),
        widths=tuple(widths),
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


def _layer_views(
    flat: torch.Tensor, network: NetworkParams, first: int, count: int
) -> list[torch.Tensor]:
    """Per layer of species ``first .. first + count - 1`` (one architecture), the augmented
    weights ``[W, S, in + 1, out]`` (bias = last row) as strided views of ``flat`` (``[P]``,
    or ``[W, P]`` for stacked committee members) in the layout of :class:`NetworkParams`:
    each weight ``[in, out]`` row-major followed by its bias."""
    flat = flat.view(-1, flat.shape[-1])
    per_species = [sum(i * o + o for i, o in zip(sizes[:-1], sizes[1:])) for sizes in network.sizes]
    offset = flat.storage_offset() + sum(per_species[:first])
    views = []
    for fan_in, fan_out in zip(network.sizes[first][:-1], network.sizes[first][1:]):
        shape = (flat.shape[0], count, fan_in + 1, fan_out)
        strides = (flat.stride(0), per_species[first], fan_out, 1)
        views.append(flat.as_strided(shape, strides, offset))
        offset += (fan_in + 1) * fan_out
    return views


def _activate_into(name: str, z: torch.Tensor, out: torch.Tensor) -> None:
    """Write activation ``name`` of ``z`` into ``out`` (a view of the next layer's input)."""
    if name in ("tanh", "sigmoid"):
        getattr(torch, name)(z, out=out)
    else:
        out.copy_(ACTIVATIONS[name](z))


class EnergyWorkspace:
    """What the energy-only steps of one network reuse from plan to plan: the network, whose
    parameter values are one contiguous buffer that the caller updates in place between steps,
    the gradient buffer, the weight and gradient views of each species group, and activation
    buffers (with their rows of ones; reallocated when a plan's widest batch differs). Mutable:
    for one training run at a time."""

    def __init__(self, network: NetworkParams):
        if not network.values.is_contiguous():
            raise ValueError("EnergyWorkspace needs contiguous network values")
        self.network = network
        self.n_members = network.values.shape[0] if network.values.ndim == 2 else 1
        self.gradient = torch.empty_like(network.values)
        self._layers: dict[tuple[int, int], list[tuple[_Weights, _Weights, _Weights]]] = {}
        self._hidden: dict[tuple[int, int], list[torch.Tensor]] = {}

    def layers(self, first: int, count: int) -> list[tuple[_Weights, _Weights, _Weights]]:
        """Per layer of species ``first .. first + count - 1``: the transposed augmented
        weights, the weights without bias and the gradient's view."""
        if (first, count) not in self._layers:
            weights = _layer_views(self.network.values, self.network, first, count)
            gradients = _layer_views(self.gradient, self.network, first, count)
            self._layers[first, count] = [
                (_Weights(weight.transpose(2, 3)), _Weights(weight[:, :, :-1]), _Weights(grad))
                for weight, grad in zip(weights, gradients)
            ]
        return self._layers[first, count]

    def hidden(self, first: int, count: int, width: int) -> list[torch.Tensor]:
        """Per hidden layer of that group, a ``[W·S, out + 1, width]`` buffer whose last row
        is ones (the next layer's bias input). Exactly ``width`` wide: the products' strides,
        hence their rounding, then depend on the plan alone, not on the plans before."""
        buffers = self._hidden.get((first, count))
        if buffers is None or buffers[0].shape[-1] != width:
            buffers = [
                self.network.values.new_ones(self.n_members * count, fan_out + 1, width)
                for fan_out in self.network.sizes[first][1:-1]
            ]
            self._hidden[first, count] = buffers
        return buffers


class EnergySteps:
    """The energy-only gradient of each batch of one :class:`EnergyPlan`, for a network
    whose parameter values live in one contiguous buffer that the caller updates in place
    between steps (an in-place optimiser step, or ``copy_``), with the views and buffers of an
    :class:`EnergyWorkspace` (a new one, or one kept from plan to plan).

    Not a pure function: :meth:`gradient` returns the workspace's gradient buffer, which the
    next call overwrites (:func:`plan_gradient` is the pure form)."""

    def __init__(
        self,
        network: NetworkParams,
        plan: EnergyPlan,
        force_weight: float,
        workspace: EnergyWorkspace | None = None,
    ):
        workspace = EnergyWorkspace(network) if workspace is None else workspace
        if workspace.network.values.data_ptr() != network.values.data_ptr():
            raise ValueError("EnergySteps: the workspace holds another parameter buffer")
        values = network.values
        self.network, self.plan = network, plan
        self.n_members = workspace.n_members
        self.shared_order = plan.n_orders != self.n_members
        # ∂[(1 − α) rmse]/∂errors = errors · (1 − α) / (√b_k ‖errors‖); the constant part
        sizes = torch.tensor(plan.sizes, dtype=values.dtype, device=values.device)
        error_scale = plan.output_scale * ((1.0 - force_weight) / sizes.sqrt())[:, None, None]
        # per batch [W, b_k] views (one unbind per plan rather than slices per step)
        self.per_structure = [
            tuple(t if size == plan.batch_size else t[:, :size] for t in per_batch)
            for size, per_batch in zip(
                plan.sizes,
                zip(*(t.unbind(0) for t in (plan.offset, plan.output_scale, error_scale))),
            )
        ]
        self.gradient_buffer = workspace.gradient
        # per group, per layer: (weightsᵀ, weights without bias, gradient); per hidden layer
        # a [W·S, out + 1, widest] activation buffer
        self.layers = [workspace.layers(first, count) for first, count in plan.groups]
        self.hidden = [
            workspace.hidden(first, count, max(widths, default=0))
            for (first, count), widths in zip(plan.groups, plan.widths)
        ]

    def _structures(self, per_atom: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
        """``[W, S·n]`` per-atom values summed into ``[W, batch_size]`` structure values."""
        if self.shared_order:
            return torch.mm(per_atom, assign[0])
        return torch.bmm(per_atom.unsqueeze(1), assign).squeeze(1)

    def _atoms(self, per_structure: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
        """``[W, b_k]`` structure values spread onto their atoms ``[W, S·n]``."""
        if per_structure.shape[1] < assign.shape[2]:
            assign = assign[:, :, : per_structure.shape[1]]
        assign = assign.transpose(1, 2)
        if self.shared_order:
            return torch.mm(per_structure, assign[0])
        return torch.bmm(per_structure.unsqueeze(1), assign).squeeze(1)

    def gradient(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient of the energy-only loss ``(1 − α)·RMSE_E`` of batch ``k`` with respect to
        the network values (shaped like them: ``[P]`` or ``[W, P]``; the buffer of this
        object) and the batch's per-atom energy errors ``[b_k]`` (``[W, b_k]``; eV/atom)."""
        plan, n_members, size = self.plan, self.n_members, self.plan.sizes[k]
        sums, passes = None, []
        for g, (first, _) in enumerate(plan.groups):
            x, assign = plan.batch_inputs(g, k)  # [W·S, F + 1, n]
            if self.shared_order and n_members > 1:
                x = x.expand(n_members, *x.shape).reshape(-1, *x.shape[1:])
            activations = self.network.activations[first]
            inputs, preactivations, outputs = [x], [], []
            for (weight, _, _), name, buffer in zip(self.layers[g], activations, self.hidden[g]):
                z = torch.bmm(weight.merged(), inputs[-1])
                preactivations.append(z)
                augmented = buffer[:, :, : x.shape[2]]  # the last row stays ones (bias input)
                outputs.append(augmented[:, :-1])
                _activate_into(name, z, outputs[-1])
                inputs.append(augmented)
            energies = torch.bmm(self.layers[g][-1][0].merged(), inputs[-1])
            part = self._structures(energies.view(n_members, -1), assign)
            sums = part if sums is None else sums + part
            passes.append((activations, inputs, preactivations, outputs, assign))

        offset, output_scale, error_scale = self.per_structure[k]
        if size < plan.batch_size:
            sums = sums[:, :size]
        errors = torch.addcmul(offset, sums, output_scale)  # [W, b_k]
        norm = torch.linalg.vector_norm(errors, dim=1, keepdim=True)
        # zero where autograd's clamp_min(tiny) of the mean square is active (x / inf = 0)
        limit = math.sqrt(size * torch.finfo(errors.dtype).tiny)
        output_grad = errors.div(torch.where(norm >= limit, norm, math.inf)).mul_(error_scale)

        for layers, (activations, inputs, preactivations, outputs, assign) in zip(
            self.layers, passes
        ):
            delta = self._atoms(output_grad, assign).view(inputs[0].shape[0], 1, -1)
            for layer in reversed(range(len(layers))):
                if layer < len(activations):
                    delta = _BACKWARD[activations[layer]](
                        delta, preactivations[layer], outputs[layer]
                    )
                layers[layer][2].write(torch.bmm, inputs[layer], delta.transpose(1, 2))
                if layer > 0:
                    delta = torch.bmm(layers[layer][1].merged(), delta)
        return self.gradient_buffer, errors.view(*self.gradient_buffer.shape[:-1], size)


class _Weights:
    """A ``[W, S, a, b]`` view of stacked weights (or their gradient buffer), used as
    ``[W·S, a, b]``: a view where the member and species axes merge (one model, or a group
    of all species), else a copy per use (a committee group of some species)."""

    def __init__(self, view: torch.Tensor):
        self.view = view
        try:
            self.flat: torch.Tensor | None = view.view(-1, *view.shape[2:])
        except RuntimeError:
            self.flat = None

    def merged(self) -> torch.Tensor:
        """The current values as ``[W·S, a, b]``."""
        return self.view.reshape(-1, *self.view.shape[2:]) if self.flat is None else self.flat

    def write(self, product: Callable[..., torch.Tensor], *operands: torch.Tensor) -> None:
        """Store ``product(*operands)`` (``[W·S, a, b]``) into the view."""
        if self.flat is not None:
            product(*operands, out=self.flat)
        else:
            self.view.copy_(product(*operands).view(self.view.shape))


def energy_gradients(
    table: EnergyTable,
    network: NetworkParams,
    draws: torch.Tensor,
    batch_size: int,
    force_weight: float,
    workspace: EnergyWorkspace | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The energy-only gradient and per-atom errors (as :meth:`EnergySteps.gradient` gives
    them) of each batch of ``batch_size`` structures of ``draws`` (``[D]``, or ``[W, D]`` for
    committee members' own orders), batch after batch: plans of about 2¹⁶ atoms each, with the
    buffers of ``workspace`` (one is made for ``network`` when not given). The caller updates
    ``network.values`` in place between batches."""
    workspace = EnergyWorkspace(network) if workspace is None else workspace
    for chunk in plan_chunks(table, draws, batch_size):
        plan = energy_plan(table, network, chunk, batch_size)
        steps = EnergySteps(network, plan, force_weight, workspace)
        for k in range(len(plan.sizes)):
            yield steps.gradient(k)


def plan_gradient(
    network: NetworkParams, plan: EnergyPlan, k: int, force_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the energy-only loss ``(1 − α)·RMSE_E`` of batch ``k`` of ``plan`` with
    respect to ``network.values`` (``[P]``, or ``[W, P]`` for committee members, each with its
    own loss), and the batch's per-atom energy errors ``[b_k]`` (``[W, b_k]``; eV/atom, before
    the step). The pure form of :meth:`EnergySteps.gradient`."""
    network = attrs.evolve(network, values=network.values.contiguous())
    return EnergySteps(network, plan, force_weight).gradient(k)


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
