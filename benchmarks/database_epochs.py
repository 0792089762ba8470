"""Training epochs read from an HDF5 database against the same epochs in memory.

Run: ``python -m benchmarks.database_epochs [--structures 20000] [--force-structures 2000]``.
Prints JSON, then a table. Generated EMT Cu/Ni/Au cells of 8–64 atoms
(``aenet_fn.examples.emt_alloys``), descriptor rad 8/5.0 Å, ang 4/4.0 Å, 2×(16, tanh)
networks, Adam, batch 32, float64, CPU, one torch thread. The database is built with the
default storage (gzip, small chunks). Per case, the epochs of every variant alternate (best of
``--rounds``, two epochs each):

* energy only, ``--structures`` structures with persisted features: in memory (the
  ``torch.func`` route, the base of the ratios, and the automatic route, whose per-run set-up
  is included, spread over the two epochs), and read from the database with 0 and 2
  DataLoader workers (:class:`~aenet_fn.driver.database_source.DatabaseSource`, which trains on
  the ``torch.func`` route);
* energies and forces (force weight 0.1), ``--force-structures`` structures: in memory, and
  from databases with persisted local derivatives or with features only (derivatives
  recomputed per batch from the positions).

Also reported: build rate and file size per structure of each database.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import aenet_fn as af
from aenet_fn.driver.database_source import DatabaseSource
from aenet_fn.examples import ALLOY_SPECIES, emt_alloys
from aenet_fn.io.database import build_database, open_database
from benchmarks._common import report, setup_info

REPEATS = ((2, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 3), (2, 2, 4))  # 8–64 atoms
PARAMS = af.ChebyshevParams(ALLOY_SPECIES, 8, 5.0, 4, 4.0, min_cutoff=0.5)
ARCH = {s: [(16, "tanh"), (16, "tanh")] for s in ALLOY_SPECIES}


def build(path: Path, structures: list[af.Structure], derivatives: bool) -> dict[str, Any]:
    """Build a database with persisted features (and derivatives); its rate and size."""
    start = time.perf_counter()
    build_database(
        path,
        structures,
        descriptor_params=PARAMS,
        persist_features=True,
        persist_force_derivatives=derivatives,
        show_progress=False,
    )
    seconds = time.perf_counter() - start
    return {
        "case": f"build, features{' and derivatives' if derivatives else ''}",
        "structures": len(structures),
        "structures_per_s": round(len(structures) / seconds, 1),
        "kB_per_structure": round(path.stat().st_size / len(structures) / 1e3, 1),
    }


def epochs(
    label: str, variants: dict[str, tuple[Any, dict]], force_weight: float, rounds: int
) -> list[dict[str, Any]]:
    """Best epoch time of every variant ``name -> (split, TrainConfig options)``, alternating
    the variants in each round; ratios against the first variant."""
    first = next(iter(variants.values()))[0]
    model = af.init_model(PARAMS, ARCH, first, seed=0)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (split, options) in variants.items():
            config = af.TrainConfig(
                epochs=2,
                batch_size=32,
                force_weight=force_weight,
                persistent_workers=True,
                **options,
            )
            state = af.init_train_state(model, split, config)
            start = time.perf_counter()
            af.fit(state, split, None, config)
            times[name].append((time.perf_counter() - start) / 2)
    base = min(next(iter(times.values())))
    return [
        {
            "case": f"{label}: {name}",
            "structures": first.n_structures,
            "epoch_s": round(min(measured), 3),
            "ratio": round(min(measured) / base, 2),
        }
        for name, measured in times.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", type=int, default=20000)
    parser.add_argument("--force-structures", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    structures = emt_alloys(max(args.structures, args.force_structures), seed=0, repeats=REPEATS)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        energy_db = Path(folder) / "features.h5"
        rows.append(build(energy_db, structures[: args.structures], derivatives=False))
        with open_database(energy_db) as db:
            memory = db.featurized(PARAMS, with_derivatives=False, dtype=torch.float64)
        lazy = DatabaseSource(PARAMS, energy_db, with_derivatives=False)
        rows += epochs(
            "energy",
            {
                "in memory, route func": (memory, {"route": "func"}),
                "in memory, automatic route": (memory, {}),
                "database, 0 workers": (lazy, {}),
                "database, 2 workers": (lazy, {"num_workers": 2}),
            },
            0.0,
            args.rounds,
        )
        lazy.close()
        force_db = Path(folder) / "derivatives.h5"
        few = structures[: args.force_structures]
        rows.append(build(force_db, few, derivatives=True))
        memory = af.featurize_structures(PARAMS, few, with_derivatives=True)
        stored = DatabaseSource(PARAMS, force_db, with_derivatives=True)
        recomputed = DatabaseSource(
            PARAMS, energy_db, range(args.force_structures), with_derivatives=True
        )
        rows += epochs(
            "forces",
            {
                "in memory, route func": (memory, {"route": "func"}),
                "in memory, automatic route": (memory, {}),
                "database, derivatives read": (stored, {}),
                "database, derivatives recomputed": (recomputed, {}),
                "database, derivatives read, 2 workers": (stored, {"num_workers": 2}),
            },
            0.1,
            args.rounds,
        )
        stored.close()
        recomputed.close()
    report("database_epochs", setup_info(dtype="float64", device="cpu", threads=1), rows)


if __name__ == "__main__":
    main()
