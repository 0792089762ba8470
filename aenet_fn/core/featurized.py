"""Featurized data sets, as pure functions.

Training structures never move, so their features (and, for force training, the local descriptor
derivatives) are computed once by :func:`featurize_structures`; sets are selected from, viewed
without derivatives and joined here, and cut into mini-batches by
:func:`~aenet_fn.core.minibatch.take_structures`. Nothing of the descriptor is recomputed inside
the training loop.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import attrs
import torch
from torch import Tensor
from torch.func import jacfwd

from aenet_fn.core.batch import Batch, collate, ranges
from aenet_fn.core.descriptor import (
    ChebyshevParams,
    DescriptorGraph,
    build_graph,
    features_from_graph,
    species_lookup,
)
from aenet_fn.core.forces import strained
from aenet_fn.core.local_derivatives import ATOM_INDEX_FIELDS, LocalDerivatives, local_derivatives
from aenet_fn.core.normalization import ENERGY_DTYPE, as_energy
from aenet_fn.core.records import host_field, pytree_record, static_field, to, tree_bytes
from aenet_fn.core.structure import Structure, check_float_dtype

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
class StrainData:
    """Stress labels of a featurized set and the strain derivatives of its features.

    Attributes:
        stresses: ``[B, 3, 3]`` stress labels (eV/Å³, float64), NaN where unknown.
        volumes: ``[B]`` cell volumes (Å³, float64; NaN for structures not periodic along x,
            y and z).
        derivatives: ``[N, F, 3, 3]`` ``∂G_i/∂ε`` of every atom's raw features under a
            homogeneous strain ``ε`` of its structure, so that a model's stress is
            ``(1/V) Σ_i (∂E_i/∂G_i) · ∂G_i/∂ε`` (symmetrised).
    """

    stresses: torch.Tensor
    volumes: torch.Tensor
    derivatives: torch.Tensor

    @property
    def known(self) -> torch.Tensor:
        """``[B]`` bool: structures with a stress label."""
        return torch.isfinite(self.stresses).all(dim=-1).all(dim=-1)


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
        strain: stress labels and the features' strain derivatives (:class:`StrainData`), or
            None (featurized without ``with_stress``).
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
    strain: StrainData | None = None

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
    with_stress: bool = False,
) -> FeaturizedSet:
    """Featurize ``structures`` (in chunks of ``chunk_size`` to bound memory) into a
    :class:`FeaturizedSet`; with ``with_derivatives`` also the local descriptor derivatives,
    with ``with_stress`` the stress labels and the features' strain derivatives
    (:class:`StrainData`, 9 numbers per feature and atom). ``dtype`` is ``torch.float32`` or
    ``torch.float64``; ``chunk_size`` a positive integer. The set is computed on the CPU (the
    neighbour search runs on the host) and moved to ``device`` once (default: stays on the
    CPU)."""
    check_float_dtype(dtype, "featurize_structures")
    _check_chunk_size(chunk_size)
    if not structures:
        raise ValueError("featurize_structures: no structures")
    blocks: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("features", "species", "local", "strain")
    }
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
        if with_stress:
            blocks["strain"].append(strain_derivatives(params, batch, graph))
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
        strain=_strain_data(structures, blocks["strain"]) if with_stress else None,
    )
    return data if device is None else to(data, device=device)


def strain_derivatives(params: ChebyshevParams, batch: Batch, graph: DescriptorGraph) -> Tensor:
    """``[N, F, 3, 3]`` ``∂G_i/∂ε`` of the raw features of ``batch`` (its ``graph``) under one
    homogeneous strain ``ε`` applied to every structure (structures do not interact, so each
    atom's derivative is that of its own structure's strain), by forward-mode ``torch.func``."""

    def features(strain: Tensor) -> Tensor:
        strains = strain.expand(batch.cells.shape[0], 3, 3)
        positions, cells = strained(batch.positions, batch.cells, batch.structure_index, strains)
        return features_from_graph(params, positions, cells, batch.structure_index, graph)

    return jacfwd(features)(batch.positions.new_zeros(3, 3)).detach()


def _strain_data(structures: Sequence[Structure], derivatives: list[Tensor]) -> StrainData:
    """The :class:`StrainData` of ``structures`` from their chunks' strain derivatives."""
    nan = torch.full((3, 3), float("nan"), dtype=ENERGY_DTYPE)
    volumes = [
        float(torch.linalg.det(s.cell).abs()) if all(s.pbc) else float("nan") for s in structures
    ]
    return StrainData(
        stresses=torch.stack([nan if s.stress is None else s.stress for s in structures]),
        volumes=torch.tensor(volumes, dtype=ENERGY_DTYPE),
        derivatives=torch.cat(derivatives),
    )


@attrs.frozen
class SetEstimate:
    """What :func:`featurize_structures` would take for a set of structures, estimated from a
    sample of them (:func:`estimate_set`).

    Attributes:
        n_structures, n_atoms: the set's size.
        neighbours_per_atom: mean neighbour entries per atom within the radial cutoff (periodic
            images included; 0 for an energy-only estimate).
        feature_bytes: memory of the features and labels (and, ``with_stress``, the stress
            data, which training keeps in memory).
        total_bytes: memory of the whole set (features and, ``with_derivatives``, the local
            derivatives, which grow with the neighbours of each atom).
    """

    n_structures: int
    n_atoms: int
    neighbours_per_atom: float
    feature_bytes: int
    total_bytes: int


def estimate_set(
    params: ChebyshevParams,
    structures: Sequence[Structure],
    *,
    with_derivatives: bool,
    dtype: torch.dtype = torch.float64,
    sample: int = 16,
    with_stress: bool = False,
) -> SetEstimate:
    """The memory :func:`featurize_structures` would take for ``structures``, from ``sample``
    of them spread over the sequence (their bytes per atom, times every structure's atoms);
    ``with_derivatives`` and ``with_stress`` as :func:`featurize_structures` takes them."""
    count = len(structures)
    if count == 0:
        raise ValueError("estimate_set: no structures")
    picked = sorted(
        {round(k * (count - 1) / max(sample - 1, 1)) for k in range(min(sample, count))}
    )
    chosen = [structures[k] for k in picked]
    part = featurize_structures(
        params, chosen, with_derivatives=with_derivatives, dtype=dtype, with_stress=with_stress
    )
    atoms = sum(structures[k].n_atoms for k in range(count))
    per_atom = atoms / sum(s.n_atoms for s in chosen)
    entries = 0 if part.local is None else part.local.radial_centre.numel()
    return SetEstimate(
        n_structures=count,
        n_atoms=atoms,
        neighbours_per_atom=entries / max(int(part.n_atoms.sum()), 1),
        feature_bytes=round(tree_bytes(energy_view(part)) * per_atom),
        total_bytes=round(tree_bytes(part) * per_atom),
    )


def _offset_atoms(local: LocalDerivatives, offset: int) -> LocalDerivatives:
    return attrs.evolve(local, **{f: getattr(local, f) + offset for f in ATOM_INDEX_FIELDS})


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
            if field.name in ATOM_INDEX_FIELDS:
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
        strain=None
        if data.strain is None
        else StrainData(
            stresses=data.strain.stresses[selection],
            volumes=data.strain.volumes[selection],
            derivatives=data.strain.derivatives[atoms],
        ),
    )


def energy_view(data: FeaturizedSet) -> FeaturizedSet:
    """``data`` without local derivatives (an energy-only view, stress data kept; nothing
    copied)."""
    empty = torch.zeros(0, dtype=torch.long)
    return attrs.evolve(
        data,
        local=None,
        radial_start=empty,
        radial_count=empty,
        triplet_start=empty,
        triplet_count=empty,
    )


def with_empty_derivatives(data: FeaturizedSet, like: LocalDerivatives) -> FeaturizedSet:
    """``data`` (featurized without derivatives) with no local-derivative entries, in the form
    of ``like``: it joins sets with derivatives in :func:`concatenate` for structures whose
    forces are not supervised (forces computed from it would be zero)."""
    if data.local is not None:
        raise ValueError("with_empty_derivatives: the set already carries local derivatives")
    none = torch.zeros(data.n_structures, dtype=torch.long)
    return attrs.evolve(
        data,
        local=like.without_entries(),
        radial_start=none,
        radial_count=none,
        triplet_start=none,
        triplet_count=none,
    )


def concatenate(sets: Sequence[FeaturizedSet]) -> FeaturizedSet:
    """The structures of ``sets`` one after another in one :class:`FeaturizedSet` (local
    derivatives re-indexed); all sets with derivatives (stress data), or none."""
    if not sets:
        raise ValueError("concatenate: no featurized sets")
    with_local = [s.local is not None for s in sets]
    if any(with_local) and not all(with_local):
        raise ValueError("concatenate: some sets carry local derivatives and some do not")
    with_strain = [s.strain is not None for s in sets]
    if any(with_strain) and not all(with_strain):
        raise ValueError("concatenate: some sets carry stress data and some do not")
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
        strain=StrainData(
            *(
                torch.cat([getattr(s.strain, f.name) for s in sets])
                for f in attrs.fields(StrainData)
            )
        )
        if all(with_strain)
        else None,
    )
