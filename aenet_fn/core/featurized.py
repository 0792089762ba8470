"""Featurized data sets and mini-batch selection, as pure functions.

Training structures never move, so their features (and, for force training, the local descriptor
derivatives) are computed once by :func:`featurize_structures`. A mini-batch is then a pure
selection of whole structures from that set (:func:`take_structures`): rows of the feature matrix
and, for the structures whose forces are supervised, their derivative entries re-indexed to the
batch's atom numbering. Nothing of the descriptor is recomputed inside the training loop.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Protocol

import attrs
import torch

from aenet_fn.core.batch import collate, ranges
from aenet_fn.core.descriptor import (
    ChebyshevParams,
    build_graph,
    features_from_graph,
    species_lookup,
)
from aenet_fn.core.local_derivatives import LocalDerivatives, PositionMap, local_derivatives
from aenet_fn.core.normalization import ENERGY_DTYPE, as_energy
from aenet_fn.core.records import host_field, pytree_record, static_field, to, tree_bytes
from aenet_fn.core.structure import Structure, check_float_dtype


class StoredJacobian(Protocol):
    """A featurized set's derivative data assembled once by a speed-up (the CPU's stored
    Jacobians, :func:`~aenet_fn.speedups.force_jacobian.set_jacobian`), from which
    :func:`take_structures` cuts each batch's :class:`~aenet_fn.core.local_derivatives.PositionMap`
    instead of gathering derivative entries."""

    n_atoms: int
    n_structures: int

    def batch(
        self,
        selection: torch.Tensor,
        supervised: torch.Tensor,
        atoms: torch.Tensor,
        structure_major: torch.Tensor,
        position: torch.Tensor,
        force_atoms: torch.Tensor,
    ) -> PositionMap:
        """The map of the batch of structures ``selection`` (see :func:`take_structures`)."""
        ...


HOST = torch.device("cpu")
"""Where batches are laid out: the host, whatever the data's device."""


@pytree_record
@attrs.frozen(eq=False)
class HostLayout:
    """Host (CPU) copies of a featurized set's integer layout, from which a mini-batch's
    indices and sizes are computed without reading the set's device (:func:`take_structures`).

    Attributes:
        n_atoms, atom_start: ``[B]`` atoms of each structure and its first atom.
        species_index: ``[N]`` species of each atom.
        labelled: ``[N]`` bool, atoms whose forces are known.
        radial_start, radial_count, triplet_start, triplet_count: ``[N]`` each centre atom's
            run of derivative entries (the set's entries are sorted by centre; zeros without
            derivatives).
    """

    n_atoms: torch.Tensor
    atom_start: torch.Tensor
    species_index: torch.Tensor
    labelled: torch.Tensor
    radial_start: torch.Tensor
    radial_count: torch.Tensor
    triplet_start: torch.Tensor
    triplet_count: torch.Tensor

    @classmethod
    def of(cls, data: FeaturizedSet) -> HostLayout:
        """The layout of ``data``, read to the host once."""
        n = data.features.shape[0]

        def runs(centres: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            count = torch.zeros(n, dtype=torch.long, device=HOST)
            if centres is not None:
                count = torch.bincount(centres.cpu(), minlength=n)
            return torch.cumsum(count, 0) - count, count

        local = data.local
        radial_start, radial_count = runs(None if local is None else local.radial_centre)
        triplet_start, triplet_count = runs(None if local is None else local.triplet_centre)
        return cls(
            n_atoms=data.n_atoms.cpu(),
            atom_start=data.atom_start.cpu(),
            species_index=data.species_index.cpu(),
            labelled=torch.isfinite(data.forces).all(dim=1).cpu(),
            radial_start=radial_start,
            radial_count=radial_count,
            triplet_start=triplet_start,
            triplet_count=triplet_count,
        )


@pytree_record
@attrs.frozen(eq=False)
class FeaturizedSet:
    """Features and labels of ``B`` structures (``N`` atoms), ready for training.

    Attributes:
        features: ``[N, F]`` raw descriptor features.
        species_index: ``[N]`` species of each atom in descriptor order.
        atom_start: ``[B]`` first atom of each structure; ``n_atoms`` ``[B]`` their counts.
        energies: ``[B]`` total energies (eV, always float64), NaN where unknown.
        forces: ``[N, 3]`` forces (eV/Å), NaN where unknown.
        species_counts: ``[B, M]`` atoms of each descriptor species per structure.
        local: local descriptor derivatives (global atom indices), or None (energy-only).
        radial_start, radial_count, triplet_start, triplet_count: ``[B]`` ranges of each
            structure's entries in ``local`` (empty tensors without ``local``).
        names: one name per structure.
        descriptor: the descriptor parameters the features were computed with (None: not
            recorded); models and other sets are checked against it.
        layout: the :class:`HostLayout` of the set, on the host whatever the set's device
            (derived from the fields above when the set is built; kept when it moves).
    """

    features: torch.Tensor
    species_index: torch.Tensor
    atom_start: torch.Tensor
    n_atoms: torch.Tensor
    energies: torch.Tensor = attrs.field(converter=as_energy)
    forces: torch.Tensor
    species_counts: torch.Tensor
    local: LocalDerivatives | None
    radial_start: torch.Tensor
    radial_count: torch.Tensor
    triplet_start: torch.Tensor
    triplet_count: torch.Tensor
    names: tuple[str | None, ...] = static_field()
    descriptor: ChebyshevParams | None = static_field(default=None)  # noqa: RUF009 (immutable)
    layout: HostLayout | None = host_field(default=None)  # noqa: RUF009 (an attrs field)

    def __attrs_post_init__(self) -> None:
        # derived on the CPU (cheap, never stale); a set elsewhere keeps the one it moved with
        if self.layout is None or self.features.device.type == "cpu":
            object.__setattr__(self, "layout", HostLayout.of(self))

    @property
    def n_structures(self) -> int:
        """Number of structures ``B``."""
        return int(self.n_atoms.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the features (and of a model's networks trained on them)."""
        return self.features.dtype

    @property
    def device(self) -> torch.device:
        """Device of the set (and of a model initialised on it)."""
        return self.features.device

    @property
    def has_forces(self) -> torch.Tensor:
        """``[B]`` bool, on the host: structures whose forces are all known."""
        layout = self.layout
        structure = torch.repeat_interleave(
            torch.arange(self.n_structures, device=HOST), layout.n_atoms
        )
        known = torch.zeros_like(layout.n_atoms).index_add(0, structure, layout.labelled.long())
        return known == layout.n_atoms

    @property
    def structure_index(self) -> torch.Tensor:
        """``[N]`` structure of each atom."""
        return torch.repeat_interleave(
            torch.arange(self.n_structures, device=self.n_atoms.device), self.n_atoms
        )


@pytree_record
@attrs.frozen(eq=False)
class MiniBatch:
    """A selection of ``b`` whole structures (``n`` atoms) from a :class:`FeaturizedSet`.

    The atoms are sorted by species (``species_blocks`` atoms of species 0 first, then of
    species 1, ...), so that each species' network runs on a static slice: no data-dependent
    shapes, hence ``vmap``-able over the stacked batches of committee members.

    Attributes:
        features, species_index, energies, forces, n_atoms: the rows of the selected structures
            (energies float64).
        structure_index: ``[n]`` position of each atom's structure in the selection; padding
            atoms of stacked batches (:func:`stack_batches`) use the spare slot ``b``.
        force_atoms: ``[n]`` bool, atoms whose forces are supervised in this batch.
        local: derivative data of the force-supervised structures in batch atom numbering
            (entries, or their assembled Jacobian), or None when no force is supervised.
        n_force_labelled: ``[]`` atoms of the batch with force labels (for the unbiased scale).
        atom_index: ``[n]`` index of each atom in the featurized set (-1 for padding).
        species_blocks: atoms of each species, in order (static).
    """

    features: torch.Tensor
    species_index: torch.Tensor
    structure_index: torch.Tensor
    n_atoms: torch.Tensor
    energies: torch.Tensor = attrs.field(converter=as_energy)
    forces: torch.Tensor
    force_atoms: torch.Tensor
    local: PositionMap | None
    n_force_labelled: torch.Tensor
    atom_index: torch.Tensor
    species_blocks: tuple[int, ...] = static_field()

    @property
    def n_structures(self) -> int:
        """Number of structures ``b`` (of each member's batch, in stacked batches)."""
        return int(self.n_atoms.shape[-1])


def _entry_ranges(owner: torch.Tensor, n_structures: int) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.bincount(owner, minlength=n_structures)
    return torch.cumsum(counts, 0) - counts, counts


def _check_chunk_size(chunk_size: object) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(
            f"featurize_structures: chunk_size must be a positive integer, "
            f"got {chunk_size!r} ({type(chunk_size).__name__})"
        )
    if chunk_size < 1:
        raise ValueError(f"featurize_structures: chunk_size must be >= 1, got {chunk_size}")


def featurize_structures(
    params: ChebyshevParams,
    structures: Sequence[Structure],
    *,
    with_derivatives: bool,
    dtype: torch.dtype = torch.float64,
    chunk_size: int = 256,
    device: torch.device | str | None = None,
) -> FeaturizedSet:
    """Featurize ``structures`` (in chunks of ``chunk_size`` to bound memory) into a
    :class:`FeaturizedSet`; with ``with_derivatives`` also the local descriptor derivatives.
    ``dtype`` is ``torch.float32`` or ``torch.float64``; ``chunk_size`` a positive integer.
    The set is computed on the CPU (the neighbour search runs on the host) and moved to
    ``device`` once (default: stays on the CPU)."""
    check_float_dtype(dtype, "featurize_structures")
    _check_chunk_size(chunk_size)
    if not structures:
        raise ValueError("featurize_structures: no structures")
    blocks: dict[str, list[torch.Tensor]] = {k: [] for k in ("features", "species", "local")}
    atom_offset = 0
    for first in range(0, len(structures), chunk_size):
        batch = collate(structures[first : first + chunk_size], species=None, dtype=dtype)
        graph = build_graph(params, batch)
        with torch.no_grad():
            blocks["features"].append(
                features_from_graph(
                    params, batch.positions, batch.cells, batch.structure_index, graph
                )
            )
        lookup = species_lookup(params, batch.species)
        blocks["species"].append(lookup[batch.species_index])
        if with_derivatives:
            local = local_derivatives(
                params, batch.positions, batch.cells, batch.structure_index, graph
            )
            blocks["local"].append(_offset_atoms(local, atom_offset))
        atom_offset += batch.positions.shape[0]
    n_atoms = torch.tensor([s.n_atoms for s in structures])
    species_index = torch.cat(blocks["species"])
    atom_start = torch.cumsum(n_atoms, 0) - n_atoms
    structure_index = torch.repeat_interleave(torch.arange(len(structures)), n_atoms)
    counts = torch.zeros(len(structures), len(params.species), dtype=torch.long)
    counts.index_put_((structure_index, species_index), torch.tensor(1), accumulate=True)
    nan_forces = torch.full((1, 3), float("nan"), dtype=dtype)
    local = _concat_local(blocks["local"]) if with_derivatives else None
    empty = torch.zeros(0, dtype=torch.long)
    radial_start = radial_count = triplet_start = triplet_count = empty
    if local is not None:
        radial_start, radial_count = _entry_ranges(
            structure_index[local.radial_centre], len(structures)
        )
        triplet_start, triplet_count = _entry_ranges(
            structure_index[local.triplet_centre], len(structures)
        )
    data = FeaturizedSet(
        features=torch.cat(blocks["features"]),
        species_index=species_index,
        atom_start=atom_start,
        n_atoms=n_atoms,
        energies=torch.tensor(
            [float("nan") if s.energy is None else s.energy for s in structures],
            dtype=ENERGY_DTYPE,
        ),
        forces=torch.cat(
            [
                nan_forces.expand(s.n_atoms, 3) if s.forces is None else s.forces.to(dtype)
                for s in structures
            ]
        ),
        species_counts=counts,
        local=local,
        radial_start=radial_start,
        radial_count=radial_count,
        triplet_start=triplet_start,
        triplet_count=triplet_count,
        names=tuple(s.name for s in structures),
        descriptor=params,
    )
    return data if device is None else to(data, device=device)


_ATOM_FIELDS = (
    "radial_centre",
    "radial_neighbour",
    "triplet_centre",
    "triplet_first",
    "triplet_second",
)


def estimated_set_bytes(
    params: ChebyshevParams,
    structures: Sequence[Structure],
    *,
    with_derivatives: bool,
    dtype: torch.dtype = torch.float64,
    sample: int = 16,
) -> int:
    """The memory (bytes) :func:`featurize_structures` would take for ``structures``,
    estimated from ``sample`` of them spread over the sequence (their bytes per atom, times
    every structure's atoms): local derivatives grow with the neighbours of each atom, so a
    set with force data can take far more than its features."""
    count = len(structures)
    if count == 0:
        raise ValueError("estimated_set_bytes: no structures")
    picked = sorted(
        {round(k * (count - 1) / max(sample - 1, 1)) for k in range(min(sample, count))}
    )
    chosen = [structures[k] for k in picked]
    part = featurize_structures(params, chosen, with_derivatives=with_derivatives, dtype=dtype)
    part_bytes = tree_bytes(part)
    atoms = sum(structures[k].n_atoms for k in range(count))
    return round(part_bytes * atoms / sum(s.n_atoms for s in chosen))


def _offset_atoms(local: LocalDerivatives, offset: int) -> LocalDerivatives:
    return attrs.evolve(local, **{f: getattr(local, f) + offset for f in _ATOM_FIELDS})


def _concat_local(parts: list[LocalDerivatives]) -> LocalDerivatives:
    """The entries of ``parts`` one after another. Consumes ``parts`` (the list is emptied):
    each field's pieces are freed as soon as they are joined, so that the peak memory is the
    result plus one field's pieces, not twice the result."""
    if len(parts) == 1:
        return parts.pop()
    pieces = {f.name: [getattr(p, f.name) for p in parts] for f in attrs.fields(LocalDerivatives)}
    parts.clear()
    joined = {}
    for name in list(pieces):
        joined[name] = torch.cat(pieces.pop(name))
    return LocalDerivatives(**joined)


def select_structures(data: FeaturizedSet, indices: Sequence[int]) -> FeaturizedSet:
    """The :class:`~aenet_fn.core.featurized.FeaturizedSet` of structures ``indices`` of ``data``
    (repeats allowed), local derivatives re-indexed to the new atom numbering."""
    selection = torch.as_tensor(list(indices), dtype=torch.long)
    if selection.numel() == 0:
        raise ValueError("select_structures: no structures selected")
    counts = data.n_atoms[selection]
    atoms = ranges(data.atom_start[selection], counts)
    new_start = torch.cumsum(counts, 0) - counts
    local = None
    empty = torch.zeros(0, dtype=torch.long)
    radial_start = radial_count = triplet_start = triplet_count = empty
    if data.local is not None:
        shift = new_start - data.atom_start[selection]
        radial_count = data.radial_count[selection]
        triplet_count = data.triplet_count[selection]
        radial = ranges(data.radial_start[selection], radial_count)
        triplet = ranges(data.triplet_start[selection], triplet_count)
        r_shift = torch.repeat_interleave(shift, radial_count)
        t_shift = torch.repeat_interleave(shift, triplet_count)
        values = {}
        for field in attrs.fields(LocalDerivatives):
            column = getattr(data.local, field.name)
            entries = radial if field.name.startswith("radial") else triplet
            value = column[entries]
            if field.name in _ATOM_FIELDS:
                value = value + (r_shift if field.name.startswith("radial") else t_shift)
            values[field.name] = value
        local = LocalDerivatives(**values)
        radial_start = torch.cumsum(radial_count, 0) - radial_count
        triplet_start = torch.cumsum(triplet_count, 0) - triplet_count
    return FeaturizedSet(
        features=data.features[atoms],
        species_index=data.species_index[atoms],
        atom_start=new_start,
        n_atoms=counts,
        energies=data.energies[selection],
        forces=data.forces[atoms],
        species_counts=data.species_counts[selection],
        local=local,
        radial_start=radial_start,
        radial_count=radial_count,
        triplet_start=triplet_start,
        triplet_count=triplet_count,
        names=tuple(data.names[i] for i in selection.tolist()),
        descriptor=data.descriptor,
    )


def energy_view(data: FeaturizedSet) -> FeaturizedSet:
    """``data`` without local derivatives (an energy-only view; nothing copied)."""
    empty = torch.zeros(0, dtype=torch.long)
    return attrs.evolve(
        data,
        local=None,
        radial_start=empty,
        radial_count=empty,
        triplet_start=empty,
        triplet_count=empty,
    )


def concatenate(sets: Sequence[FeaturizedSet]) -> FeaturizedSet:
    """The structures of ``sets`` one after another in one :class:`FeaturizedSet` (local
    derivatives re-indexed); all sets with derivatives, or none."""
    if not sets:
        raise ValueError("concatenate: no featurized sets")
    with_local = [s.local is not None for s in sets]
    if any(with_local) and not all(with_local):
        raise ValueError("concatenate: some sets carry local derivatives and some do not")
    descriptors = {s.descriptor for s in sets} - {None}
    if len(descriptors) > 1:
        raise ValueError("concatenate: the sets were featurized with different descriptors")
    n_atoms = torch.cat([s.n_atoms for s in sets])
    local = None
    empty = torch.zeros(0, dtype=torch.long)
    radial_start = radial_count = triplet_start = triplet_count = empty
    if all(with_local):
        offsets = torch.cumsum(torch.tensor([0] + [int(s.n_atoms.sum()) for s in sets]), 0)
        local = _concat_local([_offset_atoms(s.local, int(o)) for s, o in zip(sets, offsets)])
        radial_count = torch.cat([s.radial_count for s in sets])
        triplet_count = torch.cat([s.triplet_count for s in sets])
        radial_start = torch.cumsum(radial_count, 0) - radial_count
        triplet_start = torch.cumsum(triplet_count, 0) - triplet_count
    return FeaturizedSet(
        features=torch.cat([s.features for s in sets]),
        species_index=torch.cat([s.species_index for s in sets]),
        atom_start=torch.cumsum(n_atoms, 0) - n_atoms,
        n_atoms=n_atoms,
        energies=torch.cat([s.energies for s in sets]),
        forces=torch.cat([s.forces for s in sets]),
        species_counts=torch.cat([s.species_counts for s in sets]),
        local=local,
        radial_start=radial_start,
        radial_count=radial_count,
        triplet_start=triplet_start,
        triplet_count=triplet_count,
        names=tuple(name for s in sets for name in s.names),
        descriptor=next(iter(descriptors), None),
    )


def take_structures(
    data: FeaturizedSet,
    selection: torch.Tensor,
    force_selected: torch.Tensor | None = None,
    jacobian: StoredJacobian | None = None,
) -> MiniBatch:
    """The mini-batch of structures ``selection`` ``[b]`` (indices into ``data``, repeats
    allowed). ``force_selected`` ``[B]`` bool marks the structures whose forces are supervised;
    their local derivatives are included (``data`` must carry them): as derivative entries, or
    with ``jacobian`` (:func:`~aenet_fn.speedups.force_jacobian.set_jacobian` of ``data``) as the
    batch's assembled Jacobian.
    Every index and size is laid out on the host from the set's :class:`HostLayout`; a set
    off the CPU only gathers its rows, with ``selection`` and ``force_selected`` given on the
    CPU (as the training driver does) nothing is read back from it."""
    take = torch.Tensor.index_select  # much faster than advanced indexing on CPU
    layout, device = data.layout, data.features.device
    selection = selection.cpu()
    counts = take(layout.n_atoms, 0, selection)
    atom_start = take(layout.atom_start, 0, selection)
    atoms = ranges(atom_start, counts)
    new_start = torch.cumsum(counts, 0) - counts
    structure_index = torch.repeat_interleave(torch.arange(selection.shape[0], device=HOST), counts)
    species = take(layout.species_index, 0, atoms)
    order = torch.argsort(species, stable=True)  # batch position (species-major) → structure-major
    position = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=HOST))
    atoms, structure_index, species = (take(x, 0, order) for x in (atoms, structure_index, species))
    labelled = take(layout.labelled, 0, atoms)
    local, entries = None, ()
    force_atoms = torch.zeros_like(labelled)
    if force_selected is not None:
        known = torch.zeros_like(counts).index_add(0, structure_index, labelled.to(counts.dtype))
        supervised = take(force_selected.cpu(), 0, selection) & (known == counts)
        if bool(supervised.any()):
            if data.local is None:
                raise ValueError("take_structures: forces requested but the set has no derivatives")
            force_atoms = take(supervised, 0, structure_index)
            if jacobian is None:
                shift = take(new_start - atom_start, 0, structure_index)[force_atoms]
                entries = _entry_plan(layout, atoms[force_atoms], shift)
            elif (jacobian.n_atoms, jacobian.n_structures) != (
                data.features.shape[0],
                data.n_structures,
            ):
                raise ValueError(
                    f"take_structures: the Jacobian of a set of {jacobian.n_structures} structures "
                    f"({jacobian.n_atoms} atoms) given for a set of {data.n_structures} "
                    f"({data.features.shape[0]} atoms; use set_jacobian of this set)"
                )
            else:
                local = jacobian.batch(selection, supervised, atoms, order, position, force_atoms)
    n_species = data.species_counts.shape[1]
    blocks = tuple(torch.bincount(species, minlength=n_species).tolist())
    host = (atoms, species, structure_index, counts, selection, force_atoms, labelled.sum())
    (atoms, species, structure_index, counts, selection, force_atoms, labelled, *planned) = (
        _to_device(device, *host, *((position, *entries) if entries else ()))
    )
    if planned:
        local = _gather_local(data.local, *planned)
    return MiniBatch(
        features=take(data.features, 0, atoms),
        species_index=species,
        structure_index=structure_index,
        n_atoms=counts,
        energies=take(data.energies, 0, selection),
        forces=take(data.forces, 0, atoms),
        force_atoms=force_atoms,
        local=local,
        n_force_labelled=labelled,
        atom_index=atoms,
        species_blocks=blocks,
    )


def _entry_plan(
    layout: HostLayout, supervised_atoms: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """On the host, the derivative entries of the batch's supervised atoms
    (``supervised_atoms``: their global indices, in the batch's species-major order) and each
    entry's ``shift`` (global → structure-major batch atom): ``(radial, radial_shift,
    triplet, triplet_shift)``. Each centre's entries are one run in the set, so the entries come
    sorted by species-major centre, as :func:`~aenet_fn.core.local_derivatives.centre_sums`
    needs."""
    take = torch.Tensor.index_select  # much faster than advanced indexing on CPU
    plan = []
    for starts, counts in (
        (layout.radial_start, layout.radial_count),
        (layout.triplet_start, layout.triplet_count),
    ):
        chosen = take(counts, 0, supervised_atoms)
        plan += [ranges(take(starts, 0, supervised_atoms), chosen), shift.repeat_interleave(chosen)]
    return tuple(plan)


def _gather_local(
    local: LocalDerivatives,
    position: torch.Tensor,
    radial: torch.Tensor,
    radial_shift: torch.Tensor,
    triplet: torch.Tensor,
    triplet_shift: torch.Tensor,
) -> LocalDerivatives:
    """The entries of :func:`_entry_plan` gathered from the set's ``local`` (on its device),
    their atoms renumbered into the batch (``position``: structure-major → species-major)."""
    take = torch.Tensor.index_select

    def atom(field: torch.Tensor, entries: torch.Tensor, entry_shift: torch.Tensor):
        return take(position, 0, take(field, 0, entries) + entry_shift)

    return LocalDerivatives(
        radial_centre=atom(local.radial_centre, radial, radial_shift),
        radial_neighbour=atom(local.radial_neighbour, radial, radial_shift),
        triplet_centre=atom(local.triplet_centre, triplet, triplet_shift),
        triplet_first=atom(local.triplet_first, triplet, triplet_shift),
        triplet_second=atom(local.triplet_second, triplet, triplet_shift),
        radial_spin=take(local.radial_spin, 0, radial),
        triplet_spin=take(local.triplet_spin, 0, triplet),
        radial=take(local.radial, 0, radial),
        angular_first=take(local.angular_first, 0, triplet),
        angular_second=take(local.angular_second, 0, triplet),
    )


def _to_device(device: torch.device, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Host index ``tensors`` (integer or bool) on the set's ``device``: themselves on the CPU,
    elsewhere all in one copy (on CUDA, one asynchronous copy from pinned memory, so the host
    never waits for the device), split and cast back there."""
    if device.type == "cpu":
        return tensors
    flat = torch.cat([t.reshape(-1).to(torch.long) for t in tensors])
    cuda = device.type == "cuda"
    moved = (flat.pin_memory() if cuda else flat).to(device, non_blocking=cuda)
    pieces = moved.split([t.numel() for t in tensors])
    return tuple(p.view(t.shape).to(t.dtype) for p, t in zip(pieces, tensors))


def _pad(tensor: torch.Tensor, length: int, value: float | int | bool) -> torch.Tensor:
    extra = tensor.new_full((length - tensor.shape[0], *tensor.shape[1:]), value)
    return torch.cat([tensor, extra])


def _empty_like_local(template: LocalDerivatives) -> LocalDerivatives:
    return LocalDerivatives(
        **{f.name: getattr(template, f.name)[:0] for f in attrs.fields(LocalDerivatives)}
    )


def stack_batches(batches: Sequence[MiniBatch]) -> MiniBatch:
    """Stack the batches of committee members (same number of structures ``b``) along a new
    leading axis for ``vmap``. Each species block is padded to the largest count among the
    members (the last block by one more atom): padding atoms have zero features, no labels and
    sit in the spare structure slot ``b``; derivative entries are padded with zero blocks acting
    on a padding atom; assembled Jacobians are kept per member with their atoms' padded
    positions (:func:`~aenet_fn.speedups.force_jacobian.stack_jacobians`: such a batch is used with
    the members as a leading axis, ``batch_loss`` of values ``[M, P]``, not under ``vmap``).
    Padding changes no energy, force or gradient."""
    sizes = {batch.n_structures for batch in batches}
    if len(sizes) != 1:
        raise ValueError(f"stack_batches: batches hold different numbers of structures {sizes}")
    (n_structures,) = sizes
    blocks = [max(column) for column in zip(*(batch.species_blocks for batch in batches))]
    blocks[-1] += 1  # guarantees a padding atom for padded derivative entries
    device = batches[0].species_index.device
    block_start = torch.tensor([0, *blocks[:-1]], device=device).cumsum(0)
    n_padded = sum(blocks)
    dummy_atom = n_padded - 1

    def remap(batch: MiniBatch) -> torch.Tensor:
        """New position of each atom of ``batch`` in the padded layout."""
        species = batch.species_index
        own_start = torch.tensor([0, *batch.species_blocks[:-1]], device=species.device).cumsum(0)
        atoms = torch.arange(species.shape[0], device=species.device)
        return block_start[species] + atoms - own_start[species]

    positions = [remap(batch) for batch in batches]
    padding_species = torch.repeat_interleave(
        torch.arange(len(blocks), device=device), torch.tensor(blocks, device=device)
    )

    def stacked(field: str, fill: torch.Tensor | float | bool) -> torch.Tensor:
        rows = []
        for batch, position in zip(batches, positions):
            value = getattr(batch, field)
            padded = value.new_empty((n_padded, *value.shape[1:]))
            padded[...] = (
                fill
                if not isinstance(fill, torch.Tensor)
                else fill.reshape(-1, *([1] * (value.ndim - 1)))
            )
            padded[position] = value
            rows.append(padded)
        return torch.stack(rows)

    local = None
    template = next((batch.local for batch in batches if batch.local is not None), None)
    if template is not None and not isinstance(template, LocalDerivatives):
        if any(isinstance(batch.local, LocalDerivatives) for batch in batches):
            raise ValueError("stack_batches: batches mix derivative entries and Jacobians")
        local = template.stack([batch.local for batch in batches], positions)
    elif template is not None:
        filled = [
            _empty_like_local(template) if batch.local is None else batch.local for batch in batches
        ]
        n_radial = max(item.radial.shape[0] for item in filled)
        n_triplet = max(item.angular_first.shape[0] for item in filled)
        entries = {}
        for f in attrs.fields(LocalDerivatives):
            length = n_radial if f.name.startswith("radial") else n_triplet
            columns = []
            for item, position in zip(filled, positions):
                value = getattr(item, f.name)
                if f.name in _ATOM_FIELDS:
                    columns.append(_pad(position[value], length, dummy_atom))
                else:
                    columns.append(_pad(value, length, 0))
            entries[f.name] = torch.stack(columns)
        local = LocalDerivatives(**entries)
    return MiniBatch(
        features=stacked("features", 0.0),
        species_index=stacked("species_index", padding_species),
        structure_index=stacked("structure_index", n_structures),
        n_atoms=torch.stack([batch.n_atoms for batch in batches]),
        energies=torch.stack([batch.energies for batch in batches]),
        forces=stacked("forces", 0.0),
        force_atoms=stacked("force_atoms", False),
        local=local,
        n_force_labelled=torch.stack([batch.n_force_labelled for batch in batches]),
        atom_index=stacked("atom_index", -1),
        species_blocks=tuple(blocks),
    )
