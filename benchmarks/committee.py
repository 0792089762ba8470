"""Committee training: vmapped members vs the same members one after another.

Run: ``python -m benchmarks.committee [--sizes 1 2 4 8 16] [--epochs 4]``. Prints JSON, then a
table. Same setup as ``benchmarks.train`` (TiO2 set, [Ti, O] rad 10/6.0 Å, ang 3/3.5 Å, min
0.5 Å, 2×(10, tanh), Adam, batch 16, float64, CPU, 2 threads). For each committee size and for
energy-only and force training (force_weight 0.1, all forces), with batches shared by the
members or drawn per member: seconds per epoch of the vmapped committee, of the sequential loop
over the same members, their ratio, and the vmapped cost relative to one member alone. Epoch
times are each run's mean epoch, from its history: the one-time set-up of a run (energy table,
stored Jacobian, built once per run by ``fit`` and ``committee_fit``) is left out of both.
"""

from __future__ import annotations

import argparse

import attrs

import aenet_fn as af
from aenet_fn.driver.committee import committee_fit, init_committee, member_seeds
from benchmarks._common import (
    ARCH,
    BATCH_SIZE,
    FORCE_WEIGHT,
    PARAMS,
    data_description,
    parse_benchmark_arguments,
    report,
    tio2_structures,
    training_setup_info,
)

QUICK_SIZES = [1, 4, 8]
FULL_SIZES = [1, 2, 4, 8, 16]


def _epoch_seconds(state: af.TrainState) -> float:
    """Seconds of the mean epoch of a run, from its history (a run's one-time set-up, such as
    its energy table or stored Jacobian, is not an epoch; energy-only runs lay out their few
    epochs in one plan, paid in the first, so the best single epoch would flatter them)."""
    return sum(row["epoch_time"] for row in state.history) / len(state.history)


def rows_for(
    train: af.FeaturizedSet, forces: bool, shared: bool, sizes: list[int], epochs: int
) -> list[dict]:
    """Per-epoch times of vmapped and sequential committees of each size."""
    config = af.TrainConfig(
        epochs=epochs, batch_size=BATCH_SIZE, force_weight=FORCE_WEIGHT if forces else 0.0
    )
    warm = init_committee(PARAMS, ARCH, train, attrs.evolve(config, epochs=1), [0, 1])
    committee_fit(warm, train, None, attrs.evolve(config, epochs=1))
    rows, single = [], None
    for size in sizes:
        seeds = member_seeds(size)
        members = init_committee(PARAMS, ARCH, train, config, seeds, shared_batches=shared)
        vmapped = _epoch_seconds(committee_fit(members, train, None, config)[0])
        sequential = sum(
            _epoch_seconds(
                af.fit(m, train, None, config if shared else attrs.evolve(config, seed=s))
            )
            for m, s in zip(members, seeds)
        )
        single = sequential / size if single is None else single
        rows.append(
            {
                "mode": "forces" if forces else "energy",
                "batches": "shared" if shared else "per-member",
                "members": size,
                "vmapped_epoch_s": vmapped,
                "sequential_epoch_s": sequential,
                "speedup": sequential / vmapped,
                "vmapped_vs_one_member": vmapped / single,
            }
        )
    return rows


def committee_rows(structures: list[af.Structure], sizes: list[int], epochs: int) -> list[dict]:
    """:func:`rows_for` for energy and force training, shared and per-member batches."""
    train = af.featurize_structures(PARAMS, structures, with_derivatives=True)
    return [
        row
        for forces in (False, True)
        for shared in (True, False)
        for row in rows_for(train, forces, shared, sizes, epochs)
    ]


def committee_setup(structures: list[af.Structure], epochs: int) -> dict:
    """The setup of :func:`committee_rows`."""
    return training_setup_info(data_description(structures), epochs)


def main() -> None:
    """Run the benchmark and print JSON plus a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=FULL_SIZES)
    parser.add_argument("--epochs", type=int, default=4)
    args = parse_benchmark_arguments(parser)
    structures = tio2_structures()
    rows = committee_rows(structures, args.sizes, args.epochs)
    report("committee", committee_setup(structures, args.epochs), rows)


if __name__ == "__main__":
    main()
