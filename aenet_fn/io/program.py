"""A trained potential as a self-contained ``torch.export`` program (``.pt2``).

The program computes the energy, forces and stress of one structure from its positions, cell,
species and a full neighbour list, with any number of atoms and neighbour entries. It holds
only standard aten operations and the model's numbers: plain ``torch.export.load`` runs it,
with no aenet_fn installed (C++ through AOTInductor too). The descriptor is the neighbour-list
form of :mod:`~aenet_fn.core.pair_descriptor`, and forces and stress are traced
``torch.func`` derivatives of the energy, so the numbers are those of
:func:`~aenet_fn.core.potential.energy_forces_stress` to rounding.

Program inputs (``dtype``: the program's float type, stored in its metadata):

* ``positions`` ``[N, 3]`` (Å, dtype), ``cell`` ``[3, 3]`` (Å, dtype; rows are lattice vectors,
  zeros for an isolated structure);
* ``species`` ``[N]`` int64 index of each atom's element in the metadata's ``species``;
* ``centers``, ``neighbors`` ``[P]`` int64 and ``shifts`` ``[P, 3]`` int64: a full neighbour
  list (``r_j − r_i + S · cell``, both directions), e.g. ASE's
  ``neighbor_list("ijS", atoms, cutoff)`` with any ``cutoff >=`` the metadata's ``cutoff``.

Outputs: ``energy`` ``[]`` (eV, float64), ``forces`` ``[N, 3]`` (eV/Å, dtype) and ``stress``
``[3, 3]`` (eV/Å³, dtype, ASE's sign; NaN when the cell has no volume).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree

from aenet_fn.core.descriptor import ChebyshevParams
from aenet_fn.core.forces import value_and_forces
from aenet_fn.core.neighbors import Neighbors, neighbor_list
from aenet_fn.core.pair_descriptor import pair_features
from aenet_fn.core.potential import Model, atomic_energies_from_features
from aenet_fn.core.records import to
from aenet_fn.io.atomic import replacing

PROGRAM_FORMAT = "aenet_fn.exported_program/1"
"""The ``format`` entry of an exported program's metadata."""

METADATA_FILE = "aenet_fn.json"
"""Name of the metadata entry stored with the program (``torch.export.save``'s extra files)."""


def _structure_energy_forces_stress(
    model: Model,
    positions: torch.Tensor,
    cell: torch.Tensor,
    species: torch.Tensor,
    pairs: Neighbors,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Energy ``[]``, forces ``[N, 3]`` and stress ``[3, 3]`` of one structure (the traced
    function of the program)."""

    def energies(strained_positions: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        features = pair_features(model.descriptor, strained_positions, cells[0], species, pairs)
        return atomic_energies_from_features(model, features, species).sum().reshape(1)

    volume = torch.linalg.det(cell).abs()
    periodic = (volume > 0).reshape(1, 1).expand(1, 3)
    result = value_and_forces(
        energies,
        positions,
        cell.reshape(1, 3, 3),
        torch.zeros_like(species),
        periodic,
        compute_stress=True,
    )
    return result.energy[0], result.forces, result.stress[0]


def _example_inputs(descriptor: ChebyshevParams, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """A small periodic structure of every species to trace with: 5 atoms in a cell wide enough
    that the sizes of atoms and entries differ from each other and from 3."""
    generator = torch.Generator().manual_seed(0)
    side = 1.2 * descriptor.cutoff
    positions = torch.rand(5, 3, generator=generator, dtype=torch.float64) * side
    cell = torch.eye(3, dtype=torch.float64) * side
    pairs = neighbor_list(positions, cell, None, descriptor.cutoff)
    species = torch.arange(5) % len(descriptor.species)
    return (
        positions.to(dtype),
        cell.to(dtype),
        species,
        pairs.centers,
        pairs.neighbors,
        pairs.shifts,
    )


class _Program(torch.nn.Module):
    """The traced aten graph with the model's tensors as buffers (what ``torch.export`` sees)."""

    def __init__(self, graph: torch.fx.GraphModule, leaves: list[torch.Tensor]):
        super().__init__()
        self.graph_module = graph
        self.names = [f"model_{k}" for k in range(len(leaves))]
        for name, leaf in zip(self.names, leaves):
            self.register_buffer(name, leaf)

    def forward(self, positions, cell, species, centers, neighbors, shifts):
        leaves = [getattr(self, name) for name in self.names]
        return self.graph_module(positions, cell, species, centers, neighbors, shifts, *leaves)


def program_metadata(model: Model, dtype: torch.dtype) -> dict[str, Any]:
    """What a user of the exported program needs: species order, cutoff (Å), dtype, units."""
    return {
        "format": PROGRAM_FORMAT,
        "species": list(model.descriptor.species),
        "cutoff": model.descriptor.cutoff,
        "dtype": str(dtype).removeprefix("torch."),
        "inputs": ["positions", "cell", "species", "centers", "neighbors", "shifts"],
        "outputs": ["energy", "forces", "stress"],
        "units": {"energy": "eV", "forces": "eV/Å", "stress": "eV/Å^3", "length": "Å"},
    }


def export_program(model: Model, dtype: torch.dtype | None = None) -> torch.export.ExportedProgram:
    """``model`` as a ``torch.export`` program on the CPU (see the module docstring for its
    inputs and outputs); ``dtype``: its float type (default: the model's feature dtype).
    Move it to a GPU with ``torch.export.passes.move_to_device_pass``."""
    dtype = model.normalization.feature_mean.dtype if dtype is None else dtype
    leaves, spec = pytree.tree_flatten(to(model, "cpu", dtype))
    leaves = [leaf.detach() for leaf in leaves]

    def traced(positions, cell, species, centers, neighbors, shifts, *values):
        model = pytree.tree_unflatten(list(values), spec)
        pairs = Neighbors(centers, neighbors, shifts)
        return _structure_energy_forces_stress(model, positions, cell, species, pairs)

    example = _example_inputs(model.descriptor, dtype)
    graph = make_fx(traced, tracing_mode="symbolic")(*example, *leaves)
    atoms, entries = torch.export.Dim.DYNAMIC, torch.export.Dim.DYNAMIC
    shapes = ({0: atoms}, None, {0: atoms}, {0: entries}, {0: entries}, {0: entries})
    return torch.export.export(_Program(graph, leaves), example, dynamic_shapes=shapes)


def save_program(model: Model, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as an exported program to ``path`` (``.pt2``, atomically), with its
    metadata (:func:`program_metadata`) stored beside the graph as ``aenet_fn.json``. Returns
    the path. Load it with ``torch.export.load(path, extra_files={"aenet_fn.json": ""})``."""
    program = export_program(model, dtype)
    metadata = program_metadata(model, dtype or model.normalization.feature_mean.dtype)
    archive = io.BytesIO()
    torch.export.save(program, archive, extra_files={METADATA_FILE: json.dumps(metadata, indent=1)})
    with replacing(path) as temporary:
        temporary.write_bytes(archive.getvalue())
    return Path(path)
