"""The main job, ``aenet-fn demo`` (:func:`run_demo` and the command's handler): a committee
trained on energies and forces of the built-in EMT Cu/Ni/Au data set, its errors, plots and a
short molecular-dynamics check.

The demo goes through the same path as ``aenet-fn train``: it writes the generated structures
(``data/emt-alloys.xsf``) and a configuration (``demo.toml``) into the output folder, validates
the configuration and trains from it, so ``aenet-fn train aenet-fn-output/demo.toml --overwrite``
repeats the training. Then it runs NVE molecular dynamics (velocity Verlet) of a new, unrattled
alloy cell with the committee as ASE calculator and reports the energy drift and the committee's
force spread.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase import units
from ase.md.velocitydistribution import Stationary
from ase.md.verlet import VelocityVerlet

from aenet_fn.calculator import AenetCalculator, thermalize_momenta
from aenet_fn.cli.config import parse_config
from aenet_fn.cli.train import format_summary, run_training
from aenet_fn.core.structure import Structure
from aenet_fn.examples import ALLOY_SPECIES, emt_alloys
from aenet_fn.io.ase_io import to_ase
from aenet_fn.io.atomic import atomic_write_text
from aenet_fn.io.xsf import write_xsf


@dataclass(frozen=True)
class DemoSize:
    """How much the demo does: structures, their repeats of the 4-atom fcc cell, epochs, MD
    steps."""

    n_structures: int
    repeats: tuple[tuple[int, int, int], ...]
    epochs: int
    md_steps: int


DEFAULT = DemoSize(n_structures=80, repeats=((2, 2, 2), (2, 2, 3)), epochs=100, md_steps=300)
FAST = DemoSize(n_structures=12, repeats=((2, 2, 2),), epochs=3, md_steps=20)
MEMBERS = 4
MD_TIMESTEP_FS = 1.0
MD_TEMPERATURE_K = 300.0


def demo_tables(size: DemoSize, seed: int = 0) -> dict[str, Any]:
    """The demo's configuration (the tables of ``demo.toml``), relative to the output folder."""
    return {
        "data": {"paths": ["data/emt-alloys.xsf"]},
        "descriptor": {
            "species": list(ALLOY_SPECIES),
            "rad_order": 6,
            "rad_cutoff": 4.5,
            "ang_order": 2,
            "ang_cutoff": 3.5,
            "min_cutoff": 0.5,
        },
        "network": {"default": [[12, "tanh"], [12, "tanh"]]},
        "training": {
            "iterations": size.epochs,
            "testpercent": 20,
            "split_seed": seed,
            "seed": seed,
            "force_weight": 0.5,
            "use_scheduler": True,
            "scheduler_patience": 5,
            # EMT energies are relative to the elemental fcc crystals already
            "atomic_energies": dict.fromkeys(ALLOY_SPECIES, 0.0),
            "checkpoint_dir": False,
            "method": "adam",
            "adam": {"mu": 0.01, "batchsize": 16},
        },
        "committee": {"members": MEMBERS, "base_seed": seed, "shared_batches": True},
        "output": {"directory": "."},
    }


def toml_text(tables: Mapping[str, Any]) -> str:
    """``tables`` as TOML: one ``[section]`` per top-level key, nested mappings as sub-tables;
    values are strings, numbers, booleans or lists of them."""
    lines: list[str] = []

    def table(name: str, values: Mapping[str, Any]) -> None:
        lines.append(f"[{name}]")
        lines.extend(
            f"{key} = {json.dumps(value)}"
            for key, value in values.items()
            if not isinstance(value, Mapping)
        )
        for key, value in values.items():
            if isinstance(value, Mapping):
                lines.append("")
                table(f"{name}.{key}", value)

    for section, values in tables.items():
        if lines:
            lines.append("")
        table(section, values)
    return "\n".join(lines) + "\n"


def md_check(potential: Any, structure: Structure, steps: int, seed: int = 0) -> dict[str, float]:
    """NVE velocity-Verlet MD of ``structure`` with ``potential`` as ASE calculator
    (:data:`MD_TIMESTEP_FS` fs steps, Maxwell-Boltzmann start at :data:`MD_TEMPERATURE_K` K).

    Returns ``drift`` (final minus initial total energy per atom, eV/atom), ``max_deviation``
    (largest ``|E_tot − E_tot(0)|`` per atom, eV/atom), the final ``temperature`` (K) and the
    mean committee force spread ``force_uncertainty`` (eV/Å; NaN for a single potential)."""
    atoms = to_ase(structure)
    atoms.calc = AenetCalculator(potential)
    thermalize_momenta(atoms, MD_TEMPERATURE_K, rng=np.random.default_rng(seed))
    Stationary(atoms)
    totals, spreads = [], []

    def observe() -> None:
        totals.append(atoms.get_total_energy())
        if "forces_std" in atoms.calc.results:
            spreads.append(float(np.mean(atoms.calc.results["forces_std"])))

    dynamics = VelocityVerlet(atoms, timestep=MD_TIMESTEP_FS * units.fs)
    dynamics.attach(observe, interval=1)
    observe()
    dynamics.run(steps)
    n = len(atoms)
    return {
        "atoms": n,
        "steps": steps,
        "drift": (totals[-1] - totals[0]) / n,
        "max_deviation": max(abs(e - totals[0]) for e in totals) / n,
        "temperature": float(atoms.get_temperature()),
        "force_uncertainty": float(np.mean(spreads)) if spreads else math.nan,
    }


def run_demo(
    fast: bool = False,
    show_progress: bool = True,
    output: str | Path = "aenet-fn-output",
    seed: int = 0,
    threads: int = 1,
) -> dict[str, Any]:
    """Generate the EMT data set, train a :data:`MEMBERS`-member committee with forces
    (vmapped), print the errors table, write the plots and run the MD check. Returns
    ``{"metrics": per split, "md": md_check(...), "seconds": wall time}``.

    ``threads`` sets torch's intra-op threads: one by default, because the demo's tensors are
    small (the steps are bound by per-operation overhead) and several threads stall badly when
    the cores are shared with other work."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(FAST if fast else DEFAULT, show_progress, Path(output).resolve(), seed)
    finally:
        torch.set_num_threads(before)


def _run(size: DemoSize, show_progress: bool, out: Path, seed: int) -> dict[str, Any]:
    start = time.perf_counter()
    print(
        f"aenet_fn demo: {size.n_structures} Cu/Ni/Au cells labelled with ASE's EMT calculator, "
        f"a committee of {MEMBERS} trained on energies and forces for {size.epochs} epochs"
    )
    structures = emt_alloys(size.n_structures, seed=seed, repeats=size.repeats)
    n_atoms = sum(s.n_atoms for s in structures)
    print(f"generated {n_atoms} atoms in {time.perf_counter() - start:.1f} s")
    (out / "data").mkdir(parents=True, exist_ok=True)
    write_xsf(out / "data" / "emt-alloys.xsf", structures)
    tables = demo_tables(size, seed)
    config_path = out / "demo.toml"
    header = (
        "# Written by `aenet-fn demo`; repeat the training with\n"
        f"#   aenet-fn train {config_path} --overwrite\n\n"
    )
    atomic_write_text(config_path, header + toml_text(tables))
    run = parse_config(tables, out, str(config_path))
    result = run_training(run, overwrite=True, show_progress=show_progress)
    print(f"featurized, trained and evaluated in {result.seconds:.1f} s\n")
    print(format_summary(result.metrics))
    md_start = time.perf_counter()
    cell = emt_alloys(1, seed=seed + 1, repeats=((2, 2, 2),), rattle=0.0)[0]
    md = md_check(result.potential, cell, size.md_steps, seed)
    print(
        f"\nMD check (NVE, {md['atoms']} atoms, {md['steps']} steps of {MD_TIMESTEP_FS} fs from "
        f"{MD_TEMPERATURE_K:.0f} K, {time.perf_counter() - md_start:.1f} s): energy drift "
        f"{1000 * md['drift']:+.4f} meV/atom (largest deviation "
        f"{1000 * md['max_deviation']:.4f} meV/atom), final {md['temperature']:.0f} K, "
        f"mean committee force spread {md['force_uncertainty']:.4f} eV/Å"
    )
    seconds = time.perf_counter() - start
    print(
        f"\nwrote {out}: committee (committee_metadata.json, member_*/model.pt), "
        f"training_summary.png, parity.png, energies.*.0, metrics.json, demo.toml "
        f"in {seconds:.1f} s"
    )
    test = result.metrics.get("test", {})
    if not all(math.isfinite(v) for v in (*test.values(), md["drift"])):
        raise RuntimeError("demo: training or MD produced non-finite numbers")
    return {"metrics": result.metrics, "md": md, "seconds": seconds}


# ---------------------------------------------------------------------------------------------
# the command


def _cmd_demo(args: argparse.Namespace) -> int:
    threads = 1 if args.threads is None else args.threads
    run_demo(args.fast, not args.no_progress, args.output, threads=threads)
    return 0
