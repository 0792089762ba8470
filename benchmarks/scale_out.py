"""Larger-than-memory and multi-process training on a generated EMT alloy set.

Run: ``python -m benchmarks.scale_out [--structures 20000] [--epochs 1] [--forces 0.1]``.
Prints JSON, then a table. Setup (issue 6): random periodic Cu/Ni/Au fcc cells of 8–64 atoms
labelled with ASE's EMT calculator (``aenet_fn.examples.emt_alloys``), descriptor rad 8/5.0 Å,
ang 4/4.0 Å, 2×(16, tanh) networks, Adam, batch 32, float64, CPU, one torch thread per
process; energy-only, or with ``--forces F`` the epochs from disk also train forces (weight
0.1) on a fraction ``F`` of the structures, their local derivatives computed per batch (not
persisted: at 10⁵ structures they would take 165 GB). Each measurement runs in its own process
so that its peak RSS is its own:

* database build throughput (structures/s), plain and with persisted features;
* training epoch time from the database kept on disk (``DatabaseSource``: each batch's
  persisted features read when drawn) with 0, 1 and 2 DataLoader workers, and the peak RSS at
  the full size, a tenth and a hundredth of it (bounded memory and a flat cost per structure);
* one training process vs two gloo processes (``torchrun``) on the persisted features.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import ROOT, peak_rss_mib, report, setup_info

REPEATS = ((2, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 3), (2, 2, 4))  # 8–64 atoms
ARCH = "2x(16,tanh) per species"


NETWORK = [(16, "tanh"), (16, "tanh")]
"""Hidden layers of every species' network in the training measurements."""


def _row(mode: str, n_structures: int, seconds: float) -> dict:
    """One result row: throughput and this process's peak memory so far."""
    return {
        "mode": mode,
        "structures": n_structures,
        "seconds": seconds,
        "structures_per_s": n_structures / seconds,
        "peak_rss_mib": peak_rss_mib(),
    }


def _descriptor():
    import aenet_fn as af
    from aenet_fn.examples import ALLOY_SPECIES

    return af.ChebyshevParams(ALLOY_SPECIES, 8, 5.0, 4, 4.0, min_cutoff=0.5)


def build(folder: Path, n_structures: int) -> dict:
    """Generate the structures, then build the plain and the persisted-features databases."""
    from aenet_fn.examples import emt_alloys
    from aenet_fn.io.database import build_database

    start = time.perf_counter()
    structures = emt_alloys(n_structures, seed=0, repeats=REPEATS)
    generate_s = time.perf_counter() - start
    rows = [_row("generate (EMT)", n_structures, generate_s)]
    for name, persist in (("plain", False), ("features", True)):
        start = time.perf_counter()
        build_database(
            folder / f"{name}.h5",
            structures,
            descriptor_params=_descriptor() if persist else None,
            persist_features=persist,
            show_progress=False,
        )
        seconds = time.perf_counter() - start
        mode = f"build, {'persisted features' if persist else 'structures only'}"
        rows.append(_row(mode, n_structures, seconds))
    return rows


def train_from_disk(
    path: Path, workers: int, epochs: int, limit: int | None, force_fraction: float
) -> dict:
    """Epoch time and peak RSS of training from the on-disk database (persisted features,
    batches read as drawn: ``DatabaseSource``) with ``workers``; forces trained on
    ``force_fraction`` of the structures (0: energy only)."""
    import aenet_fn as af
    from aenet_fn.driver.database_source import DatabaseSource

    params = _descriptor()
    entries = None if limit is None else range(limit)  # small reference size
    forces = force_fraction > 0
    source = DatabaseSource(params, path, entries, with_derivatives=forces)
    start = time.perf_counter()
    arch = {s: NETWORK for s in params.species}
    model = af.init_model(params, arch, source, seed=0)
    statistics_s = time.perf_counter() - start
    config = af.TrainConfig(
        epochs=epochs,
        batch_size=32,
        num_workers=workers,
        prefetch_factor=4,
        persistent_workers=True,
        force_weight=0.1 if forces else 0.0,
        force_fraction=force_fraction if forces else 1.0,
    )
    start = time.perf_counter()
    af.fit(af.init_train_state(model, source, config), source, None, config)
    seconds = (time.perf_counter() - start) / epochs
    source.close()
    trained = f"forces of {force_fraction:.0%}" if forces else "energies"
    mode = f"epoch from disk ({trained}), {workers} workers (statistics {statistics_s:.1f} s)"
    return _row(mode, source.n_structures, seconds)


def train_in_memory(path: Path, epochs: int) -> dict:
    """Epoch time of energy-only training on the persisted features, in every process of the
    run (1 process, or each rank under torchrun)."""
    import torch.distributed as dist

    import aenet_fn as af
    from aenet_fn.torch_training import HDF5StructureDataset

    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    dataset = HDF5StructureDataset(None, path, mode="load")
    data = dataset.featurized(False, torch.float64)
    params = dataset.descriptor.params
    arch = {s: NETWORK for s in params.species}
    model = af.init_model(params, arch, data, seed=0)
    config = af.TrainConfig(epochs=epochs, batch_size=32)
    state = af.init_train_state(model, data, config)
    start = time.perf_counter()
    af.fit(state, data, None, config)
    seconds = (time.perf_counter() - start) / epochs
    world = dist.get_world_size() if distributed else 1
    if distributed:
        dist.destroy_process_group()
    return _row(
        f"epoch in memory, {world} gloo process{'es' if world > 1 else ''}",
        data.n_structures,
        seconds,
    )


def _child(*arguments: str, torchrun: bool = False) -> dict | list:
    """Run one measurement in a fresh process (under torchrun for two gloo processes); its
    result is also echoed to stderr at once, so a long run shows its progress."""
    result = _run_child(arguments, torchrun)
    print(json.dumps(result), file=sys.stderr, flush=True)
    return result


def _run_child(arguments: tuple[str, ...], torchrun: bool) -> dict | list:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = (launcher if torchrun else [sys.executable]) + [__file__, *arguments]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=environment)
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    """Run every measurement in its own process; print JSON and a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--structures", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--forces", type=float, default=0.0, help="force-trained fraction")
    parser.add_argument("--workers", default="0,1,2", help="DataLoader workers to time")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # one thread per process: the training process, each DataLoader worker and each gloo rank
    # (on a shared 2-core machine two threads per process mostly wait for each other)
    torch.set_num_threads(1)
    if args.child:
        kind, folder = args.child[0], Path(args.child[1])
        if kind == "build":
            result = build(folder, args.structures)
        elif kind == "disk":
            limit = None if args.child[3] == "all" else int(args.child[3])
            workers = int(args.child[2])
            path = folder / "features.h5"
            result = train_from_disk(path, workers, args.epochs, limit, args.forces)
        else:
            result = train_in_memory(folder / "features.h5", args.epochs)
        if int(os.environ.get("RANK", 0)) == 0:
            print(json.dumps(result))
        return
    common = ["--structures", str(args.structures), "--epochs", str(args.epochs)]
    common += ["--forces", str(args.forces), "--child"]
    with tempfile.TemporaryDirectory() as folder:
        rows = _child(*common, "build", folder)
        for workers in args.workers.split(","):
            rows.append(_child(*common, "disk", folder, workers, "all"))
        for part in (10, 100):  # the same run on a tenth and a hundredth of the data
            rows.append(_child(*common, "disk", folder, "0", str(max(1, args.structures // part))))
        rows.append(_child(*common, "memory", folder))
        rows.append(_child(*common, "memory", folder, torchrun=True))
    report(
        "scale_out",
        setup_info(
            dtype="float64",
            device="cpu",
            arch=ARCH,
            optimizer="adam",
            batch=32,
            threads=1,
            force_fraction=args.forces,
        ),
        rows,
    )


if __name__ == "__main__":
    main()
