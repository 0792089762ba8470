"""Mini-batches cut from a featurized set, as pure functions.

A mini-batch is a selection of whole structures from a
:class:`~aenet_fn.core.featurized.FeaturizedSet` (:func:`take_structures`): rows of the feature
matrix and, for the structures whose forces are supervised, their derivative entries
re-indexed to the batch's atom numbering, laid out on the host and gathered on the set's
device in one transfer. :func:`stack_batches` pads the batches of committee members to one
shape along a leading member axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import attrs
import torch

from aenet_fn.core.batch import inverse_permutation, ranges
from aenet_fn.core.featurized import HOST, FeaturizedSet, HostLayout
from aenet_fn.core.local_derivatives import ATOM_INDEX_FIELDS, LocalDerivatives, PositionMap
from aenet_fn.core.normalization import as_energy
from aenet_fn.core.records import pytree_record, static_field


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


@pytree_record
@attrs.frozen(eq=False)
class StrainBatch:
    """A mini-batch's stress labels and its features' strain derivatives.

    Attributes:
        derivatives: ``[n, F, 3, 3]`` ``∂G_i/∂ε`` of the batch's atoms (batch order).
        stresses: ``[b, 3, 3]`` stress labels (eV/Å³, float64; 0 where not supervised).
        volumes: ``[b]`` cell volumes (Å³, float64; 1 where not supervised).
        supervised: ``[b]`` bool, structures whose stress the batch supervises.
    """

    derivatives: torch.Tensor
    stresses: torch.Tensor
    volumes: torch.Tensor
    supervised: torch.Tensor


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
        strain: stress labels and strain derivatives (:class:`StrainBatch`), or None when the
            batch supervises no stress.
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
    strain: StrainBatch | None = None

    @property
    def n_structures(self) -> int:
        """Number of structures ``b`` (of each member's batch, in stacked batches)."""
        return int(self.n_atoms.shape[-1])

    @property
    def supervises_labels(self) -> bool:
        """Whether the batch supervises forces or stresses (beyond its energies)."""
        return self.local is not None or self.strain is not None

    @property
    def stress_supervised(self) -> torch.Tensor | None:
        """``[b]`` bool, structures whose stress the batch supervises (None: no stress)."""
        return None if self.strain is None else self.strain.supervised


def take_structures(
    data: FeaturizedSet,
    selection: torch.Tensor,
    force_selected: torch.Tensor | None = None,
    jacobian: StoredJacobian | None = None,
    with_stress: bool = False,
) -> MiniBatch:
    """The mini-batch of structures ``selection`` ``[b]`` (indices into ``data``, repeats
    allowed). ``force_selected`` ``[B]`` bool marks the structures whose forces are supervised;
    their local derivatives are included (``data`` must carry them): as derivative entries, or
    with ``jacobian`` (:func:`~aenet_fn.speedups.force_jacobian.set_jacobian` of ``data``) as the
    batch's assembled Jacobian. ``with_stress``: the batch supervises the stress of its
    structures with a stress label (``data`` must carry :class:`StrainData`).
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
    position = inverse_permutation(order)
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
    strain = None
    if with_stress:
        if data.strain is None:
            raise ValueError("take_structures: stresses requested but the set has no stress data")
        stresses = take(data.strain.stresses, 0, selection)
        supervised = take(data.strain.known, 0, selection)
        strain = StrainBatch(
            derivatives=take(data.strain.derivatives, 0, atoms),
            stresses=torch.where(supervised[:, None, None], stresses, 0.0),
            volumes=torch.where(supervised, take(data.strain.volumes, 0, selection), 1.0),
            supervised=supervised,
        )
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
        strain=strain,
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
            template.without_entries() if batch.local is None else batch.local for batch in batches
        ]
        n_radial = max(item.radial.shape[0] for item in filled)
        n_triplet = max(item.angular_first.shape[0] for item in filled)
        entries = {}
        for f in attrs.fields(LocalDerivatives):
            length = n_radial if f.name.startswith("radial") else n_triplet
            columns = []
            for item, position in zip(filled, positions):
                value = getattr(item, f.name)
                if f.name in ATOM_INDEX_FIELDS:
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
        strain=_stacked_strain(batches, positions, n_padded),
    )


def _stacked_strain(
    batches: Sequence[MiniBatch], positions: Sequence[torch.Tensor], n_padded: int
) -> StrainBatch | None:
    """The members' strain data stacked (derivatives padded with zeros), or None."""
    parts = [batch.strain for batch in batches]
    if all(part is None for part in parts):
        return None
    if any(part is None for part in parts):
        raise ValueError("stack_batches: some batches supervise stresses and some do not")
    derivatives = []
    for part, position in zip(parts, positions):
        padded = part.derivatives.new_zeros((n_padded, *part.derivatives.shape[1:]))
        padded[position] = part.derivatives
        derivatives.append(padded)
    return StrainBatch(
        derivatives=torch.stack(derivatives),
        stresses=torch.stack([part.stresses for part in parts]),
        volumes=torch.stack([part.volumes for part in parts]),
        supervised=torch.stack([part.supervised for part in parts]),
    )
