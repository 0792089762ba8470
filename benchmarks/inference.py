"""Prediction throughput: structures/s and atoms/s, with and without forces, one model and a
committee, through the core functions and through the facade.

Run: ``python -m benchmarks.inference [--members 8] [--repeats 5]``. Prints JSON, then a table.
TiO2 set (all 100 structures in one call), descriptor [Ti, O] rad 10/6.0 Å, ang 3/3.5 Å, min
0.5 Å, 2×(10, tanh) networks (untrained: the weights do not change the cost), float64, CPU,
2 threads. Every call starts from structures already in memory and includes the neighbour
graph; the core calls start from a collated ``Batch``, the facade calls from the structure list
(``TorchANNPotential.predict`` batches by 32; both convert the results to NumPy).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch

import aenet_fn as af
from aenet_fn.driver.committee import committee_predict
from aenet_fn.torch_featurize import ChebyshevDescriptor
from aenet_fn.torch_training import TorchANNPotential, TorchCommitteePotential
from benchmarks._common import (
    ARCH,
    ARCH_TEXT,
    PARAMS,
    best_time,
    data_description,
    parse_benchmark_arguments,
    report,
    tio2_setup_info,
    tio2_structures,
)


def _facade(models: list[af.Model]) -> tuple[TorchANNPotential, TorchCommitteePotential]:
    """A facade potential holding ``models[0]`` and a facade committee holding all of them."""
    descriptor = ChebyshevDescriptor.from_params(PARAMS)
    members = []
    for model in models:
        member = TorchANNPotential(ARCH, descriptor)
        member.model = model
        members.append(member)
    committee = TorchCommitteePotential(ARCH, descriptor)
    committee.members = members
    return members[0], committee


def inference_rows(structures: list[af.Structure], members: int, repeats: int) -> list[dict]:
    """Best-of-``repeats`` prediction time of every (api, model, forces) case."""
    data = af.featurize_structures(PARAMS, structures, with_derivatives=False)
    models = [af.init_model(PARAMS, ARCH, data, seed=seed) for seed in range(members)]
    batch = af.collate(structures, PARAMS.species)
    potential, committee = _facade(models)

    def energies_only() -> Any:
        with torch.no_grad():
            return af.energy(models[0], batch)

    cases: list[tuple[str, str, int, bool, Callable[[], Any]]] = [
        ("core", "energy", 1, False, energies_only),
        ("core", "energy_and_forces", 1, True, lambda: af.energy_and_forces(models[0], batch)),
    ]
    for forces in (False, True):
        cases.append(
            (
                "core",
                "committee_predict",
                members,
                forces,
                lambda f=forces: committee_predict(models, batch, eval_forces=f),
            )
        )
    for forces in (False, True):
        cases.append(
            (
                "facade",
                "TorchANNPotential.predict",
                1,
                forces,
                lambda f=forces: potential.predict(structures, eval_forces=f),
            )
        )
    for forces in (False, True):
        cases.append(
            (
                "facade",
                "TorchCommitteePotential.predict",
                members,
                forces,
                lambda f=forces: committee.predict(structures, eval_forces=f),
            )
        )
    n_atoms = sum(s.n_atoms for s in structures)
    rows = []
    for api, call, n_members, forces, function in cases:
        seconds = best_time(function, repeats)
        rows.append(
            {
                "api": api,
                "call": call,
                "members": n_members,
                "forces": forces,
                "structures": len(structures),
                "atoms": n_atoms,
                "seconds": seconds,
                "structures_per_s": len(structures) / seconds,
                "atoms_per_s": n_atoms / seconds,
            }
        )
    return rows


def inference_setup(structures: list[af.Structure], members: int) -> dict:
    """The setup of :func:`inference_rows`."""
    return tio2_setup_info(
        data_description(structures) + ", all in one call",
        arch=ARCH_TEXT,
        committee_members=members,
    )


def main() -> None:
    """Run the benchmark and print JSON plus a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parse_benchmark_arguments(parser)
    structures = tio2_structures()
    rows = inference_rows(structures, args.members, args.repeats)
    report("inference", inference_setup(structures, args.members), rows)


if __name__ == "__main__":
    main()
