"""Featurization throughput on the TiO2 reference set and scaling with system size.

Run: ``python -m benchmarks.featurize [--quick]``. Prints JSON, then a table.

* TiO2 set (aenet_fn.examples.TIO2_STRUCTURES, 100 structures, 2105 atoms), species [Ti, O],
  rad 10/6.0 Å, ang 3/3.5 Å, min 0.5 Å, float64, CPU, 2 threads: atoms/s for the energy view
  (neighbour list + features), the features alone with the pair/triplet graph reused, and
  features + forces (a linear energy over the features, differentiated with torch.func).
* Periodic boxes of 100 … 100 000 atoms (jittered simple-cubic packing, 2.3 Å spacing): seconds for
  the neighbour list and for the featurization; cost per atom stays flat when scaling is linear.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from aenet_fn import Structure, build_graph, collate, features_from_graph
from aenet_fn.core.forces import value_and_forces
from aenet_fn.core.neighbors import batch_neighbor_list
from benchmarks._common import (
    PARAMS,
    best_time,
    data_description,
    parse_benchmark_arguments,
    report,
    tio2_setup_info,
    tio2_structures,
)

BOX_SPACING = 2.3
QUICK_SIZES = [100, 1000, 10_000]
FULL_SIZES = [100, 1000, 10_000, 100_000]


def tio2_rows(structures: list[Structure], repeats: int) -> list[dict]:
    """Throughput on the TiO2 reference set (or the given part of it)."""
    batch = collate(structures, PARAMS.species)
    n_atoms = batch.positions.shape[0]
    graph = build_graph(PARAMS, batch)
    weights = torch.randn(
        PARAMS.n_features, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )

    def energy(positions, cells):
        atomic = (
            features_from_graph(PARAMS, positions, cells, batch.structure_index, graph) @ weights
        )
        return atomic.new_zeros(batch.n_structures).index_add(0, batch.structure_index, atomic)

    def energy_view():
        with torch.no_grad():
            g = build_graph(PARAMS, batch)
            return features_from_graph(
                PARAMS, batch.positions, batch.cells, batch.structure_index, g
            )

    def features_only():
        with torch.no_grad():
            return features_from_graph(
                PARAMS, batch.positions, batch.cells, batch.structure_index, graph
            )

    def with_forces():
        return value_and_forces(energy, batch.positions, batch.cells, batch.structure_index)

    rows = []
    for view, function in (
        ("energy view (graph + features)", energy_view),
        ("features, graph reused", features_only),
        ("features + forces, graph reused", with_forces),
        ("graph only", lambda: build_graph(PARAMS, batch)),
    ):
        seconds = best_time(function, repeats)
        rows.append(
            {
                "data": "tio2",
                "view": view,
                "atoms": n_atoms,
                "seconds": seconds,
                "atoms_per_s": n_atoms / seconds,
            }
        )
    return rows


def box(n_target: int, seed: int = 0) -> Structure:
    """A jittered simple-cubic TiO-like periodic box of about ``n_target`` atoms."""
    generator = torch.Generator().manual_seed(seed)
    side = max(2, round(n_target ** (1 / 3)))
    grid = torch.stack(torch.meshgrid(*[torch.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    positions = (grid + 0.1 * torch.rand(grid.shape, generator=generator)) * BOX_SPACING
    species = ["Ti" if k % 3 == 0 else "O" for k in range(grid.shape[0])]
    return Structure(
        positions.double(), species, cell=torch.eye(3, dtype=torch.float64) * side * BOX_SPACING
    )


def _neighbors_of(batch):
    return batch_neighbor_list(
        batch.positions, batch.cells, batch.pbc, batch.structure_index, PARAMS.cutoff
    )


def _featurize_box(batch):
    with torch.no_grad():
        graph = build_graph(PARAMS, batch)
        return features_from_graph(
            PARAMS, batch.positions, batch.cells, batch.structure_index, graph
        )


def scaling_rows(sizes: list[int], repeats: int) -> list[dict]:
    """Neighbour-list and featurization time of growing periodic boxes."""
    rows = []
    for size in sizes:
        batch = collate([box(size)], PARAMS.species)
        n_atoms = batch.positions.shape[0]
        reps, warmup = (repeats, 1) if n_atoms <= 10_000 else (1, 0)
        nl = best_time(partial(_neighbors_of, batch), reps, warmup)
        feat = best_time(partial(_featurize_box, batch), reps, warmup)
        rows.append(
            {
                "data": "box",
                "atoms": n_atoms,
                "neighbor_list_s": nl,
                "featurize_s": feat,
                "us_per_atom": feat / n_atoms * 1e6,
            }
        )
    return rows


def tio2_setup(structures: list[Structure]) -> dict:
    """The setup of :func:`tio2_rows`."""
    return tio2_setup_info(data_description(structures))


def scaling_setup() -> dict:
    """The setup of :func:`scaling_rows`."""
    return tio2_setup_info(f"jittered simple-cubic periodic boxes, {BOX_SPACING} Å spacing, 1/3 Ti")


def main() -> None:
    """Run the benchmark and print JSON plus a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller boxes, fewer repeats")
    args = parse_benchmark_arguments(parser)
    repeats = 2 if args.quick else 5
    structures = tio2_structures()
    report("featurize", tio2_setup(structures), tio2_rows(structures, repeats))
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    report("featurize-scaling", scaling_setup(), scaling_rows(sizes, repeats))


if __name__ == "__main__":
    main()
