"""The energy-only training loss and its gradient, derived by hand for speed.

An energy-only training step on small networks is bound by per-operation overhead, not by
arithmetic. This module computes the loss of :func:`aenet_fn.driver.step.batch_loss` (per-atom
energy RMSE, times ``1 − α``) and its gradient with respect to the flat network parameters by
explicit back-propagation, with no autograd graph, and with as few operations as it can:

* an :class:`EnergyPlan` lays out ``K`` consecutive mini-batches at once (one gather for a
  whole epoch), with normalised features and every per-structure constant precomputed;
* atoms are columns, so each layer is one batched product ``Wᵀ @ X`` along the long axis;
  species whose networks share an architecture (and sit next to each other in the species
  order) are stacked in that product, a frequent species split into several blocks so that
  the blocks are about equally wide (each batch padded to its own widest block); the weights
  are strided views of the flat parameter vector (or one gathered copy per step where a
  species has several blocks);
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

It is checked against ``torch.func.grad`` of :func:`~aenet_fn.driver.step.batch_loss` in the tests;
force training keeps autodiff.

Why one module of about 870 lines: a plan's layout and the forward and backward passes
over it change together (a different layout means different index arithmetic in both passes).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator

import attrs
import numpy as np
import torch

from aenet_fn.core.featurized import FeaturizedSet
from aenet_fn.core.minibatch import MiniBatch
from aenet_fn.core.network import (
    _MTANH_A,
    _MTANH_B,
    _TWIST_C,
    ACTIVATIONS,
    NetworkParams,
    parameter_count,
)
from aenet_fn.core.normalization import referenced_energy_per_atom
from aenet_fn.core.potential import Model
from aenet_fn.core.records import pytree_record, static_field

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

_BLOCK_COST = 4
"""Estimated cost of one more block in a batch's products, in atom columns (float64 on CPU,
TiO2-sized layers: a block costs about as much as four more atoms)."""

_GROUP_COST = 256
"""Estimated cost of one more species group per batch (its own dozen operations per step),
in atom columns."""

_MAX_SPLIT = 8
"""Most blocks a species of a stacked group is split into."""


@pytree_record
@attrs.frozen(eq=False)
class EnergyPlan:
    """``K`` consecutive energy-only mini-batches of ``batch_size`` structures (the last may
    be shorter), laid out for :class:`EnergySteps`; for ``W`` committee members with their own
    orders at once, or for one order (``W = 1``) that any number of members share.

    Atoms are columns: every layer is one batched product ``weightsᵀ @ inputs`` with the atoms
    along the long, contiguous axis (about twice as fast as atoms-as-rows for these narrow
    layers on CPU BLAS). Batch ``k`` of group ``g`` holds ``W·B_g`` blocks (member-major) of
    ``widths[g][k]`` columns, ``groups[g]`` naming the species of each: a species' atoms of the
    batch fill its (adjacent) blocks in order, then padding columns (zero features) fill them
    up. Species of one architecture share a group, each split into as many blocks as balance
    their widths (TiO2: one block of Ti, two of O), as far as an estimate of the products'
    cost favours it over smaller groups: decided once for a table made for a batch size
    (:func:`species_grouping`), else plan by plan (where species with no atom in the plan have
    no block).

    Attributes:
        features: per species group, ``[Σ_k W·B_g·widths[g][k], F + 1]`` normalised features
            with a trailing 1 (the bias input) of every column of every batch, batch after
            batch (gathered as rows; each batch is used through a transposed view).
        assign: per group, the matrices ``[W, B_g·widths[g][k], batch_size]`` of every
            batch, flat and batch after batch, that sum atom outputs into their structure's
            error per atom: an atom's row holds ``1 / (E_scaling N)`` of its structure
            (1/atom) in its structure's column, zero elsewhere (padding rows are zero).
        offset: ``[K, W, batch_size]`` ``(Σ_atoms (E_shift + E_atomic) − E_ref) / N`` (eV/atom)
            of each structure, zero for the padding slots of a short last batch.
        groups: per group, the species of each of its ``B_g`` blocks (static; one
            architecture, species in order, e.g. ``(0, 1, 1)``).
        widths: per group, the block width of each batch (static).
        sizes: structures in each batch (static).
    """

    features: tuple[torch.Tensor, ...]
    assign: tuple[torch.Tensor, ...]
    offset: torch.Tensor
    groups: tuple[tuple[int, ...], ...] = static_field()
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


Grouping = tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]
"""Species groups of plans: per group, its species and the number of blocks of each."""


@pytree_record
@attrs.frozen(eq=False)
class EnergyTable:
    """What energy-only steps need of a set of ``B`` structures (``N`` atoms) for one
    normalisation, computed once: the plans of every epoch gather from it.

    Attributes:
        rows: ``[N + 1, F + 1]`` normalised features with a trailing 1 (the bias input), atoms
            sorted by species, then structure; the last row (zero features) pads batches.
        species_atoms: ``[B + 1, M, 2]`` per structure and species, its number of atoms and
            the row of the first; entry ``B`` (zeros) is what a short batch's empty slots take.
        constants: ``[B + 1, 2]`` per structure ``1 / (E_scaling N)`` (1/atom) and
            ``(Σ_atoms (E_shift + E_atomic) − E_ref) / N`` (eV/atom); entry ``B`` zeros.
        grouping: the species groups of every plan from this table, per group its species
            and the number of blocks of each (static; see :func:`species_grouping`), or None
            for a grouping decided plan by plan.
    """

    rows: torch.Tensor
    species_atoms: torch.Tensor
    constants: torch.Tensor
    grouping: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] | None = static_field()

    @property
    def n_structures(self) -> int:
        """``B``; also the index of the empty entry."""
        return int(self.constants.shape[0]) - 1

    @property
    def atoms_per_structure(self) -> float:
        """Mean atoms per structure (what plans are sized by)."""
        return (self.rows.shape[0] - 1) / self.n_structures


def energy_table(
    model: Model, data: FeaturizedSet | MiniBatch, batch_size: int | None = None
) -> EnergyTable:
    """The :class:`EnergyTable` of the structures of ``data`` (raw features, species, atom
    counts and total energies in eV) under ``model``'s normalisation; with ``batch_size``,
    one species grouping for all its plans (:func:`species_grouping`: decided once, not per
    plan, so that every plan of a run has the same layout and costs less)."""
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
    species_atoms = counts.new_zeros(n_structures + 1, n_species, 2)
    species_atoms[:-1] = torch.stack([counts, species_start], -1)
    # The constants are differences of large total energies: formed in float64, then rounded.
    wide = torch.float64
    referenced = referenced_energy_per_atom(
        energies.to(wide), counts, norm.atomic_energies.to(wide)
    )
    constants = features.new_zeros(n_structures + 1, 2)
    constants[:-1, 0] = 1.0 / (norm.energy_scaling.to(wide) * n_atoms.to(wide))
    constants[:-1, 1] = norm.energy_shift.to(wide) - referenced
    table = EnergyTable(rows, species_atoms, constants, grouping=None)
    if batch_size is None:
        return table
    return attrs.evolve(table, grouping=species_grouping(table, model.network, batch_size))


def _exclusive_cumsum(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Sums of the values before each one along ``axis``."""
    return np.cumsum(values, axis) - values


_ALIGNMENT = 64
"""Bytes to which each batch's rows of a plan are aligned: a batch's products then see the same
alignment wherever it sits in a plan, which BLAS results can depend on (so that several epochs
in one plan give the numbers of one plan per epoch, bit for bit)."""


def _aligned_rows(rows: np.ndarray | int, itemsize: int) -> np.ndarray:
    """``rows`` rounded up so that as many rows of any width of ``itemsize``-byte numbers
    span a whole number of ``_ALIGNMENT`` bytes."""
    unit = _ALIGNMENT // math.gcd(_ALIGNMENT, itemsize)
    return _ceil_div(np.asarray(rows), unit) * unit


def _ceil_div(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``ceil(numerator / denominator)`` of non-negative integers."""
    return -(-numerator // denominator)


def _species_groups(
    most: np.ndarray, totals: np.ndarray, network: NetworkParams, n_orders: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The groups of a plan: per group, its species ``[c]`` and the number of blocks of each
    ``[c]`` (see :class:`EnergyPlan`), from the most atoms of each species in each batch
    (``most``: ``[K, M]``, over the orders) and their totals (``[M]``, over batches and
    orders). Each run of species of one architecture becomes one group, its present species
    split in proportion to their totals (``m`` blocks for the most frequent,
    ``m = 1 .. _MAX_SPLIT``, the cheapest by the estimate
    ``blocks · (Σ_k width_k + _BLOCK_COST · K)``), or a group per species where that estimate
    (with ``_GROUP_COST`` per extra group) is lower."""
    n_batches, one = most.shape[0], np.ones(1, dtype=np.int64)
    groups: list[tuple[np.ndarray, np.ndarray]] = []
    for first, count in _architecture_runs(network):
        present = np.flatnonzero(totals[first : first + count]) + first
        if present.size <= 1:
            groups += [(present, one)] if present.size else []
            continue
        widest = most[:, present]  # [K, c]
        share = totals[present] / totals[present].max()
        multiples = np.arange(1, _MAX_SPLIT + 1)[:, None]
        splits = np.maximum(1, np.rint(multiples * share)).astype(np.int64)  # [C, c]
        widths = _ceil_div(widest[None], splits[:, None]).max(-1)  # [C, K]
        blocks = splits.sum(1)
        cost = n_orders * blocks * (widths.sum(1) + _BLOCK_COST * n_batches)
        best = int(np.argmin(cost))
        alone = n_orders * (widest.sum() + _BLOCK_COST * n_batches * present.size)
        alone += _GROUP_COST * n_batches * (present.size - 1)
        if alone < cost[best]:
            groups += [(present[i : i + 1], one) for i in range(present.size)]
        else:
            groups.append((present, splits[best]))
    return groups


_GROUPING_SEED = 0
"""Seed of the fixed order whose batches :func:`species_grouping` weighs."""


def species_grouping(table: EnergyTable, network: NetworkParams, batch_size: int) -> Grouping:
    """The species groups (see :func:`_species_groups`) for plans of ``batch_size``
    structures of ``table``, weighed on the batches of one fixed shuffled order of all its
    structures: a pure function of the table, the architecture and the batch size, so that
    every plan of a run, resumed or not, has one layout (hence one round-off)."""
    order = np.random.default_rng(_GROUPING_SEED).permutation(table.n_structures)
    _, atoms = _slot_atoms(table, order[None], batch_size)
    return _grouping(atoms, network)


def _slot_atoms(
    table: EnergyTable, orders: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The structure of each batch slot of ``orders`` (``[W, D]`` indices into ``table``,
    ``-1`` for an empty slot), padded to whole batches with the table's empty entry:
    ``[W, K·batch_size]``, and their :attr:`EnergyTable.species_atoms`
    ``[W, K, batch_size, M, 2]``."""
    n_orders, n_draws = orders.shape
    n_batches, empty = math.ceil(n_draws / batch_size), table.n_structures
    slots = np.full((n_orders, n_batches * batch_size), empty)
    slots[:, :n_draws] = np.where(orders < 0, empty, orders)
    atoms = table.species_atoms.cpu().numpy()[slots]
    return slots, atoms.reshape(n_orders, n_batches, batch_size, *atoms.shape[2:])


def _grouping(atoms: np.ndarray, network: NetworkParams) -> Grouping:
    """:func:`_species_groups` of the batches whose slots' ``atoms`` (from
    :func:`_slot_atoms`) are given."""
    per_batch = atoms[..., 0].sum(2)  # [W, K, M]
    groups = _species_groups(per_batch.max(0), per_batch.sum((0, 1)), network, len(atoms))
    return tuple((tuple(species.tolist()), tuple(splits.tolist())) for species, splits in groups)


@torch.inference_mode()
def energy_plan(
    table: EnergyTable, network: NetworkParams, draws: torch.Tensor, batch_size: int
) -> EnergyPlan:
    """Lay out the structures ``draws`` (indices into ``table``, repeats allowed; ``[D]``, or
    ``[W, D]``: one order per committee member) as ``ceil(D / batch_size)`` consecutive
    mini-batches of ``batch_size`` structures for :class:`EnergySteps` (``-1``: an empty slot,
    only after a batch's structures, the same in every order: several epochs' short last
    batches in one plan); each batch's atoms of
    a species in the order of :func:`~aenet_fn.core.minibatch.take_structures`, the species
    grouped as ``table.grouping`` says where it is set, else as these draws' batches favour
    (:func:`_species_groups`). The index
    arithmetic runs in NumPy on the host (a few hundred numbers: cheaper per operation than
    tensors); the features are gathered on the table's device."""
    slots, atoms = _slot_atoms(table, draws.cpu().numpy().reshape(-1, draws.shape[-1]), batch_size)
    n_orders, n_batches = atoms.shape[:2]
    constants = table.constants.cpu().numpy()[slots].reshape(*atoms.shape[:3], 2)  # [W, K, b, 2]
    most = atoms[..., 0].sum(2).max(0)  # [K, M]: the most atoms of each species per batch
    grouping = _grouping(atoms, network) if table.grouping is None else table.grouping
    device, dtype = table.rows.device, table.rows.dtype
    features, assign, widths = [], [], []
    for species, splits in grouping:
        first_blocks = np.array((0, *itertools.accumulate(splits[:-1])))  # of each species
        species, splits, n_blocks = list(species), np.array(splits), sum(splits)
        width = _ceil_div(most[:, species], splits).max(1)  # [K]
        stack = n_orders * n_blocks
        # per (order, species, batch, slot) "segment" of atoms: the column of its first atom
        # (its batch's first column, its species' first block's within the batch
        # (member-major), then the atoms of the slots before it: a species' blocks are
        # adjacent, its atoms run across them), its first row in the table and its slot
        segments = atoms[..., species, :].transpose(0, 3, 1, 2, 4)  # [W, c, K, b, 2]
        count, first_row = segments[..., 0], segments[..., 1]
        first_block = np.arange(n_orders)[:, None] * n_blocks + first_blocks
        batch_rows = _aligned_rows(stack * width, table.rows.element_size())  # [K]
        block_start = _exclusive_cumsum(batch_rows) + first_block[..., None] * width
        column = block_start[..., None] + _exclusive_cumsum(count)
        # each atom: its segment's values, then its rank in the segment added
        before = _exclusive_cumsum(count.ravel()).reshape(count.shape)
        layout = np.empty((*count.shape, 4), dtype=np.int64)
        layout[..., 0], layout[..., 1] = column - before, first_row - before
        layout[..., 2] = np.arange(batch_size)
        layout[..., 3] = np.arange(n_orders * n_batches * batch_size).reshape(
            n_orders, 1, -1, batch_size
        )
        per_atom = np.repeat(layout.reshape(-1, 4), count.ravel(), axis=0)
        rank = np.arange(per_atom.shape[0])
        target = per_atom[:, 0] + rank
        rows = np.full(int(batch_rows.sum()), table.rows.shape[0] - 1)  # padding: zeros
        rows[target] = per_atom[:, 1] + rank
        # [columns, batch_size], flat; in torch's (aligned) host memory, filled through NumPy
        # and moved to the table's device once (below)
        summing = torch.zeros(rows.size * batch_size, dtype=torch.float64, device="cpu")
        scales = summing.numpy()
        np.put(
            scales, target * batch_size + per_atom[:, 2], constants[..., 0].ravel()[per_atom[:, 3]]
        )
        features.append(table.rows.index_select(0, torch.from_numpy(rows).to(device)))
        assign.append(summing.to(device=device, dtype=dtype))
        widths.append(tuple(width.tolist()))

    offset = np.ascontiguousarray(constants[..., 1].transpose(1, 0, 2))  # [K, W, b]
    return EnergyPlan(
        features=tuple(features),
        assign=tuple(assign),
        offset=torch.from_numpy(offset).to(device=device, dtype=dtype),
        groups=tuple(
            tuple(s for s, k in zip(species, splits) for _ in range(k))
            for species, splits in grouping
        ),
        widths=tuple(widths),
        sizes=tuple((slots[0] != table.n_structures).reshape(n_batches, -1).sum(1).tolist()),
    )


PLAN_ATOMS = 1 << 16
"""Atoms (per member order) laid out by one plan: bounds the copy of their features."""


def plan_chunks(
    table: EnergyTable, draws: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, ...]:
    """``draws`` (``[D]`` or ``[W, D]``) split along the draws into whole batches of about
    2¹⁶ atoms each, one :func:`energy_plan` apiece."""
    per_plan = max(1, int(PLAN_ATOMS / (table.atoms_per_structure * batch_size)))
    return draws.split(per_plan * batch_size, dim=-1)


def _layer_views(flat: torch.Tensor, sizes: tuple[int, ...], count: int) -> list[torch.Tensor]:
    """Per layer of ``count`` networks of layer widths ``sizes`` whose parameters ``flat``
    (``[count·p]``, or ``[W, count·p]`` for stacked committee members; a view of a larger
    vector or not) holds one after another in the layout of :class:`NetworkParams` (each
    weight ``[in, out]`` row-major followed by its bias), the augmented weights
    ``[W, count, in + 1, out]`` (bias = last row) as strided views of ``flat``."""
    flat = flat.view(-1, flat.shape[-1])
    per_network, offset = parameter_count(sizes), flat.storage_offset()
    views = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        shape = (flat.shape[0], count, fan_in + 1, fan_out)
        strides = (flat.stride(0), per_network, fan_out, 1)
        views.append(flat.as_strided(shape, strides, offset))
        offset += (fan_in + 1) * fan_out
    return views


def _group_parameters(
    flat: torch.Tensor, network: NetworkParams, blocks: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The parameters of the networks of ``blocks`` (species indices, one architecture), one
    after another: ``[B·p]`` (``[W, B·p]``) from ``flat`` (``[P]``, ``[W, P]``), and the
    positions ``[B·p]`` they were gathered from; a view of ``flat`` (positions None) where
    the blocks are consecutive distinct species whose member and block axes merge (one
    member, or all species)."""
    per_species = [parameter_count(sizes) for sizes in network.sizes]
    starts, size = _exclusive_cumsum(np.array(per_species)), per_species[blocks[0]]
    consecutive = blocks == tuple(range(blocks[0], blocks[0] + len(blocks)))
    if consecutive and (flat.ndim == 1 or len(blocks) * size == flat.shape[-1]):
        return flat.narrow(-1, int(starts[blocks[0]]), len(blocks) * size), None
    positions = starts[list(blocks)][:, None] + np.arange(size)
    positions = torch.from_numpy(positions.ravel()).to(flat.device)
    return flat.index_select(-1, positions), positions


@attrs.frozen
class _Activation:
    """How the steps apply a hidden layer and its activation: ``product(weights, inputs)``
    (batched; for ``tanh`` twice the pre-activation), then ``into(product, out=...)`` writes
    the activation into ``out`` (a view of the next layer's input), overwriting the product
    where it is not the pre-activation itself."""

    product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    into: Callable[..., torch.Tensor]


def _activation(name: str, like: torch.Tensor) -> _Activation:
    """The :class:`_Activation` of ``name`` for tensors like ``like``. ``tanh`` is written
    as ``2σ(2z) − 1``, the factor 2 taken in the product (the same to round-off: torch's
    float64 sigmoid kernel takes half the time of its tanh, the largest elementwise cost of a
    step)."""
    if name == "tanh":
        zero, minus_one = like.new_zeros(()), like.new_full((), -1.0)
        return _Activation(
            lambda weights, x: torch.baddbmm(zero, weights, x, beta=0, alpha=2),
            lambda u, out: torch.add(minus_one, torch.sigmoid_(u), alpha=2, out=out),
        )
    if name == "sigmoid":
        return _Activation(torch.bmm, torch.sigmoid)
    return _Activation(torch.bmm, lambda z, out: out.copy_(ACTIVATIONS[name](z)))


_USES_PREACTIVATION = frozenset({"twist", "relu", "silu"})
"""Activations whose derivative reads the pre-activation (the others read only the output)."""
assert _USES_PREACTIVATION <= _BACKWARD.keys()

_HIDDEN_ELEMENTS = 1 << 22
"""Activation-buffer elements a workspace keeps for the batch widths it has seen (all of them
forgotten beyond: 32 MiB in float64)."""


@attrs.frozen
class _Layer:
    """One layer of a species group, as the steps use it: ``forward`` the augmented weights
    transposed ``[W·B, out, in + 1]`` (outputs = ``forward @ inputs``), ``backward`` the
    same without the bias column ``[W·B, out, in]`` (input deltas, atoms as rows =
    ``deltas @ backward``); views of the values or of the group's gathered copy of them."""

    forward: torch.Tensor
    backward: torch.Tensor


@attrs.frozen
class _GroupWeights:
    """The :class:`_Layer` s of one species group and, where they view a gathered copy of the
    values (a species in several blocks, or some species of committee members), the
    ``(positions, copy)`` to gather again after each change of the values."""

    layers: list[_Layer]
    gather: tuple[torch.Tensor, torch.Tensor] | None


@attrs.frozen
class _GroupPass:
    """What every step of a plan does for one species group of ``B`` blocks, resolved once
    per plan: ``forward``, per hidden layer, its weights ``[W·B, out, in + 1]``, its
    :class:`_Activation` and whether the derivative reads the pre-activation; ``output``
    the output layer's weights ``[W·B, 1, in + 1]``; ``backward``, from the top layer down to
    the second, the layer's index, its weights without the bias column ``[W·B, out, in]`` and
    the derivative of the activation below it; ``members_as_rows`` (see
    :class:`EnergySteps`) and ``expand_inputs`` (a shared order whose inputs each member takes
    as its own copy)."""

    count: int
    forward: tuple[tuple[torch.Tensor, _Activation, bool], ...]
    output: torch.Tensor
    backward: tuple[tuple[int, torch.Tensor, Callable[..., torch.Tensor]], ...]
    members_as_rows: bool
    expand_inputs: bool


@attrs.frozen
class _GradientScratch:
    """Where the steps of plans with one species grouping write their weight gradients:
    ``blocks[g][layer]``, a contiguous ``[W·B_g, in + 1, out]`` block of ``buffer`` per group
    and layer (a batched product writes a contiguous result several times faster than a strided
    one), and how :meth:`reduce_into` brings ``buffer`` into the values' layout: ``order``,
    the index that gathers it where every value has exactly one block's entry, else
    ``positions``, each entry's position in the values (summed there; zero for values of no
    block)."""

    blocks: list[list[torch.Tensor]]
    buffer: torch.Tensor
    order: torch.Tensor | None
    positions: torch.Tensor

    def reduce_into(self, gradient: torch.Tensor) -> None:
        """Write the gradient of the values (``[P]`` / ``[W, P]``) from ``buffer``."""
        if self.order is not None:
            torch.index_select(self.buffer, 0, self.order, out=gradient.view(-1))
        else:
            gradient.view(-1).zero_().index_add_(0, self.positions, self.buffer)


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
        self._layers: dict[tuple[int, ...], _GroupWeights] = {}
        self._scratch: dict[tuple, _GradientScratch] = {}
        self._hidden: dict[tuple, list[tuple[torch.Tensor, ...]]] = {}
        self._hidden_elements = 0

    def layers(self, blocks: tuple[int, ...]) -> _GroupWeights:
        """The :class:`_GroupWeights` of the group of species ``blocks`` (one per block)."""
        if blocks not in self._layers:
            values, n_blocks = self.network.values, len(blocks)
            parameters, positions = _group_parameters(values, self.network, blocks)
            layers = []
            for weight in _layer_views(parameters, self.network.sizes[blocks[0]], n_blocks):
                forward = weight.transpose(2, 3).flatten(0, 1)  # a view: the axes merge
                layers.append(_Layer(forward, forward[..., :-1]))
            gather = None if positions is None else (positions, parameters)
            self._layers[blocks] = _GroupWeights(layers, gather)
        return self._layers[blocks]

    def scratch(
        self, groups: tuple[tuple[int, ...], ...], members_as_rows: tuple[bool, ...]
    ) -> _GradientScratch:
        """The :class:`_GradientScratch` of the species grouping ``groups`` (one per grouping
        seen: plans group and split species by their atoms). A group marked in
        ``members_as_rows`` has its first layer's block as ``[B, in + 1, W·out]`` (the members
        side by side, as :class:`EnergySteps` computes it for a shared order)."""
        key = (groups, members_as_rows)
        if key not in self._scratch:
            # each block's values' positions, in the block's order: the layer views
            # [W, B, in + 1, out] of the positions themselves, arranged as the block (worked
            # out on the host, like the plans, and moved to the gradient's device once below)
            index = torch.arange(self.gradient.numel(), device="cpu").view(self.gradient.shape)
            views = []
            for blocks, rows in zip(groups, members_as_rows):
                parameters, _ = _group_parameters(index, self.network, blocks)
                sizes = self.network.sizes[blocks[0]]
                views.append(
                    [
                        view.permute(1, 2, 0, 3).flatten(2)  # [B, in + 1, W·out]
                        if layer == 0 and rows
                        else view.flatten(0, 1)  # [W·B, in + 1, out]
                        for layer, view in enumerate(_layer_views(parameters, sizes, len(blocks)))
                    ]
                )
            flat = [view for group in views for view in group]
            positions = torch.cat([view.reshape(-1) for view in flat])
            buffer = self.gradient.new_empty(positions.numel())
            blocks = iter(buffer.split([view.numel() for view in flat]))
            grouped = [[next(blocks).view(view.shape) for view in group] for group in views]
            once = bool((torch.bincount(positions, minlength=index.numel()) == 1).all())
            order = torch.argsort(positions).to(buffer.device) if once else None
            positions = positions.to(buffer.device)
            self._scratch[key] = _GradientScratch(grouped, buffer, order, positions)
        return self._scratch[key]

    def hidden(self, blocks: tuple[int, ...], width: int) -> list[tuple[torch.Tensor, ...]]:
        """Per hidden layer of the group of species ``blocks``, for batches ``width`` atoms
        wide: a ``[W·B, out + 1, width]`` buffer whose last row is ones (the next layer's bias
        input), its activation rows ``[W·B, out, width]`` and their transpose
        ``[W·B, width, out]``. Exactly ``width`` wide: the products' strides, hence their
        rounding, depend on the batch alone."""
        key = (blocks, width)
        if key not in self._hidden:
            if self._hidden_elements > _HIDDEN_ELEMENTS:
                self._hidden.clear()
                self._hidden_elements = 0
            buffers = [
                self.network.values.new_ones(self.n_members * len(blocks), fan_out + 1, width)
                for fan_out in self.network.sizes[blocks[0]][1:-1]
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
        weights = [workspace.layers(blocks) for blocks in plan.groups]
        self.gathers = [group.gather for group in weights if group.gather is not None]
        # one order shared by several members: the first layer takes the members as rows of
        # one weight matrix per block, so the inputs are not copied per member
        members_as_rows = tuple(
            self.shared_order and self.n_members > 1 and len(network.sizes[blocks[0]]) > 2
            for blocks in plan.groups
        )
        self.scratch = workspace.scratch(plan.groups, members_as_rows)
        passes = [
            self._group_pass(blocks, group.layers, rows)
            for blocks, group, rows in zip(plan.groups, weights, members_as_rows)
        ]
        # per batch, per group: (its pass, inputs, summing and spreading matrices, buffers)
        views = [self._group_views(g) for g in range(len(plan.groups))]
        self.batches = [
            [(group, *batch) for group, batch in zip(passes, batches)] for batches in zip(*views)
        ]

    def _group_pass(self, blocks: tuple[int, ...], layers: list[_Layer], rows: bool) -> _GroupPass:
        """The :class:`_GroupPass` of the group of species ``blocks``."""
        activations = self.network.activations[blocks[0]]
        forward = tuple(
            (layer.forward, _activation(name, self.network.values), name in _USES_PREACTIVATION)
            for layer, name in zip(layers, activations)
        )
        backward = tuple(
            (layer, layers[layer].backward, _BACKWARD[activations[layer - 1]])
            for layer in range(len(layers) - 1, 0, -1)
        )
        expand = self.shared_order and self.n_members > 1 and not rows
        return _GroupPass(len(blocks), forward, layers[-1].forward, backward, rows, expand)

    def _group_views(self, g: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]]:
        """Per batch of group ``g``: its inputs ``[W·B_g, F + 1, n]`` (a strided view of
        the plan's features), the matrix that sums per-atom values into structures
        (``[B_g·n, batch_size]`` for a shared order, else ``[W, B_g·n, batch_size]``) and the
        one that spreads structure values onto atoms (``[batch_size, B_g·n]`` /
        ``[W, batch_size, B_g·n]``),
        views of the plan's assignment matrices (the spreading one the transpose of the summing
        one: padding slots of a short last batch spread zeros); and the workspace's activation
        buffers for the batch's width."""
        plan, n_orders, size = self.plan, self.plan.n_orders, self.plan.batch_size
        features, assign, blocks = plan.features[g], plan.assign[g], plan.groups[g]
        n_features, widths = features.shape[1], plan.widths[g]
        rows = len(blocks) * np.array(widths, dtype=np.int64)  # assignment rows per order
        starts = _exclusive_cumsum(_aligned_rows(n_orders * rows, features.element_size()))
        views = []
        for width, n_rows, start in zip(widths, rows.tolist(), starts.tolist()):
            inputs = features.as_strided(  # from the batch's first feature row
                (n_orders * len(blocks), n_features, width),
                (width * n_features, 1, n_features),
                features.storage_offset() + start * n_features,
            )
            offset = assign.storage_offset() + start * size
            if self.shared_order:
                summing = assign.as_strided((n_rows, size), (size, 1), offset)
            else:
                summing = assign.as_strided(
                    (n_orders, n_rows, size), (n_rows * size, size, 1), offset
                )
            spreading = summing.transpose(-2, -1)
            views.append((inputs, summing, spreading, self.workspace.hidden(blocks, width)))
        return views

    def _errors(
        self, errors: torch.Tensor, per_atom: torch.Tensor, assign: torch.Tensor
    ) -> torch.Tensor:
        """``errors`` ``[W, batch_size]`` plus the ``[W·B, 1, n]`` per-atom outputs summed into
        their structures' errors per atom by ``assign``."""
        if self.shared_order:
            return torch.addmm(errors, per_atom.view(self.n_members, -1), assign)
        per_member = per_atom.view(self.n_members, 1, -1)
        return torch.baddbmm(errors.unsqueeze(1), per_member, assign).view(self.n_members, -1)

    def _atoms(self, per_structure: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
        """``[W, batch_size]`` structure values spread onto their atoms ``[W, B·n]``."""
        if self.shared_order:
            return torch.mm(per_structure, spread)
        return torch.bmm(per_structure.unsqueeze(1), spread)

    def gradient(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient of the energy-only loss ``(1 − α)·RMSE_E`` of batch ``k`` with respect to
        the network values (shaped like them: ``[P]`` or ``[W, P]``; the buffer of this
        object) and the batch's per-atom energy errors ``[b_k]`` (``[W, b_k]``; eV/atom).
        To be called in ``torch.inference_mode`` (its buffers are inference tensors), as
        :func:`energy_gradients` and :func:`plan_gradient` do."""
        n_members, size = self.n_members, self.plan.sizes[k]
        for positions, copy in self.gathers:
            torch.index_select(self.network.values, -1, positions, out=copy)
        batch = self.batches[k]
        errors, passes = self.offsets[k], []  # passes: per group, its inputs, pre-activations
        for group, x, assign, _, hidden in batch:
            if group.expand_inputs:  # each member its inputs
                x = x.expand(n_members, *x.shape).reshape(-1, *x.shape[1:])
            inputs, preactivations = [x], []
            for (weights, activate, keep), (buffer, outputs, _) in zip(group.forward, hidden):
                if group.members_as_rows and len(inputs) == 1:
                    z = self._members_as_rows(group.count, weights, x, activate, outputs, keep)
                else:
                    z = activate.product(weights, inputs[-1])
                    activate.into(z, out=outputs)
                preactivations.append(z.transpose(1, 2) if keep else None)
                inputs.append(buffer)
            energies = torch.bmm(group.output, inputs[-1])  # [W·B, 1, n]
            errors = self._errors(errors, energies, assign)
            passes.append((inputs, preactivations))

        # [W, batch_size] (zero in padding slots); a zero gradient below the limit (x / inf)
        norm = torch.linalg.vector_norm(errors, dim=1, keepdim=True)
        norm = torch.threshold(norm, self.norm_limits[k], math.inf)
        output_grad = torch.addcdiv(self._zero, errors, norm, value=self.error_weights[k])

        for (group, _, _, spread, hidden), (inputs, pre), scratch in zip(
            batch, passes, self.scratch.blocks
        ):
            # deltas with atoms as rows: [W·B, n, out]; the output layer's is an outer
            # product (one column): a broadcast multiply
            delta = self._atoms(output_grad, spread).view(n_members * group.count, -1, 1)
            for layer, weights, derivative in group.backward:
                torch.bmm(inputs[layer], delta, out=scratch[layer])
                delta = delta * weights if delta.shape[2] == 1 else torch.bmm(delta, weights)
                delta = derivative(delta, pre[layer - 1], hidden[layer - 1][2])
            if group.members_as_rows:  # the members side by side: [B, n, W·out]
                delta = delta.view(n_members, group.count, *delta.shape[1:]).permute(1, 2, 0, 3)
                delta = delta.reshape(group.count, delta.shape[1], -1)
            torch.bmm(inputs[0], delta, out=scratch[0])
        gradient = self.gradient_buffer
        self.scratch.reduce_into(gradient)
        if size < self.plan.batch_size:
            errors = errors[:, :size]
        return gradient, errors.view(*gradient.shape[:-1], size)

    def _members_as_rows(
        self,
        count: int,
        weights: torch.Tensor,
        x: torch.Tensor,
        activate: _Activation,
        outputs: torch.Tensor,
        keep: bool,
    ) -> torch.Tensor:
        """The first layer of a group whose members share the order: one product per block,
        ``[B, W·out, in + 1] @ [B, in + 1, n]``, with the activation written into ``outputs``
        (``[W·B, out, n]``); returns the pre-activations ``[W·B, out, n]`` (a view, where
        ``keep``)."""
        n_members = self.n_members
        weights = weights.view(n_members, count, *weights.shape[1:])
        weights = weights.transpose(0, 1).reshape(count, -1, x.shape[1])
        z = activate.product(weights, x).view(count, n_members, -1, x.shape[2])
        z = z.transpose(0, 1)  # [W, B, out, n]: member-major, as the buffers
        activate.into(z, out=outputs.view(n_members, count, *outputs.shape[1:]))
        return z.reshape(-1, *z.shape[2:]) if keep else z

    def gradients(
        self, batches: range | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`gradient` of each of ``batches`` (default: all), each in
        ``torch.inference_mode`` (entered per step only where the caller's loop is not in
        it); the caller updates the values in place between them."""
        for k in range(len(self.plan.sizes)) if batches is None else batches:
            if torch.is_inference_mode_enabled():
                yield self.gradient(k)
                continue
            with torch.inference_mode():
                result = self.gradient(k)
            yield result

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
    ``network.values`` in place between batches. Each step runs in ``torch.inference_mode``:
    iterating in it (updates included) saves entering it once per step (~5 % of an epoch)."""
    workspace = EnergyWorkspace(network) if workspace is None else workspace
    for chunk in plan_chunks(table, draws, batch_size):
        plan = energy_plan(table, network, chunk, batch_size)
        yield from EnergySteps(network, plan, force_weight, workspace).gradients()


def plan_gradient(
    network: NetworkParams, plan: EnergyPlan, k: int, force_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the energy-only loss ``(1 − α)·RMSE_E`` of batch ``k`` of ``plan`` with
    respect to ``network.values`` (``[P]``, or ``[W, P]`` for committee members, each with its
    own loss), and the batch's per-atom energy errors ``[b_k]`` (``[W, b_k]``; eV/atom, before
    the step). The pure form of :meth:`EnergySteps.gradient`: new, ordinary tensors (the
    steps run in inference mode; their results are cloned out of it)."""
    network = attrs.evolve(network, values=network.values.contiguous())
    with torch.inference_mode():
        gradient, errors = EnergySteps(network, plan, force_weight).gradient(k)
    return gradient.clone(), errors.clone()
