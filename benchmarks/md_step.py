"""Cost of one MD step (energy, forces and stress of one structure, neighbour search included)
through ``energy_forces_stress`` and through the exported program, plain and
``torch.compile``-d.

Run: ``python -m benchmarks.md_step [--repeats 5] [--no-compile]``. Prints JSON, then a table.
The published TiO2 potential (``aenet_fn.examples.TIO2_POTENTIAL``, 56 features), float64,
CPU, 2 threads; the rutile cell of 46 atoms and
its 2×2×2 supercell. Every variant is timed in alternating rounds (best of ``--repeats``); the
compile time is reported once.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import aenet_fn as af
from aenet_fn.examples import TIO2_POTENTIAL, TIO2_STRUCTURES
from benchmarks._common import parse_benchmark_arguments, report, setup_info


def _supercell(structure: af.Structure, repeat: int) -> af.Structure:
    atoms = af.io.to_ase(structure).repeat(repeat)
    return af.io.from_ase(atoms)


def step_functions(
    model: af.Model, structure: af.Structure, program: Callable[..., Any]
) -> dict[str, Callable[[], Any]]:
    """One MD step's evaluation of ``structure`` by each route, from its positions."""
    species = model.descriptor.species
    index = torch.tensor([species.index(s) for s in structure.species])
    positions = torch.as_tensor(structure.positions, dtype=torch.float64)
    cell = torch.as_tensor(structure.cell, dtype=torch.float64)

    def core() -> Any:
        batch = af.collate([structure], species=species)
        return af.energy_forces_stress(model, batch, compute_stress=True)

    def exported() -> Any:
        pairs = af.neighbor_list(positions, cell, None, model.descriptor.cutoff)
        return program(positions, cell, index, pairs.centers, pairs.neighbors, pairs.shifts)

    return {"energy_forces_stress": core, "exported program": exported}


def md_rows(repeats: int, compile_program: bool) -> list[dict[str, Any]]:
    """Best time per step of every (structure, route) case, alternating the routes."""
    model = af.read_aenet_ascii(TIO2_POTENTIAL)
    rutile = af.read_structures(sorted(TIO2_STRUCTURES.glob("*.xsf"))[1])[0]
    start = time.perf_counter()
    program = af.export_program(model).module()
    export_s = time.perf_counter() - start
    compiled, compile_s = None, None
    rows = []
    for structure in (rutile, _supercell(rutile, 2)):
        steps = step_functions(model, structure, program)
        if compile_program:
            if compiled is None:
                compiled = torch.compile(program, dynamic=True)
            start = time.perf_counter()
            step_functions(model, structure, compiled)["exported program"]()
            compile_s = time.perf_counter() - start if compile_s is None else compile_s
            steps["exported program, compiled"] = step_functions(model, structure, compiled)[
                "exported program"
            ]
        times: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(repeats):
            for name, step in steps.items():
                step()
                begin = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - begin)
        base = min(times["energy_forces_stress"])
        for name, measured in times.items():
            rows.append(
                {
                    "atoms": len(structure.species),
                    "route": name,
                    "ms_per_step": round(1e3 * min(measured), 2),
                    "speedup": round(base / min(measured), 2),
                    "median_ms": round(1e3 * float(np.median(measured)), 2),
                }
            )
    rows.append({"atoms": None, "route": "export (once)", "ms_per_step": round(1e3 * export_s)})
    if compile_s is not None:
        rows.append(
            {"atoms": None, "route": "compile (once)", "ms_per_step": round(1e3 * compile_s)}
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (~40 s)")
    args = parse_benchmark_arguments(parser)
    rows = md_rows(args.repeats, not args.no_compile)
    report("md_step", setup_info(dtype="float64", device="cpu", data="TiO2 rutile"), rows)


if __name__ == "__main__":
    main()
