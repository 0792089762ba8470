"""Host reads, data-dependent shapes and device slips per call of today's entry points.

Run: ``python -m benchmarks.host_syncs [--structures 8] [--top 8]``. Prints Markdown tables.
Each entry point runs once under :func:`aenet_fn.testing.devices.count_host_syncs` with
``expected_device="cpu"`` (so constructors without ``device=`` count): a training step with
forces, an energy-only training step (``force_weight=0``), the mini-batch selection that feeds
them (on the CPU, where its host-side planning counts too, and from a set on the meta device,
where only what reads or mixes the set's data counts), ``energy_and_forces`` on a collated
batch (neighbour graph included), the graph alone, and ``energy_forces_stress`` with a
prebuilt graph. Small TiO2 setup: the first structures of the
example set, [Ti, O] rad 6/5.0 Å, ang 3/3.5 Å, min 0.5 Å, 1×(5, tanh), batch 4, float64, CPU.
Each offence would stall a GPU step (or fail it, for a device slip); the counts are per call.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

import aenet_fn as af
from aenet_fn.core.descriptor import build_graph
from aenet_fn.core.potential import energy_forces_stress
from aenet_fn.testing.devices import (
    DEVICE,
    DYNAMIC_SHAPE,
    HOST_READ,
    Violation,
    count_host_syncs,
)
from benchmarks._common import markdown_table, tio2_structures

PARAMS = af.ChebyshevParams(["Ti", "O"], 6, 5.0, 3, 3.5, min_cutoff=0.5)
ARCH = {"Ti": [(5, "tanh")], "O": [(5, "tanh")]}
ATOMIC_ENERGIES = {"Ti": -1604.604515075, "O": -432.503149303}
BATCH = 4


ON_CPU = {"expected_device": "cpu"}
OFF_THE_CPU = {"expected_device": "meta", "host_work": True}
"""How a call is checked: everything on the CPU (constructors without ``device=`` count), or
a set on another device (the meta device) cut from host-side plans (host work allowed; what
reads or mixes the device's data counts)."""


def entry_points(n_structures: int) -> dict[str, tuple[Callable[[], Any], dict[str, Any]]]:
    """The measured calls, by name, each ready to run on the small TiO2 setup, with the
    checks' options."""
    structures = tio2_structures(n_structures)
    train = af.featurize_structures(PARAMS, structures, with_derivatives=True)
    model = af.init_model(PARAMS, ARCH, train, seed=0, atomic_energies=ATOMIC_ENERGIES)
    forces_config = af.TrainConfig(batch_size=BATCH, force_weight=0.1)
    energy_config = af.TrainConfig(batch_size=BATCH, force_weight=0.0)
    forces_state = af.init_train_state(model, train, forces_config)
    energy_state = af.init_train_state(model, train, energy_config)
    selection = torch.arange(BATCH)
    everything = torch.ones(train.n_structures, dtype=torch.bool)
    forces_batch = af.take_structures(train, selection, everything)
    energy_batch = af.take_structures(train, selection, None)
    batch = af.collate(structures[:2], species=PARAMS.species)
    graph = build_graph(PARAMS, batch)
    elsewhere = af.to(train, device="meta")
    return {
        "train_step (forces)": (
            lambda: af.train_step(forces_state, forces_batch, forces_config),
            ON_CPU,
        ),
        "train_step (energy only)": (
            lambda: af.train_step(energy_state, energy_batch, energy_config),
            ON_CPU,
        ),
        "take_structures (forces)": (
            lambda: af.take_structures(train, selection, everything),
            ON_CPU,
        ),
        "take_structures (energy only)": (
            lambda: af.take_structures(train, selection, None),
            ON_CPU,
        ),
        "take_structures (forces), set off the CPU": (
            lambda: af.take_structures(elsewhere, selection, everything),
            OFF_THE_CPU,
        ),
        "energy_and_forces": (lambda: af.energy_and_forces(model, batch), ON_CPU),
        "build_graph": (lambda: build_graph(PARAMS, batch), ON_CPU),
        "energy_forces_stress (prebuilt graph)": (
            lambda: energy_forces_stress(model, batch, graph),
            ON_CPU,
        ),
    }


def measure(function: Callable[[], Any], options: dict[str, Any]) -> list[Violation]:
    """The offences of one call of ``function`` under the checks' ``options`` (run once
    before, so that one-time set-up such as caches is not counted)."""
    function()
    return count_host_syncs(function, **options)[1]


def summary_row(name: str, offences: list[Violation]) -> dict[str, Any]:
    kinds = Counter(v.kind for v in offences)
    return {
        "entry": name,
        "total": len(offences),
        "host_reads": kinds[HOST_READ],
        "dynamic_shapes": kinds[DYNAMIC_SHAPE],
        "devices": kinds[DEVICE],
        "places": len({v.where for v in offences}),
    }


def place_rows(offences: list[Violation], top: int) -> list[dict[str, Any]]:
    """The ``top`` (op, source line) pairs by count."""
    code = {(v.op, v.where): v.code for v in offences}
    counts = Counter((v.op, v.where) for v in offences)
    return [
        {"count": n, "op": op, "where": where, "code": f"`{code[op, where]}`"}
        for (op, where), n in counts.most_common(top)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", type=int, default=8)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    measured = {name: measure(*entry) for name, entry in entry_points(args.structures).items()}
    print(f"torch {torch.__version__}; tio2: first {args.structures} structures; per call\n")
    columns = [
        ("entry", "entry point"),
        ("total", "offences"),
        ("host_reads", "host reads"),
        ("dynamic_shapes", "dynamic shapes"),
        ("devices", "device"),
        ("places", "source lines"),
    ]
    print(markdown_table([summary_row(n, o) for n, o in measured.items()], columns))
    place_columns = [("count", "n"), ("op", "op"), ("where", "where"), ("code", "code")]
    for name, offences in measured.items():
        if offences:
            print(f"\n### {name}\n")
            print(markdown_table(place_rows(offences, args.top), place_columns))


if __name__ == "__main__":
    main()
