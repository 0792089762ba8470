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
* a structure's error per atom is ``Σ outputs / (E_scaling N) + (constant of its atoms)``:
  one ``addmm`` with an assignment matrix holding each atom's ``1 / (E_scaling N)``, whose
  transpose spreads the loss gradient back onto the atoms;
* the backward pass carries its deltas with atoms as rows, so that weight gradients and input
  deltas are products of the stored arrays with no transposed copies; an output layer's
  delta is a broadcast multiply;
* the index arithmetic of a plan runs in NumPy (hundreds of numbers: far cheaper per
  operation than tensors);
* :class:`EnergySteps` runs the steps of a plan with the weight views, activation buffers and
  gradient buffer of an :class:`EnergyWorkspace` (kept by ``fit`` for a whole run), for
  parameters that the caller updates in place between steps (:func:`plan_gradient` is the
  pure form of one step). A step is about twenty tensor operations.

It is checked against ``torch.func.grad`` of :func:`~aenet_fn.train.batch_loss` in the tests;
force training keeps autodiff.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import attrs
import numpy as np
import torch

from aenet_fn._records import pytree_record, static_field
from aenet_fn.featurized import FeaturizedSet, MiniBatch
from aenet_fn.network import (
    _MTANH_A,
    _MTANH_B,
    _TWIST_C,
    ACTIVATIONS,
    NetworkParams,
    parameter_count,
)
from aenet_fn.potential import Model

# ∂L/∂input of an activation from ∂L/∂output ``g``, its input ``z`` and its output ``a``
_BACKWARD: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "linear": lambda g, z, a: g,
    "tanh": lambda g, z, a: torch.ops.aten.tanh_backward.default(g, a),
    "sigmoid": lambda g, z, a: torch.ops.aten.sigmoid_backward.default(g, a),
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
        assign: per group, the matrices ``[W, S_g·widths[g][k], batch_size]`` of every
            batch, flat and batch after batch, that sum atom outputs into their structure's
            error per atom: an atom's row holds ``1 / (E_scaling N)`` of its structure
            (1/atom) in its structure's column, zero elsewhere (padding rows are zero).
        offset: ``[K, W, batch_size]`` ``(Σ_atoms (E_shift + E_atomic) − E_ref) / N`` (eV/atom)
            of each structure, zero for the padding slots of a short last batch.
        groups: ``(first species, number of species)`` of each group (static).
        widths: per group, the block width of each batch (static).
        sizes: structures in each batch (static).
    """

    features: tuple[torch.Tensor, ...]
    assign: tuple[torch.Tensor, ...]
    offset: torch.Tensor
    groups: tuple[tuple[int, int], ...] = static_field()
    widths: tuple[tuple[int, ...], ...] = static_field()
    sizes: tuple[int, ...] = static_field()

    @property
    def batch_size(self) -> int:
        """Structures per (full) batch."""
        return int(self.offset.shape[-1])

    @property
    def n_orders(self) -> int:
        """``W``: member orders laid out (1: one order for every member)."""
        return int(self.offset.shape[1])


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


def _exclusive_cumsum(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Sums of the values before each one along ``axis``."""
    return np.cumsum(values, axis) - values


def _group_blocks(values: np.ndarray, first: int, count: int) -> np.ndarray:
    """``[W, K, b, M]`` per-slot values of species ``first .. first + count - 1`` as
    ``[W·count, K, b]`` (member-major blocks)."""
    group = values[..., first : first + count].transpose(0, 3, 1, 2)
    return group.reshape(-1, *values.shape[1:3])


@torch.inference_mode()
def energy_plan(
    table: EnergyTable, network: NetworkParams, draws: torch.Tensor, batch_size: int
) -> EnergyPlan:
    """Lay out the structures ``draws`` (indices into ``table``, repeats allowed; ``[D]``, or
    ``[W, D]``: one order per committee member) as ``ceil(D / batch_size)`` consecutive
    mini-batches of ``batch_size`` structures for :class:`EnergySteps`; each batch's atoms of
    a species in the order of :func:`~aenet_fn.featurized.take_structures`. The index
    arithmetic runs in NumPy on the host (a few hundred numbers: cheaper per operation than
    tensors); the features are gathered on the table's device."""
    orders = draws.reshape(-1, draws.shape[-1]).cpu().numpy()
    n_orders, n_draws = orders.shape
    n_batches = math.ceil(n_draws / batch_size)
    n_species = table.species_counts.shape[1]

    def per_slot(values: torch.Tensor) -> np.ndarray:
        """``values[orders]`` as ``[W, K, batch_size, M]`` (zero for the padding slots)."""
        padded = np.zeros((n_orders, n_batches * batch_size, n_species), dtype=np.int64)
        padded[:, :n_draws] = values.cpu().numpy()[orders]
        return padded.reshape(n_orders, n_batches, batch_size, n_species)

    counts, starts = per_slot(table.species_counts), per_slot(table.species_start)
    per_batch = counts.sum(2)  # [W, K, M]
    most, totals = per_batch.max(0), per_batch.sum((0, 1))  # [K, M], [M]
    groups = []
    for first, count in _architecture_runs(network):
        padded = n_orders * count * most[:, first : first + count].max(1).sum()
        if count > 1 and padded > _MAX_PADDING * totals[first : first + count].sum():
            groups += [(s, 1) for s in range(first, first + count)]
        else:
            groups.append((first, count))

    def per_draw(values: torch.Tensor, fill: float) -> np.ndarray:
        """``values[orders]`` as ``[W, K, batch_size]`` (``fill`` for the padding slots)."""
        padded = np.full((n_orders, n_batches * batch_size), fill)
        padded[:, :n_draws] = values.cpu().numpy()[orders]
        return padded.reshape(n_orders, n_batches, batch_size)

    output_scale, offset = per_draw(table.output_scale, 0.0), per_draw(table.offset, 0.0)
    device, dtype = table.rows.device, table.rows.dtype
    features, assign, widths = [], [], []
    for first, count in groups:
        width = most[:, first : first + count].max(1)  # [K]
        stack = n_orders * count
        # the column of the first atom of each (block, batch, slot): its batch's first column,
        # its block's within the batch, then the atoms of the slots before it in the block
        atoms = _group_blocks(counts, first, count)
        batch_start = _exclusive_cumsum(width) * stack
        block_start = batch_start + np.arange(stack)[:, None] * width
        column = block_start[:, :, None] + _exclusive_cumsum(atoms)
        atoms = atoms.ravel()
        index = np.arange(atoms.sum()) - np.repeat(_exclusive_cumsum(atoms), atoms)
        target = np.repeat(column.ravel(), atoms) + index
        rows = np.full(stack * int(width.sum()), table.rows.shape[0] - 1)  # padding: zeros
        rows[target] = np.repeat(_group_blocks(starts, first, count).ravel(), atoms) + index
        slot = np.repeat(np.tile(np.arange(batch_size), stack * n_batches), atoms)
        scales = np.zeros((rows.size, batch_size))
        scales[target, slot] = np.repeat(np.repeat(output_scale, count, axis=0).ravel(), atoms)
        features.append(table.rows.index_select(0, torch.from_numpy(rows).to(device)))
        assign.append(torch.from_numpy(scales.ravel()).to(device=device, dtype=dtype))
        widths.append(tuple(width.tolist()))

    return EnergyPlan(
        features=tuple(features),
        assign=tuple(assign),
        offset=torch.from_numpy(offset.transpose(1, 0, 2)).to(device=device, dtype=dtype),
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
    per_species = [parameter_count(sizes) for sizes in network.sizes]
    offset = flat.storage_offset() + sum(per_species[:first])
    views = []
    for fan_in, fan_out in zip(network.sizes[first][:-1], network.sizes[first][1:]):
        shape = (flat.shape[0], count, fan_in + 1, fan_out)
        strides = (flat.stride(0), per_species[first], fan_out, 1)
        views.append(flat.as_strided(shape, strides, offset))
        offset += (fan_in + 1) * fan_out
    return views


def _activation_into(name: str) -> Callable[..., torch.Tensor]:
    """``f(z, out=...)`` writing activation ``name`` of ``z`` into ``out`` (a view of the next
    layer's input)."""
    if name in ("tanh", "sigmoid"):
        return getattr(torch, name)
    return lambda z, out: out.copy_(ACTIVATIONS[name](z))


_USES_PREACTIVATION = frozenset({"twist", "relu", "silu"})
"""Activations whose derivative reads the pre-activation (the others read only the output)."""
assert _USES_PREACTIVATION <= _BACKWARD.keys()

_HIDDEN_ELEMENTS = 1 << 22
"""Activation-buffer elements a workspace keeps for the batch widths it has seen (all of them
forgotten beyond: 32 MiB in float64)."""


class _Weights:
    """A ``[W, S, a, b]`` view of stacked weights, used as
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


@attrs.frozen
class _Layer:
    """One layer of a species group, as the steps use it: ``forward`` the augmented weights
    transposed ``[W·S, out, in + 1]`` (outputs = ``forward @ inputs``), ``backward`` the
    same without the bias column ``[W·S, out, in]`` (input deltas, atoms as rows =
    ``deltas @ backward``)."""

    forward: _Weights
    backward: _Weights


@attrs.frozen
class _GradientScratch:
    """Where the steps of plans with one species grouping write their weight gradients:
    ``blocks[g][layer]``, a contiguous ``[W·S_g, in + 1, out]`` block of ``buffer`` per group
    and layer (a batched product writes a contiguous result several times faster than a strided
    one), and ``order``, the index that gathers ``buffer`` into the values' layout."""

    blocks: list[list[torch.Tensor]]
    buffer: torch.Tensor
    order: torch.Tensor


class EnergyWorkspace:
    """What the energy-only steps of one network reuse from plan to plan: the network, whose
    parameter values are one contiguous buffer that the caller updates in place between steps,
    the gradient buffer, the weight views of each species group, gradient scratch buffers per
    species grouping and activation buffers per batch width (with their rows of ones).
    Mutable: for one training run at a time."""

    def __init__(self, network: NetworkParams):
        if not network.values.is_contiguous():
            raise ValueError("EnergyWorkspace needs contiguous network values")
        self.network = network
        self.n_members = network.values.shape[0] if network.values.ndim == 2 else 1
        self.gradient = torch.empty_like(network.values)
        self._layers: dict[tuple[int, int], list[_Layer]] = {}
        self._scratch: dict[tuple[tuple[int, int], ...], _GradientScratch] = {}
        self._hidden: dict[tuple[int, int, int], list[tuple[torch.Tensor, ...]]] = {}
        self._hidden_elements = 0

    def layers(self, first: int, count: int) -> list[_Layer]:
        """The :class:`_Layer` s of species ``first .. first + count - 1``."""
        if (first, count) not in self._layers:
            weights = _layer_views(self.network.values, self.network, first, count)
            self._layers[first, count] = [
                _Layer(_Weights(weight.transpose(2, 3)), _Weights(weight.transpose(2, 3)[..., :-1]))
                for weight in weights
            ]
        return self._layers[first, count]

    def scratch(
        self, groups: tuple[tuple[int, int], ...], members_as_rows: tuple[bool, ...]
    ) -> _GradientScratch:
        """The :class:`_GradientScratch` of the species grouping ``groups`` (one per grouping
        seen: a plan may split a run of species of one architecture). A group marked in
        ``members_as_rows`` has its first layer's block as ``[S, in + 1, W·out]`` (the members
        side by side, as :class:`EnergySteps` computes it for a shared order)."""
        key = (groups, members_as_rows)
        if key not in self._scratch:
            # each block's values' positions, in the block's order: the layer views
            # [W, S, in + 1, out] of the positions themselves, arranged as the block
            index = torch.arange(self.gradient.numel()).view(self.gradient.shape)
            views = [
                [
                    view.permute(1, 2, 0, 3).flatten(2)  # [S, in + 1, W·out]
                    if layer == 0 and rows
                    else view.flatten(0, 1)  # [W·S, in + 1, out]
                    for layer, view in enumerate(_layer_views(index, self.network, first, count))
                ]
                for (first, count), rows in zip(groups, members_as_rows)
            ]
            flat = [view for group in views for view in group]
            buffer = self.gradient.new_empty(self.gradient.numel())
            blocks = iter(buffer.split([view.numel() for view in flat]))
            grouped = [[next(blocks).view(view.shape) for view in group] for group in views]
            order = torch.argsort(torch.cat([view.reshape(-1) for view in flat]))
            order = order.to(buffer.device)
            self._scratch[key] = _GradientScratch(grouped, buffer, order)
        return self._scratch[key]

    def hidden(self, first: int, count: int, width: int) -> list[tuple[torch.Tensor, ...]]:
        """Per hidden layer of that group, for batches ``width`` atoms wide: a
        ``[W·S, out + 1, width]`` buffer whose last row is ones (the next layer's bias input),
        its activation rows ``[W·S, out, width]`` and their transpose ``[W·S, width, out]``.
        Exactly ``width`` wide: the products' strides, hence their rounding, depend on the
        batch alone."""
        key = (first, count, width)
        if key not in self._hidden:
            if self._hidden_elements > _HIDDEN_ELEMENTS:
                self._hidden.clear()
                self._hidden_elements = 0
            buffers = [
                self.network.values.new_ones(self.n_members * count, fan_out + 1, width)
                for fan_out in self.network.sizes[first][1:-1]
            ]
            self._hidden[key] = [(b, b[:, :-1], b[:, :-1].transpose(1, 2)) for b in buffers]
            self._hidden_elements += sum(b.numel() for b in buffers)
        return self._hidden[key]


class EnergySteps:
    """The energy-only gradient of each batch of one :class:`EnergyPlan`, for a network
    whose parameter values live in one contiguous buffer that the caller updates in place
    between steps (an in-place optimiser step, or ``copy_``), with the views and buffers of an
    :class:`EnergyWorkspace` (a new one, or one kept from plan to plan).

    The forward pass keeps atoms as columns (``weightsᵀ @ inputs``); the backward pass
    carries the deltas with atoms as rows, so that each weight gradient is ``inputs @ deltas``
    and each input delta ``deltas @ weights`` with no transposed copy. Every per-batch view
    is made once, here.

    Not a pure function: :meth:`gradient` returns the workspace's gradient buffer, which the
    next call overwrites (:func:`plan_gradient` is the pure form)."""

    @torch.inference_mode()
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
        self.network, self.plan, self.workspace = network, plan, workspace
        self.n_members = workspace.n_members
        self.shared_order = plan.n_orders == 1
        # ∂[(1 − α) rmse]/∂errors = (1 − α) / √b_k · errors / ‖errors‖: the constant part
        self.error_weights = [(1.0 - force_weight) / math.sqrt(size) for size in plan.sizes]
        # below it, autograd's clamp_min(tiny) of the mean square zeroes the gradient
        tiny = torch.finfo(values.dtype).tiny
        self.norm_limits = [math.sqrt(size * tiny) for size in plan.sizes]
        self.offsets = plan.offset.unbind(0)  # per batch [W, batch_size]
        self._zero = values.new_zeros(())
        self.layers = [workspace.layers(first, count) for first, count in plan.groups]
        # one order shared by several members: the first layer takes the members as rows of
        # one weight matrix per species, so the inputs are not copied per member
        self.members_as_rows = tuple(
            self.shared_order and self.n_members > 1 and len(network.sizes[first]) > 2
            for first, _ in plan.groups
        )
        self.scratch = workspace.scratch(plan.groups, self.members_as_rows)
        self.activate_into = {
            first: [_activation_into(name) for name in network.activations[first]]
            for first, _ in plan.groups
        }
        # per batch, per group: (inputs, summing matrix, spreading matrix, activation buffers)
        self.batches = list(zip(*(self._group_views(g) for g in range(len(plan.groups)))))

    def _group_views(self, g: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]]:
        """Per batch of group ``g``: its inputs ``[W·S_g, F + 1, n]`` (a strided view of
        the plan's features), the matrix that sums per-atom values into structures
        (``[S_g·n, batch_size]`` for a shared order, else ``[W, S_g·n, batch_size]``) and the
        one that spreads structure values onto atoms (``[batch_size, S_g·n]`` /
        ``[W, batch_size, S_g·n]``),
        views of the plan's assignment matrices (the spreading one the transpose of the summing
        one: padding slots of a short last batch spread zeros), one ``as_strided`` each; and
        the workspace's activation buffers for the batch's width."""
        plan, n_orders, size = self.plan, self.plan.n_orders, self.plan.batch_size
        features, assign, (first, count) = plan.features[g], plan.assign[g], plan.groups[g]
        n_features = features.shape[1]
        views, start = [], 0  # the batch's first feature row
        for width in plan.widths[g]:
            rows = count * width  # assignment rows per order
            inputs = features.as_strided(
                (n_orders * count, n_features, width),
                (width * n_features, 1, n_features),
                features.storage_offset() + start * n_features,
            )
            offset = assign.storage_offset() + start * size
            if self.shared_order:
                shapes = ((rows, size), (size, 1)), ((size, rows), (1, size))
            else:
                shapes = (
                    ((n_orders, rows, size), (rows * size, size, 1)),
                    ((n_orders, size, rows), (rows * size, 1, size)),
                )
            summing, spreading = (assign.as_strided(*shape, offset) for shape in shapes)
            views.append((inputs, summing, spreading, self.workspace.hidden(first, count, width)))
            start += n_orders * rows
        return views

    def _errors(
        self, errors: torch.Tensor, per_atom: torch.Tensor, assign: torch.Tensor
    ) -> torch.Tensor:
        """``errors`` ``[W, batch_size]`` plus the ``[W·S, 1, n]`` per-atom outputs summed into
        their structures' errors per atom by ``assign``."""
        if self.shared_order:
            return torch.addmm(errors, per_atom.view(self.n_members, -1), assign)
        per_member = per_atom.view(self.n_members, 1, -1)
        return torch.baddbmm(errors.unsqueeze(1), per_member, assign).view(self.n_members, -1)

    def _atoms(self, per_structure: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
        """``[W, batch_size]`` structure values spread onto their atoms ``[W, S·n]``."""
        if self.shared_order:
            return torch.mm(per_structure, spread)
        return torch.bmm(per_structure.unsqueeze(1), spread)

    @torch.inference_mode()
    def gradient(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient of the energy-only loss ``(1 − α)·RMSE_E`` of batch ``k`` with respect to
        the network values (shaped like them: ``[P]`` or ``[W, P]``; the buffer of this
        object) and the batch's per-atom energy errors ``[b_k]`` (``[W, b_k]``; eV/atom)."""
        plan, n_members, size = self.plan, self.n_members, self.plan.sizes[k]
        # per group: (first species, species), members as rows, layers, batch views
        groups = list(zip(plan.groups, self.members_as_rows, self.layers, self.batches[k]))
        errors, passes = self.offsets[k], []  # passes: per group, its inputs, pre-activations
        for (first, count), rows, layers, (x, assign, _, hidden) in groups:
            if self.shared_order and n_members > 1 and not rows:  # each member its inputs
                x = x.expand(n_members, *x.shape).reshape(-1, *x.shape[1:])
            activations = self.network.activations[first]
            inputs, preactivations = [x], []
            for layer, (buffer, outputs, _), name, activate in zip(
                layers, hidden, activations, self.activate_into[first]
            ):
                if rows and len(inputs) == 1:  # [S, W·out, in + 1] @ [S, in + 1, n]
                    weights = layer.forward.view.transpose(0, 1).reshape(count, -1, x.shape[1])
                    z = torch.bmm(weights, x).view(count, n_members, -1, x.shape[2])
                    z = z.transpose(0, 1)  # [W, S, out, n]: member-major, as the buffers
                    activate(z, out=outputs.view(n_members, count, *outputs.shape[1:]))
                    z = z.reshape(-1, *z.shape[2:]) if name in _USES_PREACTIVATION else z
                else:
                    z = torch.bmm(layer.forward.merged(), inputs[-1])
                    activate(z, out=outputs)
                preactivations.append(z.transpose(1, 2) if name in _USES_PREACTIVATION else None)
                inputs.append(buffer)
            energies = torch.bmm(layers[-1].forward.merged(), inputs[-1])  # [W·S, 1, n]
            errors = self._errors(errors, energies, assign)
            passes.append((inputs, preactivations))

        # [W, batch_size] (zero in padding slots); a zero gradient below the limit (x / inf)
        norm = torch.linalg.vector_norm(errors, dim=1, keepdim=True)
        norm = torch.threshold(norm, self.norm_limits[k], math.inf)
        output_grad = torch.addcdiv(self._zero, errors, norm, value=self.error_weights[k])

        for group, (inputs, preactivations), blocks in zip(groups, passes, self.scratch.blocks):
            (first, count), rows, layers, (_, _, spread, hidden) = group
            activations = self.network.activations[first]
            # deltas with atoms as rows: [W·S, n, out]
            delta = self._atoms(output_grad, spread).view(n_members * count, -1, 1)
            for layer in reversed(range(len(layers))):
                if layer == 0 and rows:  # the members side by side: [S, n, W·out]
                    delta = delta.view(n_members, count, *delta.shape[1:]).permute(1, 2, 0, 3)
                    delta = delta.reshape(count, delta.shape[1], -1)
                torch.bmm(inputs[layer], delta, out=blocks[layer])
                if layer == 0:
                    break
                weights = layers[layer].backward.merged()
                # an output layer (one column) is an outer product: a broadcast multiply
                delta = delta * weights if weights.shape[1] == 1 else torch.bmm(delta, weights)
                name = activations[layer - 1]
                delta = _BACKWARD[name](delta, preactivations[layer - 1], hidden[layer - 1][2])
        gradient = self.gradient_buffer
        torch.index_select(self.scratch.buffer, 0, self.scratch.order, out=gradient.view(-1))
        if size < plan.batch_size:
            errors = errors[:, :size]
        return gradient, errors.view(*gradient.shape[:-1], size)

    @property
    def gradient_buffer(self) -> torch.Tensor:
        """The workspace's gradient buffer (shaped like the network values)."""
        return self.workspace.gradient


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
    the step). The pure form of :meth:`EnergySteps.gradient`: new, ordinary tensors (the
    steps run in inference mode; their results are cloned out of it)."""
    network = attrs.evolve(network, values=network.values.contiguous())
    gradient, errors = EnergySteps(network, plan, force_weight).gradient(k)
    return gradient.clone(), errors.clone()


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
