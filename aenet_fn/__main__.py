"""Command line: ``aenet-fn demo`` (also ``python -m aenet_fn demo``)."""

from __future__ import annotations

import argparse
import sys
import time

import torch
from tqdm import tqdm

from aenet_fn.batch import collate
from aenet_fn.descriptor import ChebyshevParams, featurize
from aenet_fn.examples import ALLOY_SPECIES, emt_alloys


def demo(n_structures: int, chunk: int = 10) -> None:
    """Generate the built-in EMT alloy data set and featurize it, with a progress bar and a
    summary. (Training arrives with the training core; until then the demo stops at features.)"""
    print(f"aenet_fn demo: generating {n_structures} Cu/Ni/Au structures with ASE's EMT ...")
    structures = emt_alloys(n_structures)
    params = ChebyshevParams(
        species=ALLOY_SPECIES, rad_order=10, rad_cutoff=6.0, ang_order=4, ang_cutoff=4.0
    )
    start = time.perf_counter()
    blocks = []
    for first in tqdm(range(0, len(structures), chunk), desc="featurize", unit="batch"):
        batch = collate(structures[first : first + chunk], species=params.species)
        blocks.append(featurize(params, batch))
    seconds = time.perf_counter() - start
    features = torch.cat(blocks)
    energies = torch.tensor([s.energy for s in structures])
    print(f"structures        {len(structures)}")
    print(f"atoms             {features.shape[0]}")
    print(f"features per atom {features.shape[1]}  (species {list(params.species)})")
    print(f"featurized in     {seconds:.3f} s  ({features.shape[0] / seconds:,.0f} atoms/s)")
    print(f"feature range     [{float(features.min()):.3f}, {float(features.max()):.3f}]")
    print(f"EMT energies      [{float(energies.min()):.3f}, {float(energies.max()):.3f}] eV")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``aenet-fn`` command."""
    parser = argparse.ArgumentParser(
        prog="aenet-fn", description="ænet-type potentials with torch.func"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run_demo = commands.add_parser("demo", help="featurize the built-in EMT alloy data set")
    run_demo.add_argument("--structures", type=int, default=60, help="number of structures")
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.structures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
